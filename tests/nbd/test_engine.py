"""The NBD engine against nbdkit: data checked byte for byte against the backing file."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from backends.drivers.storage.nbd import FLAG_SEND_TRIM, NbdDriver
from backends.native import ffi, lib
from tests.nbd.conftest import (
    Harness,
    Op,
    discard_op,
    disjoint,
    flush_op,
    needs_nbdkit,
    random_extent,
    read_op,
    write_op,
)

pytestmark = needs_nbdkit
SIZE = 16 << 20


def _image(path: Path, seed: int) -> bytearray:
    data = bytearray(random.Random(seed).randbytes(SIZE))
    path.write_bytes(data)
    return data


def test_random_io_matches_backing_file(workdir: Path, nbdkit_factory: Any) -> None:
    img = workdir / "disk.img"
    model = _image(img, 7)
    srv = nbdkit_factory(["file", str(img)])
    drv = NbdDriver(srv.uri)
    drv.open()
    try:
        caps = drv.capabilities()
        assert caps.size_bytes == SIZE and caps.sectors == SIZE // 512
        assert caps.needs_flush and not caps.readonly
        h = Harness(drv.engine().c, seed=3)
        rng = random.Random(11)
        sizes_seen: set[int] = set()
        for _ in range(12):
            # One batch of up to 24 concurrent ops on disjoint extents (concurrent overlapping ops have no
            # defined order, so the model could not predict them).
            batch: list[Op] = []
            extents: list[tuple[int, int]] = []
            for _ in range(rng.randrange(1, 25)):
                off, n = random_extent(rng, SIZE)
                if not disjoint(extents, off, n):
                    continue
                extents.append((off, n))
                sizes_seen.add(n)
                if rng.random() < 0.5:
                    batch.append(write_op(off, rng.randbytes(n), sync=rng.random() < 0.2))
                else:
                    batch.append(read_op(off, n))
            assert h.run(batch) == [0] * len(batch)
            for o in batch:
                assert o.buf is not None
                if o.op == lib.PV_IO_READ:
                    assert o.buf == model[o.offset : o.offset + o.length], f"read {o.offset}+{o.length} differs"
                else:
                    model[o.offset : o.offset + o.length] = o.buf
        assert min(sizes_seen) <= 4096 and max(sizes_seen) >= 256 << 10
        assert h.run([flush_op()]) == [0]
        assert img.read_bytes() == model
        # And everything reads back through the engine, in 1 MiB pieces at QD16.
        reads = [read_op(off, 1 << 20) for off in range(0, SIZE, 1 << 20)]
        assert h.run(reads) == [0] * len(reads)
        assert b"".join(bytes(o.buf or b"") for o in reads) == model
        h.close()
    finally:
        drv.close()


def test_discard_and_errors(workdir: Path, nbdkit_factory: Any) -> None:
    img = workdir / "disk.img"
    _image(img, 5)
    srv = nbdkit_factory(["file", str(img)])
    drv = NbdDriver(srv.uri)
    drv.open()
    try:
        caps = drv.capabilities()
        assert drv.export.flags & FLAG_SEND_TRIM and caps.can_discard
        h = Harness(drv.engine().c)
        assert h.run([discard_op(1 << 20, 256 << 10)]) == [0]
        rd = read_op(1 << 20, 256 << 10)
        assert h.run([rd, flush_op()]) == [0, 0]
        assert bytes(rd.buf or b"") == bytes(256 << 10)
        assert img.read_bytes()[1 << 20 : (1 << 20) + (256 << 10)] == bytes(256 << 10)
        bad = [
            discard_op(0, 4096, secure=True),  # NBD has no secure erase
            read_op(SIZE - 512, 1024),  # past the end
            Op(lib.PV_IO_READ, 0, 0, bytearray(0)),  # empty
            Op(77, 0, 512, bytearray(512)),  # unknown op
        ]
        bad[2].buf = None
        assert h.run(bad) == [-errno.EOPNOTSUPP, -errno.EINVAL, -errno.EINVAL, -errno.EINVAL]
        h.close()
    finally:
        drv.close()


def test_readonly_export(workdir: Path, nbdkit_factory: Any) -> None:
    img = workdir / "disk.img"
    model = _image(img, 9)
    srv = nbdkit_factory(["-r", "file", str(img)])
    drv = NbdDriver(srv.uri, readonly=True)
    drv.open()
    try:
        caps = drv.capabilities()
        assert caps.readonly and not caps.can_discard
        h = Harness(drv.engine().c)
        rd = read_op(4096, 8192)
        res = h.run([rd, write_op(0, b"x" * 512), discard_op(0, 4096)])
        assert res == [0, -errno.EROFS, -errno.EOPNOTSUPP]
        assert rd.buf == model[4096 : 4096 + 8192]
        h.close()
    finally:
        drv.close()


def test_write_sync_without_fua_uses_write_then_flush(workdir: Path, nbdkit_factory: Any) -> None:
    """The fua filter (default mode) hides FUA: WRITE_SYNC must become WRITE, then FLUSH after the reply."""
    img = workdir / "disk.img"
    model = _image(img, 4)
    srv = nbdkit_factory(["--filter=fua", "file", str(img)])
    drv = NbdDriver(srv.uri)
    drv.open()
    try:
        assert not drv.export.flags & (1 << 3)
        h = Harness(drv.engine().c)
        data = os.urandom(64 << 10)
        st0 = drv.stats()
        assert h.run([write_op(8192, data, sync=True)]) == [0]
        st1 = drv.stats()
        assert st1["commands_sent"] - st0["commands_sent"] == 2  # the write, then its flush
        model[8192 : 8192 + len(data)] = data
        assert img.read_bytes() == model
        h.close()
    finally:
        drv.close()


def test_engine_rejects_flags_without_has_flags() -> None:
    err = ffi.new("char[]", 128)
    assert lib.pv_io_engine_nbd_open(0, 1 << 20, 0, err, 128) == ffi.NULL
    assert b"HAS_FLAGS" in ffi.string(err)


@pytest.mark.parametrize("qd", [32])
def test_quick_throughput(workdir: Path, nbdkit_factory: Any, qd: int) -> None:
    """Not a benchmark: a short 4 KiB QD32 random-read run that must sustain a sane rate."""
    import time

    img = workdir / "disk.img"
    model = _image(img, 2)
    srv = nbdkit_factory(["file", str(img)])
    drv = NbdDriver(srv.uri)
    drv.open()
    try:
        h = Harness(drv.engine().c)
        rng = random.Random(1)
        total, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 0.5:
            ops = [read_op(4096 * rng.randrange(SIZE // 4096), 4096) for _ in range(qd)]
            assert h.run(ops) == [0] * qd
            total += qd
        elapsed = time.monotonic() - t0
        assert all(o.buf == model[o.offset : o.offset + 4096] for o in ops)
        print(f"\n4 KiB random read QD{qd} (batch-synchronous, Python harness): {total / elapsed:.0f} ops/s")
        assert total / elapsed > 1000
        h.close()
    finally:
        drv.close()
