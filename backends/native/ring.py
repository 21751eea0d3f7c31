"""Typed wrappers over the C shared-ring primitives (csrc/ring.h).

The ring objects keep a reference to the buffer that holds the shared page(s) so it outlives the C pointer.
Batch-shaped like the C calls: one `consume` copies up to N slots, one `respond` pushes N responses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backends.native import CData, ffi, lib, struct_pv_back_ring, struct_pv_front_ring
from backends.native.handle import C, CHandle

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from 3.12 on

RING_HEADER_SIZE = 64
PAGE_SIZE = 4096


class RingOverflowError(Exception):
    """The peer published an index that cannot be right (req_prod - rsp_prod_pvt > size): hostile or broken."""


def ring_size(nr_pages: int, slot_size: int) -> int:
    """__CONST_RING_SIZE for `nr_pages` 4 KiB pages of `slot_size`-byte slots."""
    return int(lib.pv_ring_size(nr_pages, slot_size))


def _pointer(buf: Buffer | CData) -> tuple[CData, bool]:
    """A C pointer for a writable buffer (memoryview/mmap/bytearray) or an existing cdata pointer, and whether
    it is ours (a from_buffer view to release on close)."""
    if isinstance(buf, CData):
        return buf, False
    return ffi.from_buffer(buf, require_writable=True), True


class _Ring(CHandle[C]):
    """What both ends share: the shared pages are held (a from_buffer view of them makes mmap.close() refuse
    while the ring lives) until close()."""

    def __init__(self, c: C, shared: Buffer | CData) -> None:
        super().__init__(c)
        self._keep, self._owned = _pointer(shared)

    def _closed_message(self) -> str:
        return "ring closed"

    def _free(self, c: C) -> None:
        if self._owned:
            ffi.release(self._keep)


class BackRing(_Ring[struct_pv_back_ring]):
    """Backend end of a shared ring: consumes requests, produces responses.  `c` is the
    `struct pv_back_ring *` for C data paths."""

    def __init__(self, shared: Buffer | CData, nr_pages: int, slot_size: int, start_idx: int = 0) -> None:
        super().__init__(ffi.new("struct pv_back_ring *"), shared)
        lib.pv_back_ring_attach(self.c, self._keep, nr_pages, slot_size, start_idx)
        if self.c.size == 0:
            raise ValueError(f"{slot_size}-byte slots do not fit in {nr_pages} page(s)")
        self.size: int = int(self.c.size)
        self.slot_size = slot_size
        self._buf = ffi.new("uint8_t[]", self.size * slot_size)

    @property
    def req_cons(self) -> int:
        return int(self.c.req_cons)

    @property
    def rsp_prod_pvt(self) -> int:
        return int(self.c.rsp_prod_pvt)

    def pending(self) -> int:
        n = int(lib.pv_back_ring_pending(self.c))
        if n < 0:
            raise RingOverflowError("frontend provided bogus ring requests")
        return n

    def consume(self, max_slots: int | None = None) -> list[bytes]:
        """Copy out up to `max_slots` requests (each read from shared memory once)."""
        limit = self.size if max_slots is None else min(max_slots, self.size)
        n = int(lib.pv_back_ring_consume(self.c, self._buf, limit))
        if n < 0:
            raise RingOverflowError("frontend provided bogus ring requests")
        raw = ffi.buffer(self._buf, n * self.slot_size)[:]
        s = self.slot_size
        return [raw[i * s : (i + 1) * s] for i in range(n)]

    def respond(self, responses: list[bytes], rsp_size: int) -> bool:
        """Write responses into zeroed slots and push; True if the frontend must be notified."""
        if not responses:
            return False
        data = b"".join(r.ljust(rsp_size, b"\0")[:rsp_size] for r in responses)
        return bool(lib.pv_back_ring_respond(self.c, data, len(responses), rsp_size))

    def final_check(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if more work arrived (so do not sleep)."""
        n = int(lib.pv_back_ring_final_check(self.c))
        if n < 0:
            raise RingOverflowError("frontend provided bogus ring requests")
        return n > 0


class FrontRing(_Ring[struct_pv_front_ring]):
    """Frontend end of a shared ring (emulated guests, tests, benchmarks)."""

    def __init__(
        self, shared: Buffer | CData, nr_pages: int, slot_size: int, *, init: bool = True, start_idx: int = 0
    ) -> None:
        super().__init__(ffi.new("struct pv_front_ring *"), shared)
        if init:
            lib.pv_sring_init_at(self._keep, start_idx)
        lib.pv_front_ring_attach(self.c, self._keep, nr_pages, slot_size, start_idx)
        if self.c.size == 0:
            raise ValueError(f"{slot_size}-byte slots do not fit in {nr_pages} page(s)")
        self.size: int = int(self.c.size)
        self.slot_size = slot_size
        self._buf = ffi.new("uint8_t[]", self.size * slot_size)

    def free_slots(self) -> int:
        return int(lib.pv_front_ring_free(self.c))

    def put(self, requests: list[bytes], req_size: int) -> int:
        """Queue requests into free slots (not yet visible); returns how many fit."""
        if not requests:
            return 0
        data = b"".join(r.ljust(req_size, b"\0")[:req_size] for r in requests)
        return int(lib.pv_front_ring_put_requests(self.c, data, len(requests), req_size))

    def push(self) -> bool:
        """Publish queued requests; True if the backend must be notified."""
        return bool(lib.pv_front_ring_push(self.c))

    def consume(self, rsp_size: int, max_slots: int | None = None) -> list[bytes]:
        limit = self.size if max_slots is None else min(max_slots, self.size)
        n = int(lib.pv_front_ring_consume(self.c, self._buf, limit, rsp_size))
        if n < 0:
            raise RingOverflowError("backend produced more responses than requests")
        raw = ffi.buffer(self._buf, n * rsp_size)[:]
        return [raw[i * rsp_size : (i + 1) * rsp_size] for i in range(n)]

    def final_check(self) -> bool:
        return bool(lib.pv_front_ring_final_check(self.c))
