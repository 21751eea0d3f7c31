"""Acceptance (issue #11, durability made observable): the order in which a guest's writes and flushes reach
storage, recorded by nbdkit's log filter behind `pvback serve`'s NBD driver, and checked against what the guest
was promised: every write acknowledged before a flush was submitted is on storage before that flush completes.

The guest (an emulated domain with BlkFront) runs phases at queue depths 1, 4, 16 and 32: each worker writes
requests of 4 KiB .. 512 KiB (direct up to 11 segments, indirect above), each to a region of the disk no other
request touches, so every NBD write in the log belongs to exactly one guest request, and flushes after every few
writes while the other workers' writes are in flight; some writes are barriers (BLKIF_OP_WRITE_BARRIER) when the
backend offers them.  For each request the guest records a sequence number at submit and at completion and
the size of nbdkit's log file right after it took the completion off the ring (tests/system/nbdlog.py says why
that bounds what storage had done).  The checker must be able to fail: it is run on the same trace with the log
altered, and on a live run where nbdkit's fua filter drops every flush before the log filter sees it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from backends.guests.blkfront import SECTOR, BlkFront
from tests.system.conftest import Bed, Nbdkit, make_image
from tests.system.nbdlog import BARRIER, FLUSH, WRITE, GuestOp, NbdCmd, check, parse_log

IMAGE_SIZE = 128 << 20
# 45056 B is the largest direct request (11 segments), 49152 B the smallest indirect one.
MAX_DIRECT = 45056
SIZES = (4096, 8192, MAX_DIRECT, 49152, 131072, 262144, 524288)
SIZE_WEIGHTS = (4, 3, 2, 2, 2, 1, 1)
PHASES = ((1, 48), (4, 24), (16, 12), (32, 8))  # (queue depth, writes per worker)
# A gap between regions: an engine that merged adjacent writes into one NBD write would otherwise make the
# mapping from NBD writes to guest requests ambiguous.
GAP = 4096
BARRIER_SHARE = 1 / 4


# -- the export ---------------------------------------------------------------------------------------------


@dataclass
class LoggedExport:
    server: Nbdkit
    image: Path
    log: Path


StartExport = Callable[..., LoggedExport]


@pytest.fixture
def logged_export() -> Iterator[StartExport]:
    """nbdkit's file plugin behind the log filter (and `outer` filters in front of it), in a private
    directory (unix socket paths are limited to 108 bytes: not tmp_path).  The image is on the root disk, so
    an NBD flush is a real fdatasync.  Stopped by PID after the test's Bed has let go of the export."""
    d = Path(tempfile.mkdtemp(prefix="pvb-dur-", dir="/tmp"))
    started: list[LoggedExport] = []

    def start(*, outer: tuple[str, ...] = (), params: tuple[str, ...] = ()) -> LoggedExport:
        image = make_image(d / "export.img", IMAGE_SIZE, random_fill=False)
        log = d / "commands.log"
        server = Nbdkit(image, d, filters=(*outer, "log"), params=(f"logfile={log}", *params))
        started.append(LoggedExport(server, image, log))
        return started[-1]

    try:
        yield start
    finally:
        for e in started:
            e.server.stop()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


# -- the guest's record -------------------------------------------------------------------------------------


def payload(tag: int, size: int) -> bytes:
    """Data no other request writes: every sector names its request and its place in it."""
    b = bytearray(bytes([tag % 251 + 1]) * size)
    for s in range(size // SECTOR):
        struct.pack_into("<8sQQ", b, s * SECTOR, b"pvbdurab", tag, s)
    return bytes(b)


class Recorder:
    """Drives a BlkFront and records each request as a GuestOp."""

    def __init__(self, front: BlkFront, log: Path) -> None:
        self.front = front
        self.log = log
        self.seq = itertools.count()
        self.ops: list[GuestOp] = []
        self.next_offset = 0
        self.completion_pos = -1

    def _pos(self) -> int:
        return os.stat(self.log).st_size

    def watch_completions(self) -> None:
        """Read the log's size right after each batch of responses is taken off a ring.  A request's coroutine
        resumes only later (after other callbacks of the loop), and the later the size is read, the more a
        backend that acknowledged a flush early could get away with; never the reverse, since the size only
        grows.  BlkFront.release removes these readers with its own."""
        loop = asyncio.get_running_loop()

        def reader(on_event: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                on_event()
                self.completion_pos = self._pos()
            return run

        for q in self.front.queues:
            loop.remove_reader(q.port.fileno())
            loop.add_reader(q.port.fileno(), reader(q.on_event))

    def region(self, size: int) -> int:
        off = self.next_offset
        self.next_offset += size + GAP
        if self.next_offset > IMAGE_SIZE:
            raise ValueError("the workload outgrew the image")
        return off

    async def write(self, size: int, *, barrier: bool = False) -> None:
        op = GuestOp(BARRIER if barrier else WRITE, self.region(size), size)
        data = payload(len(self.ops), size)
        self.ops.append(op)
        op.submit_pos = self._pos()
        op.submit_seq = next(self.seq)
        await self.front.write(op.offset // SECTOR, data, barrier=barrier)
        op.ack_pos = self.completion_pos
        op.ack_seq = next(self.seq)

    async def flush(self) -> None:
        op = GuestOp(FLUSH)
        self.ops.append(op)
        op.submit_pos = self._pos()
        op.submit_seq = next(self.seq)
        await self.front.flush()
        op.ack_pos = self.completion_pos
        op.ack_seq = next(self.seq)


async def run_workload(rec: Recorder, phases: tuple[tuple[int, int], ...], *, barriers: bool, seed: int) -> None:
    rng = random.Random(seed)

    async def worker(wr: random.Random, writes: int) -> None:
        every = wr.randint(1, 4)
        since = 0
        for _ in range(writes):
            size = wr.choices(SIZES, SIZE_WEIGHTS)[0]
            # blkif has no indirect barrier (Linux blkback refuses indirect_op other than READ/WRITE, and
            # so does ours): a barrier carries at most 11 segments.
            barrier = barriers and size <= MAX_DIRECT and wr.random() < BARRIER_SHARE
            await rec.write(size, barrier=barrier)
            since += 1
            if since >= every:
                await rec.flush()
                since, every = 0, wr.randint(1, 4)

    for depth, writes in phases:
        await asyncio.gather(*(worker(random.Random(rng.random()), writes) for _ in range(depth)))
    await rec.flush()


# -- helpers ------------------------------------------------------------------------------------------------


def max_in_flight(ops: list[GuestOp]) -> int:
    events = sorted([(o.submit_seq, 1) for o in ops] + [(o.ack_seq, -1) for o in ops])
    return max(itertools.accumulate(d for _s, d in events))


def fences_overlapping_writes(ops: list[GuestOp]) -> int:
    """Flushes that were in flight while some write was: the interleaving this test is about."""
    data = [(o.submit_seq, o.ack_seq) for o in ops if o.data]
    return sum(1 for f in ops if f.fence and any(s < f.ack_seq and f.submit_seq < a for s, a in data
                                                 if (s, a) != (f.submit_seq, f.ack_seq)))


def owed(ops: list[GuestOp]) -> list[int]:
    """Indices of the fences that had at least one write acknowledged before they were submitted."""
    return [i for i, f in enumerate(ops) if f.fence and any(o.data and o.ack_seq < f.submit_seq for o in ops)]


async def attach(bed: Bed, export: LoggedExport, *, abi: str = "x86_64", order: int = 2, queues: int = 2,
                 persistent: bool = True) -> tuple[BlkFront, Recorder]:
    d = await bed.disk(None, params=f"nbd:unix:{export.server.sock}", abi=abi, ring_page_order=order,
                       queues=queues, persistent=persistent)
    assert d.info is not None and d.info.size_bytes == IMAGE_SIZE
    assert d.info.flush, "the NBD disk does not offer feature-flush-cache: nothing to check"
    assert d.info.max_indirect_segments >= max(SIZES) // 4096, "indirect requests are part of the workload"
    rec = Recorder(d.front, export.log)
    rec.watch_completions()
    return d.front, rec


def read_log(export: LoggedExport) -> list[NbdCmd]:
    return parse_log(export.log.read_bytes())


# -- tests --------------------------------------------------------------------------------------------------


# Two frontend shapes: flush is a fence per queue in the backend, so one queue and two take different paths;
# persistent grants and grant copy hand the engine differently built buffers.
SHAPES = [pytest.param("x86_64", 2, 2, True, 11, id="x86_64-o2-q2-pers"),
          pytest.param("x86_32", 0, 1, False, 12, id="x86_32-o0-q1-copy")]


@pytest.mark.system_timeout(60)
@pytest.mark.parametrize("abi,order,queues,persistent,seed", SHAPES)
async def test_acked_writes_are_on_storage_before_the_flush_completes(
        abi: str, order: int, queues: int, persistent: bool, seed: int, shared_bed: Bed,
        logged_export: StartExport) -> None:
    t0 = time.monotonic()
    export = logged_export()
    front, rec = await attach(shared_bed, export, abi=abi, order=order, queues=queues, persistent=persistent)
    assert front.info is not None
    t1 = time.monotonic()
    await run_workload(rec, PHASES, barriers=front.info.barrier, seed=seed)
    t2 = time.monotonic()
    cmds = await asyncio.to_thread(read_log, export)
    report = check(rec.ops, cmds)
    assert not report.violations, report.summary()
    assert await shared_bed.serve.errors(rec.front.guest.domid) == {}

    kinds = Counter(o.kind for o in rec.ops)
    nbd = Counter(c.action for c in cmds)
    fences = [i for i, o in enumerate(rec.ops) if o.fence]
    # The run must have exercised what the check is about, or a pass means nothing.
    assert kinds[WRITE] + kinds[BARRIER] == sum(d * w for d, w in PHASES)
    assert report.fences_checked == len(fences) and report.obligations > 1000, report.obligations
    assert len(report.landings) == kinds[WRITE] + kinds[BARRIER]
    assert any(o.length > MAX_DIRECT for o in rec.ops), "no indirect request"
    assert max_in_flight(rec.ops) >= 16
    assert fences_overlapping_writes(rec.ops) > 0
    assert nbd["Flush"] > 0 and nbd["Write"] >= len(report.landings)
    if front.info.barrier:
        assert kinds[BARRIER] > 0

    # What the log says was written is what the guest wrote (and lies where the log says).
    with open(export.image, "rb") as img:
        for i, o in enumerate(rec.ops):
            if o.data:
                assert os.pread(img.fileno(), o.length, o.offset) == payload(i, o.length), o.describe(i)

    # Negative controls on this very trace: each alteration is a real ordering bug, and the checker sees it.
    due = owed(rec.ops)
    assert len(due) >= len(fences) - 1
    no_flush = check(rec.ops, [c for c in cmds if c.action != "Flush"])
    assert no_flush.broken_fences >= {i for i in due if rec.ops[i].kind == FLUSH}, no_flush.summary()
    # One write, moved in the log to return only after the last flush was acknowledged.
    last = fences[-1]
    victim = max((i for i in report.landings if rec.ops[i].ack_seq < rec.ops[last].submit_seq),
                 key=lambda i: rec.ops[i].ack_seq)
    late = rec.ops[last].ack_pos + 1
    moved = [replace(c, end=late) if c in report.landings[victim].pieces else c for c in cmds]
    reordered = check(rec.ops, moved)
    assert last in reordered.broken_fences, reordered.summary()
    assert reordered.acked_early == {victim}, reordered.summary()
    # Every fence acknowledged at the moment its latest earlier write returned: no flush fits in between.
    early = list(rec.ops)
    for i in due:
        f = rec.ops[i]
        early[i] = replace(f, ack_pos=max(report.landings[j].end for j in report.landings
                                          if rec.ops[j].ack_seq < f.submit_seq))
    assert check(early, cmds).broken_fences == set(due)

    print(f"\ndurability: {kinds[WRITE]} writes, {kinds[BARRIER]} barrier writes, {kinds[FLUSH]} flushes; "
          f"NBD {dict(nbd)}; {report.obligations} (fence, earlier write) pairs checked; "
          f"max {max_in_flight(rec.ops)} in flight, {fences_overlapping_writes(rec.ops)} fences overlapping "
          f"writes; negative controls flagged {len(no_flush.broken_fences)} / {len(due)} fences "
          f"(flushes removed); set-up {t1 - t0:.1f} s, workload {t2 - t1:.1f} s, checks {time.monotonic() - t2:.1f} s")


@pytest.mark.system_timeout(60)
async def test_checker_catches_flushes_that_never_reach_storage(shared_bed: Bed, logged_export: StartExport) -> None:
    """A live negative control: nbdkit's fua filter in front of the log filter acknowledges every flush (and
    FUA) without passing it on, as a write-back cache that lies would.  The guest's flushes all succeed; the
    checker must name them."""
    export = logged_export(outer=("fua",), params=("fuamode=discard",))
    front, rec = await attach(shared_bed, export)
    assert front.info is not None
    await run_workload(rec, ((4, 6),), barriers=front.info.barrier, seed=13)
    cmds = await asyncio.to_thread(read_log, export)
    assert not [c for c in cmds if c.action == "Flush"], "the fua filter let a flush through"
    report = check(rec.ops, cmds)
    due = owed(rec.ops)
    assert due and set(due) <= report.broken_fences, report.summary()
    # Only the flushes are wrong: every write reached storage where and before the guest was told.
    assert len(report.landings) == sum(o.data for o in rec.ops)
    assert all("no NBD flush" in v for v in report.violations), report.summary()


def test_parse_log_format() -> None:
    """The log filter's format as nbdkit 1.32 writes it (call line, return line, id per connection)."""
    text = (b"2026-12-06 06:37:51.020593 Ready thread_model=3\n"
            b"2026-12-06 06:37:52.118247 connection=1 Connect export=\"\" tls=0 size=0x800000 write=1 flush=1\n"
            b"2026-12-06 06:37:52.119154 connection=1 Write id=1 offset=0x1000 count=0x200 fua=0 ...\n"
            b"2026-12-06 06:37:52.119263 connection=1 Flush id=2 ...\n"
            b"2026-12-06 06:37:52.119190 connection=1 ...Write id=1 return=0\n"
            b"2026-12-06 06:37:52.119883 connection=1 ...Flush id=2 return=0\n"
            b"2026-12-06 06:37:52.119941 connection=1 Write id=3 offset=0x2000 count=0x200 fua=1 ...\n"
            b"2026-12-06 06:37:52.120180 connection=1 ...Write id=3 return=-1 error=EIO\n"
            b"2026-12-06 06:37:52.120190 connection=2 Write id=1 offset=0x4000 count=0x1000 fua=0 ...\n"
            b"2026-12-06 06:37:52.1202")  # nbdkit still writing this one
    lines = text.split(b"\n")
    at = list(itertools.accumulate((len(x) + 1 for x in lines), initial=0))
    w1, fl, w3, w4 = parse_log(text)
    assert (w1.action, w1.offset, w1.count, w1.fua, w1.start, w1.end, w1.ok) == ("Write", 0x1000, 0x200, False,
                                                                                at[2], at[5], True)
    assert (fl.action, fl.start, fl.end) == ("Flush", at[3], at[6])
    assert (w3.fua, w3.ret, w3.ok) == (True, -1, False)
    assert (w4.conn, w4.id, w4.end, w4.ok) == (2, 1, -1, False)
    # The write returned after the flush had started: a flush acknowledged afterwards does not cover it.
    ops = [GuestOp(WRITE, 0x1000, 0x200, 0, 0, 1, at[5]), GuestOp(FLUSH, 0, 0, 2, at[5], 3, at[6])]
    assert check(ops, [w1, fl]).broken_fences == {1}
    assert not check(ops, [replace(w1, end=at[3]), fl]).violations
