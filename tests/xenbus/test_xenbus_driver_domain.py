"""The bus in a driver domain (#19): xenstored refuses it other domains' homes (EACCES), which must read as
"cannot tell, alive", never as an error that stops a device from being served (seen on real Xen 4.17)."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from backends.xenbus.device import XenBus
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import add_device
from backends.xenstore.client import XenStoreError

from .conftest import FakeClass, Frontend, eventually, settle, xenbus_env

S = XenbusState


class _Store:
    """Just what domain_dead asks: every home but our own is forbidden, as xenstored answers a driver domain."""

    def __init__(self, error: str) -> None:
        self.error = error
        self.asked_introduced = 0

    async def exists(self, path: str) -> bool:
        raise XenStoreError(self.error, path)

    async def is_domain_introduced(self, domid: int) -> bool:
        self.asked_introduced += 1
        raise XenStoreError("EACCES", "IS_DOMAIN_INTRODUCED")


async def test_a_forbidden_home_counts_as_a_live_domain() -> None:
    xs: Any = _Store("EACCES")
    bus = XenBus(platform=None, xs=xs, classes=[], backend_domid=7)  # type: ignore[arg-type]
    assert await bus.domain_dead(12) is False
    assert await bus.domain_dead(7) is False  # ourselves
    assert xs.asked_introduced == 0


async def test_other_errors_still_raise() -> None:
    xs: Any = _Store("EIO")
    bus = XenBus(platform=None, xs=xs, classes=[], backend_domid=7)  # type: ignore[arg-type]
    with pytest.raises(XenStoreError):
        await bus.domain_dead(12)


async def _served_from_driver_domain(env: Any, cls: FakeClass, devid: int) -> tuple[XenBus, Frontend]:
    """A bus in driver domain 5 (its own unprivileged connection) serving a device of guest 2, connected."""
    dd = await env.guest(5)
    bus = XenBus(env.platform, dd, [cls], backend_domid=5)
    await bus.start()
    env.buses.append(bus)
    await env.guest(2)
    paths = await add_device(env.dom0, backend_domid=5, frontend_domid=2, type_name="fake", devid=devid,
                             backend={"params": "/dev/null", "mode": "w"}, frontend={"virtual-device": str(devid)})
    fe = Frontend(env.guests[2], paths)
    assert await fe.wait_backend(S.INIT_WAIT) is S.INIT_WAIT
    await fe.publish(ring=8, port=5)
    assert await fe.wait_backend(S.CONNECTED) is S.CONNECTED
    return bus, fe


async def test_frontend_removed_while_online_is_marked_offline_for_devd(tmp_path: Path) -> None:
    """libxl 4.17 destroying a guest whose qdisk lives in a driver domain: the guest closed its frontend, dom0
    writes no online=0 (its QEMU bodge for dying guests), waits for the driver domain to remove the backend,
    then removes the frontend and the guest's home.  `xl devd` removes the backend only on Closed + online=0,
    so the bus must say online=0 itself, once the frontend is gone, and not before."""
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        bus, fe = await _served_from_driver_domain(env, cls, 51712)
        paths = fe.paths
        # The guest reboots: its frontend closes; the backend follows and stays online.
        await fe.close()
        assert await fe.wait_backend(S.CLOSED) is S.CLOSED
        await settle(bus)
        assert await env.read(f"{paths.backend}/online") == "1"
        # dom0 gives up waiting and removes the frontend side and the guest's home.
        await env.dom0.rm(paths.frontend)
        await env.dom0.rm("/local/domain/2")
        await eventually(lambda: env.read(f"{paths.backend}/online"))
        await eventually(lambda: _is(env.read(f"{paths.backend}/online"), "0"))
        assert await env.read(f"{paths.backend}/state") == str(int(S.CLOSED))
        await eventually(lambda: "unrealize" in cls.names(paths.backend))
        # What devd does next: remove the directory.  The bus lets go of the device.
        await env.dom0.rm(paths.backend)
        await eventually(lambda: paths.backend not in bus.devices)


async def test_frontend_kept_while_closed_stays_online(tmp_path: Path) -> None:
    """A frontend that closed (a guest unloading its driver) but whose directory is still there is not a
    teardown: the backend stays online and waits for it to come back."""
    async with xenbus_env(tmp_path) as env:
        bus, fe = await _served_from_driver_domain(env, FakeClass(), 7)
        paths = fe.paths
        await fe.close()
        await fe.wait_backend(S.CLOSED)
        await env.guests[2].rm(f"{paths.frontend}/ring-ref")  # churn in the frontend dir, not its removal
        await settle(bus)
        assert await env.read(f"{paths.backend}/online") == "1"
        await fe.set_state(S.INITIALISING)  # and it comes back
        assert await fe.wait_backend(S.INIT_WAIT) is S.INIT_WAIT


async def _is(value: Awaitable[str | None], expected: str) -> bool:
    return await value == expected
