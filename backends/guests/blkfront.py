"""A blkif frontend for emulated guests: the handshake Linux xen-blkfront does, and I/O with data checks.

Request and response bytes are built from Xen's public header layouts (io/blkif.h, x86_64 and x86_32 ABIs),
field by field, so the backend sees exactly what a Linux or Windows frontend would send.  Used by the tests,
the demo and `pvback guest`; the benchmark drives the ring from C instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backends.guests.guest import Guest, GuestPort
from backends.native.ring import FrontRing
from backends.xenbus.state import XenbusState

PAGE = 4096
SECTOR = 512

OP_READ = 0
OP_WRITE = 1
OP_WRITE_BARRIER = 2
OP_FLUSH_DISKCACHE = 3
OP_DISCARD = 5
OP_INDIRECT = 6

RSP_OKAY = 0
RSP_ERROR = -1
RSP_EOPNOTSUPP = -2

# What Linux blkfront puts in an empty flush or barrier: the block layer's flush request keeps the
# (sector_t)-1 that blk_rq_init() leaves in it, and blkfront copies blk_rq_pos() into sector_number.
LINUX_FLUSH_SECTOR = 2**64 - 1

MAX_SEGMENTS = 11
SEGS_PER_INDIRECT_PAGE = PAGE // 8
MAX_INDIRECT_PAGES = 8



@dataclass(frozen=True)
class Abi:
    """Where io/blkif.h puts each field for one guest ABI (offsets measured with gcc -m64 / -m32)."""

    name: str
    slot: int  # sizeof(union blkif_sring_entry)
    req_id: int
    req_sector: int
    req_seg: int
    ind_id: int
    ind_sector: int
    ind_handle: int
    ind_grefs: int
    disc_id: int
    disc_sector: int
    disc_nr: int
    rsp_size: int

    def pack_rw(self, op: int, nseg: int, handle: int, rid: int, sector: int,
                segs: list[tuple[int, int, int]]) -> bytes:
        b = bytearray(self.slot)
        struct.pack_into("<BBH", b, 0, op, nseg, handle)
        struct.pack_into("<Q", b, self.req_id, rid)
        struct.pack_into("<Q", b, self.req_sector, sector)
        for i, (gref, first, last) in enumerate(segs):
            struct.pack_into("<IBB", b, self.req_seg + 8 * i, gref, first, last)
        return bytes(b)

    def pack_indirect(self, op: int, nseg: int, handle: int, rid: int, sector: int, grefs: list[int]) -> bytes:
        b = bytearray(self.slot)
        struct.pack_into("<BBH", b, 0, OP_INDIRECT, op, nseg)
        struct.pack_into("<Q", b, self.ind_id, rid)
        struct.pack_into("<Q", b, self.ind_sector, sector)
        struct.pack_into("<H", b, self.ind_handle, handle)
        for i, g in enumerate(grefs):
            struct.pack_into("<I", b, self.ind_grefs + 4 * i, g)
        return bytes(b)

    def pack_discard(self, flag: int, handle: int, rid: int, sector: int, nr_sectors: int) -> bytes:
        b = bytearray(self.slot)
        struct.pack_into("<BBH", b, 0, OP_DISCARD, flag, handle)
        struct.pack_into("<Q", b, self.disc_id, rid)
        struct.pack_into("<Q", b, self.disc_sector, sector)
        struct.pack_into("<Q", b, self.disc_nr, nr_sectors)
        return bytes(b)

    def unpack_rsp(self, raw: bytes) -> tuple[int, int, int]:
        rid, op, status = struct.unpack_from("<QBxh", raw, 0)
        return rid, op, status


X86_64 = Abi("x86_64-abi", 112, 8, 16, 24, 8, 16, 24, 28, 8, 16, 24, 16)
X86_32 = Abi("x86_32-abi", 108, 4, 12, 20, 4, 12, 20, 24, 4, 12, 20, 12)
ABIS = {"x86_64": X86_64, "x86_32": X86_32}


class BlkProtocolError(ConnectionError):
    """The backend broke the blkif protocol (a frontend like Linux's would disable the disk)."""


class BlkIOError(OSError):
    """The backend answered a request with an error status."""

    def __init__(self, op: int, status: int) -> None:
        super().__init__(f"blkif op {op} failed with status {status}")
        self.op = op
        self.status = status


@dataclass
class DiskInfo:
    sectors: int
    sector_size: int
    physical_sector_size: int
    info: int
    readonly: bool
    flush: bool
    barrier: bool
    discard: bool
    discard_secure: bool
    persistent: bool
    max_indirect_segments: int
    ring_page_order: int
    queues: int
    protocol: str

    @property
    def size_bytes(self) -> int:
        return self.sectors * SECTOR


class _GrantPool:
    """Pages granted to the backend once and reused (a persistent-grant frontend's pool), grown on demand up to
    `limit` pages; requests wait when it is exhausted instead of failing."""

    def __init__(self, guest: Guest, backend_id: int, readonly: bool, limit: int) -> None:
        self.guest = guest
        self.backend_id = backend_id
        self.readonly = readonly
        self.limit = limit
        self.free: list[tuple[int, int]] = []  # (page, ref)
        self.total = 0
        self.cond = asyncio.Condition()

    async def take(self, n: int) -> list[tuple[int, int]]:
        if n > self.limit:
            raise ValueError(f"a request needs {n} pages, the pool holds at most {self.limit}")
        async with self.cond:
            while len(self.free) < n and self.total < self.limit:
                page = self.guest.alloc_page()
                self.free.append((page, self.guest.grant(page, self.backend_id, readonly=self.readonly)))
                self.total += 1
            await self.cond.wait_for(lambda: len(self.free) >= n)
            out, self.free = self.free[-n:], self.free[:-n]
            return out

    async def give(self, items: list[tuple[int, int]]) -> None:
        async with self.cond:
            self.free.extend(items)
            self.cond.notify_all()


class _Queue:
    def __init__(self, front: BlkFront, index: int, ring_pages: list[int], port: GuestPort, ring: FrontRing) -> None:
        self.front = front
        self.index = index
        self.ring_pages = ring_pages
        self.ring_refs: list[int] = []
        self.port = port
        self.ring = ring
        self.free_ids = list(range(ring.size - 1, -1, -1))
        self.waiting: dict[int, tuple[asyncio.Future[tuple[int, int]], int]] = {}
        self.id_free = asyncio.Condition()

    def on_event(self) -> None:
        self.port.pending()
        while True:
            for raw in self.ring.consume(self.front.abi.rsp_size):
                rid, op, status = self.front.abi.unpack_rsp(raw)
                entry = self.waiting.pop(rid, None)
                if entry is None:
                    self.front.spurious_responses += 1
                    continue
                fut, want_op = entry
                if fut.done():
                    continue
                if op != want_op:
                    # Linux blkfront's check: it disables the disk on a mismatch ("response has wrong
                    # operation"), so the backend must answer INDIRECT with the inner operation.
                    fut.set_exception(BlkProtocolError(f"response has wrong operation ({op} instead of {want_op})"))
                else:
                    fut.set_result((op, status))
            if not self.ring.final_check():
                break

    async def acquire_id(self) -> int:
        async with self.id_free:
            await self.id_free.wait_for(lambda: bool(self.free_ids))
            return self.free_ids.pop()

    async def release_id(self, rid: int) -> None:
        async with self.id_free:
            self.free_ids.append(rid)
            self.id_free.notify()

    def submit(self, slot_bytes: bytes, rid: int, *, notify: bool = True) -> asyncio.Future[tuple[int, int]]:
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self.waiting[rid] = (fut, slot_bytes[1] if slot_bytes[0] == OP_INDIRECT else slot_bytes[0])
        if self.ring.put([slot_bytes], self.ring.slot_size) != 1:
            del self.waiting[rid]
            raise RuntimeError("ring full although an id was free")
        if self.ring.push() and notify:
            self.port.notify()
        return fut


class BlkFront:
    """One virtual disk of an emulated guest."""

    def __init__(self, guest: Guest, xs: Any, devid: int, *, abi: str = "x86_64", ring_page_order: int = 0,
                 queues: int = 1, persistent: bool = True, write_protocol: bool = True,
                 timeout: float = 10.0, pool_pages: int = 1024) -> None:
        self.guest = guest
        self.xs = xs
        self.devid = devid
        self.abi = ABIS[abi]
        self.want_order = ring_page_order
        self.want_queues = queues
        self.want_persistent = persistent
        self.write_protocol = write_protocol
        self.timeout = timeout
        self.handle = devid & 0xFFFF  # Linux: info->handle, the device id from the node name
        self.fe_path = f"/local/domain/{guest.domid}/device/vbd/{devid}"
        self.be_path = ""
        self.backend_id = 0
        self.queues: list[_Queue] = []
        self.info: DiskInfo | None = None
        self.spurious_responses = 0
        self._rr = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pool_pages = pool_pages
        self._data: _GrantPool | None = None
        self._ind: _GrantPool | None = None

    # -- handshake ------------------------------------------------------------------------------------

    async def _read(self, path: str) -> str | None:
        v: str | None = await self.xs.read_str(path)
        return v

    async def _read_int(self, path: str, default: int) -> int:
        v = await self._read(path)
        return int(v) if v is not None and v.isdigit() else default

    async def wait_backend(self, states: set[int]) -> int:
        watch = await self.xs.watch(f"{self.be_path}/state")
        try:
            async with asyncio.timeout(self.timeout):
                async for _ in watch:
                    st = await self._read_int(f"{self.be_path}/state", 0)
                    if st in states:
                        return st
        except TimeoutError:
            err = await self._read(f"{self.be_path}/error")
            st = await self._read_int(f"{self.be_path}/state", 0)
            raise TimeoutError(f"backend {self.be_path} is in state {st}, wanted {sorted(states)}"
                               + (f" (error: {err})" if err else "")) from None
        finally:
            with contextlib.suppress(Exception):
                await watch.close()
        raise ConnectionError("xenstore watch ended")

    async def connect(self) -> DiskInfo:
        be = await self._read(f"{self.fe_path}/backend")
        if be is None:
            raise FileNotFoundError(f"{self.fe_path}/backend: no such device")
        self.be_path = be
        self.backend_id = await self._read_int(f"{self.fe_path}/backend-id", 0)
        await self.wait_backend({XenbusState.INIT_WAIT})
        max_order = await self._read_int(f"{be}/max-ring-page-order", 0)
        max_queues = await self._read_int(f"{be}/multi-queue-max-queues", 1)
        order = min(self.want_order, max_order)
        nq = max(1, min(self.want_queues, max_queues))
        persistent = self.want_persistent and await self._read_int(f"{be}/feature-persistent", 0) == 1
        self._loop = asyncio.get_running_loop()
        self._data = _GrantPool(self.guest, self.backend_id, False, self.pool_pages)
        self._ind = _GrantPool(self.guest, self.backend_id, True, max(MAX_INDIRECT_PAGES, self.pool_pages // 64))
        for qi in range(nq):
            self.queues.append(self._make_queue(qi, order))
        keys: dict[str, str] = {}
        if self.write_protocol:
            keys["protocol"] = self.abi.name
        keys["feature-persistent"] = "1" if persistent else "0"

        def ring_keys(prefix: str, q: _Queue) -> None:
            if order == 0 and max_order == 0:
                keys[f"{prefix}ring-ref"] = str(q.ring_refs[0])
            else:
                for i, r in enumerate(q.ring_refs):
                    keys[f"{prefix}ring-ref{i}"] = str(r)
            keys[f"{prefix}event-channel"] = str(q.port.port)

        if order > 0 or max_order > 0:
            keys["ring-page-order"] = str(order)
        if nq == 1:
            ring_keys("", self.queues[0])
        else:
            keys["multi-queue-num-queues"] = str(nq)
            for q in self.queues:
                ring_keys(f"queue-{q.index}/", q)

        async def body(tx: Any) -> None:
            for k, v in keys.items():
                await tx.write(f"{self.fe_path}/{k}", v)
            await tx.write(f"{self.fe_path}/state", str(int(XenbusState.INITIALISED)))

        await self.xs.transaction(body)
        await self.wait_backend({XenbusState.CONNECTED})
        info = await self._read_int(f"{be}/info", 0)
        sector_size = await self._read_int(f"{be}/sector-size", SECTOR)
        self.info = DiskInfo(
            sectors=await self._read_int(f"{be}/sectors", 0),
            sector_size=sector_size,
            physical_sector_size=await self._read_int(f"{be}/physical-sector-size", sector_size),
            info=info,
            readonly=bool(info & 4) or (await self._read(f"{be}/mode")) == "r",
            flush=await self._read_int(f"{be}/feature-flush-cache", 0) == 1,
            barrier=await self._read_int(f"{be}/feature-barrier", 0) == 1,
            discard=await self._read_int(f"{be}/feature-discard", 0) == 1,
            discard_secure=await self._read_int(f"{be}/discard-secure", 0) == 1,
            persistent=persistent,
            max_indirect_segments=await self._read_int(f"{be}/feature-max-indirect-segments", 0),
            ring_page_order=order,
            queues=nq,
            protocol=self.abi.name if self.write_protocol else "(none)",
        )
        await self.xs.write(f"{self.fe_path}/state", str(int(XenbusState.CONNECTED)))
        return self.info

    def _make_queue(self, qi: int, order: int) -> _Queue:
        npages = 1 << order
        pages = [self.guest.alloc_page() for _ in range(npages)]
        if pages != list(range(pages[0], pages[0] + npages)):
            raise MemoryError("ring pages are not contiguous in guest memory")
        view = memoryview(self.guest.memory)[pages[0] * PAGE:(pages[0] + npages) * PAGE]
        ring = FrontRing(view, npages, self.abi.slot)
        port = self.guest.alloc_unbound(self.backend_id)
        q = _Queue(self, qi, pages, port, ring)
        q.ring_refs = [self.guest.grant(p, self.backend_id) for p in pages]
        assert self._loop is not None
        self._loop.add_reader(port.fileno(), q.on_event)
        return q

    # -- I/O ------------------------------------------------------------------------------------------

    def _queue(self) -> _Queue:
        q = self.queues[self._rr % len(self.queues)]
        self._rr += 1
        return q

    async def _rw(self, op: int, sector: int, nbytes: int, data: bytes | None) -> bytes:
        if nbytes <= 0 or nbytes % SECTOR:
            raise ValueError("I/O size must be a positive multiple of 512")
        nseg = -(-nbytes // PAGE)
        indirect = nseg > MAX_SEGMENTS
        if indirect and (self.info is None or nseg > self.info.max_indirect_segments):
            raise ValueError(f"{nbytes} bytes need {nseg} segments: more than the backend accepts")
        assert self._data is not None and self._ind is not None
        nind = -(-nseg // SEGS_PER_INDIRECT_PAGE) if indirect else 0
        pages = await self._data.take(nseg)
        ind = await self._ind.take(nind) if nind else []
        q = self._queue()
        rid = await q.acquire_id()
        try:
            segs: list[tuple[int, int, int]] = []
            left = nbytes
            for i, (page, ref) in enumerate(pages):
                n = min(PAGE, left)
                segs.append((ref, 0, n // SECTOR - 1))
                if data is not None:
                    self.guest.page_view(page)[:n] = data[i * PAGE:i * PAGE + n]
                left -= n
            if indirect:
                for pi, (page, _ref) in enumerate(ind):
                    view = self.guest.page_view(page)
                    chunk = segs[pi * SEGS_PER_INDIRECT_PAGE:(pi + 1) * SEGS_PER_INDIRECT_PAGE]
                    for j, (g, f, last) in enumerate(chunk):
                        struct.pack_into("<IBBxx", view, 8 * j, g, f, last)
                raw = self.abi.pack_indirect(op, len(segs), self.handle, rid, sector, [r for _p, r in ind])
            else:
                raw = self.abi.pack_rw(op, len(segs), self.handle, rid, sector, segs)
            _rop, status = await q.submit(raw, rid)
            if status != RSP_OKAY:
                raise BlkIOError(op, status)
            if op != OP_READ:
                return b""
            out = bytearray(nbytes)
            left = nbytes
            for i, (page, _ref) in enumerate(pages):
                n = min(PAGE, left)
                out[i * PAGE:i * PAGE + n] = self.guest.page_view(page)[:n]
                left -= n
            return bytes(out)
        finally:
            await q.release_id(rid)
            await self._data.give(pages)
            if ind:
                await self._ind.give(ind)

    async def read(self, sector: int, nbytes: int) -> bytes:
        return await self._rw(OP_READ, sector, nbytes, None)

    async def write(self, sector: int, data: bytes, *, barrier: bool = False, fua: bool = False) -> None:
        """`barrier`: a WRITE_BARRIER with data.  `fua`: a write that must be durable when acknowledged, sent
        as Linux blkfront sends a REQ_FUA write: a WRITE_BARRIER with data when the backend offers barriers but
        not flush-cache (blkfront's feature_fua), else a write followed by an empty flush (the block layer's
        post-flush when the queue has no FUA)."""
        if fua and not barrier:
            assert self.info is not None
            if self.info.barrier and not self.info.flush:
                barrier = True
            else:
                await self._rw(OP_WRITE, sector, len(data), data)
                await self.flush()
                return
        await self._rw(OP_WRITE_BARRIER if barrier else OP_WRITE, sector, len(data), data)

    async def flush(self) -> None:
        """An empty flush as Linux blkfront sends it: FLUSH_DISKCACHE when the backend offers flush-cache,
        else WRITE_BARRIER, with no segments and sector_number (sector_t)-1."""
        assert self.info is not None
        op = OP_WRITE_BARRIER if self.info.barrier and not self.info.flush else OP_FLUSH_DISKCACHE
        await self.submit_raw_op(lambda rid: self.abi.pack_rw(op, 0, self.handle, rid, LINUX_FLUSH_SECTOR, []))

    async def discard(self, sector: int, nr_sectors: int, *, secure: bool = False) -> None:
        await self.submit_raw_op(
            lambda rid: self.abi.pack_discard(1 if secure else 0, self.handle, rid, sector, nr_sectors))

    async def submit_raw_op(self, build: Callable[[int], bytes], *, check: bool = True, notify: bool = True) -> int:
        """Send a slot built by `build(id)` (hostile-frontend tests build malformed ones); returns the status.
        notify=False publishes it without the event the backend asked for (a notification lost on the way)."""
        q = self._queue()
        rid = await q.acquire_id()
        try:
            raw = build(rid)
            _op, status = await q.submit(raw, rid, notify=notify)
            if check and status != RSP_OKAY:
                raise BlkIOError(raw[0], status)
            return status
        finally:
            await q.release_id(rid)

    async def take_pages(self, n: int) -> list[tuple[int, int]]:
        """(page, ref) pairs from the data pool, for tests that craft requests by hand; give them back with
        give_pages."""
        assert self._data is not None
        return await self._data.take(n)

    async def give_pages(self, items: list[tuple[int, int]]) -> None:
        assert self._data is not None
        await self._data.give(items)

    # -- teardown -------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Closing -> wait for the backend -> Closed, then revoke every grant and close the ports."""
        if not self.queues:
            return
        with contextlib.suppress(Exception):
            await self.xs.write(f"{self.fe_path}/state", str(int(XenbusState.CLOSING)))
            await self.wait_backend({XenbusState.CLOSING, XenbusState.CLOSED})
            await self.xs.write(f"{self.fe_path}/state", str(int(XenbusState.CLOSED)))
            await self.wait_backend({XenbusState.CLOSED})
        await self.release()

    async def release(self) -> None:
        """Give back rings, pages, grants and ports (after the backend let go of them)."""
        for q in self.queues:
            if self._loop is not None:
                self._loop.remove_reader(q.port.fileno())
            for fut, _op in q.waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("frontend closed"))
            for ref in q.ring_refs:
                await self._revoke(ref)
            for p in q.ring_pages:
                self.guest.free_page(p)
            q.port.close()
        self.queues = []
        for pool in (self._data, self._ind):
            if pool is None:
                continue
            if len(pool.free) != pool.total:
                raise RuntimeError("pages still in use by requests in flight")
            for page, ref in pool.free:
                await self._revoke(ref)
                self.guest.free_page(page)
            pool.free.clear()
            pool.total = 0

    async def _revoke(self, ref: int) -> None:
        # The backend may still be finishing a copy: Xen's rule is "retry until the grant is unused".
        async with asyncio.timeout(self.timeout):
            while True:
                try:
                    self.guest.revoke(ref)
                    return
                except OSError:
                    await asyncio.sleep(0.01)
