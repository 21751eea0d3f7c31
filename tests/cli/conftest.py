"""`pvback` run as an operator runs it: every command a subprocess, every test its own sim directory.

Processes a test starts are stopped by pid at teardown (SIGTERM, then SIGKILL after a bound).  Sim directories
live under /tmp with short names because a unix socket path must fit in 108 bytes.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PVBACK = [sys.executable, "-m", "backends.daemon.cli"]
CMD_TIMEOUT = 30.0  # one command; the slowest (attach waiting for a backend) needs ~10 s at most


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("XENSTORED_PATH", "PVBACK_SIM_DIR", "PVBACK_LOG_LEVEL")}
    e["PYTHONUNBUFFERED"] = "1"
    e["PYTHONPATH"] = str(ROOT)
    return e


def run(*args: str, timeout: float = CMD_TIMEOUT, extra_env: dict[str, str] | None = None,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), *PVBACK, *args], capture_output=True, text=True, timeout=timeout,
                          env={**env(), **(extra_env or {})}, cwd=ROOT, stdin=subprocess.DEVNULL)


def one_line_error(res: subprocess.CompletedProcess[str], command: str, *needles: str) -> str:
    """The operator contract: non-zero exit, exactly one line on stderr, naming the command and the problem."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0, f"exit 0 for a bad input: {res.stdout!r} {res.stderr!r}"
    assert len(lines) == 1, f"expected one error line, got: {res.stderr!r}"
    line = lines[0]
    assert line.startswith(f"pvback {command}: "), line
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    """A background pvback process with its output in a file."""

    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match[str]:
        def find() -> re.Match[str] | None:
            if self.popen.poll() is not None and not re.search(pattern, self.text()[after:]):
                raise AssertionError(f"{self.log.name} exited ({self.popen.returncode}) before {pattern!r}:\n"
                                     f"{self.text()[-3000:]}")
            return re.search(pattern, self.text()[after:])

        m: re.Match[str] = wait_until(find, timeout, f"{pattern!r} in {self.log}")
        return m

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(5)


@dataclass
class Bed:
    """One test's private world: a directory, its sim, the processes it started."""

    root: Path
    procs: list[Proc] = field(default_factory=list)

    @property
    def sim_dir(self) -> Path:
        return self.root / "sim"

    @property
    def xs_sock(self) -> Path:
        return self.sim_dir / "xenstored.sock"

    def sim_args(self) -> list[str]:
        return ["--platform", "emulated", "--sim-dir", str(self.sim_dir)]

    def spawn(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen([*PVBACK, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**env(), **(extra_env or {})}, cwd=ROOT)
        proc = Proc(p, log)
        self.procs.append(proc)
        return proc

    def start_sim(self) -> Proc:
        sim = self.spawn("sim", "sim", "--sim-dir", str(self.sim_dir))
        sim.wait_log(r"PVBACK_SIM_DIR=")
        return sim

    def start_serve(self, *extra: str, name: str = "serve") -> tuple[Proc, str]:
        """`pvback serve` with a free metrics port; returns it and HOST:PORT of its metrics endpoint."""
        serve = self.spawn(name, "serve", *self.sim_args(), "--metrics", "127.0.0.1:0", *extra)
        m = serve.wait_log(r"msg=serving metrics=(\S+)")
        return serve, m.group(1)

    def start_guest(self, *args: str, name: str = "guest") -> tuple[Proc, int]:
        guest = self.spawn(name, "guest", "--sim-dir", str(self.sim_dir), "--name", name, *args)
        m = guest.wait_log(r"domain (\d+)")
        return guest, int(m.group(1))

    def image(self, name: str = "disk.img", size: int = 16 << 20) -> Path:
        p = self.root / name
        with open(p, "wb") as f:
            f.truncate(size)
        return p

    def xs(self, op: str, *args: str) -> Any:
        return asyncio.run(xs_call(str(self.xs_sock), op, *args))

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


async def xs_call(path: str, op: str, *args: str) -> Any:
    from backends.xenstore.client import XenStoreClient, XenStoreError

    xs = await XenStoreClient.connect(path)
    try:
        fn = getattr(xs, op)
        try:
            return await asyncio.wait_for(fn(*args), 5)
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return None
            raise
    finally:
        await xs.close()


@pytest.fixture
def bed() -> Iterator[Bed]:
    root = Path(tempfile.mkdtemp(prefix="pvc-", dir="/tmp"))
    b = Bed(root)
    try:
        yield b
    finally:
        b.stop_all()
        if not os.environ.get("PVBACK_TEST_KEEP"):  # set it to read the logs of a failed test
            shutil.rmtree(root, ignore_errors=True)


def scrape(addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        body: bytes = r.read()
    return body.decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'([a-zA-Z_]+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class FakeServer:
    """A unix stream socket server that is not what a client expects: `garbage` answers nonsense to anything,
    `silent` accepts and never says a word."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path, self.mode = path, mode
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(c)
            if self.mode == "garbage":
                try:
                    c.sendall(b"220 welcome to the wrong server\r\n" * 8)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()
