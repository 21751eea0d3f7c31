"""blkback's configuration section, `[blk]`, with every default documented here."""

from __future__ import annotations

from dataclasses import dataclass

# Backend directory types blkback can serve ("vbd3" and friends belong to other backends).
BLK_BACKEND_TYPES = ("qdisk", "vbd")


@dataclass
class BlkConfig:
    # Largest ring the frontend may use: 2^order pages (Linux blkfront asks for up to 4 by default).
    max_ring_page_order: int = 4
    # Queues offered; one pump per queue.  More queues than cores only adds wakeups.
    max_queues: int = 2
    # Segments per indirect request: 256 = 1 MiB requests with 4 KiB pages (Linux blkback's value).
    max_indirect_segments: int = 256
    # Persistent grants mapped per queue (LRU).  Linux's 1056 bounds dom0 maptrack use per device.
    max_persistent_grants: int = 1056
    # Requests of at least this many bytes use persistent mappings instead of grant copy when offered.  0 maps
    # every request, as Linux blkback does: measured cheaper on the emulated platform (perf/RESULTS.md, issue #20
    # section 6: 4 KiB QD32 backend CPU per request 1.52 -> 1.29 us on tmpfs, 7.15 -> 6.19 us on disk) and run
    # under real Xen with a Linux guest (section 6 (h)).  A bigger value keeps small requests on grant copy,
    # which needs no mapping slot in dom0.
    persistent_threshold_bytes: int = 0
    # Spin this long for new requests before re-arming the event channel: trades CPU for QD1 latency.
    poll_us: int = 0
    # Pump threads shared by all queues (N:M): a queue with work gets a turn from whichever is free, at most
    # pump_budget requests per turn, so one wake-up serves every queue that became ready and a ring kept full
    # gets a batch per turn like its neighbours.  -1: one per CPU the daemon may run on; 0: one pump thread
    # per queue (the kernel's scheduler shares the cores between them).  The interleaved A/B behind the
    # default is in perf/RESULTS.md ("Many guests", shared pumps): 1.4x the aggregate at 16 and 32 guests.
    pumps: int = -1
    # Requests one queue may take per turn of a shared pump.  8 (a guest's usual batch) gives every queue
    # the same per turn, whatever its ring depth: measured Jain 0.99 at 16 and 32 guests.  32 lets a guest
    # whose process refills during its turn take up to 4 batches: 1.5x the aggregate there, Jain down to 0.77.
    pump_budget: int = 8
    # 1: shared pump thread i runs only on the i-th CPU the daemon may use (round robin), so the threads
    # never stack on one CPU (measured: left alone they sometimes did for seconds, the daemon then got 0.8 of
    # a core); they share the queues, so a thread whose CPU is busy with other work just takes fewer turns.
    pump_pinning: int = 1
    # Worker threads for O_DIRECT files and block devices (page-cache images are served inline).
    io_threads: int = 4
    # A guest whose events keep finding no work (hammering its event channel) has the channel paused for up
    # to this long, from 20 us doubling, so its pump does not burn a core other guests need (0: never).
    spurious_pause_max_us: int = 5000
    # Every disk's I/O caps unless its backend keys say otherwise (backends/blk/limits.py): requests per
    # second and bytes per second (0: no cap), and the burst an idle disk may run at full speed (ms).
    iops_limit: int = 0
    bps_limit: int = 0
    limit_burst_ms: int = 100


# Accepted values of the integer keys, inclusive.
BLK_RANGES: dict[str, tuple[int, int]] = {
    "max_ring_page_order": (0, 4),
    "max_queues": (1, 64),
    "max_indirect_segments": (0, 4096),
    "max_persistent_grants": (0, 1 << 20),
    "persistent_threshold_bytes": (0, 1 << 30),
    "poll_us": (0, 1_000_000),
    "io_threads": (1, 256),
    "pumps": (-1, 64),
    "pump_budget": (1, 4096),
    "pump_pinning": (0, 1),
    "spurious_pause_max_us": (0, 1_000_000),
    "iops_limit": (0, 100_000_000),
    "bps_limit": (0, 1_000_000_000_000),
    "limit_burst_ms": (0, 60_000),
}
