"""Shared pumps (csrc/blkpump.h, backends/blk/pumps.py): a bounded batch per queue per turn, a queue left with
requests served again without an event, several queues on one thread with their data intact, a ring kept full
next to a healthy queue on the same pump, a broken ring failing only its own queue, and the config knobs."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import threading
import time
import tomllib
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.blk.dataplane import BlkDataplane, QueueConfig
from backends.blk.proto import RSP_OKAY, Abi
from backends.blk.pumps import PumpPool, SharedPump
from backends.daemon.config import ConfigError, parse_config
from backends.drivers.storage import FileDriver
from backends.native import ffi, lib
from backends.native.events import NativeEventChannel, open_emulated
from backends.native.ring import FrontRing

from . import wire
from .harness import GUEST, MiniGuest, Rig, memory_image

DISK = 1 << 20
RSP = Abi.X86_64.rsp_size


@pytest.fixture
def image() -> Iterator[Path]:
    with memory_image("pump", DISK) as p:
        yield p


def test_a_turn_consumes_at_most_the_budget_and_says_more(image: Path) -> None:
    """pv_blk_queue_serve, the building block: a full ring of 32 reads is answered 8 per turn with `more`
    set while requests remain, and the last turn clears it."""
    drv = FileDriver(image, mode="inline")
    drv.open()
    rig = Rig(drv.engine(), sectors=DISK // 512)
    more = ffi.new("int *")
    try:
        reqs = [rig.request(0, 8 * i, 4096) for i in range(32)]
        rig.submit([s for s, _ in reqs])
        got: list[int] = []
        turns = []
        for _ in range(4):
            rc = int(lib.pv_blk_queue_serve(rig.q.c, 0, 8, more))
            turns.append((rc, int(more[0])))
            got += [wire.response(Abi.X86_64, raw)[0] for raw in rig.front.consume(RSP)]
        assert turns == [(8, 1), (8, 1), (8, 1), (8, 0)]
        assert sorted(got) == sorted(p.rid for _, p in reqs)
        for i, (_, p) in enumerate(reqs):
            assert rig.gather(p) == image.read_bytes()[8 * i * 512 : 8 * i * 512 + 4096]
        # No bound (budget 0): the whole ring in one turn.
        reqs = [rig.request(0, 8 * i, 4096) for i in range(32)]
        rig.submit([s for s, _ in reqs])
        assert int(lib.pv_blk_queue_serve(rig.q.c, 0, 0, more)) == 32 and more[0] == 0
        assert rig.q.stats()["spurious_kicks"] == 0
    finally:
        rig.close()
        drv.close()


class Front:
    """A guest queue for the pump tests: ring, event channel pair, 32 data pages, a disk of its own."""

    def __init__(self, g: MiniGuest, image: Path, *, pool: PumpPool | None, dead: list[str]) -> None:
        self.content = image.read_bytes()
        self.drv = FileDriver(image, mode="inline")
        self.drv.open()
        to_backend = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        to_guest = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.notify_fd, self.wake_fd = os.dup(to_backend), os.dup(to_guest)
        self.ch: NativeEventChannel = open_emulated(to_backend, to_guest, 5, GUEST, 6)
        self.g = g
        self.ring_page = g.alloc()[0]
        self.front = FrontRing(g.page(self.ring_page), 1, Abi.X86_64.slot_size)
        ring = g.table.map(GUEST, [g.grant(self.ring_page)], True)
        self.pages = g.alloc(32)
        self.refs = [g.grant(p) for p in self.pages]
        cfg = QueueConfig(abi=Abi.X86_64, frontend_domid=GUEST, nr_ring_pages=1, sectors=DISK // 512)
        self.dp = BlkDataplane(ring, self.ch, g.table.c, self.drv.engine(), cfg, on_dead=dead.append, pool=pool)
        self.rid = 0

    def push(self, n: int, base_sector: int) -> list[tuple[int, int, int]]:
        """n 4 KiB reads into pages 0..n-1; returns (id, page index, sector)."""
        out = []
        slots = []
        for i in range(n):
            self.rid += 1
            sector = (base_sector + 8 * i) % (DISK // 512 - 8)
            slots.append(wire.rw(2, 0, self.rid, sector, [(self.refs[i], 0, 7)]))
            out.append((self.rid, i, sector))
        assert self.front.put(slots, 112) == n
        if self.front.push():
            os.eventfd_write(self.notify_fd, 1)
        return out

    def collect(self) -> list[int]:
        ids = []
        while True:
            for raw in self.front.consume(RSP):
                rid, _op, status = wire.response(2, raw)
                assert status == RSP_OKAY
                ids.append(rid)
            if not self.front.final_check():
                return ids

    def check(self, page: int, sector: int) -> None:
        off = sector * 512
        assert bytes(self.g.page(self.pages[page])) == self.content[off : off + 4096]

    def close(self) -> None:
        self.dp.close()
        os.close(self.notify_fd)
        os.close(self.wake_fd)
        self.drv.close()


def run_closing(main: Coroutine[Any, Any, None], *rig: Any) -> None:
    """Run a test's coroutine, then close its rig whatever happened, in the order given (the fronts, their
    pool, the guest)."""
    try:
        asyncio.run(main)
    finally:
        for part in rig:
            part.close()


def wait_responses(f: Front, want: set[int], timeout: float = 5.0) -> None:
    got: set[int] = set()
    deadline = time.monotonic() + timeout
    while not want <= got:
        got |= set(f.collect())
        assert time.monotonic() < deadline, f"{len(want - got)} of {len(want)} not answered"
        time.sleep(0.0005)


@pytest.mark.parametrize("threads", [1, 2])
def test_several_queues_on_shared_pumps_keep_their_data(tmp_path: Path, threads: int) -> None:
    """Three disks on one or two shared pump threads: every read returns its own disk's bytes, many rounds,
    and the threads stop with the last queue."""
    images = []
    for i in range(3):
        p = tmp_path / f"d{i}.img"
        p.write_bytes(random.Random(10 + i).randbytes(DISK))
        images.append(p)
    g = MiniGuest(pages=256)
    pool = PumpPool(threads, budget=4)
    dead: list[str] = []
    fronts = [Front(g, img, pool=pool, dead=dead) for img in images]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for f in fronts:
            f.dp.start(loop)
        assert [s["queues"] for s in pool.stats()] == [3]
        assert len([t for t in threading.enumerate() if t.name.startswith("blk pump")]) == threads
        rnd = random.Random(5)
        for _ in range(20):
            issued = [f.push(16, rnd.randrange(0, DISK // 512)) for f in fronts]
            for f, reqs in zip(fronts, issued, strict=True):
                await asyncio.to_thread(wait_responses, f, {r for r, _, _ in reqs})
                for _rid, page, sector in reqs:
                    f.check(page, sector)
        st = pool.stats()[0]
        assert st["budget_hits"] > 0  # 16 requests, budget 4: turns ended with more on the ring
        for f in fronts:
            assert f.dp.stats()["responses"] == 20 * 16
            await f.dp.stop()
        assert not [t for t in threading.enumerate() if t.name.startswith("blk pump")]

    run_closing(main(), *fronts, pool, g)
    assert not dead


def test_a_ring_kept_full_gets_its_budget_and_its_neighbour_keeps_being_served(image: Path, tmp_path: Path) -> None:
    """A guest that refills its whole ring and notifies in a loop shares one pump with a guest doing one
    read at a time: the pump's turns are bounded (budget hits), the flooding queue never takes more than a
    budget per turn, and the healthy guest's round trips go on."""
    other = tmp_path / "other.img"
    other.write_bytes(random.Random(4).randbytes(DISK))
    g = MiniGuest(pages=256)
    pool = PumpPool(1, budget=4)
    dead: list[str] = []
    flood, healthy = Front(g, image, pool=pool, dead=dead), Front(g, other, pool=pool, dead=dead)
    stop = threading.Event()
    flooded = [0]

    def flooder() -> None:
        while not stop.is_set():
            flooded[0] += len(flood.collect())
            free = flood.front.free_slots()
            if free:
                flood.push(free, random.randrange(0, DISK // 512))
            os.eventfd_write(flood.notify_fd, 1)  # hammering, whether the ring asks for it or not

    async def main() -> None:
        loop = asyncio.get_running_loop()
        flood.dp.start(loop)
        healthy.dp.start(loop)
        t = threading.Thread(target=flooder, name="flooder")
        t.start()
        try:
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            rounds = 0
            while time.monotonic() - t0 < 1.0:
                reqs = healthy.push(1, rounds * 8)
                await asyncio.to_thread(wait_responses, healthy, {reqs[0][0]}, 2.0)
                healthy.check(0, reqs[0][2])
                rounds += 1
        finally:
            stop.set()
            await asyncio.to_thread(t.join)
        st = pool.stats()[0]
        fst = flood.dp.stats()
        # The flooder was served (it is not starved either) and in bounded turns.
        assert flooded[0] > 0 and st["budget_hits"] > 0
        assert fst["responses"] <= 4 * st["turns"]
        assert rounds >= 20, f"the healthy guest did only {rounds} round trips in 1 s next to the flood"
        await flood.dp.stop()
        await healthy.dp.stop()

    run_closing(main(), flood, healthy, pool, g)
    assert not dead


def test_a_broken_ring_fails_only_its_queue(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(random.Random(6).randbytes(DISK))
    g = MiniGuest(pages=256)
    pool = PumpPool(1, budget=8)
    dead: list[str] = []
    bad, good = Front(g, image, pool=pool, dead=dead), Front(g, other, pool=pool, dead=dead)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bad.dp.start(loop)
        good.dp.start(loop)
        ringv = g.page(bad.ring_page)
        ringv[0:4] = struct.pack("<I", (struct.unpack("<I", ringv[0:4])[0] + 5000) & 0xFFFFFFFF)
        os.eventfd_write(bad.notify_fd, 1)
        for _ in range(200):
            if dead:
                break
            await asyncio.sleep(0.01)
        assert dead == ["frontend provided bogus ring requests"]
        reqs = good.push(8, 64)
        await asyncio.to_thread(wait_responses, good, {r for r, _, _ in reqs})
        for _rid, page, sector in reqs:
            good.check(page, sector)
        await bad.dp.stop()
        await good.dp.stop()

    run_closing(main(), bad, good, pool, g)
    assert len(dead) == 1


def test_pinned_pump_threads_each_run_on_one_cpu_of_their_own(image: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    g = MiniGuest(pages=256)
    pool = PumpPool(len(cpus), budget=8, pin=True)
    dead: list[str] = []
    f = Front(g, image, pool=pool, dead=dead)

    async def main() -> None:
        f.dp.start(asyncio.get_running_loop())
        reqs = f.push(4, 0)
        await asyncio.to_thread(wait_responses, f, {r for r, _, _ in reqs})
        threads = [t for t in threading.enumerate() if t.name.startswith("blk pump")]
        allowed = []
        for t in threads:
            status = Path(f"/proc/self/task/{t.native_id}/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
            allowed.append(line.split(":", 1)[1].strip())
        assert sorted(allowed) == sorted(str(c) for c in cpus)
        await f.dp.stop()

    run_closing(main(), f, pool, g)
    assert not dead


def test_pool_and_pump_bounds() -> None:
    with pytest.raises(ValueError, match="budget 0"):
        PumpPool(2, budget=0)
    with pytest.raises(ValueError, match="size 0"):
        PumpPool(0, budget=8)
    with pytest.raises(ValueError, match="capacity 0"):
        SharedPump("x", 8, 0, capacity=0)
    with pytest.raises(ValueError, match="size 0"):
        SharedPump("x", 8, 0, threads=0)
    with pytest.raises(ValueError, match="budget 5000"):
        SharedPump("x", 5000, 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [("[blk]\npumps = -2", "outside -1..64"), ("[blk]\npumps = 'many'", "expected an integer"),
     ("[blk]\npump_budget = 0", "outside 1..4096"), ("[blk]\npump_budget = 1e9", "expected an integer"),
     ("[blk]\npump_pinning = 2", "outside 0..1")],
)
def test_pump_config_garbage_is_refused_with_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(tomllib.loads(text))
    assert len(str(info.value).splitlines()) == 1


def test_pump_config_values_are_applied() -> None:
    cfg = parse_config({"blk": {"pumps": 3, "pump_budget": 16}})
    assert cfg.blk.pumps == 3 and cfg.blk.pump_budget == 16
