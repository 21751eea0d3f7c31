"""NBD test helpers: nbdkit / qemu-nbd servers in private directories (stopped by PID) and a harness that
drives a C I/O engine directly through cffi with a pv_io_sink as the completion sink."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends.native import ffi, lib

NBDKIT = shutil.which("nbdkit")
needs_nbdkit = pytest.mark.skipif(NBDKIT is None, reason="nbdkit is not installed (./dev installs it)")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths are limited to 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="pvb-nbd-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Nbdkit:
    """One nbdkit in the foreground, serving a unix socket; stopped by its PID."""

    def __init__(self, d: Path, args: Sequence[str], *, sock: Path | None = None, name: str = "nbdkit") -> None:
        self.sock = sock or d / f"{name}.sock"
        self.pidfile = d / f"{name}.pid"
        self.logfile = d / f"{name}.log"
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                [NBDKIT or "nbdkit", "--foreground", "--unix", str(self.sock), "--pidfile", str(self.pidfile), *args],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
            )
        deadline = time.monotonic() + 10
        # nbdkit writes the pidfile once it listens.
        while not self.pidfile.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited: {self.logfile.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.005)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@pytest.fixture
def nbdkit_factory(workdir: Path) -> Iterator[Any]:
    started: list[Nbdkit] = []

    def start(args: Sequence[str], **kw: Any) -> Nbdkit:
        srv = Nbdkit(workdir, args, **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@dataclass(eq=False)
class Op:
    op: int
    offset: int
    length: int
    buf: bytearray | None = None
    result: int | None = None
    # cffi objects that must outlive the op
    _keep: list[Any] = field(default_factory=list)


def split_iov(n: int, rng: random.Random) -> list[int]:
    """Cut n bytes into 1..8 segments of random sizes (sector multiples where possible)."""
    cuts = sorted({rng.randrange(1, n // 512) * 512 for _ in range(rng.randrange(0, 8))} if n >= 1024 else set())
    bounds = [0, *cuts, n]
    return [b - a for a, b in itertools.pairwise(bounds) if b > a]


class Harness:
    """Submits Ops to a `struct pv_io_engine *` and collects their completions from a pv_io_sink."""

    def __init__(self, engine: Any, seed: int = 1) -> None:
        self.engine = engine
        self.sink = ffi.new("struct pv_io_sink *")
        assert lib.pv_io_sink_init(self.sink) == 0
        self.rng = random.Random(seed)
        self.pending: dict[int, Op] = {}

    def close(self) -> None:
        assert not self.pending, f"{len(self.pending)} ops never completed"
        lib.pv_io_sink_destroy(self.sink)

    @property
    def fd(self) -> int:
        return int(self.sink.efd)

    def submit(self, ops: Sequence[Op]) -> None:
        ios = ffi.new("struct pv_io *[]", len(ops))
        for i, o in enumerate(ops):
            io = ffi.new("struct pv_io *")
            io.op = o.op
            io.offset = o.offset
            io.length = o.length
            io.sink = self.sink
            o._keep = [io]
            if o.buf is not None:
                segs = split_iov(len(o.buf), self.rng)
                iov = ffi.new("struct iovec[]", len(segs))
                data = ffi.from_buffer(o.buf)
                pos = 0
                for k, n in enumerate(segs):
                    iov[k].iov_base = data + pos
                    iov[k].iov_len = n
                    pos += n
                io.iov = iov
                io.iovcnt = len(segs)
                o._keep += [iov, data]
            ios[i] = io
            self.pending[int(ffi.cast("uintptr_t", io))] = o
        lib.pv_io_engine_submit(self.engine, ios, len(ops))

    def harvest(self) -> list[Op]:
        done: list[Op] = []
        io = lib.pv_io_sink_take(self.sink)
        while io != ffi.NULL:
            o = self.pending.pop(int(ffi.cast("uintptr_t", io)))
            o.result = int(io.result)
            done.append(o)
            io = io.next
        return done

    def wait(self, ops: Sequence[Op], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while any(o.result is None for o in ops):
            self.harvest()
            if all(o.result is not None for o in ops):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{sum(o.result is None for o in ops)} ops did not complete")
            select.select([self.fd], [], [], min(left, 0.1))

    def run(self, ops: Sequence[Op], timeout: float = 10.0) -> list[int]:
        self.submit(ops)
        self.wait(ops, timeout)
        return [o.result if o.result is not None else 1 for o in ops]


def read_op(offset: int, length: int) -> Op:
    return Op(lib.PV_IO_READ, offset, length, bytearray(length))


def write_op(offset: int, data: bytes, *, sync: bool = False) -> Op:
    return Op(lib.PV_IO_WRITE_SYNC if sync else lib.PV_IO_WRITE, offset, len(data), bytearray(data))


def flush_op() -> Op:
    return Op(lib.PV_IO_FLUSH, 0, 0)


def discard_op(offset: int, length: int, *, secure: bool = False) -> Op:
    return Op(lib.PV_IO_SECURE_DISCARD if secure else lib.PV_IO_DISCARD, offset, length)


def random_extent(rng: random.Random, size: int, lo: int = 512, hi: int = 1 << 20) -> tuple[int, int]:
    """A sector-aligned extent whose length is log-uniform in [lo, hi]."""
    length = 512 * max(1, int(2 ** rng.uniform((lo // 512).bit_length() - 1, (hi // 512).bit_length() - 1)))
    length = min(length, hi)
    offset = 512 * rng.randrange(0, (size - length) // 512 + 1)
    return offset, length


def disjoint(extents: list[tuple[int, int]], off: int, length: int) -> bool:
    return all(off + length <= o or o + n <= off for o, n in extents)
