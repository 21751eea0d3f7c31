"""XenStore test bed: pvback's xenstored in-process on a private socket (in the test's own loop, or in a
background thread for tests that run Debian's xenstore-utils), dom0 clients and guest clients bound to
their domids."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from backends.xenstore.client import XenStoreClient
from backends.xenstore.server import Quotas, XenStoreServer

T = TypeVar("T")
TEST_TIMEOUT = 10.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests in a fresh event loop, bounded (no pytest-asyncio needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**args), TEST_TIMEOUT))
    return True


@dataclass
class Env:
    server: XenStoreServer
    sock: str
    dom0: XenStoreClient
    clients: list[XenStoreClient] = field(default_factory=list)

    async def client(self) -> XenStoreClient:
        c = await XenStoreClient.connect(self.sock)
        self.clients.append(c)
        return c

    async def guest(self, domid: int, *, introduce: bool = True) -> XenStoreClient:
        if introduce:
            await self.server.introduce_domain(domid)
        c = await XenStoreClient.from_socket(self.server.connect_domain(domid))
        self.clients.append(c)
        return c


@pytest.fixture
def xs_env(tmp_path: Path) -> Callable[..., contextlib.AbstractAsyncContextManager[Env]]:
    @contextlib.asynccontextmanager
    async def make(quotas: Quotas | None = None) -> AsyncIterator[Env]:
        server = XenStoreServer(quotas)
        sock = str(tmp_path / "xs.sock")
        await server.listen(sock)
        dom0 = await XenStoreClient.connect(sock)
        env = Env(server, sock, dom0)
        try:
            yield env
        finally:
            for c in [dom0, *env.clients]:
                await c.close()
            await server.close()
            assert not os.path.exists(sock)

    return make


class ServerThread:
    """A XenStoreServer on its own loop in a background thread, so blocking subprocess calls (Debian's
    xenstore tools) can run in the test's thread."""

    def __init__(self, tmp: Path, quotas: Quotas | None = None) -> None:
        self.sock = str(tmp / "xenstored.sock")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="xenstored", daemon=True)
        self.thread.start()
        self.server: XenStoreServer = self.call(self._start(quotas))
        self.env = {**os.environ, "XENSTORED_PATH": self.sock}

    async def _start(self, quotas: Quotas | None) -> XenStoreServer:
        s = XenStoreServer(quotas)
        await s.listen(self.sock)
        return s

    def call(self, coro: Awaitable[T], timeout: float = 5.0) -> T:
        async def wrap() -> T:
            return await coro

        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(wrap(), self.loop)
        return fut.result(timeout)

    def run(self, *argv: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def xs_thread(tmp_path: Path) -> Iterator[ServerThread]:
    st = ServerThread(tmp_path)
    try:
        yield st
    finally:
        st.stop()
