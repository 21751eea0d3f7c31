"""The C data path end to end: a real ring page, the emulated grant table, a backing file in tmpfs or on
disk; every byte compared with the backing file."""

from __future__ import annotations

import os
import random
import select
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.blk import proto
from backends.blk.dataplane import QueueDeadError
from backends.blk.proto import Abi
from backends.drivers.storage import FileDriver, NullDriver

from . import wire
from .harness import PAGE, Rig

DISK = 4 << 20
SIZES = [512, 1024, 4096, 4608, 45056, 45568, 65536, 262144, 1 << 20]
OKAY, ERROR, EOPNOTSUPP = proto.RSP_OKAY, proto.RSP_ERROR, proto.RSP_EOPNOTSUPP


@pytest.fixture
def image(request: pytest.FixtureRequest) -> Iterator[Path]:
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path("/tmp")
    p = base / f"pvback-blk-test-{os.getpid()}-{random.getrandbits(32):08x}.img"
    p.write_bytes(random.Random(1).randbytes(DISK))
    yield p
    p.unlink(missing_ok=True)


def make_rig(image: Path, abi: Abi, *, mode: str = "inline", **kw: object) -> tuple[Rig, FileDriver]:
    drv = FileDriver(image, mode=mode, readonly=bool(kw.pop("readonly", False)))  # type: ignore[arg-type]
    drv.open()
    caps = drv.capabilities()
    rig = Rig(drv.engine(), abi=abi, sectors=caps.sectors, readonly=caps.readonly, **kw)  # type: ignore[arg-type]
    return rig, drv


def close(rig: Rig, drv: FileDriver) -> None:
    rig.close()
    drv.close()


def file_bytes(image: Path, off: int, n: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(off)
        return f.read(n)


@pytest.mark.parametrize("abi", [Abi.X86_64, Abi.X86_32])
@pytest.mark.parametrize("persistent", [False, True], ids=["copy", "persistent"])
def test_read_write_round_trip(image: Path, abi: Abi, persistent: bool) -> None:
    rig, drv = make_rig(image, abi, persistent=persistent)
    rnd = random.Random(7)
    nind = 0
    try:
        for size in SIZES:
            first = rnd.randrange(8) if size <= 8 * 512 * 10 else 0
            sector = rnd.randrange(0, (DISK - size) // 512)
            data = rnd.randbytes(size)
            wslot, wp = rig.request(1, sector, size, first=first, data=data)
            assert rig.run([wslot]) == {wp.rid: (wp.op, OKAY)}, size
            assert file_bytes(image, sector * 512, size) == data, size
            rfirst = (first + 3) % 8 if size < (1 << 20) else 0  # 1 MiB at an offset would need 257 segments
            rslot, rp = rig.request(0, sector, size, first=rfirst)
            assert rig.run([rslot]) == {rp.rid: (rp.op, OKAY)}, size
            assert rig.gather(rp) == data, size
            nind += wp.indirect + rp.indirect
        st = rig.q.stats()
        total = sum(SIZES)
        assert st["bytes_read"] == total and st["bytes_written"] == total
        assert st["req_indirect"] == nind >= 8
        assert st["errors"] == 0
        if persistent:
            assert st["persistent_maps"] > 0 and st["persistent_hits"] > 0
            assert rig.q.persistent_grants > 0
        else:
            assert st["persistent_maps"] == 0 and st["grant_copy_calls"] > 0
    finally:
        close(rig, drv)


@pytest.mark.parametrize("abi", [Abi.X86_64, Abi.X86_32])
def test_batch_of_mixed_requests(image: Path, abi: Abi) -> None:
    """A batch holding good and bad requests: each bad one gets its own error, the good ones their data."""
    rig, drv = make_rig(image, abi)
    try:
        good = [rig.request(0, 8 * i, 4096) for i in range(5)]
        bad_op = struct.pack("<B", 9) + good[0][0][1:]
        bad = [
            proto_rw(abi, 1, rig.next_id(), 0, [(rig.data_refs[0], 3, 1)]),  # first > last
            proto_rw(abi, 0, rig.next_id(), DISK // 512, [(rig.data_refs[0], 0, 0)]),  # past the end
            proto_rw(abi, 0, rig.next_id(), 0, [], nseg=0),  # no segments
        ]
        bad_op = bad_op[:8] + struct.pack("<Q", 999) + bad_op[16:] if abi == Abi.X86_64 else bad_op
        slots = [good[0][0], bad[0], good[1][0], bad[1], good[2][0], bad[2], good[3][0], good[4][0]]
        res = rig.run(slots)
        for _slot, p in good:
            assert res[p.rid] == (0, OKAY)
            sector = next(8 * i for i, (_, q) in enumerate(good) if q is p)
            assert rig.gather(p) == file_bytes(image, sector * 512, 4096)
        errs = [v for k, v in res.items() if k not in {p.rid for _, p in good}]
        assert sorted(errs) == [(0, ERROR), (0, ERROR), (1, ERROR)]
        st = rig.q.stats()
        assert st["err_sect_order"] == 1 and st["err_range"] == 1 and st["err_nr_segments"] == 1
    finally:
        close(rig, drv)


def proto_rw(
    abi: Abi, op: int, rid: int, sector: int, segs: list[tuple[int, int, int]], nseg: int | None = None
) -> bytes:
    return wire.rw(int(abi), op, rid, sector, segs, nr_segments=nseg)


@pytest.mark.parametrize("abi", [Abi.X86_64, Abi.X86_32])
def test_response_slots_carry_no_request_bytes(image: Path, abi: Abi) -> None:
    rig, drv = make_rig(image, abi)
    try:
        slots = [rig.request(0, 0, 44 * 1024)[0] for _ in range(4)]  # full 11-segment slots: no zero tail
        rig.run(slots)
        for i in range(4):
            raw = rig.ring_slot(i)
            assert raw[abi.rsp_size :] == b"\0" * (abi.slot_size - abi.rsp_size)
    finally:
        close(rig, drv)


@pytest.mark.parametrize("mode", ["inline", "threaded"])
def test_flush_barrier_discard(image: Path, mode: str) -> None:
    rig, drv = make_rig(image, Abi.X86_64, mode=mode)
    try:
        data = os.urandom(8192)
        w, _ = rig.request(1, 64, 8192, data=data)
        fl = wire.rw(2, 3, rig.next_id(), 0, [], nr_segments=0)
        bdata = os.urandom(4096)
        b, _ = rig.request(2, 200, 4096, data=bdata)  # barrier carrying data
        after, ap = rig.request(0, 64, 8192)  # parked behind the barrier, must see the write
        disc = wire.discard(2, rig.next_id(), 1024, 16)
        res = rig.run([w, fl, b, after, disc])
        assert all(status == OKAY for _, status in res.values()), res
        assert file_bytes(image, 64 * 512, 8192) == data
        assert file_bytes(image, 200 * 512, 4096) == bdata
        assert rig.gather(ap) == data
        assert file_bytes(image, 1024 * 512, 16 * 512) == b"\0" * 8192
        st = rig.q.stats()
        assert st["fences"] == 2 and st["req_flush"] == 1 and st["req_barrier"] == 1 and st["req_discard"] == 1
        # secure discard was not offered: EOPNOTSUPP, and the data stays
        before = file_bytes(image, 2048 * 512, 4096)
        res = rig.run([wire.discard(2, 555, 2048, 8, flag=1)])
        assert res == {555: (5, EOPNOTSUPP)}
        assert file_bytes(image, 2048 * 512, 4096) == before
    finally:
        close(rig, drv)


@pytest.mark.parametrize("persistent", [False, True], ids=["copy", "persistent"])
def test_bad_grants_fail_only_their_request(image: Path, persistent: bool) -> None:
    rig, drv = make_rig(image, Abi.X86_64, persistent=persistent)
    try:
        g = rig.g
        page = g.alloc()[0]
        revoked = g.grant(page)
        g.revoke(revoked)
        foreign = g.grant(page, to=7)  # granted to another domain
        ro = g.grant(page, readonly=True)  # a read needs to write guest memory
        bad = [
            wire.rw(2, 0, 11, 0, [(revoked, 0, 7)]),
            wire.rw(2, 1, 12, 0, [(foreign, 0, 7)]),
            wire.rw(2, 0, 13, 0, [(ro, 0, 7)]),
            wire.rw(2, 0, 14, 0, [(100000, 0, 7)]),  # beyond the grant table
            wire.indirect(2, 0, 15, 0, 3, [revoked]),  # indirect descriptor page not granted
        ]
        before = file_bytes(image, 0, 4096)
        res = rig.run(bad)
        # INDIRECT (15) is answered with its inner operation, as Linux blkfront expects
        assert res == {11: (0, ERROR), 12: (1, ERROR), 13: (0, ERROR), 14: (0, ERROR), 15: (0, ERROR)}
        assert file_bytes(image, 0, 4096) == before  # the refused write wrote nothing
        assert rig.q.stats()["err_grant"] == 5
        slot, p = rig.request(0, 0, 4096)
        assert rig.run([slot]) == {p.rid: (0, OKAY)}
        assert rig.gather(p) == before
        # the ring page stays mapped, plus the persistent pool; nothing from the failed requests
        assert g.table.pinned(1) == 1 + (rig.q.persistent_grants if persistent else 0)
    finally:
        close(rig, drv)


def test_readonly_disk(image: Path) -> None:
    rig, drv = make_rig(image, Abi.X86_32, readonly=True)
    try:
        w, wp = rig.request(1, 0, 4096, data=b"x" * 4096)
        r, rp = rig.request(0, 0, 4096)
        before = file_bytes(image, 0, 4096)
        assert rig.run([w, r]) == {wp.rid: (1, ERROR), rp.rid: (0, OKAY)}
        assert rig.gather(rp) == before == file_bytes(image, 0, 4096)
        assert rig.q.stats()["err_readonly"] == 1
    finally:
        close(rig, drv)


def test_bogus_req_prod_kills_the_queue(image: Path) -> None:
    rig, drv = make_rig(image, Abi.X86_64)
    try:
        slot, p = rig.request(0, 0, 4096)
        assert rig.run([slot]) == {p.rid: (0, OKAY)}
        ring = rig.g.page(rig.ring_page)
        ring[0:4] = struct.pack("<I", (struct.unpack("<I", ring[0:4])[0] + 1000) & 0xFFFFFFFF)
        with pytest.raises(QueueDeadError):
            rig.q.kick()
        with pytest.raises(QueueDeadError):
            rig.q.kick()  # sticky: never loops on it again
        assert rig.q.dead and rig.q.stats()["ring_overflow"] == 1
    finally:
        close(rig, drv)


def test_persistent_pool_evicts_lru(image: Path) -> None:
    rig, drv = make_rig(image, Abi.X86_64, persistent=True, max_persistent_grants=8)
    try:
        for i in range(6):
            slot, p = rig.request(0, 8 * i, 8 * 4096)  # 8 pages each, cycling through the page pool
            assert rig.run([slot]) == {p.rid: (0, OKAY)}
            assert rig.gather(p) == file_bytes(image, 8 * i * 512, 8 * 4096)
        st = rig.q.stats()
        assert rig.q.persistent_grants == 8
        assert st["persistent_evictions"] == st["persistent_maps"] - 8 > 0
    finally:
        close(rig, drv)


def test_persistent_threshold_uses_copy_for_small(image: Path) -> None:
    rig, drv = make_rig(image, Abi.X86_64, persistent=True, persistent_min_bytes=16384)
    try:
        small, sp = rig.request(0, 0, 4096)
        big, bp = rig.request(0, 8, 32768)
        assert rig.run([small, big]) == {sp.rid: (0, OKAY), bp.rid: (0, OKAY)}
        assert rig.q.persistent_grants == 8
        assert rig.gather(sp) == file_bytes(image, 0, 4096)
        assert rig.gather(bp) == file_bytes(image, 8 * 512, 32768)
    finally:
        close(rig, drv)


def test_4k_sector_disk_refuses_misaligned(image: Path) -> None:
    drv = FileDriver(image, mode="inline", sector_size=4096)
    drv.open()
    rig = Rig(drv.engine(), sectors=drv.capabilities().sectors, sector_size=4096)
    try:
        ok, okp = rig.request(0, 8, 4096)
        mis, misp = rig.request(0, 9, 4096)
        part, partp = rig.request(0, 16, 512)
        res = rig.run([ok, mis, part])
        assert res == {okp.rid: (0, OKAY), misp.rid: (0, ERROR), partp.rid: (0, ERROR)}
        assert rig.q.stats()["err_align"] == 2
    finally:
        close(rig, drv)


def test_null_engine_completes_without_touching_data() -> None:
    drv = NullDriver(DISK)
    drv.open()
    rig = Rig(drv.engine(), sectors=DISK // 512)
    try:
        r0, r0p = rig.request(0, 0, 8192)
        assert rig.run([r0]) == {r0p.rid: (0, OKAY)}
        assert rig.gather(r0p) == b"\0" * 8192  # fresh bounce pages are zeroed, never stale heap memory
        w, wp = rig.request(1, 0, 8192, data=b"\x11" * 8192)
        assert rig.run([w]) == {wp.rid: (1, OKAY)}
        r, rp = rig.request(0, 0, 8192)
        assert rig.run([r]) == {rp.rid: (0, OKAY)}
        # the read got recycled bounce pages back: this queue's own earlier data, nothing else
        assert rig.gather(rp) == b"\x11" * 8192
        assert rig.q.stats()["bytes_read"] == 16384
    finally:
        rig.close()
        drv.close()


@pytest.mark.parametrize("poll_us", [0, 300])
def test_threaded_engine_full_ring(image: Path, poll_us: int) -> None:
    rig, drv = make_rig(image, Abi.X86_64, mode="threaded")
    rig.q.set_poll_us(poll_us)
    try:
        reqs = [rig.request(0, 8 * i, 4096) for i in range(rig.front.size)]
        res = rig.run([s for s, _ in reqs])
        assert all(v == (0, OKAY) for v in res.values()) and len(res) == rig.front.size
        for i, (_, p) in enumerate(reqs):
            assert rig.gather(p) == file_bytes(image, 8 * i * 512, 4096)
        assert rig.q.inflight == 0
    finally:
        close(rig, drv)


def test_page_size_constant() -> None:
    assert PAGE == 4096


@pytest.mark.parametrize("abi", [Abi.X86_64, Abi.X86_32])
def test_multi_page_ring_full_batches(image: Path, abi: Abi) -> None:
    rig, drv = make_rig(image, abi, ring_pages=4)
    try:
        assert rig.q.ring_size == rig.front.size == 128
        for rnd in range(3):  # 3 x 128 requests: the indices wrap the ring
            reqs = [rig.request(rnd % 2, 8 * i, 4096, data=os.urandom(4096) if rnd % 2 else None) for i in range(128)]
            res = rig.run([s for s, _ in reqs])
            assert len(res) == 128 and all(st == OKAY for _, st in res.values())
            for i, (_, p) in enumerate(reqs):
                assert rig.gather(p) == file_bytes(image, 8 * i * 512, 4096)
    finally:
        close(rig, drv)


def test_ring_state_tells_unconsumed_from_answered(image: Path) -> None:
    """`ring_state` (the operator's look at a stuck disk): requests the frontend produced but nobody kicked
    for show as req_prod ahead of req_cons; once served, every index meets and the queue holds nothing."""
    rig, drv = make_rig(image, Abi.X86_64, mode="threaded")
    try:
        st = rig.q.ring_state()
        assert (st["req_prod"], st["req_cons"], st["rsp_prod"], st["inflight"]) == (0, 0, 0, 0)
        assert st["free_reqs"] == rig.front.size and st["listening"] == 1
        reqs = [rig.request(0, 8 * i, 4096) for i in range(3)]
        rig.submit([s for s, _ in reqs])
        st = rig.q.ring_state()
        assert (st["req_prod"], st["req_cons"], st["rsp_prod"], st["rsp_next"]) == (3, 0, 0, 0)
        rig.q.kick()
        deadline = time.monotonic() + 5
        while rig.q.ring_state()["rsp_prod"] != 3:
            assert time.monotonic() < deadline, rig.q.ring_state()
            select.select([rig.q.completion_fd], [], [], 0.2)
            rig.q.complete()
        st = rig.q.ring_state()
        assert (st["req_prod"], st["req_cons"], st["rsp_prod"], st["rsp_next"]) == (3, 3, 3, 3)
        assert (st["held"], st["inflight"], st["fence"], st["parked"]) == (0, 0, 0, 0)
        assert st["free_reqs"] == rig.front.size and st["req_event"] == 4  # the final check asked for the next
    finally:
        close(rig, drv)
