"""One blkif queue: the C data path (csrc/blkback.h) driven by a pump thread of its own (backends.xenbus.pump).

The pump is one C call (`pv_blk_queue_run`) that waits on the event channel and the completion fd and, per
event, acknowledges it, drains the ring (validate, copy, submit; with an inline engine also complete and
respond) and unmasks.  It holds no GIL, so the queues of a disk run on as many cores as there are and the
asyncio loop (xenstore, metrics, other devices) never sits between a guest and its response.  Python never
runs per request; the loop thread only starts and stops pumps and reads counters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from backends.blk import proto
from backends.blk.proto import DEFAULT_MAX_PERSISTENT_GRANTS, OP_NAMES, Abi
from backends.blk.pumps import PumpPool
from backends.native import (
    CData,
    ffi,
    lib,
    struct_pv_blk_queue,
    struct_pv_evtchn,
    struct_pv_gnt,
    struct_pv_io_engine,
)
from backends.native.handle import CHandle
from backends.platform.base import EventChannel, GrantMapping
from backends.xenbus.pump import QueueDataplane

log = logging.getLogger(__name__)


def _check_proto_mirrors() -> None:
    """backends.blk.proto is pure Python (no C), so it spells the wire constants itself; this is the one
    place they meet the C data path, so refuse to run if the two ever disagree."""
    want = {
        "OP_READ": lib.PV_BLKIF_OP_READ, "OP_WRITE": lib.PV_BLKIF_OP_WRITE,
        "OP_WRITE_BARRIER": lib.PV_BLKIF_OP_WRITE_BARRIER, "OP_FLUSH_DISKCACHE": lib.PV_BLKIF_OP_FLUSH_DISKCACHE,
        "OP_RESERVED_1": lib.PV_BLKIF_OP_RESERVED_1, "OP_DISCARD": lib.PV_BLKIF_OP_DISCARD,
        "OP_INDIRECT": lib.PV_BLKIF_OP_INDIRECT,
        "MAX_SEGMENTS_PER_REQUEST": lib.PV_BLKIF_MAX_SEGMENTS_PER_REQUEST,
        "MAX_INDIRECT_PAGES_PER_REQUEST": lib.PV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
        "SEGS_PER_INDIRECT_FRAME": lib.PV_BLKIF_SEGS_PER_INDIRECT_FRAME,
        "DISCARD_SECURE": lib.PV_BLKIF_DISCARD_SECURE, "RSP_OKAY": lib.PV_BLKIF_RSP_OKAY,
        "RSP_ERROR": lib.PV_BLKIF_RSP_ERROR, "RSP_EOPNOTSUPP": lib.PV_BLKIF_RSP_EOPNOTSUPP,
    }  # fmt: skip
    got = {name: getattr(proto, name) for name in want}
    got |= {"Abi.X86_32": int(Abi.X86_32), "Abi.X86_64": int(Abi.X86_64)}
    want |= {"Abi.X86_32": lib.PV_BLKIF_ABI_X86_32, "Abi.X86_64": lib.PV_BLKIF_ABI_X86_64}
    got |= {"SLOT_SIZE[x86_64]": proto.SLOT_SIZE["x86_64"], "SLOT_SIZE[x86_32]": proto.SLOT_SIZE["x86_32"],
            "RSP_SIZE[x86_64]": proto.RSP_SIZE["x86_64"], "RSP_SIZE[x86_32]": proto.RSP_SIZE["x86_32"]}
    want |= {"SLOT_SIZE[x86_64]": lib.PV_BLKIF_X86_64_SLOT_SIZE, "SLOT_SIZE[x86_32]": lib.PV_BLKIF_X86_32_SLOT_SIZE,
             "RSP_SIZE[x86_64]": lib.PV_BLKIF_X86_64_RSP_SIZE, "RSP_SIZE[x86_32]": lib.PV_BLKIF_X86_32_RSP_SIZE}
    wrong = [f"{k} = {got[k]} (C: {v})" for k, v in want.items() if got[k] != v]
    if wrong:
        raise ImportError(f"backends.blk.proto disagrees with csrc/blkif.h: {', '.join(wrong)}")


_check_proto_mirrors()

# Rejection reasons by PV_BLKIF_E_* value, named by C (pv_blkif_reason_name) so the two cannot drift.
REASONS = tuple(ffi.string(lib.pv_blkif_reason_name(i)).decode() for i in range(lib.PV_BLKIF_NR_REASONS))
_COUNTERS = (
    "bytes_read", "bytes_written", "ring_overflow", "out_of_requests", "kicks", "spurious_kicks", "completes",
    "responses", "notifies", "grant_copy_calls", "grant_copy_segs", "persistent_hits", "persistent_maps",
    "persistent_evictions", "persistent_fallbacks", "fences", "polls_hit", "limit_waits", "limit_throttled_ns",
    "spurious_pauses", "fixed_buffer_reqs", "fixed_buffer_refusals",
)  # fmt: skip


class DiskLimit:
    """A disk's token buckets (csrc/blklimit.h), shared by its queues: unlimited until `set`, changed live."""

    def __init__(self) -> None:
        c = lib.pv_blk_limit_create()
        if c == ffi.NULL:
            raise MemoryError("blk limit")
        self.c: Any = c
        self._stats = ffi.new("struct pv_blk_limit_stats *")
        # Freed with the last reference: the disk's and each QueueConfig's, so no queue outlives it.
        weakref.finalize(self, lib.pv_blk_limit_destroy, c)

    def set(self, iops: int, bps: int, burst_ms: int) -> None:
        """Caps (0: none) and the burst.  Queues sleeping for tokens see it at their next wakeup
        (BlkQueue.limit_kick makes that now).  ValueError outside the C bounds."""
        if lib.pv_blk_limit_set(self.c, iops, bps, burst_ms) != 0:
            raise ValueError(f"limits out of range: iops={iops} bps={bps} burst_ms={burst_ms}")

    def stats(self) -> dict[str, int]:
        s = self._stats
        lib.pv_blk_limit_get_stats(self.c, s)
        return {"iops": int(s.iops), "bps": int(s.bps), "burst_ms": int(s.burst_ms), "waiting": int(s.waiting),
                "waits": int(s.waits), "throttled_ns": int(s.throttled_ns), "admitted": int(s.admitted)}



def _shape_names() -> tuple[str, ...]:
    buf = ffi.new("char[]", 64)
    names = []
    for i in range(int(lib.PV_BLKIF_NR_SHAPES)):
        if lib.pv_blkif_shape_name(i, buf, 64) < 0:
            raise RuntimeError(f"no name for request shape {i}")
        names.append(ffi.string(buf).decode())
    return tuple(names)


RING_STATE_KEYS = ("req_prod", "req_event", "rsp_prod", "rsp_event", "req_cons", "rsp_next", "held", "inflight",
                   "free_reqs", "fence", "parked", "listening", "throttled")

# "op/segs/sector/fill" for every index of pv_blk_stats.shapes (csrc/blkif.h says what the classes are).
SHAPE_NAMES = _shape_names()


@dataclass(frozen=True)
class RejectedRequest:
    """The last request a queue answered with an error."""

    reason: str
    operation: int  # wire code
    op: int  # effective operation (indirect_op for INDIRECT)
    sector: int
    nr_segments: int


class QueueDeadError(Exception):
    """The frontend published a bogus req_prod: the queue stopped for good (fail the device)."""


class EngineHandle(Protocol):
    """What the data path needs from a storage driver's engine (backends.drivers.storage.IoEngine)."""

    @property
    def c(self) -> struct_pv_io_engine: ...


@dataclass(frozen=True)
class QueueConfig:
    abi: Abi
    frontend_domid: int
    nr_ring_pages: int
    sectors: int  # 512-byte units
    sector_size: int = 512
    readonly: bool = False
    can_flush: bool = True
    can_barrier: bool = True
    can_discard: bool = False
    can_secure_discard: bool = False
    max_indirect_segments: int = 0
    persistent: bool = False
    max_persistent_grants: int = DEFAULT_MAX_PERSISTENT_GRANTS
    persistent_min_bytes: int = 0
    poll_us: int = 0
    # Bounce pages kept for reuse.  Must cover what the guest keeps in flight: with fewer, every batch of
    # large requests frees pages and faults fresh zeroed ones in (measured: 1 MiB reads at QD8 ran at a
    # third of the copy speed with 1024).  Only pages actually used are cached: 32 MiB is a bound.
    max_buffer_pages: int = 8192
    # Longest pause of the event channel for a guest whose events keep finding nothing to do (0: never).
    spurious_pause_max_us: int = 5000
    # The disk's limits, shared by its queues (None: never limited, no timer).
    limit: DiskLimit | None = None


class BlkQueue(CHandle[struct_pv_blk_queue]):
    """The C queue object; every method is one C call."""

    def __init__(
        self,
        ring_address: CData,
        cfg: QueueConfig,
        gnt: struct_pv_gnt,
        evtchn: struct_pv_evtchn | None,
        engine: struct_pv_io_engine,
    ) -> None:
        c = ffi.new("struct pv_blk_queue_config *")
        c.abi = int(cfg.abi)
        c.frontend_domid = cfg.frontend_domid
        c.nr_ring_pages = cfg.nr_ring_pages
        c.sector_size = cfg.sector_size
        c.sectors = cfg.sectors
        c.max_indirect_segments = cfg.max_indirect_segments
        c.readonly = cfg.readonly
        c.can_flush = cfg.can_flush
        c.can_barrier = cfg.can_barrier
        c.can_discard = cfg.can_discard
        c.can_secure_discard = cfg.can_secure_discard
        c.persistent = cfg.persistent
        c.max_persistent_grants = cfg.max_persistent_grants
        c.persistent_min_bytes = cfg.persistent_min_bytes
        c.poll_us = cfg.poll_us
        c.max_buffer_pages = cfg.max_buffer_pages
        c.spurious_pause_max_us = cfg.spurious_pause_max_us
        c.limit = cfg.limit.c if cfg.limit is not None else ffi.NULL
        err = ffi.new("char[]", 256)
        q = lib.pv_blk_queue_create(ring_address, c, gnt, evtchn if evtchn is not None else ffi.NULL, engine, err, 256)
        if q == ffi.NULL:
            raise ValueError(f"blk queue: {ffi.string(err).decode(errors='replace')}")
        super().__init__(q)
        self.cfg = cfg
        self._stats = ffi.new("struct pv_blk_stats *")
        self._ring_state = ffi.new("struct pv_blk_ring_state *")

    def _closed_message(self) -> str:
        return "blk queue closed"

    @staticmethod
    def _check(n: int) -> int:
        if n < 0:
            raise QueueDeadError("frontend provided bogus ring requests")
        return n

    def kick(self) -> int:
        """Drain the ring; returns responses written.  QueueDeadError for a hostile req_prod."""
        return self._check(int(lib.pv_blk_queue_kick(self.c)))

    def complete(self) -> int:
        return self._check(int(lib.pv_blk_queue_complete(self.c)))

    def run(self, stop_fd: int) -> None:
        """Pump until `stop_fd` is readable (blocks; releases the GIL).  QueueDeadError for a hostile req_prod,
        OSError if the event channel failed."""
        n = int(lib.pv_blk_queue_run(self.c, stop_fd))
        if n == -lib.PV_BLK_EEVTCHN:
            raise OSError("event channel: pending/unmask/poll failed")
        self._check(n)

    def drain(self, timeout_ms: int = -1) -> int:
        """Wait for in-flight I/O (answering it); returns how many are still in flight."""
        return int(lib.pv_blk_queue_drain(self.c, timeout_ms))

    @property
    def completion_fd(self) -> int:
        return int(lib.pv_blk_queue_completion_fd(self.c))

    @property
    def inflight(self) -> int:
        return int(lib.pv_blk_queue_inflight(self.c))

    @property
    def dead(self) -> bool:
        return bool(lib.pv_blk_queue_dead(self.c))

    @property
    def ring_size(self) -> int:
        return int(lib.pv_blk_queue_ring_size(self.c))

    @property
    def persistent_grants(self) -> int:
        return int(lib.pv_blk_queue_persistent_count(self.c))

    def set_sectors(self, sectors: int) -> None:
        lib.pv_blk_queue_set_sectors(self.c, sectors)

    def limit_kick(self) -> None:
        """Look at the disk's limits again now (from any thread)."""
        lib.pv_blk_queue_limit_kick(self.c)

    def set_poll_us(self, us: int) -> None:
        lib.pv_blk_queue_set_poll_us(self.c, us)

    def latency_histogram(self) -> list[int]:
        """Responses by latency: [0] < 1 us, [i] in [2^(i-1), 2^i) us."""
        lib.pv_blk_queue_get_stats(self.c, self._stats)
        return [int(x) for x in self._stats.latency_us_log2]

    def shapes(self) -> dict[str, int]:
        """Requests received by shape (only the shapes seen)."""
        s = self._stats
        lib.pv_blk_queue_get_stats(self.c, s)
        return {SHAPE_NAMES[i]: int(n) for i, n in enumerate(s.shapes) if n}

    def ring_state(self) -> dict[str, int]:
        """Where the queue stands with its frontend (csrc/blkback.h, pv_blk_ring_state): the shared ring's
        indices and the queue's own, for telling a stuck guest's disk from a guest stuck elsewhere."""
        st = self._ring_state
        lib.pv_blk_queue_ring_state(self.c, st)
        return {name: int(getattr(st, name)) for name in RING_STATE_KEYS}

    def nudge(self) -> None:
        """From any thread: the pump looks at the ring and the completions now (a lost notification's work)."""
        lib.pv_blk_queue_nudge(self.c)

    def notify(self) -> None:
        """From any thread: send the frontend an event (one it may have missed; a spurious one costs it nothing)."""
        rc = int(lib.pv_blk_queue_notify(self.c))
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def last_error(self) -> RejectedRequest | None:
        s = self._stats
        lib.pv_blk_queue_get_stats(self.c, s)
        if not s.last_error_reason:
            return None
        reason = int(s.last_error_reason)
        return RejectedRequest(REASONS[reason] if reason < len(REASONS) else str(reason),
                               int(s.last_error_operation), int(s.last_error_op), int(s.last_error_sector),
                               int(s.last_error_nr_segments))

    def stats(self) -> dict[str, int]:
        s = self._stats
        lib.pv_blk_queue_get_stats(self.c, s)
        out: dict[str, int] = {}
        for op, name in OP_NAMES.items():
            out[f"req_{name}"] = int(s.req_by_op[op])
        out["req_unknown"] = int(s.req_by_op[7])
        for name in _COUNTERS:
            out[name] = int(getattr(s, name))
        for i, name in enumerate(REASONS):
            if i:
                out[f"err_{name}"] = int(s.errors[i])
        out["errors"] = sum(int(s.errors[i]) for i in range(1, len(REASONS)))
        out["inflight"] = self.inflight
        return out

    def _free(self, c: struct_pv_blk_queue) -> None:
        """Waits for in-flight I/O, unmaps persistent grants, frees."""
        lib.pv_blk_queue_destroy(c)


class BlkDataplane(QueueDataplane):
    """One queue of a connected disk: owns the ring mapping, the bound event channel, the C queue and the
    queue's pump thread (backends.xenbus.pump), or, with `pool`, its place on one of the shared pumps
    (backends.blk.pumps).

    `on_dead` is called (once, on the event loop) when the frontend breaks the ring protocol or the event
    channel fails; the device should fail.
    """

    def __init__(
        self,
        ring: GrantMapping,
        evtchn: EventChannel,
        gnt: struct_pv_gnt,
        engine: EngineHandle,
        cfg: QueueConfig,
        *,
        on_dead: Callable[[str], None] | None = None,
        name: str = "blk",
        pool: PumpPool | None = None,
    ) -> None:
        if ring.npages != cfg.nr_ring_pages:
            raise ValueError(f"ring mapping has {ring.npages} pages, config says {cfg.nr_ring_pages}")
        self._queue = BlkQueue(ring.address, cfg, gnt, evtchn.c, engine.c)
        super().__init__(name, self._queue, [ring], [evtchn], on_dead=on_dead, errors=(QueueDeadError, OSError))
        self._pool = pool
        self._pooled = False

    @property
    def queue(self) -> BlkQueue:
        return self._queue

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._pool is None:
            super().start(loop)
            return
        if self._stopped or self._pooled:
            return
        # The queue's own pump thread is never started; its once-only report serves the shared pump too.
        self._pool.add(self._queue.c, self._pump.fail, loop or asyncio.get_running_loop())
        self._pooled = True

    def _unpool(self) -> None:
        if self._pooled and self._pool is not None:
            self._pooled = False
            self._pool.remove(self._queue.c)

    async def stop(self, timeout: float = 10.0) -> None:
        if self._pooled:
            # Off the loop: removal waits for the pump's current pass (bounded by its budget).
            self._pump.silence()
            await asyncio.to_thread(self._unpool)
        await super().stop(timeout)

    def close(self) -> None:
        self._pump.silence()
        self._unpool()
        super().close()

    async def _quiesce(self, timeout: float) -> None:
        # In-flight I/O is answered before the ring is let go of.
        if not self._queue.closed and self._queue.inflight:
            await asyncio.to_thread(self._queue.drain, int(timeout * 1000))
