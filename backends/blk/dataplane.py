"""One blkif queue: the C data path (csrc/blkback.h) driven by the asyncio loop.

Per event: `evtchn.pending()`, one C kick (drains the ring with the final check, validates, copies,
submits, and with an inline engine also completes and responds), then `evtchn.unmask()`.  Per completion
wakeup (threaded engines): one C complete call.  Python never runs per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from backends.blk.proto import DEFAULT_MAX_PERSISTENT_GRANTS, OP_NAMES, Abi
from backends.native import ffi, lib
from backends.platform.base import EventChannel, GrantMapping

log = logging.getLogger(__name__)

REASONS = (
    "ok", "bad_op", "unsupported", "nr_segments", "indirect_nr_segments", "indirect_op", "sect_order",
    "sect_page", "range", "overflow", "align", "readonly", "abi", "grant", "io", "nomem",
)  # fmt: skip
_COUNTERS = (
    "bytes_read", "bytes_written", "ring_overflow", "out_of_requests", "kicks", "spurious_kicks", "completes",
    "responses", "notifies", "grant_copy_calls", "grant_copy_segs", "persistent_hits", "persistent_maps",
    "persistent_evictions", "persistent_fallbacks", "fences", "polls_hit",
)  # fmt: skip


class QueueDeadError(Exception):
    """The frontend published a bogus req_prod: the queue stopped for good (fail the device)."""


class EngineHandle(Protocol):
    """What the data path needs from a storage driver's engine (backends.drivers.storage.IoEngine)."""

    @property
    def c(self) -> Any: ...


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


class BlkQueue:
    """The C queue object; every method is one C call."""

    def __init__(self, ring_address: Any, cfg: QueueConfig, gnt: Any, evtchn: Any, engine: Any) -> None:
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
        err = ffi.new("char[]", 256)
        q = lib.pv_blk_queue_create(ring_address, c, gnt, evtchn if evtchn is not None else ffi.NULL, engine, err, 256)
        if q == ffi.NULL:
            raise ValueError(f"blk queue: {ffi.string(err).decode(errors='replace')}")
        self._q: Any = q
        self.cfg = cfg
        self._stats = ffi.new("struct pv_blk_stats *")

    @property
    def c(self) -> Any:
        if self._q is None:
            raise ValueError("blk queue closed")
        return self._q

    @property
    def closed(self) -> bool:
        return self._q is None

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

    def event(self) -> int:
        """The event channel fired: pending + kick + unmask in one C call.  OSError if the channel failed."""
        n = int(lib.pv_blk_queue_event(self.c))
        if n == -lib.PV_BLK_EEVTCHN:
            raise OSError("pending/unmask failed")
        return self._check(n)

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

    def set_poll_us(self, us: int) -> None:
        lib.pv_blk_queue_set_poll_us(self.c, us)

    def latency_histogram(self) -> list[int]:
        """Responses by latency: [0] < 1 us, [i] in [2^(i-1), 2^i) us."""
        lib.pv_blk_queue_get_stats(self.c, self._stats)
        return [int(x) for x in self._stats.latency_us_log2]

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

    def close(self) -> None:
        """Waits for in-flight I/O, unmaps persistent grants, frees.  Idempotent."""
        if self._q is not None:
            q, self._q = self._q, None
            lib.pv_blk_queue_destroy(q)


class BlkDataplane:
    """One queue of a connected disk: owns the ring mapping, the bound event channel and the C queue.

    `on_dead` is called (once) when the frontend breaks the ring protocol; the device should fail.
    """

    def __init__(
        self,
        ring: GrantMapping,
        evtchn: EventChannel,
        gnt: Any,
        engine: EngineHandle,
        cfg: QueueConfig,
        *,
        on_dead: Callable[[str], None] | None = None,
        name: str = "blk",
    ) -> None:
        if ring.npages != cfg.nr_ring_pages:
            raise ValueError(f"ring mapping has {ring.npages} pages, config says {cfg.nr_ring_pages}")
        self.name = name
        self._ring = ring
        self._evtchn = evtchn
        self._on_dead = on_dead
        self._queue = BlkQueue(ring.address, cfg, gnt, evtchn.c, engine.c)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._failed = False

    @property
    def queue(self) -> BlkQueue:
        return self._queue

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Watch the event channel and the completion fd, and serve what is already queued."""
        if self._loop is not None or self._stopped:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._evtchn.fileno(), self._on_event)
        self._loop.add_reader(self._queue.completion_fd, self._on_completion)
        # Requests may have been queued before we listened (and bind_interdomain's initial event may have
        # been consumed already): one kick picks them up.
        self._run(self._queue.kick)

    def _run(self, call: Callable[[], int]) -> None:
        if self._failed or self._queue.closed:
            return
        try:
            call()
        except QueueDeadError as exc:
            self._fail(str(exc))

    def _on_event(self) -> None:
        # One C call acknowledges the event, drains the ring and unmasks only then (the lateeoi rule: a
        # flooding guest cannot make us spin); at QD1 every Python step here is on the round trip.
        if self._failed or self._queue.closed:
            return
        try:
            self._queue.event()
        except QueueDeadError as exc:
            self._fail(str(exc))
        except OSError as exc:
            self._fail(f"event channel: {exc}")

    def _on_completion(self) -> None:
        self._run(self._queue.complete)

    def _fail(self, message: str) -> None:
        if self._failed:
            return
        self._failed = True
        log.error("%s: %s", self.name, message)
        self._remove_readers()
        if self._on_dead is not None:
            self._on_dead(message)

    def _remove_readers(self) -> None:
        if self._loop is None:
            return
        for fd in (self._evtchn_fd(), self._completion_fd()):
            if fd >= 0:
                self._loop.remove_reader(fd)

    def _evtchn_fd(self) -> int:
        try:
            return self._evtchn.fileno()
        except ValueError:
            return -1

    def _completion_fd(self) -> int:
        try:
            return self._queue.completion_fd
        except ValueError:
            return -1

    def stats(self) -> dict[str, int]:
        return {} if self._queue.closed else self._queue.stats()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, wait for in-flight I/O (answering it), unmap and unbind.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._remove_readers()
        self._loop = None
        if not self._queue.closed and self._queue.inflight:
            # Off the loop: a threaded engine may need milliseconds; nothing else touches the queue now.
            await asyncio.to_thread(self._queue.drain, int(timeout * 1000))
        self.close()

    def close(self) -> None:
        """Synchronous teardown (blocks on in-flight I/O).  Idempotent."""
        self._stopped = True
        self._remove_readers()
        self._loop = None
        self._queue.close()
        self._ring.unmap()
        self._evtchn.close()
