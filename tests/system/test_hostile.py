"""Acceptance: a hostile frontend harms nothing but its own requests (or, for ring-protocol violations, its
own device).

Guest A misbehaves; guest B, with its own disk, runs verified I/O for the whole test and must never see an
error, a wrong byte or a stall; the daemon must stay up.  Malformed requests get an error response with the
right status (and are counted under the right reason in the metrics) and A's next valid request works.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends.guests.blkfront import (
    OP_DISCARD,
    OP_FLUSH_DISKCACHE,
    OP_INDIRECT,
    OP_READ,
    OP_WRITE,
    PAGE,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    RSP_OKAY,
    SECTOR,
    BlkFront,
)
from backends.guests.guest import Guest
from backends.guests.workload import Shadow, random_verified
from backends.xenbus.toolstack import wait_for_state
from backends.xenstore.client import Transaction
from tests.system.conftest import XVDA, Bed, Disk, S, make_image

IMAGE_SIZE = 4 << 20
RING_HEADER = 64


@dataclass
class Healthy:
    disk: Disk
    shadow: Shadow
    ops: int = 0
    mismatches: int = 0
    rounds: int = 0


@contextlib.asynccontextmanager
async def healthy_neighbour(bed: Bed, tmp: Path) -> AsyncIterator[Healthy]:
    """Guest B: verified random I/O on its own disk in the background for as long as the block runs."""
    image = make_image(tmp / "b.img", IMAGE_SIZE)
    d = await bed.disk(image, ring_page_order=1)
    h = Healthy(d, Shadow(image.read_bytes()))
    stop = asyncio.Event()

    async def run() -> None:
        while not stop.is_set():
            r = await random_verified(d.front, h.shadow, seconds=0.3, max_ops=40, depth=2,
                                      sizes=(512, 4096, 65536), seed=h.rounds + 1)
            h.rounds += 1
            h.ops += r.ops
            h.mismatches += len(r.mismatches)

    task = asyncio.create_task(run())
    try:
        yield h
        before = h.ops
        # B must still make progress after whatever A did.
        async with asyncio.timeout(10):
            while h.ops <= before:
                if task.done():
                    break
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task  # raises if any of B's requests failed
    assert h.mismatches == 0
    assert h.ops > 0
    await d.front.flush()
    assert image.read_bytes() == bytes(h.shadow.data)
    assert await bed.serve.errors(d.domid) == {}


async def a_works(d: Disk, tag: int) -> None:
    """A valid write and read-back on A."""
    data = bytes([tag & 0xFF]) * 4096 + os.urandom(4096)
    await d.front.write(8 * tag, data)
    assert await d.front.read(8 * tag, len(data)) == data


# -- malformed requests -------------------------------------------------------------------------------------

Build = Callable[[BlkFront, int, list[tuple[int, int]]], bytes]


@dataclass(frozen=True)
class Bad:
    name: str
    build: Build
    status: int
    reason: str
    pages: int = 1  # data pages (page, ref) handed to build


def _rw(op: int, nseg: int, sector: int, segs: Callable[[list[tuple[int, int]]], list[tuple[int, int, int]]]
        ) -> Build:
    return lambda f, rid, pages: f.abi.pack_rw(op, nseg, 0, rid, sector, segs(pages))


def _full(pages: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    return [(ref, 0, 7) for _p, ref in pages]


def _op(code: int) -> Build:
    def build(f: BlkFront, rid: int, pages: list[tuple[int, int]]) -> bytes:
        b = bytearray(f.abi.pack_rw(OP_READ, 1, 0, rid, 0, _full(pages)))
        b[0] = code
        return bytes(b)
    return build


def _indirect(iop: int, nseg: int, grefs: Callable[[list[tuple[int, int]]], list[int]], sector: int = 0) -> Build:
    return lambda f, rid, pages: f.abi.pack_indirect(iop, nseg, 0, rid, sector, grefs(pages))


def _one_seg(ref: int) -> Callable[[list[tuple[int, int]]], list[tuple[int, int, int]]]:
    return lambda pages: [(ref, 0, 7)]


def _bind(build: Build, f: BlkFront, pages: list[tuple[int, int]]) -> Callable[[int], bytes]:
    return lambda rid: build(f, rid, pages)


END = IMAGE_SIZE // SECTOR

BAD: list[Bad] = [
    Bad("unknown-op", _op(9), RSP_EOPNOTSUPP, "bad_op"),
    Bad("op-255", _op(255), RSP_EOPNOTSUPP, "bad_op"),
    Bad("reserved-op-4", _op(4), RSP_EOPNOTSUPP, "unsupported"),
    Bad("read-0-segments", _rw(OP_READ, 0, 0, lambda p: []), RSP_ERROR, "nr_segments", 0),
    Bad("write-0-segments", _rw(OP_WRITE, 0, 0, lambda p: []), RSP_ERROR, "nr_segments", 0),
    Bad("read-12-segments", _rw(OP_READ, 12, 0, lambda p: _full(p)[:11]), RSP_ERROR, "nr_segments", 11),
    Bad("write-255-segments", _rw(OP_WRITE, 255, 0, lambda p: _full(p)), RSP_ERROR, "nr_segments", 2),
    Bad("first-after-last", _rw(OP_READ, 1, 0, lambda p: [(p[0][1], 5, 2)]), RSP_ERROR, "sect_order"),
    Bad("last-sect-8", _rw(OP_WRITE, 1, 0, lambda p: [(p[0][1], 0, 8)]), RSP_ERROR, "sect_page"),
    Bad("last-sect-255", _rw(OP_READ, 1, 0, lambda p: [(p[0][1], 7, 255)]), RSP_ERROR, "sect_page"),
    Bad("past-end", _rw(OP_READ, 1, END - 7, _full), RSP_ERROR, "range"),
    Bad("at-end", _rw(OP_WRITE, 1, END, lambda p: [(p[0][1], 0, 0)]), RSP_ERROR, "range"),
    Bad("wraps-2^64", _rw(OP_WRITE, 1, (1 << 64) - 4, _full), RSP_ERROR, "overflow"),
    Bad("bad-gref", _rw(OP_READ, 1, 0, lambda p: [(0xFFFFFFF0, 0, 7)]), RSP_ERROR, "grant", 0),
    Bad("reserved-gref", _rw(OP_WRITE, 1, 0, lambda p: [(3, 0, 7)]), RSP_ERROR, "grant", 0),
    # 4 pages = 16 KiB: with persistent grants on, this goes through the map path and its fallback.
    Bad("bad-gref-large", _rw(OP_WRITE, 4, 0, lambda p: [*_full(p)[:3], (0x7FFFFFFF, 0, 7)]), RSP_ERROR,
        "grant", 3),
    Bad("discard-past-end", lambda f, rid, p: f.abi.pack_discard(0, 0, rid, END - 8, 16), RSP_ERROR, "range", 0),
    Bad("discard-wraps", lambda f, rid, p: f.abi.pack_discard(0, 0, rid, 1 << 63, 1 << 63), RSP_ERROR,
        "overflow", 0),
    Bad("flush-12-segments", _rw(OP_FLUSH_DISKCACHE, 12, 0, lambda p: _full(p)[:11]), RSP_ERROR, "nr_segments",
        11),
    Bad("indirect-257-segments", _indirect(OP_WRITE, 257, lambda p: [r for _pg, r in p]), RSP_ERROR,
        "indirect_nr_segments", 2),
    Bad("indirect-0-segments", _indirect(OP_READ, 0, lambda p: [p[0][1]]), RSP_ERROR, "indirect_nr_segments"),
    Bad("indirect-op-flush", _indirect(OP_FLUSH_DISKCACHE, 1, lambda p: [p[0][1]]), RSP_ERROR, "indirect_op"),
    Bad("indirect-op-indirect", _indirect(OP_INDIRECT, 1, lambda p: [p[0][1]]), RSP_ERROR, "indirect_op"),
    Bad("indirect-op-discard", _indirect(OP_DISCARD, 1, lambda p: [p[0][1]]), RSP_ERROR, "indirect_op"),
    Bad("indirect-bad-page-gref", _indirect(OP_READ, 16, lambda p: [0xFFFFFF00]), RSP_ERROR, "grant", 0),
]


def _fill_indirect(f: BlkFront, page: int, segs: list[tuple[int, int, int]]) -> None:
    view = f.guest.page_view(page)
    view[:] = bytes(PAGE)
    for j, (g, first, last) in enumerate(segs):
        struct.pack_into("<IBBxx", view, 8 * j, g, first, last)


async def test_malformed_requests(shared_bed: Bed, tmp_path: Path) -> None:
    bed = shared_bed
    async with healthy_neighbour(bed, tmp_path) as _b:
        a = await bed.disk(make_image(tmp_path / "a.img", IMAGE_SIZE), persistent=True)
        f = a.front
        expected: dict[str, int] = {}
        for i, bad in enumerate(BAD):
            pages = await f.take_pages(bad.pages) if bad.pages else []
            try:
                status = await f.submit_raw_op(_bind(bad.build, f, pages), check=False)
            finally:
                await f.give_pages(pages)
            assert status == bad.status, f"{bad.name}: status {status}, want {bad.status}"
            expected[bad.reason] = expected.get(bad.reason, 0) + 1
            await a_works(a, i + 1)
        # Grants the guest took back, or never gave to us.
        g = a.guest
        page = g.alloc_page()
        grant_cases: list[tuple[str, Callable[[], int]]] = [
            ("revoked", lambda: _revoked(g, page)),
            ("foreign-domain", lambda: g.grant(page, 7)),
            ("readonly-grant-for-read", lambda: g.grant(page, 0, readonly=True)),
        ]
        for name, ref_of in grant_cases:
            ref = ref_of()
            status = await f.submit_raw_op(_bind(_rw(OP_READ, 1, 0, _one_seg(ref)), f, []), check=False)
            assert status == RSP_ERROR, f"{name}: status {status}"
            expected["grant"] += 1
            if ref in g.granted:
                g.revoke(ref)
            await a_works(a, 40)
        # Indirect pages full of garbage, and an indirect page whose segments are well formed but hostile.
        ind = g.alloc_page()
        ind_ref = g.grant(ind, 0, readonly=True)
        rng = random.Random(7)
        for trial in range(8):
            g.page_view(ind)[:] = rng.randbytes(PAGE)
            iop = OP_READ if trial % 2 else OP_WRITE
            status = await f.submit_raw_op(_bind(_indirect(iop, 64, lambda p: [ind_ref]), f, []), check=False)
            assert status == RSP_ERROR, f"garbage indirect page {trial}: status {status}"
            await a_works(a, 41)
        data_pages = await f.take_pages(2)
        try:
            for segs, reason in (
                ([(data_pages[0][1], 0, 7), (data_pages[1][1], 6, 3)], "sect_order"),
                ([(data_pages[0][1], 0, 7), (data_pages[1][1], 0, 9)], "sect_page"),
                ([(data_pages[0][1], 0, 7), (0xFFFFFFF, 0, 7)], "grant"),
            ):
                _fill_indirect(f, ind, segs)
                status = await f.submit_raw_op(_bind(_indirect(OP_WRITE, len(segs), lambda p: [ind_ref], END - 16),
                                                     f, []), check=False)
                assert status == RSP_ERROR, f"indirect {reason}: status {status}"
                expected[reason] += 1
                await a_works(a, 42)
            # The same page made valid: the request now succeeds and lands at the right place.
            payload = os.urandom(2 * PAGE)
            for k, (p, _r) in enumerate(data_pages):
                g.page_view(p)[:] = payload[k * PAGE:(k + 1) * PAGE]
            _fill_indirect(f, ind, [(r, 0, 7) for _p, r in data_pages])
            status = await f.submit_raw_op(
                lambda rid: f.abi.pack_indirect(OP_WRITE, 2, 0, rid, END - 16, [ind_ref]), check=False)
            assert status == RSP_OKAY
            assert await f.read(END - 16, 2 * PAGE) == payload
        finally:
            await f.give_pages(data_pages)
        errors = await bed.serve.errors(a.domid)
        for reason, n in expected.items():
            assert errors.get(reason, 0) >= n, f"reason {reason}: counted {errors.get(reason, 0)}, sent {n}"
        assert await bed.backend_state(a) == S.CONNECTED
        assert await bed.backend_error(a) is None


def _revoked(g: Guest, page: int) -> int:
    ref = g.grant(page, 0)
    g.revoke(ref)
    return ref


async def test_readonly_disk_refuses_writes(shared_bed: Bed, tmp_path: Path) -> None:
    """mode=r: reads work; writes, barriers, discards and indirect writes are refused; the file is untouched.
    Flush: a read-only disk advertises neither feature-flush-cache nor feature-barrier (there is nothing to
    make durable), so a flush is answered EOPNOTSUPP like any operation the disk does not offer."""
    bed = shared_bed
    image = make_image(tmp_path / "ro.img", IMAGE_SIZE)
    before = image.read_bytes()
    d = await bed.disk(image, mode="r")
    assert d.info is not None and d.info.readonly
    assert (d.info.flush, d.info.barrier, d.info.discard) == (False, False, False)
    assert await d.front.read(0, 1 << 20) == before[:1 << 20]
    assert await d.front.read(100, 512) == before[100 * 512:101 * 512]
    f = d.front
    pages = await f.take_pages(16)
    try:
        segs = [(r, 0, 7) for _p, r in pages]
        assert await f.submit_raw_op(lambda rid: f.abi.pack_rw(OP_WRITE, 1, 0, rid, 0, segs[:1]),
                                     check=False) == RSP_ERROR
        assert await f.submit_raw_op(lambda rid: f.abi.pack_rw(OP_WRITE, 11, 0, rid, 8, segs[:11]),
                                     check=False) == RSP_ERROR
        ind = await f.take_pages(1)
        _fill_indirect(f, ind[0][0], segs)
        assert await f.submit_raw_op(lambda rid: f.abi.pack_indirect(OP_WRITE, 16, 0, rid, 0, [ind[0][1]]),
                                     check=False) == RSP_ERROR
        await f.give_pages(ind)
        assert await f.submit_raw_op(lambda rid: f.abi.pack_rw(2, 1, 0, rid, 0, segs[:1]),  # WRITE_BARRIER
                                     check=False) == RSP_EOPNOTSUPP
        assert await f.submit_raw_op(lambda rid: f.abi.pack_discard(0, 0, rid, 0, 8), check=False) == RSP_EOPNOTSUPP
        assert await f.submit_raw_op(lambda rid: f.abi.pack_rw(OP_FLUSH_DISKCACHE, 0, 0, rid, 0, []),
                                     check=False) == RSP_EOPNOTSUPP
    finally:
        await f.give_pages(pages)
    assert await d.front.read(0, 8192) == before[:8192]
    errors = await bed.serve.errors(d.domid)
    assert errors.get("readonly", 0) == 3, errors
    assert errors.get("unsupported", 0) == 3, errors
    assert image.read_bytes() == before


@pytest.mark.parametrize("store", ["shm", "disk"])
async def test_discard_reads_back_zeros(store: str, shared_bed: Bed, shm_dir: Path, tmp_path: Path) -> None:
    bed = shared_bed
    image = make_image((shm_dir if store == "shm" else tmp_path) / "disc.img", IMAGE_SIZE)
    shadow = Shadow(image.read_bytes())
    d = await bed.disk(image)
    assert d.info is not None and d.info.discard
    for sector, nr in ((0, 8), (64, 256), (1001, 3), (2048 + 1, 8 * 33)):  # aligned, large, sub-page, unaligned
        await d.front.discard(sector, nr)
        shadow.discard(sector * SECTOR, nr * SECTOR)
        assert await d.front.read(sector, nr * SECTOR) == bytes(nr * SECTOR)
    # Neighbours of the discarded ranges are untouched.
    assert await d.front.read(0, 1 << 20) == bytes(shadow.data[:1 << 20])
    await d.front.flush()
    assert image.read_bytes() == bytes(shadow.data)


@pytest.mark.parametrize("abi", ["x86_64", "x86_32"])
async def test_responses_leak_nothing(abi: str, shared_bed: Bed, tmp_path: Path) -> None:
    """After each response, the slot holds the response's fields and zeros: none of the request's bytes (which
    sat in the same slot) and nothing else the backend had in memory."""
    bed = shared_bed
    d = await bed.disk(make_image(tmp_path / "leak.img", IMAGE_SIZE), abi=abi)
    f = d.front
    q = f.queues[0]
    ring_mem = f.guest.page_view(q.ring_pages[0])
    pages = await f.take_pages(11)
    try:
        segs = [(r, 0, 7) for _p, r in pages]
        builds: list[tuple[Callable[[int], bytes], int]] = [
            (lambda rid: f.abi.pack_rw(OP_READ, 11, 0xBEEF, rid, 16, segs), RSP_OKAY),
            (lambda rid: f.abi.pack_rw(OP_WRITE, 11, 0xBEEF, rid, 16, segs), RSP_OKAY),
            (lambda rid: f.abi.pack_rw(OP_WRITE, 11, 0xBEEF, rid, (1 << 64) - 1, segs), RSP_ERROR),
            (lambda rid: bytes([77]) + f.abi.pack_rw(OP_READ, 11, 0xBEEF, rid, 16, segs)[1:], RSP_EOPNOTSUPP),
            (lambda rid: f.abi.pack_discard(1, 0xBEEF, rid, 8, 8), RSP_EOPNOTSUPP),  # secure: not offered
            (lambda rid: f.abi.pack_rw(OP_FLUSH_DISKCACHE, 0, 0xBEEF, rid, 100, []), RSP_OKAY),
        ]
        for k, (build, want) in enumerate(builds * 3):
            idx = q.ring.c.req_prod_pvt % q.ring.size
            sent = b""
            sent_id = -1

            def keep(rid: int, build: Callable[[int], bytes] = build) -> bytes:
                nonlocal sent, sent_id
                sent, sent_id = build(rid), rid
                return sent

            status = await f.submit_raw_op(keep, check=False)
            assert status == want, f"request {k}: status {status}, want {want}"
            off = RING_HEADER + idx * f.abi.slot
            slot = bytes(ring_mem[off:off + f.abi.slot])
            rid, op, st = struct.unpack_from("<QBxh", slot, 0)
            assert (rid, op, st) == (sent_id, sent[0], want)
            assert slot[9] == 0, "response padding after operation"
            assert slot[12:] == bytes(f.abi.slot - 12), \
                f"slot {idx} bytes past the response are not zero: {slot[12:].hex()}"
            assert any(sent[12:]), "the request did not fill the slot (the check would prove nothing)"
    finally:
        await f.give_pages(pages)


# -- ring-protocol violations: only that device fails ---------------------------------------------------------


async def _failed(bed: Bed, d: Disk) -> str:
    xs = await bed.dom0()
    st = await wait_for_state(xs, d.paths.backend, {S.CLOSING, S.CLOSED}, timeout=10)
    err = await bed.backend_error(d)
    assert err, f"backend {d.paths.backend} is {st.name} without an error node"
    linux_place = f"/local/domain/0/error/backend/qdisk/{d.domid}/{d.devid}/error"
    assert await xs.read_str(linux_place) == err
    return err


@pytest.mark.parametrize("delta", ["size+1", "-1", "2^31"])
async def test_bogus_req_prod_fails_only_that_device(delta: str, shared_bed: Bed, tmp_path: Path) -> None:
    bed = shared_bed
    async with healthy_neighbour(bed, tmp_path):
        a = await bed.disk(make_image(tmp_path / "a.img", IMAGE_SIZE))
        bystander = await bed.disk(make_image(tmp_path / "c.img", IMAGE_SIZE), devid=XVDA + 16,
                                   guest=(a.guest, a.xs))  # A's second disk: its own ring, unaffected
        await a_works(a, 1)
        q = a.front.queues[0]
        ring_mem = a.guest.page_view(q.ring_pages[0])
        prod = q.ring.c.req_prod_pvt
        bogus = {"size+1": prod + q.ring.size + 1, "-1": prod - 1, "2^31": prod + (1 << 31)}[delta] & 0xFFFFFFFF
        struct.pack_into("<I", ring_mem, 0, bogus)
        q.port.notify()
        err = await _failed(bed, a)
        assert "ring" in err or "bogus" in err, err
        await a_works(bystander, 2)
        assert await bed.backend_state(bystander) == S.CONNECTED
        assert bed.serve.alive


async def test_event_storm(shared_bed: Bed, tmp_path: Path) -> None:
    """A notifies its port in a tight loop (from another thread, as another vCPU would) for 2 s: the daemon
    keeps answering B and the metrics endpoint, and A's device still works afterwards."""
    bed = shared_bed
    async with healthy_neighbour(bed, tmp_path) as b:
        a = await bed.disk(make_image(tmp_path / "a.img", IMAGE_SIZE))
        port = a.front.queues[0].port
        stop = threading.Event()
        count = [0]

        def storm() -> None:
            n = 0
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not stop.is_set():
                for _ in range(1000):
                    port.notify()
                n += 1000
            count[0] = n

        th = threading.Thread(target=storm)
        ops0 = b.ops
        th.start()
        try:
            worst = 0.0
            while th.is_alive():
                t0 = time.monotonic()
                await bed.serve.metrics(timeout=5)
                await a_works(a, 3)
                worst = max(worst, time.monotonic() - t0)
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.to_thread(th.join, 10)
        assert count[0] >= 100_000, f"only {count[0]} notifies"
        assert b.ops > ops0, "B made no progress during the storm"
        assert worst < 2.0, f"a metrics scrape + A's I/O took {worst:.2f} s during the storm"
        await a_works(a, 4)
        assert await bed.backend_state(a) == S.CONNECTED


GARBAGE_KEYS: list[tuple[str, dict[str, str]]] = [
    ("ring-ref-text", {"ring-ref": "garbage"}),
    ("ring-ref-negative", {"ring-ref": "-5"}),
    ("ring-ref-huge", {"ring-ref": "99999999999999999999"}),
    ("ring-ref-ungranted", {"ring-ref": "5"}),
    ("event-channel-text", {"event-channel": "x"}),
    ("event-channel-unbound", {"event-channel": "4000"}),
    ("protocol", {"protocol": "x86_99-abi"}),
    ("ring-page-order-9", {"ring-page-order": "9", "ring-ref0": "{ref}"}),
    ("queues-3", {"multi-queue-num-queues": "3"}),
    ("queues-0", {"multi-queue-num-queues": "0"}),
    ("control-chars", {"ring-ref": "1\n2"}),
    ("long-value", {"protocol": "x" * 1000}),
]


@pytest.mark.parametrize("name,override", GARBAGE_KEYS, ids=[n for n, _ in GARBAGE_KEYS])
async def test_garbage_ring_keys_fail_only_that_device(name: str, override: dict[str, str], shared_bed: Bed,
                                                       tmp_path: Path) -> None:
    bed = shared_bed
    a = await bed.disk(make_image(tmp_path / "a.img", IMAGE_SIZE), connect=False)
    other = await bed.disk(make_image(tmp_path / "o.img", IMAGE_SIZE))
    g, xs = a.guest, a.xs
    page = g.alloc_page()
    ref = g.grant(page, 0)
    port = g.alloc_unbound(0)
    keys = {"ring-ref": str(ref), "event-channel": str(port.port), "protocol": "x86_64-abi",
            "feature-persistent": "1"}
    if "multi-queue-num-queues" in override:
        keys = {"protocol": "x86_64-abi", "queue-0/ring-ref": str(ref), "queue-0/event-channel": str(port.port)}
    keys.update({k: v.format(ref=ref) for k, v in override.items()})
    if "ring-page-order" in override:
        keys.pop("ring-ref")
    fe = a.front.fe_path

    async def body(tx: Transaction) -> None:
        for k, v in keys.items():
            await tx.write(f"{fe}/{k}", v)
        await tx.write(f"{fe}/state", str(int(S.INITIALISED)))

    await xs.transaction(body)
    await _failed(bed, a)
    assert bed.serve.alive
    await a_works(other, 5)
    assert await bed.backend_state(other) == S.CONNECTED
    async with asyncio.timeout(5):
        while True:  # the backend lets go of the ring page (if it ever mapped it)
            try:
                g.revoke(ref)
                break
            except OSError:
                await asyncio.sleep(0.02)
    port.close()
