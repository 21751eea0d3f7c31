"""The C data path of the emulated netfront (csrc/netfront_io.h): one thread per queue blocked in one C call,
`pv_nf_run`, which moves frames between the guest-namespace tap and the queue's rings until told to stop.

NetFront owns the handshake, the rings, the event channels and the grants; this hands them to C.  The TX pool
and the RX buffers are C's from start() to stop(): nothing in Python touches them meanwhile.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends._guest_native import CData
    from backends.guests.netfront import NetFront

STAT_FIELDS = (
    "tx_packets", "tx_bytes", "tx_gso", "tx_csum_blank", "tx_dropped", "tx_errors", "tx_full", "tx_notifies",
    "tap_reads", "rx_packets", "rx_bytes", "rx_gso", "rx_errors", "rx_notifies", "tap_writes", "wakeups",
    "spin_hits", "loops",
)  # fmt: skip


def available() -> bool:
    """Whether the guest's cffi module is built (it is wherever the backend's is: build_ffi.py builds both)."""
    try:
        import backends._guest_native  # noqa: F401
    except ImportError:
        return False
    return True


class NativeQueue:
    """One netfront queue's C loop.  `error` holds what ended it early (None while it runs or after a stop)."""

    def __init__(self, front: NetFront, tx_pages: list[tuple[int, int]], rx_bufs: list[tuple[int, int]], *,
                 batch: int = 64, spin_us: int = 0) -> None:
        from backends._guest_native import ffi

        g = front.guest
        self._ffi = ffi
        self._tx_addrs = ffi.new("void *[]", [g.page_address(p) for p, _r in tx_pages])
        self._tx_refs = ffi.new("uint32_t[]", [r for _p, r in tx_pages])
        self._rx_addrs = ffi.new("void *[]", [g.page_address(p) for p, _r in rx_bufs])
        self._rx_refs = ffi.new("uint32_t[]", [r for _p, r in rx_bufs])
        q = ffi.new("struct pv_nf_queue *")
        q.tx = ffi.cast("struct pv_front_ring *", front.tx.c)
        q.rx = ffi.cast("struct pv_front_ring *", front.rx.c)
        q.ev_tx = ffi.cast("struct pv_evtchn *", front.ev_tx.c)
        q.ev_rx = ffi.cast("struct pv_evtchn *", front.ev_rx.c)
        q.tap_fd = front.tap
        q.ntx, q.tx_addrs, q.tx_refs = len(tx_pages), self._tx_addrs, self._tx_refs
        q.nrx, q.rx_addrs, q.rx_refs = len(rx_bufs), self._rx_addrs, self._rx_refs
        q.batch, q.spin_us = batch, spin_us
        self._q = q
        self._st = ffi.new("struct pv_nf_stats *")
        self._err = ffi.new("char[]", 256)
        self._stop_fd = -1
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._main, name="netfront-c", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        from backends._guest_native import lib

        rc = int(lib.pv_nf_run(self._q, self._stop_fd, self._st, self._err, 256))
        if rc < 0:
            self.error = RuntimeError(f"netfront C data path failed ({rc}): "
                                      f"{self._ffi.string(self._err).decode(errors='replace')}")

    def stop(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join(5)
            if self._thread.is_alive():  # pragma: no cover - the loop polls stop_fd on every sleep
                raise RuntimeError("netfront C data path did not stop")
            self._thread = None
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        st: CData = self._st
        return {k: int(getattr(st, k)) for k in STAT_FIELDS}
