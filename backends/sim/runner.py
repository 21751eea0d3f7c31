"""The emulated Xen platform as one process: a xenstored-compatible server plus the grant/event broker.

`pvback sim` runs this.  The sim directory holds `xenstored.sock` (dom0's xenstore: XENSTORED_PATH for
Debian's xenstore-utils), `broker.sock` (guests register memory and event channels there; backends fetch
them) and `sim.pid`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.sim.broker import Broker
    from backends.xenstore.server import XenStoreServer

XENSTORED_SOCK = "xenstored.sock"
BROKER_SOCK = "broker.sock"
PID_FILE = "sim.pid"


@dataclass(frozen=True)
class SimPaths:
    directory: Path

    @property
    def xenstored(self) -> Path:
        return self.directory / XENSTORED_SOCK

    @property
    def broker(self) -> Path:
        return self.directory / BROKER_SOCK

    @property
    def pid_file(self) -> Path:
        return self.directory / PID_FILE


class SimAlreadyRunning(RuntimeError):
    pass


def _answers(path: Path, kind: int) -> bool:
    """Something accepts connections on `path` (a live sim; a stale socket file refuses)."""
    with socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True  # present and not refusing (EPROTOTYPE, EACCES, timeout...): someone owns it
        return True


def check_not_running(paths: SimPaths) -> None:
    """Raise SimAlreadyRunning if another process serves this sim directory.

    The sockets are the truth, not the pid file: a killed sim leaves both behind (its sockets then refuse),
    and a recycled pid must not block a new start.
    """
    if _answers(paths.xenstored, socket.SOCK_STREAM) or _answers(paths.broker, socket.SOCK_SEQPACKET):
        try:
            who = f" (pid {int(paths.pid_file.read_text().strip())})"
        except (OSError, ValueError):
            who = ""
        raise SimAlreadyRunning(f"an emulated platform{who} already runs in {paths.directory}")


class Sim:
    """Owns the XenStoreServer and the Broker of one sim directory."""

    def __init__(self, directory: str | Path) -> None:
        self.paths = SimPaths(Path(directory))
        self._stop = asyncio.Event()
        self.xenstore: XenStoreServer | None = None
        self.broker: Broker | None = None

    async def start(self) -> None:
        from backends.sim.broker import Broker
        from backends.xenstore.server import XenStoreServer

        self.paths.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        check_not_running(self.paths)
        for p in (self.paths.xenstored, self.paths.broker):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self.xenstore = XenStoreServer()
        try:
            await self.xenstore.listen(str(self.paths.xenstored))
            await self._init_dom0()
            self.broker = Broker(hooks=self.xenstore)
            await self.broker.listen(str(self.paths.broker))
            self.paths.pid_file.write_text(f"{os.getpid()}\n")
        except BaseException:
            await self.close()  # a half-started sim leaves no socket behind to confuse the next one
            raise

    async def _init_dom0(self) -> None:
        """What xen-init-dom0 writes on a real host, so tools find dom0 like they do there."""
        from backends.xenstore.client import XenStoreClient

        xs = await XenStoreClient.connect(str(self.paths.xenstored))
        try:
            await xs.write("/local/domain/0/name", "Domain-0")
            await xs.write("/local/domain/0/domid", "0")
        finally:
            await xs.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def close(self) -> None:
        if self.broker is not None:
            await self.broker.close()
            self.broker = None
        if self.xenstore is not None:
            await self.xenstore.close()
            self.xenstore = None
        for p in (self.paths.xenstored, self.paths.broker, self.paths.pid_file):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


async def run_sim(directory: str | Path, ready: asyncio.Event | None = None, announce: bool = True) -> None:
    sim = Sim(directory)
    await sim.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sim.request_stop)
    if announce:
        print(f"XENSTORED_PATH={sim.paths.xenstored}", flush=True)
        print(f"PVBACK_SIM_BROKER={sim.paths.broker}", flush=True)
        print(f"PVBACK_SIM_DIR={sim.paths.directory}", flush=True)
    if ready is not None:
        ready.set()
    try:
        await sim.wait()
    finally:
        await sim.close()
