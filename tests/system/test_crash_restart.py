"""Acceptance: crash consistency and restart recovery of `pvback serve`.

- SIGKILL in the middle of a write+flush workload: every write acknowledged before an acknowledged flush is
  in the image afterwards (and, since a killed process loses nothing the kernel already has, every
  acknowledged write is); a new daemon then answers what was in flight.
- SIGKILL with requests in flight, new daemon: the guest's outstanding requests are answered, its I/O goes on,
  every byte verified.
- SIGTERM: in-flight I/O drained, exit 0, the device stays Connected, the daemon let go of every grant, and a
  new daemon continues.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends.guests.blkfront import PAGE, SECTOR
from backends.guests.workload import Shadow, full_compare
from tests.system.conftest import Bed, Disk, Nbdkit, S, make_image

IMAGE_SIZE = 8 << 20
GTF_READING, GTF_WRITING = 1 << 3, 1 << 4


@dataclass
class Write:
    sub: int  # logical clock at submission
    off: int
    data: bytes
    ack: int | None = None


@dataclass
class Flush:
    sub: int
    ack: int | None = None


@dataclass
class Journal:
    """What the guest submitted and what the backend acknowledged, on one logical clock."""

    clock: int = 0
    writes: list[Write] = field(default_factory=list)
    flushes: list[Flush] = field(default_factory=list)
    reads: int = 0
    mismatches: list[str] = field(default_factory=list)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    @property
    def acked_writes(self) -> int:
        return sum(1 for w in self.writes if w.ack is not None)

    @property
    def acked_flushes(self) -> int:
        return sum(1 for f in self.flushes if f.ack is not None)


class Workload:
    """`depth` workers, each serial on its own stripe (so every page has one ordered history), random writes
    and verified reads; a flusher issues flushes concurrently.  Stops submitting when `stop` is set."""

    def __init__(self, d: Disk, shadow: Shadow, *, depth: int = 6, sizes: tuple[int, ...] = (4096, 16384, 65536),
                 read_ratio: float = 0.3, flush_interval: float = 0.01, seed: int = 1) -> None:
        assert d.info is not None
        self.d = d
        self.shadow = shadow
        self.j = Journal()
        self.stop = asyncio.Event()
        self.depth = depth
        self.sizes = sizes
        self.read_ratio = read_ratio
        self.flush_interval = flush_interval
        self.seed = seed
        self.stripe = (d.info.size_bytes // depth) // PAGE * PAGE
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._worker(w)) for w in range(self.depth)]
        self.tasks.append(asyncio.create_task(self._flusher()))

    async def _worker(self, w: int) -> None:
        rng = random.Random(self.seed * 100 + w)
        base = w * self.stripe
        while not self.stop.is_set():
            size = rng.choice(self.sizes)
            off = base + rng.randrange(0, (self.stripe - size) // PAGE + 1) * PAGE
            if rng.random() < self.read_ratio:
                got = await self.d.front.read(off // SECTOR, size)
                self.j.reads += 1
                if got != bytes(self.shadow.data[off:off + size]):
                    self.j.mismatches.append(f"read {size} at {off}")
                continue
            rec = Write(self.j.tick(), off, rng.randbytes(size))
            self.j.writes.append(rec)
            await self.d.front.write(off // SECTOR, rec.data)
            rec.ack = self.j.tick()
            self.shadow.write(off, rec.data)

    async def _flusher(self) -> None:
        while not self.stop.is_set():
            rec = Flush(self.j.tick())
            self.j.flushes.append(rec)
            await self.d.front.flush()
            rec.ack = self.j.tick()
            await asyncio.sleep(self.flush_interval)

    async def until(self, writes: int, flushes: int = 0, timeout: float = 15.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while self.j.acked_writes < writes or self.j.acked_flushes < flushes:
                    for t in self.tasks:
                        if t.done():
                            t.result()  # a failed request ends the test with its error
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"workload stalled at {self.j.acked_writes} writes, {self.j.acked_flushes} "
                                 f"flushes (wanted {writes}, {flushes}); rings: {ring_report(self.d)}") from None

    async def finish(self, timeout: float = 15.0) -> None:
        self.stop.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*self.tasks)
        except TimeoutError:
            raise AssertionError(f"requests never answered; rings: {ring_report(self.d)}") from None
        assert not self.j.mismatches, self.j.mismatches[:5]


def ring_report(d: Disk) -> str:
    out = []
    for q in d.front.queues:
        hdr = struct.unpack_from("<IIII", d.guest.page_view(q.ring_pages[0]), 0)
        out.append(f"q{q.index}: req_prod={hdr[0]} req_event={hdr[1]} rsp_prod={hdr[2]} rsp_event={hdr[3]} "
                   f"req_prod_pvt={q.ring.c.req_prod_pvt} rsp_cons={q.ring.c.rsp_cons} waiting={len(q.waiting)}")
    return "; ".join(out) + f"; spurious responses {d.front.spurious_responses}"


def outstanding(d: Disk) -> int:
    return sum(len(q.waiting) for q in d.front.queues)


def check_after_crash(j: Journal, image: bytes, original: bytes) -> tuple[int, int]:
    """Per page: the flush rule and the acknowledged-write rule (see the module doc).  Returns (pages checked
    under the flush rule, writes in flight at the crash)."""
    last_flush = max((f for f in j.flushes if f.ack is not None), key=lambda f: f.ack or 0)
    history: dict[int, list[Write]] = {}
    for w in j.writes:  # submission order; per page that is also completion order (one writer per stripe)
        for p in range(w.off // PAGE, (w.off + len(w.data)) // PAGE):
            history.setdefault(p, []).append(w)
    durable_pages = 0
    for p, ws in history.items():
        got = image[p * PAGE:(p + 1) * PAGE]

        def chunk(w: Write, p: int = p) -> bytes:
            start = p * PAGE - w.off
            return w.data[start:start + PAGE]

        # Flush rule: the last write acknowledged before the last acknowledged flush was submitted, or anything
        # submitted after it to this page.
        before = [i for i, w in enumerate(ws) if w.ack is not None and w.ack < last_flush.sub]
        if before:
            i = before[-1]
            allowed = {chunk(w) for w in ws[i:]}
            assert got in allowed, f"page {p}: a write acknowledged before an acknowledged flush is lost"
            durable_pages += 1
        # Acknowledged-write rule: the newest acknowledged write, or a write still in flight.
        acked = [i for i, w in enumerate(ws) if w.ack is not None]
        base = chunk(ws[acked[-1]]) if acked else original[p * PAGE:(p + 1) * PAGE]
        allowed = {base} | {chunk(w) for w in ws if w.ack is None}
        assert got in allowed, f"page {p}: an acknowledged write is lost (or the page holds something else)"
    untouched = set(range(len(image) // PAGE)) - set(history)
    for p in untouched:
        assert image[p * PAGE:(p + 1) * PAGE] == original[p * PAGE:(p + 1) * PAGE], f"page {p} changed"
    return durable_pages, sum(1 for w in j.writes if w.ack is None)


def stuck_grants(d: Disk) -> list[int]:
    g = d.guest
    return [ref for ref in g.granted if g.grant_flags(ref) & (GTF_READING | GTF_WRITING)]


def _image(store: str, shm_dir: Path, tmp_path: Path) -> Path:
    return make_image((shm_dir if store == "shm" else tmp_path) / "disk.img", IMAGE_SIZE)


@pytest.mark.parametrize("store", ["shm", "disk"])
async def test_sigkill_keeps_flushed_writes(store: str, bed: Bed, shm_dir: Path, tmp_path: Path) -> None:
    image = _image(store, shm_dir, tmp_path)
    original = image.read_bytes()
    shadow = Shadow(original)
    d = await bed.disk(image, ring_page_order=1, queues=2, persistent=True)
    wl = Workload(d, shadow, read_ratio=0.0, sizes=(4096, 8192, 65536, 262144))
    wl.start()
    await wl.until(writes=60, flushes=3)
    rc = bed.serve.kill(signal.SIGKILL)
    wl.stop.set()
    assert rc == -signal.SIGKILL
    on_disk = await asyncio.to_thread(image.read_bytes)
    durable, inflight = check_after_crash(wl.j, on_disk, original)
    assert durable > 0, f"no page was covered by an acknowledged flush ({inflight} writes in flight)"
    # The guest still waits for what was in flight; a new daemon answers it and the image ends up complete.
    await asyncio.to_thread(bed.serve.start)
    await wl.finish()
    assert outstanding(d) == 0
    await d.front.flush()
    assert await asyncio.to_thread(image.read_bytes) == bytes(shadow.data)
    assert not await full_compare(d.front, shadow)
    assert await bed.backend_state(d) == S.CONNECTED


@pytest.mark.parametrize("store", ["shm", "disk"])
async def test_sigkill_restart_answers_outstanding(store: str, bed: Bed, shm_dir: Path, tmp_path: Path) -> None:
    image = _image(store, shm_dir, tmp_path)
    shadow = Shadow(image.read_bytes())
    d = await bed.disk(image, ring_page_order=2, queues=2, persistent=True)
    wl = Workload(d, shadow, depth=8, read_ratio=0.4, sizes=(4096, 45056, 131072, 1 << 20))
    wl.start()
    await wl.until(writes=40)
    bed.serve.kill(signal.SIGKILL)
    pending = outstanding(d)
    assert pending > 0, "no request was in flight when the daemon died"
    ops_at_kill = wl.j.acked_writes + wl.j.reads
    await asyncio.to_thread(bed.serve.start)
    # The stuck requests are answered and the workload goes on.
    await wl.until(writes=wl.j.acked_writes + 60, timeout=20)
    await wl.finish()
    assert wl.j.acked_writes + wl.j.reads > ops_at_kill + pending
    assert await bed.backend_state(d) == S.CONNECTED
    await d.front.flush()
    assert await asyncio.to_thread(image.read_bytes) == bytes(shadow.data)
    assert not await full_compare(d.front, shadow)
    assert await bed.serve.errors(d.domid) == {}


@pytest.mark.parametrize("store", ["shm", "disk"])
async def test_sigterm_drains_and_restart_continues(store: str, bed: Bed, shm_dir: Path, tmp_path: Path) -> None:
    image = _image(store, shm_dir, tmp_path)
    shadow = Shadow(image.read_bytes())
    d = await bed.disk(image, ring_page_order=1, queues=2, persistent=True)
    wl = Workload(d, shadow, depth=8, read_ratio=0.4, sizes=(4096, 65536, 1 << 20))
    wl.start()
    await wl.until(writes=40)
    # The guest keeps submitting while the daemon shuts down; wait for the exit without blocking the loop.
    bed.serve.proc.signal(signal.SIGTERM)  # type: ignore[union-attr]
    bed.serve.killed = True
    rc = await asyncio.to_thread(bed.serve.proc.wait, 15)  # type: ignore[union-attr]
    assert rc == 0, bed.serve.log_text()[-2000:]
    log = bed.serve.log_text()
    assert "did not drain" not in log
    xs = await bed.dom0()
    assert await bed.backend_state(d) == S.CONNECTED
    assert await xs.read_str(f"{d.front.fe_path}/state") == str(int(S.CONNECTED))
    assert await bed.backend_error(d) is None
    # Drained and let go: no grant of the guest is still mapped or mid-copy.
    assert stuck_grants(d) == []
    await asyncio.to_thread(bed.serve.start)
    await wl.until(writes=wl.j.acked_writes + 40, timeout=20)
    await wl.finish()
    assert outstanding(d) == 0
    await d.front.flush()
    assert await asyncio.to_thread(image.read_bytes) == bytes(shadow.data)
    assert not await full_compare(d.front, shadow)


async def test_restart_twice_idle_guest(bed: Bed, tmp_path: Path) -> None:
    """A guest that is idle across two restarts (SIGTERM then SIGKILL) sees its disk unchanged and usable."""
    image = make_image(tmp_path / "idle.img", IMAGE_SIZE)
    shadow = Shadow(image.read_bytes())
    d = await bed.disk(image, queues=2, ring_page_order=3)
    data = os.urandom(1 << 20)
    await d.front.write(2048, data)
    shadow.write(2048 * SECTOR, data)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        bed.serve.kill(sig)
        await asyncio.to_thread(bed.serve.start)
        assert await d.front.read(2048, len(data)) == data
    assert not await full_compare(d.front, shadow)
    assert await bed.backend_state(d) == S.CONNECTED


async def test_restart_wakes_frontend_for_unnotified_responses(bed: Bed, tmp_path: Path) -> None:
    """A daemon can die between publishing responses (rsp_prod) and notifying the guest.  The guest is then
    waiting for an event nobody will send: the new daemon must notify once when it picks the ring up.
    Recreated exactly: the daemon is killed, then the ring is left as a dead daemon would leave it (a request
    consumed and answered, rsp_prod moved, no event)."""
    d = await bed.disk(make_image(tmp_path / "w.img", IMAGE_SIZE))
    f = d.front
    await f.read(0, 4096)
    bed.serve.kill(signal.SIGKILL)
    q = f.queues[0]
    rid = await q.acquire_id()
    idx = q.ring.c.req_prod_pvt
    fut = q.submit(f.abi.pack_rw(3, 0, 0, rid, 0, []), rid)  # a flush: published to the dead daemon
    ring = f.guest.page_view(q.ring_pages[0])
    off = 64 + (idx % q.ring.size) * f.abi.slot
    ring[off:off + f.abi.slot] = bytes(f.abi.slot)
    struct.pack_into("<QBxh", ring, off, rid, 3, 0)  # its response, written by the "dead daemon"
    struct.pack_into("<I", ring, 8, idx + 1)  # rsp_prod published; the event never sent
    await asyncio.to_thread(bed.serve.start)
    async with asyncio.timeout(5):
        op, status = await fut
    await q.release_id(rid)
    assert (op, status) == (3, 0)
    await f.read(0, 4096)


async def test_restart_after_out_of_order_completions(bed: Bed, tmp_path: Path) -> None:
    """Requests complete out of order (a slow write, then a fast read): a daemon killed with the read answered
    and the write in flight must not lose the write nor answer the read twice after the restart.  Made
    deterministic with nbdkit's delay filter (writes take 1.5 s, reads are immediate)."""
    image = make_image(tmp_path / "slow.img", IMAGE_SIZE)
    server = Nbdkit(image, tmp_path, filters=("delay",), params=("delay-write=1500ms",))
    bed.cleanups.append(server.stop)  # after the device is gone: the daemon must not lose its export first
    d = await bed.disk(None, params=f"nbd:unix:{server.sock}", persistent=False)
    f = d.front
    q = f.queues[0]
    ring = f.guest.page_view(q.ring_pages[0])
    data = os.urandom(8192)
    w = asyncio.create_task(f.write(64, data))
    r = asyncio.create_task(f.read(4096, 4096))
    async with asyncio.timeout(5):  # both consumed: the backend re-armed req_event past them
        while struct.unpack_from("<I", ring, 4)[0] != q.ring.c.req_prod_pvt + 1:
            await asyncio.sleep(0.005)
    await asyncio.wait({r}, timeout=0.5)  # the read completes long before the write, if answered early
    bed.serve.kill(signal.SIGKILL)
    assert not w.done()
    await asyncio.to_thread(bed.serve.start)
    try:
        async with asyncio.timeout(10):
            await w
            got = await r
    except TimeoutError:
        raise AssertionError(f"not answered after the restart: write {'done' if w.done() else 'pending'}, "
                             f"read {'done' if r.done() else 'pending'}; {ring_report(d)}") from None
    assert got == image.read_bytes()[4096 * SECTOR:4096 * SECTOR + 4096]
    assert f.spurious_responses == 0, "a request was answered twice"
    assert await f.read(64, len(data)) == data
    assert outstanding(d) == 0


async def test_restart_after_kill_mid_publication(bed: Bed, tmp_path: Path) -> None:
    """A daemon killed while writing a batch of responses (slots overwritten, rsp_prod not yet moved): the
    overwritten slots no longer hold requests, so a new daemon must publish them rather than parse them as
    requests.  The ring is left exactly as csrc/blkback.c's put_logged leaves it at that moment: the first
    slot holds its response, the log in the ring header's padding names the second slot and holds its
    response, the second slot still holds its request."""
    d = await bed.disk(make_image(tmp_path / "m.img", IMAGE_SIZE))
    f = d.front
    await f.read(0, 4096)
    bed.serve.kill(signal.SIGKILL)
    q = f.queues[0]
    ring = f.guest.page_view(q.ring_pages[0])
    futs = []
    ids = []
    first = q.ring.c.req_prod_pvt
    for _ in range(2):
        rid = await q.acquire_id()
        ids.append(rid)
        futs.append(q.submit(f.abi.pack_rw(3, 0, 0, rid, 8, []), rid))  # flushes, "consumed" by the dead daemon
    slot0 = 64 + (first % q.ring.size) * f.abi.slot
    ring[slot0:slot0 + f.abi.slot] = bytes(f.abi.slot)
    struct.pack_into("<QBxh", ring, slot0, ids[0], 3, 0)
    log = bytearray(40)
    struct.pack_into("<II", log, 0, 0x70764C47, first + 1)
    struct.pack_into("<QBxh", log, 8 + 16 * ((first + 1) & 1), ids[1], 3, 0)
    ring[20:60] = bytes(log)
    await asyncio.to_thread(bed.serve.start)
    async with asyncio.timeout(5):
        results = [await fu for fu in futs]
    for rid in ids:
        await q.release_id(rid)
    assert results == [(3, 0), (3, 0)]
    assert f.spurious_responses == 0
    assert struct.unpack_from("<I", ring, 20)[0] == 0, "the log was not cleared"
    await f.read(0, 4096)


async def test_sigkill_leaves_no_grant_pinned(bed: Bed, tmp_path: Path) -> None:
    d = await bed.disk(make_image(tmp_path / "pin.img", IMAGE_SIZE), persistent=True)
    f = d.front
    pages = await f.take_pages(8)  # held out of the pool: the next daemon never sees these refs
    segs = [(r, 0, 7) for _p, r in pages]
    # 32 KiB: over the persistent threshold, so the daemon keeps these pages mapped.
    assert await f.submit_raw_op(lambda rid: f.abi.pack_rw(1, 8, 0, rid, 0, segs)) == 0
    assert {r for _p, r in pages} <= set(stuck_grants(d)), "the daemon did not map the pages persistently"
    bed.serve.kill(signal.SIGKILL)
    await asyncio.to_thread(bed.serve.start)
    await f.read(0, 4096)
    # A clean stop unmaps everything the new daemon holds; nothing may stay pinned after that.
    assert bed.serve.kill(signal.SIGTERM) == 0
    assert stuck_grants(d) == []
