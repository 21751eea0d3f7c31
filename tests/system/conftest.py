"""System test bed for blkback on the emulated platform: real processes, as on a host.

`pvback sim` (xenstored + grant/event broker) runs once per session in a private directory; `pvback serve`
runs as a subprocess that tests may stop, SIGKILL and restart; guests are `Guest` domains in this process with
a `BlkFront` each, and devices are created the way `pvback attach` creates them (toolstack.add_device,
backend type qdisk, frontend type vbd).  Every wait is bounded; every process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends.guests.blkfront import BlkFront, DiskInfo
from backends.guests.guest import Guest
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import DevicePaths, add_device, read_state, remove_device, wait_for_state
from backends.xenstore.client import XenStoreClient

REPO = Path(__file__).resolve().parents[2]
PY = [sys.executable, "-m", "backends.daemon.cli"]
TEST_TIMEOUT = 60.0  # a whole test, set-up and clean-up inside the loop included; most take a few seconds
START_TIMEOUT = 20.0
XVDA = 51712
S = XenbusState


# -- async tests --------------------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests in a fresh loop, bounded; a `Bed` argument is closed inside that same loop."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    marker = pyfuncitem.get_closest_marker("system_timeout")
    timeout = float(marker.args[0]) if marker else TEST_TIMEOUT

    async def main() -> None:
        try:
            await pyfuncitem.obj(**args)
        finally:
            for v in args.values():
                if isinstance(v, Bed):
                    await v.aclose()

    asyncio.run(asyncio.wait_for(main(), timeout))
    return True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "system_timeout(seconds): bound for one system test (default 60)")


# -- processes ----------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def settles(pred: Callable[[], bool], what: str, timeout: float = 15.0, *, poll: float = 0.05) -> float:
    """Wait (bounded) for what the system does after the step the test took returned (a detached vif's tap and
    switch port go when the daemon sees its backend directory removed, as Linux netback's go on xenbus remove;
    OVN binds a port; a swtpm restarts).  `pred` runs in a thread: it may block (ovs-vsctl, ip).  Returns the
    seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await asyncio.to_thread(pred):
        assert loop.time() - start < timeout, f"still not so after {timeout:g} s: {what}"
        await asyncio.sleep(poll)
    return loop.time() - start


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


class Proc:
    """A child process with its log file; stopped by PID only."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        with open(log, "ab") as out:
            self.p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=_env(), cwd=REPO)

    @property
    def pid(self) -> int:
        return self.p.pid

    @property
    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.p.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.p.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
        if self.alive:
            self.signal(signal.SIGTERM)
            try:
                return self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
        return self.p.wait(timeout)


class SimProc:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "sim"
        self.log = workdir / "sim.log"
        self.proc = Proc([*PY, "sim", "--sim-dir", str(self.dir)], self.log)
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.dir / "sim.pid").exists():
            if not self.proc.alive:
                raise RuntimeError(f"pvback sim exited ({self.proc.p.returncode}):\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                self.proc.stop()
                raise RuntimeError(f"pvback sim did not come up in {START_TIMEOUT} s:\n{_tail(self.log)}")
            time.sleep(0.02)

    @property
    def xenstored(self) -> Path:
        return self.dir / "xenstored.sock"

    def close(self) -> None:
        self.proc.stop()


class ServeProc:
    """`pvback serve --platform emulated`; restartable.  `killed` records that a test stopped it on purpose."""

    def __init__(self, sim: SimProc, workdir: Path, config: str | None = None) -> None:
        self.sim = sim
        self.workdir = workdir
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = workdir / "pvback.toml"
            self.config_path.write_text(config)
        self.log = workdir / "serve.log"
        self.proc: Proc | None = None
        self.port = 0
        self.killed = False
        self.kills = 0  # SIGKILLs so far: a killed daemon leaves grants pinned (see Bed.aclose)
        self.generation = 0
        self.prefix: list[str] = []  # e.g. `ip netns exec NAME`: the daemon runs in that network namespace

    def start(self) -> None:
        assert self.proc is None or not self.proc.alive, "serve is already running"
        self.port = free_port()
        argv = [*self.prefix, *PY, "serve", "--platform", "emulated", "--sim-dir", str(self.sim.dir),
                "--metrics", f"127.0.0.1:{self.port}"]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        self.generation += 1
        with open(self.log, "a") as f:
            f.write(f"==== serve start #{self.generation}\n")
        self.proc = Proc(argv, self.log)
        self.killed = False
        deadline = time.monotonic() + START_TIMEOUT
        # The metrics endpoint opens after the bus has started: answering means serving.
        while True:
            if not self.proc.alive:
                raise RuntimeError(f"pvback serve exited ({self.proc.p.returncode}):\n{_tail(self.log)}")
            try:
                self.metrics_text(timeout=1.0)
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.stop()
                raise RuntimeError(f"pvback serve did not come up in {START_TIMEOUT} s:\n{_tail(self.log)}")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int:
        """Send `sig` and wait for the exit; returns the exit status (negative: killed by a signal)."""
        assert self.proc is not None
        self.killed = True
        self.kills += sig == signal.SIGKILL
        self.proc.signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return self.proc.stop()

    def metrics_text(self, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout) as r:
            body: bytes = r.read()
        return body.decode()

    async def metrics(self, timeout: float = 5.0) -> str:
        return await asyncio.to_thread(self.metrics_text, timeout)

    async def errors(self, domid: int, devid: int = XVDA) -> dict[str, int]:
        """Per-reason error counters of one device, summed over its queues (the data path's reason codes)."""
        out: dict[str, int] = {}
        pat = re.compile(r'^pvback_errors_total\{(?P<labels>[^}]*)\} (?P<v>[0-9.e+]+)$')
        for line in (await self.metrics()).splitlines():
            m = pat.match(line)
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            if labels.get("domid") == str(domid) and labels.get("devid") == str(devid):
                out[labels["reason"]] = out.get(labels["reason"], 0) + int(float(m["v"]))
        return out

    def log_text(self) -> str:
        return _tail(self.log, 1 << 20)


# -- per-test bed -------------------------------------------------------------------------------------------


@dataclass
class Disk:
    guest: Guest
    xs: XenStoreClient
    front: BlkFront
    paths: DevicePaths
    image: Path | None
    devid: int
    info: DiskInfo | None = None

    @property
    def domid(self) -> int:
        return self.guest.domid


@dataclass
class Bed:
    """Guests, devices and a dom0 xenstore connection for one test; `aclose` undoes everything it made."""

    sim: SimProc
    serve: ServeProc
    tmp: Path
    guests: list[tuple[Guest, XenStoreClient]] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    devices: list[tuple[int, int]] = field(default_factory=list)
    cleanups: list[Callable[[], object]] = field(default_factory=list)  # run last (e.g. stop an NBD server)
    _dom0: XenStoreClient | None = None

    async def dom0(self) -> XenStoreClient:
        if self._dom0 is None:
            self._dom0 = await XenStoreClient.connect(str(self.sim.xenstored))
        return self._dom0

    async def guest(self, name: str = "guest", mem_pages: int = 4096, gnt_entries: int = 4096
                    ) -> tuple[Guest, XenStoreClient]:
        g = await asyncio.to_thread(Guest.in_sim, self.sim.dir, name=name, mem_pages=mem_pages,
                                    gnt_entries=gnt_entries)
        assert g.xenstore_sock is not None
        xs = await XenStoreClient.from_socket(g.xenstore_sock)
        self.guests.append((g, xs))
        return g, xs

    async def attach(self, domid: int, params: str, *, devid: int = XVDA, mode: str = "w",
                     wait: bool = True, extra: dict[str, str] | None = None) -> DevicePaths:
        """What `pvback attach` writes; waits for InitWait like it does."""
        xs = await self.dom0()
        backend = {"params": params, "type": "qdisk", "mode": mode, "dev": "xvda", "device-type": "disk",
                   "removable": "0", "bootable": "1", "discard-enable": "1", **(extra or {})}
        frontend = {"virtual-device": str(devid), "device-type": "disk", "trusted": "1"}
        paths = await add_device(xs, backend_domid=0, frontend_domid=domid, type_name="qdisk", devid=devid,
                                 backend=backend, frontend=frontend, frontend_type="vbd")
        self.devices.append((domid, devid))
        if wait:
            await wait_for_state(xs, paths.backend, {S.INIT_WAIT, S.CONNECTED}, timeout=10.0)
        return paths

    async def disk(self, image: Path | None, *, params: str | None = None, mode: str = "w", devid: int = XVDA,
                   guest: tuple[Guest, XenStoreClient] | None = None, connect: bool = True,
                   **front_kwargs: Any) -> Disk:
        """A guest (new unless given) with `image` attached and its blkfront connected."""
        g, xs = guest if guest is not None else await self.guest()
        p = params if params is not None else f"aio:{image}"
        paths = await self.attach(g.domid, p, devid=devid, mode=mode)
        front = BlkFront(g, xs, devid, **front_kwargs)
        d = Disk(g, xs, front, paths, image, devid)
        self.disks.append(d)
        if connect:
            d.info = await front.connect()
        return d

    async def backend_state(self, d: Disk) -> XenbusState:
        return await read_state(await self.dom0(), d.paths.backend)

    async def backend_error(self, d: Disk) -> str | None:
        return await (await self.dom0()).read_str(f"{d.paths.backend}/error")

    async def aclose(self) -> None:
        """Frontends closed, devices removed (the daemon lets go of the images), guests destroyed."""
        live = self.serve.alive
        # Grants a SIGKILLed daemon had in use stay pinned on the emulated platform and cannot be revoked:
        # do not wait for them.
        grace = 5.0 if self.serve.kills == 0 else 1.0
        for d in self.disks:
            if live and d.front.queues:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(grace):
                        await d.front.close()
            elif live:
                # A frontend the test drove by hand: answer the backend's Closing the way blkfront does,
                # or the backend (rightly) waits for it until the toolstack's removal times out.
                with contextlib.suppress(Exception):
                    await d.xs.write(f"{d.front.fe_path}/state", str(int(S.CLOSED)))
        xs = await self.dom0()
        for domid, devid in self.devices:
            with contextlib.suppress(Exception):
                await remove_device(xs, backend_domid=0, frontend_domid=domid, type_name="qdisk", devid=devid,
                                    frontend_type="vbd", timeout=5.0 if live else 0.2)
        for d in self.disks:
            if d.front.queues:
                # A daemon killed with grants in use: the frontend cannot revoke those; the domain goes anyway.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(grace / 5):
                        await d.front.release()
        for g, gxs in self.guests:
            with contextlib.suppress(Exception):
                await gxs.close()
            g.close()
        if self._dom0 is not None:
            await self._dom0.close()
            self._dom0 = None
        for fn in reversed(self.cleanups):
            await asyncio.to_thread(fn)


# -- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProc]:
    s = SimProc(tmp_path_factory.mktemp("pvback-sim"))
    try:
        yield s
    finally:
        rc = s.proc.stop()
        assert rc == 0, f"pvback sim exited with {rc}:\n{_tail(s.log)}"


def _check_alive(serve: ServeProc) -> None:
    if serve.killed:
        return
    assert serve.alive, f"pvback serve died during the test ({serve.proc and serve.proc.p.returncode}):\n" \
                        f"{_tail(serve.log)}"


@pytest.fixture
def serve(sim: SimProc, tmp_path: Path) -> Iterator[ServeProc]:
    """A daemon of this test's own: the test may kill and restart it."""
    s = ServeProc(sim, tmp_path)
    s.start()
    try:
        yield s
    finally:
        alive = s.alive
        rc = s.stop()
        if not s.killed:
            assert alive, f"pvback serve died during the test:\n{_tail(s.log)}"
            assert rc == 0, f"pvback serve exited with {rc} on SIGTERM:\n{_tail(s.log)}"


@pytest.fixture(scope="module")
def shared_serve(sim: SimProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProc]:
    """One daemon for a whole module (tests that do not kill it)."""
    s = ServeProc(sim, tmp_path_factory.mktemp("serve"))
    s.start()
    try:
        yield s
    finally:
        alive = s.alive
        rc = s.stop()
        assert alive, f"pvback serve died:\n{_tail(s.log)}"
        assert rc == 0, f"pvback serve exited with {rc} on SIGTERM:\n{_tail(s.log)}"


@pytest.fixture
def bed(sim: SimProc, serve: ServeProc, tmp_path: Path) -> Iterator[Bed]:
    b = Bed(sim, serve, tmp_path)
    yield b
    _check_alive(serve)


@pytest.fixture
def shared_bed(sim: SimProc, shared_serve: ServeProc, tmp_path: Path) -> Iterator[Bed]:
    b = Bed(sim, shared_serve, tmp_path)
    yield b
    _check_alive(shared_serve)


class Nbdkit:
    """`nbdkit [--filter ...] file IMAGE [k=v ...]` on a unix socket, stopped by PID."""

    def __init__(self, image: Path, workdir: Path, *, filters: tuple[str, ...] = (),
                 params: tuple[str, ...] = ()) -> None:
        self.sock = workdir / "nbdkit.sock"
        self.pidfile = workdir / "nbdkit.pid"
        self.log = workdir / "nbdkit.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["nbdkit", "--unix", str(self.sock), "--pidfile", str(self.pidfile), "--foreground",
                 *(f"--filter={f}" for f in filters), "file", str(image), *params],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.pidfile.exists():  # nbdkit writes it once the socket listens
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nbdkit did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.02)
        assert int(self.pidfile.read_text()) == self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # by PID
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- images -------------------------------------------------------------------------------------------------


SHM = Path("/dev/shm")


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A private directory on tmpfs (the inline engine's home)."""
    d = SHM / f"pvback-system-{os.getpid()}-{tmp_path.name}"
    d.mkdir()
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def make_image(path: Path, size: int, *, random_fill: bool = True) -> Path:
    with open(path, "wb") as f:
        if random_fill:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
        else:
            f.truncate(size)
    return path
