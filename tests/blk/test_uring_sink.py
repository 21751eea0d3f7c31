"""The FILE engine's per-submitter io_uring: attach, completions reaped by the submitter, short transfers.

O_DIRECT reads and writes of an attached sink go to that sink's own ring; the kernel writes the sink's
eventfd and `pv_io_sink_take` reaps the CQEs in the caller's thread.  Two sinks on one engine must each get
exactly their own completions.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import select
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.native import ffi, lib

BS = 4096
SIZE = 1 << 20
URING = os.environ.get("PVBACK_NO_URING") != "1"


@pytest.fixture
def direct_file() -> Iterator[tuple[Path, int, bytes]]:
    """A 1 MiB + 4 KiB image of random data opened O_DIRECT (on /var/tmp: tmpfs may refuse O_DIRECT)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        path = Path(d) / "img"
        data = os.urandom(SIZE + BS)
        path.write_bytes(data)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        try:
            yield path, fd, data
        finally:
            os.close(fd)


class Sink:
    def __init__(self) -> None:
        self.c = ffi.new("struct pv_io_sink *")
        assert lib.pv_io_sink_init(self.c) == 0
        self.keep: list[Any] = []

    def wait(self, n: int, timeout: float = 10.0) -> list[Any]:
        """Collect n completions, sleeping on the eventfd between takes (as the pump does)."""
        done: list[Any] = []
        while len(done) < n:
            io = lib.pv_io_sink_take(self.c)
            while io != ffi.NULL:
                done.append(io)
                io = io.next
            if len(done) < n:
                r, _, _ = select.select([self.c.efd], [], [], timeout)
                assert r, f"only {len(done)} of {n} completions arrived"
        return done

    def close(self) -> None:
        lib.pv_io_sink_destroy(self.c)


def make_io(sink: Sink, op: int, offset: int, buf: mmap.mmap, length: int) -> Any:
    iov = ffi.new("struct iovec[]", 1)
    iov[0].iov_base = ffi.from_buffer(buf)
    iov[0].iov_len = length
    io = ffi.new("struct pv_io *")
    io.op, io.offset, io.length, io.iov, io.iovcnt, io.sink = op, offset, length, iov, 1, sink.c
    sink.keep += [iov, io, buf]
    return io


def open_engine(fd: int) -> Any:
    err = ffi.new("char[]", 256)
    eng = lib.pv_io_engine_file_open(fd, 2, err, 256)
    assert eng != ffi.NULL, ffi.string(err)
    return eng


def test_two_sinks_each_reap_their_own(direct_file: tuple[Path, int, bytes]) -> None:
    _, fd, data = direct_file
    eng = open_engine(fd)
    sinks = [Sink(), Sink()]
    try:
        for s in sinks:
            rc = lib.pv_io_engine_attach(eng, s.c)
            assert rc == (0 if URING else -errno.EOPNOTSUPP)
        if URING:
            assert lib.pv_io_engine_attach(eng, sinks[0].c) == -errno.EBUSY
        rng = random.Random(7)
        want: dict[int, tuple[int, int, mmap.mmap]] = {}
        for si, s in enumerate(sinks):
            ios = ffi.new("struct pv_io *[]", 48)
            for i in range(48):
                off = rng.randrange(SIZE // BS) * BS
                buf = mmap.mmap(-1, BS)  # page aligned, as O_DIRECT needs
                ios[i] = make_io(s, lib.PV_IO_READ, off, buf, BS)
                want[int(ffi.cast("uintptr_t", ios[i]))] = (si, off, buf)
            lib.pv_io_engine_submit(eng, ios, 48)
        for si, s in enumerate(sinks):
            done = s.wait(48)
            assert len(done) == 48
            for io in done:
                owner, off, buf = want.pop(int(ffi.cast("uintptr_t", io)))
                assert owner == si, "a completion reached the other submitter's sink"
                assert io.result == 0
                assert buf[:] == data[off : off + BS]
            assert not lib.pv_io_sink_nonempty(s.c)
        assert not want
    finally:
        for s in sinks:
            s.close()
        lib.pv_io_engine_close(eng)


def test_writes_flush_and_short_read(direct_file: tuple[Path, int, bytes]) -> None:
    path, fd, data = direct_file
    eng = open_engine(fd)
    s = Sink()
    try:
        lib.pv_io_engine_attach(eng, s.c)
        bufs = []
        ios = ffi.new("struct pv_io *[]", 9)
        for i in range(8):
            buf = mmap.mmap(-1, BS)
            buf[:] = bytes([i + 1]) * BS
            bufs.append(buf)
            ios[i] = make_io(s, lib.PV_IO_WRITE, i * 2 * BS, buf, BS)
        flush = ffi.new("struct pv_io *")
        flush.op, flush.sink = lib.PV_IO_FLUSH, s.c  # not a ring op: the pool runs it, same sink
        ios[8] = flush
        lib.pv_io_engine_submit(eng, ios, 9)
        done = s.wait(9)
        assert sorted(int(io.op) for io in done) == [lib.PV_IO_WRITE] * 8 + [lib.PV_IO_FLUSH]
        assert all(io.result == 0 for io in done)
        on_disk = path.read_bytes()
        for i in range(8):
            assert on_disk[i * 2 * BS : (i * 2 + 1) * BS] == bytes([i + 1]) * BS
            assert on_disk[(i * 2 + 1) * BS : (i * 2 + 2) * BS] == data[(i * 2 + 1) * BS : (i * 2 + 2) * BS]
        # 8 KiB at the last 4 KiB of the file: the ring returns 4 KiB, the redo hits EOF -> an error, never a
        # half-filled buffer reported as success.
        buf = mmap.mmap(-1, 2 * BS)
        io = make_io(s, lib.PV_IO_READ, SIZE, buf, 2 * BS)
        lib.pv_io_engine_submit(eng, ffi.new("struct pv_io *[]", [io]), 1)
        (got,) = s.wait(1)
        assert got.result == -errno.EIO
    finally:
        s.close()
        lib.pv_io_engine_close(eng)


@pytest.mark.skipif(not URING, reason="built without liburing (PVBACK_NO_URING=1): no ring to register with")
def test_registered_buffers(direct_file: tuple[Path, int, bytes]) -> None:
    """Fixed-buffer reads and writes through a sink's registered slots land in and come from the registered
    memory; a slot can be cleared and set to other memory; misuse is refused with an errno."""
    path, fd, data = direct_file
    eng = open_engine(fd)
    s, unattached = Sink(), Sink()
    try:
        assert lib.pv_io_sink_buffers(unattached.c, 4) == -errno.EOPNOTSUPP
        assert lib.pv_io_engine_attach(eng, s.c) == 0
        assert lib.pv_io_sink_buffers(s.c, 0) == -errno.EINVAL
        assert lib.pv_io_sink_buffers(s.c, 4) == 0
        assert lib.pv_io_sink_buffers(s.c, 4) == -errno.EBUSY
        bufs = [mmap.mmap(-1, BS) for _ in range(3)]
        assert lib.pv_io_sink_buffer_set(s.c, 4, ffi.from_buffer(bufs[0]), BS) == -errno.EINVAL  # no such slot
        for i in range(2):
            assert lib.pv_io_sink_buffer_set(s.c, i, ffi.from_buffer(bufs[i]), BS) == 0
        # Slot 0: read block 3; slot 1: write its bytes to block 5.
        bufs[1][:] = b"\xa5" * BS
        rd = make_io(s, lib.PV_IO_READ, 3 * BS, bufs[0], BS)
        wr = make_io(s, lib.PV_IO_WRITE, 5 * BS, bufs[1], BS)
        rd.fixed, wr.fixed = 1, 2
        lib.pv_io_engine_submit(eng, ffi.new("struct pv_io *[]", [rd, wr]), 2)
        assert all(io.result == 0 for io in s.wait(2))
        assert bufs[0][:] == data[3 * BS : 4 * BS]
        assert path.read_bytes()[5 * BS : 6 * BS] == b"\xa5" * BS
        # Slot 0 cleared and pointed at other memory: the next fixed read fills that memory, not the old.
        assert lib.pv_io_sink_buffer_set(s.c, 0, ffi.NULL, 0) == 0
        assert lib.pv_io_sink_buffer_set(s.c, 0, ffi.from_buffer(bufs[2]), BS) == 0
        before = bufs[0][:]
        rd2 = make_io(s, lib.PV_IO_READ, 7 * BS, bufs[2], BS)
        rd2.fixed = 1
        lib.pv_io_engine_submit(eng, ffi.new("struct pv_io *[]", [rd2]), 1)
        (got,) = s.wait(1)
        assert got.result == 0 and bufs[2][:] == data[7 * BS : 8 * BS] and bufs[0][:] == before
        lib.pv_io_sink_buffers_drop(s.c)
        assert lib.pv_io_sink_buffer_set(s.c, 0, ffi.from_buffer(bufs[0]), BS) == -errno.EINVAL
    finally:
        s.close()
        unattached.close()
        lib.pv_io_engine_close(eng)
