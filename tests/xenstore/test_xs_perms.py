"""Permissions as cxenstored applies them: guests (connect_domain) against each other and dom0."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from backends.xenstore.client import Perm, XenStoreError

from .conftest import Env

EnvFactory = Callable[..., AbstractAsyncContextManager[Env]]


async def _err(coro: object) -> str:
    with pytest.raises(XenStoreError) as ei:
        await coro  # type: ignore[misc]
    return ei.value.name


async def test_domain_home_and_relative_paths(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5 = await env.guest(5)
        assert await env.dom0.get_perms("/local/domain/5") == [Perm(5, "n")]
        await g5.write("data/x", "1")  # relative to /local/domain/5
        assert await env.dom0.read("/local/domain/5/data/x") == b"1"
        assert await g5.read("/local/domain/5/data/x") == b"1"
        # Created by the guest: owned by it, ACL inherited from the parent.
        assert await g5.get_perms("data/x") == [Perm(5, "n")]
        assert await g5.get_domain_path(5) == "/local/domain/5"
        assert await _err(g5.read("data/missing")) == "ENOENT"


async def test_guest_cannot_touch_other_guest_or_dom0(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5, g6 = await env.guest(5), await env.guest(6)
        await g5.write("secret", "s5")
        await env.dom0.write("/vm/cfg", "dom0 only")
        for c, path in ((g6, "/local/domain/5/secret"), (g5, "/vm/cfg"), (g5, "/")):
            assert await _err(c.read(path)) == "EACCES"
            assert await _err(c.directory(path)) == "EACCES"
            assert await _err(c.get_perms(path)) == "EACCES"
        assert await _err(g6.write("/local/domain/5/secret", "x")) == "EACCES"
        assert await _err(g6.write("/local/domain/5/new", "x")) == "EACCES"
        assert await _err(g6.rm("/local/domain/5/secret")) == "EACCES"
        assert await _err(g6.mkdir("/local/domain/5/d")) == "EACCES"
        assert await _err(g5.write("/vm/cfg", "x")) == "EACCES"
        assert await _err(g5.write("/newtop", "x")) == "EACCES"
        assert await _err(g5.rm("/vm")) == "EACCES"
        # A missing node under a tree the guest cannot read gives EACCES, not ENOENT: nothing leaks.
        assert await _err(g6.read("/local/domain/5/nothing/here")) == "EACCES"
        assert await _err(g6.exists("/local/domain/5/secret")) == "EACCES"
        # Privileged operations.
        assert await _err(g5.introduce_domain(7)) == "EACCES"
        assert await _err(g5.release_domain(6)) == "EACCES"
        assert await _err(g5.is_domain_introduced(6)) == "EACCES"
        assert await _err(g5.control("quota")) == "EACCES"
        # Nothing changed.
        assert await env.dom0.read("/local/domain/5/secret") == b"s5"
        assert await env.dom0.read("/vm/cfg") == b"dom0 only"
        assert await env.dom0.directory("/local/domain/5") == ["secret"]


async def test_access_after_chmod(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5, g6 = await env.guest(5), await env.guest(6)
        await env.dom0.write("/vm/a", "v")
        await env.dom0.set_perms("/vm/a", [Perm(0, "n"), Perm(5, "r")])
        assert await g5.read("/vm/a") == b"v"
        assert await _err(g5.write("/vm/a", "w")) == "EACCES"
        assert await _err(g6.read("/vm/a")) == "EACCES"
        # Default access (first entry) applies to everyone not listed.
        await env.dom0.set_perms("/vm/a", [Perm(0, "r"), Perm(6, "n")])
        assert await g5.read("/vm/a") == b"v"
        assert await _err(g6.read("/vm/a")) == "EACCES"
        # Write access, and nodes created below: the creating guest owns them, the ACL is inherited.
        await env.dom0.set_perms("/vm/a", [Perm(0, "n"), Perm(5, "b")])
        await g5.write("/vm/a", "by5")
        await g5.write("/vm/a/child/grandchild", "c")
        assert await env.dom0.get_perms("/vm/a/child") == [Perm(5, "n"), Perm(5, "b")]
        assert await env.dom0.get_perms("/vm/a/child/grandchild") == [Perm(5, "n"), Perm(5, "b")]
        # Write-only.
        await env.dom0.set_perms("/vm/a", [Perm(0, "n"), Perm(6, "w")])
        await g6.write("/vm/a", "by6")
        assert await _err(g6.read("/vm/a")) == "EACCES"
        # dom0 creating below a guest's node keeps the guest as owner (privileged creators do not take it).
        await env.dom0.write("/local/domain/5/device/vbd/1/state", "1")
        assert (await env.dom0.get_perms("/local/domain/5/device/vbd/1/state"))[0] == Perm(5, "n")


async def test_guest_chmod_rules(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5, g6 = await env.guest(5), await env.guest(6)
        await g5.write("shared", "for six")
        await g5.set_perms("shared", [Perm(5, "n"), Perm(6, "r")])
        assert await g6.read("/local/domain/5/shared") == b"for six"
        assert await _err(g6.set_perms("/local/domain/5/shared", [Perm(5, "b")])) == "EACCES"
        # Only a privileged domain may give a node away.
        assert await _err(g5.set_perms("shared", [Perm(6, "n")])) == "EPERM"
        # Write access through the ACL is not ownership.
        await env.dom0.write("/vm/b", "x")
        await env.dom0.set_perms("/vm/b", [Perm(0, "n"), Perm(5, "b")])
        assert await _err(g5.set_perms("/vm/b", [Perm(0, "b")])) == "EACCES"
        # At most 5 entries for a guest (cxenstored's perms-per-node quota).
        too_many = [Perm(5, "n"), *(Perm(d, "r") for d in range(10, 15))]
        assert await _err(g5.set_perms("shared", too_many)) == "ENOSPC"
        await env.dom0.set_perms("/vm/b", [Perm(0, "n"), *(Perm(d, "r") for d in range(1, 9))])
        assert len(await env.dom0.get_perms("/vm/b")) == 9


async def test_release_domain_cleans_up(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5 = await env.guest(5)
        await env.dom0.write("/vm/a", "")
        await env.dom0.set_perms("/vm/a", [Perm(0, "n"), Perm(5, "b")])
        await g5.write("/vm/a/mine", "x")
        assert env.server.is_introduced(5)
        await env.server.release_domain(5)
        assert not env.server.is_introduced(5)
        assert not await env.dom0.exists("/local/domain/5")
        # Its other nodes now belong to dom0, so a later domain 5 does not inherit them.
        assert (await env.dom0.get_perms("/vm/a/mine"))[0] == Perm(0, "n")
        assert env.server.store.owned_count(5) == 0
        # Its connection was closed.
        with pytest.raises(XenStoreError) as ei:
            await g5.read("/local/domain/5")
        assert ei.value.name in ("ECONNRESET", "EPIPE")


async def test_wire_introduce_release(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        assert not await env.dom0.is_domain_introduced(12)
        await env.dom0.introduce_domain(12, 0x1234, 3)
        assert await env.dom0.is_domain_introduced(12)
        assert await env.dom0.get_perms("/local/domain/12") == [Perm(12, "n")]
        await env.dom0.resume_domain(12)
        await env.dom0.release_domain(12)
        assert not await env.dom0.is_domain_introduced(12)
        assert await _err(env.dom0.release_domain(12)) == "ENOENT"
        assert await _err(env.dom0.resume_domain(12)) == "ENOENT"
        assert await _err(env.dom0.get_domain_path(70000)) == "EINVAL"
