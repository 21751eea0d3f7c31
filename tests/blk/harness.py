"""An in-process frontend for data-path tests: guest memory and a v1 grant table in memfds, attached to the
emulated `struct pv_gnt` (csrc/gnt_emu.c, which enforces Xen's grant rules), one shared ring page, and
helpers that build blkif requests over granted pages (direct or indirect) and collect responses."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import mmap
import os
import random
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.blk.dataplane import BlkQueue, QueueConfig
from backends.blk.proto import Abi
from backends.native.grants import EmulatedGrantTable, NativeGrantMapping, guest_grant, guest_revoke
from backends.native.ring import FrontRing

from . import wire

PAGE = 4096
GUEST = 1
BACKEND = 0


@contextlib.contextmanager
def memory_image(tag: str, size: int) -> Iterator[Path]:
    """An image of `size` bytes of seeded random data on a memory filesystem (so it is served like a tmpfs
    image), removed afterwards."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path("/tmp")
    p = base / f"pvback-{tag}-test-{os.getpid()}-{random.getrandbits(32):08x}.img"
    p.write_bytes(random.Random(3).randbytes(size))
    try:
        yield p
    finally:
        p.unlink(missing_ok=True)


def _sealed_memfd(name: str, size: int) -> int:
    # The emulated grant table insists on F_SEAL_SHRINK: a guest must not be able to pull pages from under us.
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


class MiniGuest:
    def __init__(self, pages: int = 1024, entries: int = 4096, domid: int = GUEST) -> None:
        self.domid = domid
        self.pages = pages
        self.entries = entries
        mem_fd = _sealed_memfd("blk-test-mem", pages * PAGE)
        gtab_fd = _sealed_memfd("blk-test-gtab", entries * 8)
        try:
            self.mem = mmap.mmap(mem_fd, pages * PAGE)
            self.gtab = mmap.mmap(gtab_fd, entries * 8)
            self.table = EmulatedGrantTable(BACKEND)
            self.table.attach(domid, mem_fd, pages, gtab_fd, entries)
        finally:
            os.close(mem_fd)
            os.close(gtab_fd)
        self.view = memoryview(self.mem)
        self._next_page = 0
        self._next_ref = 8

    def alloc(self, n: int = 1) -> list[int]:
        if self._next_page + n > self.pages:
            raise MemoryError("guest out of pages")
        out = list(range(self._next_page, self._next_page + n))
        self._next_page += n
        return out

    def grant(self, page: int, *, readonly: bool = False, to: int = BACKEND) -> int:
        ref = self._next_ref
        self._next_ref += 1
        guest_grant(self.gtab, self.entries, ref, to, page, readonly)
        return ref

    def revoke(self, ref: int) -> None:
        guest_revoke(self.gtab, self.entries, ref)

    def page(self, page: int) -> memoryview:
        return self.view[page * PAGE : (page + 1) * PAGE]

    def close(self) -> None:
        self.table.detach(self.domid)
        self.table.close()
        gc.collect()  # FrontRing and page views export pointers into the mapping
        for m in (self.view, self.mem, self.gtab):
            with contextlib.suppress(BufferError):
                m.release() if isinstance(m, memoryview) else m.close()


@dataclass
class Pending:
    rid: int
    op: int  # the operation the response must carry: the inner one for INDIRECT (Linux blkfront checks it)
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # (page, offset, length) in order
    indirect: bool = False


class Rig:
    """A guest, a ring, and a C queue on an engine."""

    def __init__(
        self,
        engine: Any,
        *,
        abi: Abi = Abi.X86_64,
        sectors: int,
        sector_size: int = 512,
        readonly: bool = False,
        persistent: bool = False,
        persistent_min_bytes: int = 0,
        max_persistent_grants: int = 1056,
        max_indirect: int = 256,
        can_discard: bool = True,
        guest_pages: int = 1024,
        ring_pages: int = 1,
    ) -> None:
        self.abi = abi
        self.engine = engine
        self.g = MiniGuest(pages=guest_pages)
        rpages = self.g.alloc(ring_pages)  # consecutive: the frontend sees one contiguous ring
        ring_page = rpages[0]
        ring_refs = [self.g.grant(p) for p in rpages]
        shared = self.g.view[ring_page * PAGE : (ring_page + ring_pages) * PAGE]
        self.front = FrontRing(shared, ring_pages, abi.slot_size)
        self.ring_map: NativeGrantMapping = self.g.table.map(GUEST, ring_refs, True)
        self.cfg = QueueConfig(
            abi=abi,
            frontend_domid=GUEST,
            nr_ring_pages=ring_pages,
            sectors=sectors,
            sector_size=sector_size,
            readonly=readonly,
            can_discard=can_discard,
            max_indirect_segments=max_indirect,
            persistent=persistent,
            max_persistent_grants=max_persistent_grants,
            persistent_min_bytes=persistent_min_bytes,
        )
        self.q = BlkQueue(self.ring_map.address, self.cfg, self.g.table.c, None, engine.c)
        self.ring_page = ring_page
        # A fixed pool of granted data pages, reused across requests (as blkfront with persistent grants).
        self.data_pages = self.g.alloc(300)
        self.data_refs = [self.g.grant(p) for p in self.data_pages]
        self._next = 0
        self._rid = 100

    def _take_pages(self, n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            i = self._next % len(self.data_pages)
            self._next += 1
            out.append((self.data_pages[i], self.data_refs[i]))
        return out

    def request(self, op: int, sector: int, nbytes: int, *, first: int = 0, data: bytes | None = None,
                force_indirect: bool = False) -> tuple[bytes, Pending]:
        """A READ/WRITE (or FLUSH/BARRIER with data) of `nbytes` at `sector`, first segment starting at
        sector `first` of its page.  Fills guest pages with `data` for writes, garbage for reads."""
        assert nbytes % 512 == 0 and nbytes > 0
        nsect = nbytes // 512
        segs: list[tuple[int, int, int]] = []
        pieces: list[tuple[int, int, int]] = []
        f = first
        left = nsect
        pages = self._take_pages(-(-(nsect + first) // 8))
        for page, ref in pages:
            last = min(7, f + left - 1)
            segs.append((ref, f, last))
            pieces.append((page, f * 512, (last - f + 1) * 512))
            left -= last - f + 1
            f = 0
        assert left == 0
        off = 0
        for page, poff, ln in pieces:
            pv = self.g.page(page)
            if data is not None:
                pv[poff : poff + ln] = data[off : off + ln]
            else:
                pv[:] = b"\xee" * PAGE
            off += ln
        self._rid += 1
        rid = self._rid
        if len(segs) <= 11 and not force_indirect:
            slot = wire.rw(self.abi, op, rid, sector, segs)
            return slot, Pending(rid, op, pieces)
        ind_pages = self._indirect_pages(segs)
        slot = wire.indirect(self.abi, op, rid, sector, len(segs), ind_pages)
        return slot, Pending(rid, op, pieces, indirect=True)

    def _indirect_pages(self, segs: list[tuple[int, int, int]]) -> list[int]:
        refs = []
        for i in range(0, len(segs), 512):
            page = self.g.alloc()[0]
            chunk = wire.indirect_page(segs[i : i + 512])
            self.g.page(page)[: len(chunk)] = chunk
            refs.append(self.g.grant(page, readonly=True))
        return refs

    def next_id(self) -> int:
        self._rid += 1
        return self._rid

    def submit(self, slots: list[bytes]) -> None:
        assert self.front.put(slots, self.abi.slot_size) == len(slots)
        self.front.push()

    def run(self, slots: list[bytes], timeout: float = 5.0) -> dict[int, tuple[int, int]]:
        """Submit, kick, wait; returns {id: (operation, status)}."""
        self.submit(slots)
        self.q.kick()
        out: dict[int, tuple[int, int]] = {}
        deadline = time.monotonic() + timeout
        while True:
            for raw in self.front.consume(self.abi.rsp_size):
                rid, op, status = wire.response(self.abi, raw)
                assert rid not in out, "duplicate response"
                out[rid] = (op, status)
            if len(out) >= len(slots):
                return out
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(out)}/{len(slots)} responses"
            r, _, _ = select.select([self.q.completion_fd], [], [], min(left, 0.5))
            if r:
                self.q.complete()

    def gather(self, p: Pending) -> bytes:
        return b"".join(bytes(self.g.page(page)[off : off + ln]) for page, off, ln in p.pieces)

    def ring_slot(self, idx: int) -> bytes:
        start = self.ring_page * PAGE + 64 + (idx % self.front.size) * self.abi.slot_size
        return bytes(self.g.view[start : start + self.abi.slot_size])

    def close(self) -> None:
        self.q.close()
        self.ring_map.unmap()
        assert self.g.table.live_mappings == 0, "grant mappings leaked"
        assert self.g.table.pinned(GUEST) == 0, "grants left pinned"
        del self.front
        self.g.close()
