"""Transactions (isolation, EAGAIN on conflict, retry) and watches (initial event, children, removal,
fire-after-commit, permissions, relative paths, special paths)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from backends.xenstore.client import Perm, Transaction, Watch, XenStoreError

from .conftest import Env

EnvFactory = Callable[..., AbstractAsyncContextManager[Env]]


async def _no_event(w: Watch, wait: float = 0.1) -> None:
    with pytest.raises(asyncio.TimeoutError):
        got = await w.next(wait)
        pytest.fail(f"unexpected event {got}")


# --- transactions ------------------------------------------------------------------------------------------


async def test_transaction_isolation_and_commit(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        other = await env.client()
        await env.dom0.write("/c/keep", "k")
        t = await env.dom0.transaction_start()
        await t.write("/c/new/deep", "n")
        await t.rm("/c/keep")
        assert await t.read("/c/new/deep") == b"n"
        assert not await t.exists("/c/keep")
        assert await t.directory("/c") == ["new"]
        # Outside the transaction nothing has happened yet.
        assert await other.read("/c/keep") == b"k"
        assert not await other.exists("/c/new")
        await t.commit()
        assert await other.directory("/c") == ["new"]
        assert await other.read("/c/new/deep") == b"n"
        with pytest.raises(XenStoreError):
            await t.read("/c/new")  # ended


async def test_transaction_abort(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        t = await env.dom0.transaction_start()
        await t.write("/ab/x", "1")
        await t.abort()
        assert not await env.dom0.exists("/ab")


async def test_conflict_gives_eagain(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        other = await env.client()
        await env.dom0.write("/c/v", "1")
        t = await env.dom0.transaction_start()
        assert await t.read("/c/v") == b"1"
        await other.write("/c/v", "2")  # changes what t has read
        await t.write("/c/v", "from-tx")
        with pytest.raises(XenStoreError) as ei:
            await t.commit()
        assert ei.value.name == "EAGAIN"
        assert await other.read("/c/v") == b"2"
        # A node the transaction found absent and someone else created is a conflict too.
        t = await env.dom0.transaction_start()
        assert not await t.exists("/c/w")
        await other.write("/c/w", "x")
        await t.write("/c/z", "1")
        with pytest.raises(XenStoreError) as ei:
            await t.commit()
        assert ei.value.name == "EAGAIN"
        assert not await other.exists("/c/z")
        # Unrelated changes do not conflict.
        t = await env.dom0.transaction_start()
        await t.read("/c/v")
        await other.write("/elsewhere", "x")
        await t.write("/c/v", "3")
        await t.commit()
        assert await other.read("/c/v") == b"3"


async def test_transaction_retry_reruns_fn(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        other = await env.client()
        await env.dom0.write("/cnt", "0")
        runs = 0

        async def body(t: Transaction) -> int:
            nonlocal runs
            runs += 1
            v = int(await t.read("/cnt"))
            if runs == 1:
                await other.write("/cnt", "100")  # conflicting change during the first run
            await t.write("/cnt", str(v + 1))
            return v + 1

        assert await env.dom0.transaction(body) == 101
        assert runs == 2
        assert await other.read("/cnt") == b"101"

        async def always_conflicts(t: Transaction) -> None:
            await t.read("/cnt")
            await other.write("/cnt", "x")
            await t.write("/cnt", "y")

        with pytest.raises(XenStoreError) as ei:
            await env.dom0.transaction(always_conflicts, retries=2)
        assert ei.value.name == "EAGAIN"
        assert env.server.stats()["transactions"] == 0

        async def fails(t: Transaction) -> None:
            await t.write("/fail", "x")
            raise ValueError("boom")

        with pytest.raises(ValueError):
            await env.dom0.transaction(fails)
        assert not await env.dom0.exists("/fail")
        await asyncio.sleep(0.05)
        assert env.server.stats()["transactions"] == 0  # aborted


async def test_concurrent_increments(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        clients = [env.dom0, *[await env.client() for _ in range(4)]]
        await env.dom0.write("/n", "0")

        async def inc(t: Transaction) -> None:
            v = int(await t.read("/n"))
            await t.write("/n", str(v + 1))

        await asyncio.gather(*(c.transaction(inc, retries=200) for c in clients for _ in range(10)))
        assert await env.dom0.read("/n") == b"50"


async def test_transaction_protocol_errors(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        with pytest.raises(XenStoreError) as ei:
            await env.dom0.read("/", tx=4242)
        assert ei.value.name == "ENOENT"
        t = await env.dom0.transaction_start()
        with pytest.raises(XenStoreError) as ei:
            await env.dom0._request(6, b"\0", t.id)  # TRANSACTION_START inside a transaction
        assert ei.value.name == "EBUSY"
        # Transaction ids are per connection.
        other = await env.client()
        with pytest.raises(XenStoreError) as ei:
            await other.read("/", tx=t.id)
        assert ei.value.name == "ENOENT"
        await t.abort()


# --- watches -----------------------------------------------------------------------------------------------


async def test_watch_initial_child_and_removal(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        await env.dom0.write("/r/a/b", "1")
        w = await env.dom0.watch("/r")
        assert await w.next(1) == "/r"  # initial event
        wb = await env.dom0.watch("/r/a/b")
        assert await wb.next(1) == "/r/a/b"
        await env.dom0.write("/r/a/b", "2")
        assert await w.next(1) == "/r/a/b"
        assert await wb.next(1) == "/r/a/b"
        await env.dom0.write("/r2", "x")  # a sibling whose name starts the same is not below /r
        await _no_event(w)
        await env.dom0.rm("/r/a")
        # Watches on nodes inside a removed subtree fire for their own path; the ones above see only the
        # removed root (cxenstored's "exact" events).
        assert await wb.next(1) == "/r/a/b"
        assert await w.next(1) == "/r/a"
        await _no_event(w)
        await w.close()
        await env.dom0.write("/r/again", "1")
        assert [p async for p in w] == []  # closed: iteration ends
        await wb.close()
        assert env.server.stats()["watches"] == 0


async def test_watch_fires_after_commit(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        w = await env.dom0.watch("/txw")
        assert await w.next(1) == "/txw"
        t = await env.dom0.transaction_start()
        await t.write("/txw/a", "1")
        await t.write("/txw/b", "2")
        await _no_event(w)
        await t.commit()
        assert {await w.next(1), await w.next(1)} == {"/txw/a", "/txw/b"}
        t = await env.dom0.transaction_start()
        await t.write("/txw/c", "3")
        await t.abort()
        await _no_event(w)


async def test_guest_watch_relative_and_permissions(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5, g6 = await env.guest(5), await env.guest(6)
        w5 = await g5.watch("device")  # relative: /local/domain/5/device
        assert await w5.next(1) == "device"
        await env.dom0.write("/local/domain/5/device/vbd/1/state", "1")
        assert await w5.next(1) == "device/vbd/1/state"
        # A guest may watch anything, but only sees changes to nodes it may read (or their parent).
        w6 = await g6.watch("/local/domain/5")
        assert await w6.next(1) == "/local/domain/5"
        await g5.write("device/x", "1")
        assert await w5.next(1) == "device/x"
        await _no_event(w6)
        await g5.set_perms("device/x", [Perm(5, "n"), Perm(6, "r")])
        assert await w6.next(1) == "/local/domain/5/device/x"
        # Losing access still tells the watcher (cxenstored checks the old permissions too).
        await g5.set_perms("device/x", [Perm(5, "n")])
        assert await w6.next(1) == "/local/domain/5/device/x"
        await g5.write("device/x", "2")
        await _no_event(w6)


async def test_special_watches(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        wi = await env.dom0.watch("@introduceDomain")
        wr = await env.dom0.watch("@releaseDomain")
        assert await wi.next(1) == "@introduceDomain"
        assert await wr.next(1) == "@releaseDomain"
        g = await env.guest(7)
        gw = await g.watch("@releaseDomain")  # guests get the initial event but no others by default
        assert await gw.next(1) == "@releaseDomain"
        assert await wi.next(1) == "@introduceDomain"
        await env.server.release_domain(7)
        assert await wr.next(1) == "@releaseDomain"
        with pytest.raises(XenStoreError):
            await gw.next(1)  # its connection went with the domain
        await env.server.introduce_domain(8)
        g8 = await env.guest(8, introduce=False)
        w8 = await g8.watch("@releaseDomain")
        assert await w8.next(1) == "@releaseDomain"
        await env.server.introduce_domain(9)
        await env.server.release_domain(9)
        assert await wr.next(1) == "@releaseDomain"
        await _no_event(w8)
        # dom0 can open @releaseDomain to a guest via its permissions.
        await env.dom0.set_perms("@releaseDomain", [Perm(0, "n"), Perm(8, "r")])
        assert await env.dom0.get_perms("@releaseDomain") == [Perm(0, "n"), Perm(8, "r")]
        await env.server.introduce_domain(10)
        await env.server.release_domain(10)
        assert await w8.next(1) == "@releaseDomain"


async def test_unwatch_reset_and_duplicates(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        w = await env.dom0.watch("/u")
        await w.next(1)
        with pytest.raises(XenStoreError) as ei:
            await env.dom0._request(4, b"/u\0" + w.token + b"\0", 0)  # same path and token again
        assert ei.value.name == "EEXIST"
        with pytest.raises(XenStoreError) as ei:
            await env.dom0._request(5, b"/u\0nosuchtoken\0", 0)
        assert ei.value.name == "ENOENT"
        await env.dom0.transaction_start()
        await env.dom0.reset_watches()
        assert env.server.stats()["watches"] == 0
        assert env.server.stats()["transactions"] == 0
        assert [p async for p in w] == []


async def test_watch_events_coalesce_in_client(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        w = await env.dom0.watch("/co")
        for i in range(50):
            await env.dom0.write("/co/a", str(i))
        await env.dom0.write("/co/b", "x")
        await env.dom0.read("/")  # every event above has arrived before this reply
        assert [await w.next(1) for _ in range(w.pending)] == ["/co", "/co/a", "/co/b"]


async def test_64_concurrent_attaches(xs_env: EnvFactory) -> None:
    """64 toolstacks (one connection each, as 64 `pvback attach` processes) add a vTPM at the same moment.
    Each adds a child to backend/vtpm, so their transactions conflict by construction; every one must still
    commit (libxl and xenstore-utils retry EAGAIN without a cap) and leave a whole, consistent tree."""
    from backends.xenbus.toolstack import add_device

    n = 64
    async with xs_env() as env:
        clients = [await env.client() for _ in range(n)]
        await env.dom0.mkdir("/local/domain/0/backend")
        start = asyncio.Event()

        async def attach(i: int) -> None:
            await start.wait()
            await add_device(clients[i], backend_domid=0, frontend_domid=100 + i, type_name="vtpm", devid=0,
                             backend={"uuid": f"00000000-0000-4000-8000-{i:012d}", "resume": "False"},
                             frontend={}, frontend_type="vtpm")

        tasks = [asyncio.create_task(attach(i)) for i in range(n)]
        await asyncio.sleep(0.05)
        start.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r for r in results if r is not None] == []
        assert env.server.stats()["transactions"] == 0
        assert sorted(map(int, await env.dom0.directory("/local/domain/0/backend/vtpm"))) == list(range(100, 164))
        for i in range(n):
            domid = 100 + i
            be, fe = f"/local/domain/0/backend/vtpm/{domid}/0", f"/local/domain/{domid}/device/vtpm/0"
            assert sorted(await env.dom0.directory(be)) == sorted(
                ["uuid", "resume", "frontend", "frontend-id", "online", "state"])
            assert await env.dom0.read(f"{be}/uuid") == f"00000000-0000-4000-8000-{i:012d}".encode()
            assert await env.dom0.read(f"{be}/frontend") == fe.encode()
            assert await env.dom0.read(f"{be}/frontend-id") == str(domid).encode()
            assert await env.dom0.read(f"{fe}/backend") == be.encode()
            assert sorted(await env.dom0.directory(fe)) == ["backend", "backend-id", "state"]
            assert await env.dom0.get_perms(be) == [Perm(0, "n"), Perm(domid, "r")]
            assert await env.dom0.get_perms(fe) == [Perm(domid, "n"), Perm(0, "r")]
