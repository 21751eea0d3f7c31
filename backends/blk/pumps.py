"""Shared pumps: N blk queues served by M threads (`[blk] pumps = M`), instead of one pump thread per queue.

The M threads run one C pump object (csrc/blkpump.h) that sleeps on every source of every queue and gives
each queue with work a turn, at most `pump_budget` requests per turn, from whichever thread is free; a queue
with more on its ring gets another turn after the others.  So a guest that keeps its ring full gets a batch
per turn like everyone else, and one wake-up of a thread serves every queue that became ready meanwhile
instead of one thread per queue being scheduled in turn (measured in perf/RESULTS.md, "Many guests").

The threads start with the first queue and stop with the last, so an idle daemon has no pump threads.
`remove` returning means no thread will touch that queue again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from backends.native import CData, ffi, lib, struct_pv_blk_pump, struct_pv_blk_queue
from backends.native.handle import CHandle

log = logging.getLogger(__name__)

MAX_BUDGET = int(lib.PV_BLK_PUMP_MAX_BUDGET)
_DEAD_MESSAGES = {-int(lib.PV_BLK_EDEAD): "frontend provided bogus ring requests",
                  -int(lib.PV_BLK_EEVTCHN): "event channel: pending/unmask/poll failed"}


class SharedPump(CHandle[struct_pv_blk_pump]):
    """The C pump object and its `threads` threads (started with the first queue, stopped with the last)."""

    def __init__(self, name: str, budget: int, spin_us: int, *, threads: int = 1,
                 capacity: int = int(lib.PV_BLK_PUMP_MAX_QUEUES), cpus: list[int] | None = None) -> None:
        if threads < 1:
            raise ValueError(f"pump pool size {threads}: at least 1")
        err = ffi.new("char[]", 256)
        c = lib.pv_blk_pump_create(capacity, budget, spin_us, err, 256)
        if c == ffi.NULL:
            raise ValueError(f"blk pump: {ffi.string(err).decode(errors='replace')}")
        super().__init__(c)
        self.name = name
        self.nthreads = threads
        # Thread i runs on cpus[i % len(cpus)] only (None: wherever the scheduler puts it).
        self.cpus = cpus
        self._lock = threading.Lock()
        # queue pointer -> (reporter of its death, the loop to report on)
        self._owners: dict[int, tuple[Callable[[str], None], asyncio.AbstractEventLoop]] = {}
        self._threads: list[threading.Thread] = []
        self._stop_fd = -1
        self._stats = ffi.new("struct pv_blk_pump_stats *")

    @property
    def queues(self) -> int:
        return len(self._owners)

    @staticmethod
    def _key(q: CData) -> int:
        return int(ffi.cast("uintptr_t", q))

    def add(self, q: struct_pv_blk_queue, on_dead: Callable[[str], None], loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._owners[self._key(q)] = (on_dead, loop)
        rc = int(lib.pv_blk_pump_add(self.c, q))
        if rc < 0:
            with self._lock:
                self._owners.pop(self._key(q), None)
            raise OSError(-rc, f"{self.name}: cannot serve the queue: {os.strerror(-rc)}")
        if not self._threads:
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            for i in range(self.nthreads):
                cpu = self.cpus[i % len(self.cpus)] if self.cpus else None
                t = threading.Thread(target=self._main, args=(self._stop_fd, cpu), name=f"{self.name} {i}",
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def remove(self, q: struct_pv_blk_queue) -> None:
        """Stop serving `q` (waits for a turn in progress on it); stops the threads with the last queue."""
        lib.pv_blk_pump_remove(self.c, q)
        with self._lock:
            self._owners.pop(self._key(q), None)
            idle = not self._owners
        if idle:
            self._stop_threads()

    def _stop_threads(self) -> None:
        threads, self._threads = self._threads, []
        if not threads:
            return
        os.eventfd_write(self._stop_fd, 1)
        for t in threads:
            t.join()
        os.close(self._stop_fd)  # which also takes it out of the pump's epoll set
        self._stop_fd = -1

    def _main(self, stop_fd: int, cpu: int | None) -> None:
        if cpu is not None:
            # Measured (perf/RESULTS.md, shared pumps): left to the scheduler, both threads sometimes stack on
            # one vCPU for seconds, and the daemon then gets 0.75 of a core and the guests near it a worse
            # share.  The threads share the queues, so one whose CPU is busy with other work just takes
            # fewer turns.
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError as exc:
                log.warning("%s: cannot pin to CPU %d: %s", self.name, cpu, exc)
        c = self.c
        dead_q = ffi.new("struct pv_blk_queue *[]", 64)
        dead_rc = ffi.new("int32_t[]", 64)
        while True:
            rc = int(lib.pv_blk_pump_run(c, stop_fd))
            if rc == lib.PV_BLK_PUMP_DEAD:
                n = int(lib.pv_blk_pump_take_dead(c, dead_q, dead_rc, 64))
                for i in range(n):
                    self._report(self._key(dead_q[i]), _DEAD_MESSAGES.get(int(dead_rc[i]), "queue failed"))
                continue
            if rc < 0:
                # epoll itself failed: nothing this pump holds can be served any more.
                with self._lock:
                    keys = list(self._owners)
                for key in keys:
                    self._report(key, "shared pump: epoll failed")
            return

    def _report(self, key: int, message: str) -> None:
        with self._lock:
            owner = self._owners.get(key)
        if owner is None:
            return
        on_dead, loop = owner
        try:
            loop.call_soon_threadsafe(on_dead, message)
        except RuntimeError:
            pass  # the loop is closed: the daemon is going away anyway

    def set_budget(self, budget: int) -> None:
        lib.pv_blk_pump_set_budget(self.c, budget)

    def stats(self) -> dict[str, int]:
        s = self._stats
        lib.pv_blk_pump_get_stats(self.c, s)
        return {"passes": int(s.passes), "turns": int(s.turns), "budget_hits": int(s.budget_hits),
                "sleeps": int(s.sleeps), "queues": int(s.queues), "threads": len(self._threads)}

    def _free(self, c: struct_pv_blk_pump) -> None:
        self._stop_threads()
        lib.pv_blk_pump_destroy(c)


class PumpPool:
    """`size` threads sharing every queue (one C pump object): a ready queue gets its next turn from whichever
    thread is free, so no queue waits on a busy thread while another idles."""

    def __init__(self, size: int, budget: int, spin_us: int = 0, *, pin: bool = False) -> None:
        if size < 1:
            raise ValueError(f"pump pool size {size}: at least 1")
        if not 1 <= budget <= MAX_BUDGET:
            raise ValueError(f"pump budget {budget}: not in 1..{MAX_BUDGET}")
        self.size, self.budget, self.spin_us = size, budget, spin_us
        # Pinned: thread i on the i-th CPU the daemon may use (round robin when there are more threads).
        self.cpus = sorted(os.sched_getaffinity(0)) if pin else None
        self._pump: SharedPump | None = None

    def add(self, q: struct_pv_blk_queue, on_dead: Callable[[str], None], loop: asyncio.AbstractEventLoop) -> None:
        if self._pump is None:
            self._pump = SharedPump("blk pump", self.budget, self.spin_us, threads=self.size, cpus=self.cpus)
        self._pump.add(q, on_dead, loop)

    def remove(self, q: struct_pv_blk_queue) -> None:
        """Idempotent; after it the queue is served by nobody."""
        if self._pump is not None:
            self._pump.remove(q)

    def stats(self) -> list[dict[str, Any]]:
        return [] if self._pump is None else [self._pump.stats()]

    def close(self) -> None:
        if self._pump is not None:
            self._pump.close()
            self._pump = None
