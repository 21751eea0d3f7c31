"""A netif frontend for emulated guests: Linux xen-netfront's handshake keys and data path, bridging a tap of
the guest's own network namespace to its rings, so a real network stack (ping, TCP, the kernel's checksum
and segmentation offloads) runs inside the "guest".

Slots are built field by field from Xen's io/netif.h layouts (not from the backend's constants).  The data
path is Python per packet (a thread): enough for functional tests; the benchmark will need it in C.
"""

from __future__ import annotations

import collections
import fcntl
import os
import select
import struct
import threading
from typing import TYPE_CHECKING, Any

from backends.guests.guest import Guest, GuestPort
from backends.native.ring import FrontRing

if TYPE_CHECKING:
    from backends.xenstore.client import XenStoreClient

PAGE = 4096
# io/netif.h
NETTXF_CSUM_BLANK, NETTXF_DATA_VALIDATED, NETTXF_MORE_DATA, NETTXF_EXTRA_INFO = 1, 2, 4, 8
NETRXF_DATA_VALIDATED, NETRXF_CSUM_BLANK, NETRXF_MORE_DATA, NETRXF_EXTRA_INFO = 1, 2, 4, 8
EXTRA_GSO, EXTRA_FLAG_MORE = 1, 1
GSO_TCPV4, GSO_TCPV6 = 1, 2
RSP_NULL = 1
TX_REQ = struct.Struct("<IHHHH")  # gref, offset, flags, id, size (12 bytes)
TX_RSP = struct.Struct("<Hh")  # id, status
RX_REQ = struct.Struct("<HHI")  # id, pad, gref (8 bytes)
RX_RSP = struct.Struct("<HHHh")  # id, offset, flags, status
EXTRA = struct.Struct("<BBHBBH")  # type, flags, gso.size, gso.type, gso.pad, gso.features
TX_SLOT, RX_SLOT = 12, 8
# linux/virtio_net.h and if_tun.h
VNET = struct.Struct("<BBHHHH")
VNET_F_NEEDS_CSUM, VNET_F_DATA_VALID = 1, 2
VNET_GSO_TCPV4, VNET_GSO_TCPV6 = 1, 4
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 1, 2, 4
MAX_TX_SLOTS = 18  # XEN_NETIF_NR_SLOTS_MIN: what a backend must accept


_QUEUE_KEYS = frozenset({"tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx", "event-channel-rx"})


def l4_offsets(frame: bytes) -> tuple[int, int, int] | None:
    """(csum_start, csum_offset, header end) of a TCP/UDP frame, or None."""
    off, etype = 14, int.from_bytes(frame[12:14], "big")
    if etype == 0x8100:
        off, etype = 18, int.from_bytes(frame[16:18], "big")
    if etype == 0x0800:
        ihl = (frame[off] & 0xF) * 4
        proto, off = frame[off + 9], off + ihl
    elif etype == 0x86DD:
        proto, off = frame[off + 6], off + 40
    else:
        return None
    if proto == 6:
        return off, 16, off + (frame[off + 12] >> 4) * 4
    if proto == 17:
        return off, 6, off + 8
    return None


class NetFront:
    """One vif of an emulated guest: `keys()` to write into device/vif/N, `start()` once the backend is
    Connected, `stop()`."""

    def __init__(self, guest: Guest, backend_domid: int, tap_fd: int, *, offload: bool = False,
                 split: bool = False, tx_pages: int = 64, rx_buffers: int = 256) -> None:
        self.guest = guest
        self.backend = backend_domid
        self.tap = tap_fd
        self.offload = offload
        self._pages: list[int] = []
        self._refs: list[int] = []
        tx_page, rx_page = self._page(True), self._page(True)
        self.tx_ref, self.rx_ref = self._refs[-2], self._refs[-1]
        self.tx = FrontRing(guest.page_address(tx_page), 1, TX_SLOT)
        self.rx = FrontRing(guest.page_address(rx_page), 1, RX_SLOT)
        self.ev_tx: GuestPort = guest.alloc_unbound(backend_domid)
        self.ev_rx: GuestPort = guest.alloc_unbound(backend_domid) if split else self.ev_tx
        # TX pages granted read-only once (a pool), RX buffers granted writable once.
        self._tx_free = collections.deque(self._page(False) for _ in range(tx_pages))
        self._tx_ref = {p: self._refs[i] for i, p in enumerate(self._pages[2:], start=2)}
        self._tx_inflight: dict[int, int] = {}  # slot id -> page
        self._next_id = 0
        self._rx_bufs: list[tuple[int, int]] = []
        for _ in range(min(rx_buffers, self.rx.size)):
            page = self._page(True)
            self._rx_bufs.append((page, self._refs[-1]))
        self._rx_posted: collections.deque[int] = collections.deque()
        self._rx_parts: list[tuple[int, int, int, int]] = []  # (buf, offset, flags, status) of a frame so far
        self._rx_gso: tuple[int, int] | None = None
        self._rx_extra = False
        self._rx_more = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"tx": 0, "rx": 0, "tx_errors": 0, "rx_errors": 0}
        self.error: BaseException | None = None
        fcntl.ioctl(tap_fd, TUNSETOFFLOAD, (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) if offload else 0)

    def _page(self, writable: bool) -> int:
        p = self.guest.alloc_page()
        self._pages.append(p)
        self._refs.append(self.guest.grant(p, self.backend, readonly=not writable))
        return p

    def keys(self) -> dict[str, str]:
        k = {"tx-ring-ref": str(self.tx_ref), "rx-ring-ref": str(self.rx_ref), "request-rx-copy": "1",
             "feature-rx-notify": "1", "feature-sg": "1"}
        if self.ev_rx is self.ev_tx:
            k["event-channel"] = str(self.ev_tx.port)
        else:
            k["event-channel-tx"], k["event-channel-rx"] = str(self.ev_tx.port), str(self.ev_rx.port)
        if self.offload:
            k |= {"feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1", "feature-ipv6-csum-offload": "1"}
        else:
            k["feature-no-csum-offload"] = "1"
        return k

    def start(self) -> None:
        self._post_rx(list(range(len(self._rx_bufs))))
        self._thread = threading.Thread(target=self._main, name="netfront", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        for port in {id(self.ev_tx): self.ev_tx, id(self.ev_rx): self.ev_rx}.values():
            port.close()

    # -- data path ---------------------------------------------------------------------------------------

    def _post_rx(self, bufs: list[int]) -> None:
        reqs = [RX_REQ.pack(b, 0, self._rx_bufs[b][1]) for b in bufs]
        n = self.rx.put(reqs, RX_SLOT)
        self._rx_posted.extend(bufs[:n])
        if self.rx.push():
            self.ev_rx.notify()

    def _main(self) -> None:
        try:
            fds = {self.ev_tx.fileno(), self.ev_rx.fileno()}
            while not self._stop.is_set():
                want = list(fds) + ([self.tap] if len(self._tx_free) >= MAX_TX_SLOTS else [])
                r, _, _ = select.select(want, [], [], 0.1)
                for fd in fds & set(r):
                    port = self.ev_tx if fd == self.ev_tx.fileno() else self.ev_rx
                    port.pending()
                self._tx_responses()
                self._rx_responses()
                if self.tap in r:
                    self._tx_frames()
        except BaseException as exc:  # reported to the test
            self.error = exc

    def _tx_responses(self) -> None:
        while True:
            for raw in self.tx.consume(TX_SLOT):
                rid, status = TX_RSP.unpack_from(raw)
                if status == RSP_NULL:
                    continue
                if status < 0:
                    self.stats["tx_errors"] += 1
                page = self._tx_inflight.pop(rid, None)
                if page is not None:
                    self._tx_free.append(page)
            if not self.tx.final_check():
                return

    def _tx_frames(self) -> None:
        sent = False
        while len(self._tx_free) >= MAX_TX_SLOTS:
            try:
                data = os.read(self.tap, 65536 + VNET.size)
            except BlockingIOError:
                break
            flags_v, gso_type, _hl, gso_size, _cs, _co = VNET.unpack_from(data)
            frame = data[VNET.size:]
            flags = 0
            if flags_v & VNET_F_NEEDS_CSUM:
                flags |= NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED
            elif flags_v & VNET_F_DATA_VALID:
                flags |= NETTXF_DATA_VALIDATED
            extras = []
            g = gso_type & 0x7F
            if g in (VNET_GSO_TCPV4, VNET_GSO_TCPV6):
                extras.append(EXTRA.pack(EXTRA_GSO, 0, gso_size, GSO_TCPV4 if g == VNET_GSO_TCPV4 else GSO_TCPV6,
                                         0, 0).ljust(TX_SLOT, b"\0"))
                flags |= NETTXF_EXTRA_INFO
            chunks = [frame[i:i + PAGE] for i in range(0, len(frame), PAGE)]
            slots: list[bytes] = []
            for i, chunk in enumerate(chunks):
                page = self._tx_free.popleft()
                self.guest.page_view(page)[: len(chunk)] = chunk
                rid = self._next_id
                self._next_id = (self._next_id + 1) & 0xFFFF
                self._tx_inflight[rid] = page
                f = NETTXF_MORE_DATA if i + 1 < len(chunks) else 0
                size = len(chunk)
                if i == 0:
                    f |= flags
                    size = len(frame)
                slots.append(TX_REQ.pack(self._tx_ref[page], 0, f, rid, size))
                if i == 0:
                    slots.extend(extras)
            if self.tx.free_slots() < len(slots):
                raise RuntimeError("netfront: TX ring full")
            self.tx.put(slots, TX_SLOT)
            self.stats["tx"] += 1
            sent = True
        if sent and self.tx.push():
            self.ev_tx.notify()

    def _rx_responses(self) -> None:
        done: list[int] = []
        while True:
            got = self.rx.consume(RX_SLOT)
            for raw in got:
                buf = self._rx_posted.popleft()
                done.append(buf)
                if self._rx_extra:
                    etype, eflags, size, gtype, _p, _f = EXTRA.unpack_from(raw)
                    if etype == EXTRA_GSO:
                        self._rx_gso = (gtype, size)
                    self._rx_extra = bool(eflags & EXTRA_FLAG_MORE)
                else:
                    _rid, off, flags, status = RX_RSP.unpack_from(raw)
                    self._rx_parts.append((buf, off, flags, status))
                    self._rx_extra = bool(flags & NETRXF_EXTRA_INFO)
                    self._rx_more = bool(flags & NETRXF_MORE_DATA)
                if not self._rx_more and not self._rx_extra and self._rx_parts:
                    self._deliver(self._rx_parts, self._rx_gso)
                    self._rx_parts, self._rx_gso = [], None
            if not got and not self.rx.final_check():
                break
        if done:
            self._post_rx(done)

    def _deliver(self, parts: list[tuple[int, int, int, int]], gso: tuple[int, int] | None) -> None:
        if any(status < 0 for _b, _o, _f, status in parts):
            self.stats["rx_errors"] += 1
            return
        frame = b"".join(bytes(self.guest.page_view(self._rx_bufs[b][0])[o:o + s]) for b, o, _f, s in parts)
        flags = parts[0][2]
        vflags, cs, co, hl, gtype, gsize = 0, 0, 0, 0, 0, 0
        if flags & NETRXF_CSUM_BLANK or gso is not None:
            where = l4_offsets(frame)
            if where is None:
                self.stats["rx_errors"] += 1
                return
            vflags, (cs, co, hl) = VNET_F_NEEDS_CSUM, where
            if gso is not None:
                gtype = VNET_GSO_TCPV4 if gso[0] == GSO_TCPV4 else VNET_GSO_TCPV6
                gsize = gso[1]
        elif flags & NETRXF_DATA_VALIDATED:
            vflags = VNET_F_DATA_VALID
        os.write(self.tap, VNET.pack(vflags, gtype, hl if gtype else 0, gsize, cs, co) + frame)
        self.stats["rx"] += 1

    @property
    def queue_keys(self) -> dict[str, str]:
        """This queue's ring and event channel keys (in `queue-N/` when the vif has several queues)."""
        return {k: v for k, v in self.keys().items() if k in _QUEUE_KEYS}

    @property
    def vif_keys(self) -> dict[str, str]:
        """The vif-wide keys (features), the same for every queue."""
        return {k: v for k, v in self.keys().items() if k not in _QUEUE_KEYS}

    def __enter__(self) -> NetFront:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


async def xenbus_connect(xs: XenStoreClient, fe_path: str, fronts: list[NetFront], *, timeout: float = 20.0,
                         start: bool = True) -> str:
    """xen-netfront's side of the handshake for one vif with `len(fronts)` queues: wait for the backend's
    InitWait, write the keys in one transaction (`queue-N/` for several queues), go Connected, wait for the
    backend's Connected (netback holds it until the vif is plugged), then start the queues (unless `start`
    is False).  Returns the
    backend path."""
    from backends.xenbus.state import XenbusState
    from backends.xenbus.toolstack import wait_for_state

    be = await xs.read_str(f"{fe_path}/backend")
    if be is None:
        raise FileNotFoundError(f"{fe_path}/backend: no such device")
    await wait_for_state(xs, be, {XenbusState.INIT_WAIT, XenbusState.CONNECTED}, timeout)
    values = dict(fronts[0].vif_keys)
    if len(fronts) == 1:
        values |= fronts[0].queue_keys
    else:
        values["multi-queue-num-queues"] = str(len(fronts))
        for i, nf in enumerate(fronts):
            values |= {f"queue-{i}/{k}": v for k, v in nf.queue_keys.items()}

    async def body(tx: Any) -> None:
        for k, v in values.items():
            await tx.write(f"{fe_path}/{k}", v)
        await tx.write(f"{fe_path}/state", str(int(XenbusState.CONNECTED)))

    await xs.transaction(body)
    await wait_for_state(xs, be, XenbusState.CONNECTED, timeout)
    if start:  # start=False: a test drives the rings by hand
        for nf in fronts:
            nf.start()
    return be
