"""Shared pumps: N blk queues served by M threads (`[blk] pumps = M`), instead of one pump thread per queue.

Each SharedPump is one thread in one C call (csrc/blkpump.h) that sleeps on every source of the queues it
holds and serves, in passes, each queue that has work, at most `pump_budget` requests per queue per turn; a
queue with more on its ring is served again next pass.  So a guest that keeps its ring full gets a batch per
pass like everyone else, and one wake-up of the thread serves every queue that became ready meanwhile
instead of one thread per queue being scheduled in turn (measured in perf/RESULTS.md, "Many guests").

A queue goes to the pump holding fewest queues; a pump's thread starts with its first queue and stops with
its last, so an idle daemon has no pump threads.  The pool's methods are called from the event loop's thread
(add, remove); `remove` returning means the pump will never touch that queue again.
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
    """One pump thread and the C object it runs."""

    def __init__(self, name: str, budget: int, spin_us: int, capacity: int = int(lib.PV_BLK_PUMP_MAX_QUEUES)) -> None:
        err = ffi.new("char[]", 256)
        c = lib.pv_blk_pump_create(capacity, budget, spin_us, err, 256)
        if c == ffi.NULL:
            raise ValueError(f"blk pump: {ffi.string(err).decode(errors='replace')}")
        super().__init__(c)
        self.name = name
        self._lock = threading.Lock()
        # queue pointer -> (reporter of its death, the loop to report on)
        self._owners: dict[int, tuple[Callable[[str], None], asyncio.AbstractEventLoop]] = {}
        self._thread: threading.Thread | None = None
        self._stop_fd = -1
        self._stats = ffi.new("struct pv_blk_pump_stats *")
        self._dead_q = ffi.new("struct pv_blk_queue *[]", 64)
        self._dead_rc = ffi.new("int32_t[]", 64)

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
        if self._thread is None:
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()

    def remove(self, q: struct_pv_blk_queue) -> None:
        """Stop serving `q` (waits for the pass in progress, if any); stops the thread with the last queue."""
        lib.pv_blk_pump_remove(self.c, q)
        with self._lock:
            self._owners.pop(self._key(q), None)
            idle = not self._owners
        if idle:
            self._stop_thread()

    def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        os.eventfd_write(self._stop_fd, 1)
        thread.join()
        os.close(self._stop_fd)
        self._stop_fd = -1

    def _main(self) -> None:
        c, stop_fd = self.c, self._stop_fd
        while True:
            rc = int(lib.pv_blk_pump_run(c, stop_fd))
            if rc == lib.PV_BLK_PUMP_DEAD:
                n = int(lib.pv_blk_pump_take_dead(c, self._dead_q, self._dead_rc, 64))
                for i in range(n):
                    self._report(self._key(self._dead_q[i]), _DEAD_MESSAGES.get(int(self._dead_rc[i]), "queue failed"))
                continue
            if rc < 0:
                # epoll itself failed: nothing this thread holds can be served any more.
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
                "sleeps": int(s.sleeps), "queues": int(s.queues)}

    def _free(self, c: struct_pv_blk_pump) -> None:
        self._stop_thread()
        lib.pv_blk_pump_destroy(c)


class PumpPool:
    """`size` shared pumps; a queue goes to the one holding fewest."""

    def __init__(self, size: int, budget: int, spin_us: int = 0) -> None:
        if size < 1:
            raise ValueError(f"pump pool size {size}: at least 1")
        if not 1 <= budget <= MAX_BUDGET:
            raise ValueError(f"pump budget {budget}: not in 1..{MAX_BUDGET}")
        self.size, self.budget, self.spin_us = size, budget, spin_us
        self._pumps: list[SharedPump] = []
        self._where: dict[int, SharedPump] = {}

    def add(self, q: struct_pv_blk_queue, on_dead: Callable[[str], None], loop: asyncio.AbstractEventLoop) -> None:
        if len(self._pumps) < self.size:
            self._pumps.append(SharedPump(f"blk pump {len(self._pumps)}", self.budget, self.spin_us))
        pump = min(self._pumps, key=lambda p: p.queues)
        pump.add(q, on_dead, loop)
        self._where[SharedPump._key(q)] = pump

    def remove(self, q: struct_pv_blk_queue) -> None:
        """Idempotent; after it the queue is served by nobody."""
        pump = self._where.pop(SharedPump._key(q), None)
        if pump is not None:
            pump.remove(q)

    def stats(self) -> list[dict[str, Any]]:
        return [p.stats() for p in self._pumps]

    def close(self) -> None:
        for p in self._pumps:
            p.close()
        self._pumps = []
        self._where = {}
