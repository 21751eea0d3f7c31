"""XenBus test bed: pvback's own xenstored in-process on a private socket, a dom0 client, guest clients bound to
their domids, a scripted frontend that behaves like a guest's xenbus driver, and a fake device class."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends.xenbus.device import BackendDevice, DeviceError, XenBus
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import DevicePaths, add_device, read_state, wait_for_state
from backends.xenstore.client import XenStoreClient, XenStoreError
from backends.xenstore.server import XenStoreServer

S = XenbusState
TEST_TIMEOUT = 10.0  # per test, whole thing; each wait below is much shorter
WAIT = 3.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests in a fresh event loop, bounded (no pytest-asyncio needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**args), TEST_TIMEOUT))
    return True


class FakePlatform:
    """The bus must only hand this through to the device class."""

    name = "fake"
    backend_domid = 0


@dataclass
class FakeClass:
    """Records calls; `raise_on[name]` makes that callback raise (once, unless `sticky`)."""

    type_names: tuple[str, ...] = ("fake",)
    connect_states: frozenset[XenbusState] = frozenset({S.INITIALISED, S.CONNECTED})
    calls: list[tuple[str, str]] = field(default_factory=list)
    raise_on: dict[str, BaseException] = field(default_factory=dict)
    sticky: bool = False
    rings: dict[str, tuple[int, int]] = field(default_factory=dict)
    connected: set[str] = field(default_factory=set)
    platforms: list[Any] = field(default_factory=list)

    def _maybe_raise(self, name: str) -> None:
        exc = self.raise_on.get(name)
        if exc is not None:
            if not self.sticky:
                del self.raise_on[name]
            raise exc

    def names(self, dev_path: str | None = None) -> list[str]:
        return [n for n, p in self.calls if dev_path is None or p == dev_path]

    async def realize(self, dev: BackendDevice) -> None:
        self.calls.append(("realize", dev.backend_path))
        self.platforms.append(dev.platform)
        self._maybe_raise("realize")
        await dev.write_backend({"feature-fake": "1", "max-ring-page-order": "0"})

    async def connect(self, dev: BackendDevice) -> None:
        self.calls.append(("connect", dev.backend_path))
        self._maybe_raise("connect")
        ring = await dev.read_frontend_int("ring-ref", 0, 2**32 - 1)
        port = await dev.read_frontend_int("event-channel", 1, 4095)
        protocol = await dev.read_frontend("protocol", max_len=16)
        if protocol not in (None, "x86_64-abi", "x86_32-abi"):
            raise DeviceError(f"unknown protocol {protocol!r}")
        self.rings[dev.backend_path] = (ring, port)
        self.connected.add(dev.backend_path)
        await dev.write_backend({"sectors": "2048", "info": "0"})

    async def disconnect(self, dev: BackendDevice) -> None:
        self.calls.append(("disconnect", dev.backend_path))
        self._maybe_raise("disconnect")
        self.connected.discard(dev.backend_path)

    async def unrealize(self, dev: BackendDevice) -> None:
        self.calls.append(("unrealize", dev.backend_path))
        self._maybe_raise("unrealize")


class Frontend:
    """A guest's side of one device, scripted step by step through the guest's own (unprivileged) client."""

    def __init__(self, xs: XenStoreClient, paths: DevicePaths) -> None:
        self.xs = xs
        self.paths = paths
        self.path = paths.frontend

    async def set_state(self, state: XenbusState) -> None:
        await self.xs.write(f"{self.path}/state", str(int(state)))

    async def publish(self, ring: int | str = 8, port: int | str = 5, state: XenbusState = S.INITIALISED,
                      **extra: str) -> None:
        """What blkfront's talk_to_blkback does: transport keys and the new state in one transaction."""
        values = {"ring-ref": str(ring), "event-channel": str(port), **extra}

        async def body(tx: Any) -> None:
            for k, v in values.items():
                await tx.write(f"{self.path}/{k}", v)
            await tx.write(f"{self.path}/state", str(int(state)))

        await self.xs.transaction(body)

    async def backend_state(self) -> XenbusState:
        return await read_state(self.xs, self.paths.backend)

    async def wait_backend(self, *states: XenbusState, timeout: float = WAIT) -> XenbusState:
        return await wait_for_state(self.xs, self.paths.backend, states, timeout)

    async def close(self) -> None:
        """Closing then Closed, as a frontend that answers a backend's Closing."""
        await self.set_state(S.CLOSING)
        await self.set_state(S.CLOSED)


@dataclass
class Env:
    tmp: Path
    server: XenStoreServer
    dom0: XenStoreClient
    platform: FakePlatform
    guests: dict[int, XenStoreClient] = field(default_factory=dict)
    buses: list[XenBus] = field(default_factory=list)
    clients: list[XenStoreClient] = field(default_factory=list)

    async def guest(self, domid: int) -> XenStoreClient:
        """A guest domain and its own unprivileged xenstore connection."""
        if domid not in self.guests:
            await self.server.introduce_domain(domid)  # creates /local/domain/<domid> owned by it
            self.guests[domid] = await XenStoreClient.from_socket(self.server.connect_domain(domid))
        return self.guests[domid]

    async def new_client(self) -> XenStoreClient:
        c = await XenStoreClient.connect(str(self.tmp / "xenstored.sock"))
        self.clients.append(c)
        return c

    async def bus(self, *classes: Any, xs: XenStoreClient | None = None) -> XenBus:
        bus = XenBus(self.platform, xs or await self.new_client(), list(classes), backend_domid=0)  # type: ignore[arg-type]
        await bus.start()
        self.buses.append(bus)
        return bus

    async def add(self, domid: int, devid: int = 51712, type_name: str = "fake",
                  backend: dict[str, str] | None = None) -> Frontend:
        guest = await self.guest(domid)
        paths = await add_device(self.dom0, backend_domid=0, frontend_domid=domid, type_name=type_name,
                                 devid=devid, backend=backend or {"params": "/dev/null", "mode": "w"},
                                 frontend={"virtual-device": str(devid)})
        return Frontend(guest, paths)

    async def read(self, path: str) -> str | None:
        return await self.dom0.read_str(path)


@contextlib.asynccontextmanager
async def xenbus_env(tmp: Path) -> AsyncIterator[Env]:
    server = XenStoreServer()
    sock = str(tmp / "xenstored.sock")
    await server.listen(sock)
    dom0 = await XenStoreClient.connect(sock)
    await dom0.mkdir("/local/domain/0")
    env = Env(tmp=tmp, server=server, dom0=dom0, platform=FakePlatform())
    try:
        yield env
        for bus in env.buses:
            await bus.stop(close_devices=False)
        # Leak check: once every bus is stopped no runner, watch follower or device remains.
        stray = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and
                 (t.get_name().startswith("xenbus") or "BackendDevice" in repr(t.get_coro()))]
        assert not stray, stray
        assert all(not bus.devices for bus in env.buses)
        assert server.stats()["watches"] == 0, "a watch outlived its bus or helper"
    finally:
        for bus in env.buses:
            with contextlib.suppress(Exception):
                await bus.stop(close_devices=False)
        for c in [*env.clients, *env.guests.values(), dom0]:
            with contextlib.suppress(Exception):
                await c.close()
        await server.close()


async def settle(bus: XenBus, timeout: float = WAIT) -> None:
    """For "nothing happens" checks: everything here shares one event loop, so once the bus's devices have
    been idle for a few loop turns spread over ~60 ms, any watch event caused by an earlier write has been
    delivered and handled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    quiet = 0
    while quiet < 3:
        await asyncio.sleep(0.02)
        quiet = 0 if any(d.busy for d in bus.devices.values()) else quiet + 1
        if loop.time() > deadline:
            raise TimeoutError("devices never settled")


async def eventually(check: Callable[[], Awaitable[object]] | Callable[[], object], timeout: float = WAIT) -> None:
    """Poll a condition that has no xenstore node to watch (calls recorded by the fake class)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.005)


async def expect_error(xs: XenStoreClient, path: str, errname: str, op: Callable[[], Awaitable[Any]]) -> None:
    try:
        await op()
    except XenStoreError as exc:
        assert exc.name == errname, exc
    else:
        raise AssertionError(f"{path}: expected {errname}")


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
