"""A netif frontend for emulated guests: Linux xen-netfront's handshake keys and data path, bridging a tap of
the guest's own network namespace to its rings, so a real network stack (ping, TCP, the kernel's checksum
and segmentation offloads) runs inside the "guest".

Slots are built field by field from Xen's io/netif.h layouts (not from the backend's constants).  Two data
paths, chosen per NetFront: "c" (the default; backends/guests/netfront_native.py runs csrc/netfront_io.c, one
thread per queue blocked in one C call, batch-shaped, so measurements see the backend) and "python" (a thread
per queue, Python per packet: for tests that reach into the pool or watch each frame (`rx_log`, `mcast`), and
the reference the C path is tested against).

Beyond xen-netfront's usual keys it speaks what Windows PV drivers and XDP-enabled Linux netfronts use: a
control ring (`NetCtrl`: the Toeplitz hash key, flags and mapping table), MCAST_ADD/DEL extra infos on TX
(`NetFront.mcast`), and XDP headroom through Reconfiguring (`reconfigure_xdp`); RX frames are logged with
their first response's offset and their HASH/XDP extras so tests can check steering and the headroom.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import os
import select
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from backends.guests.guest import Guest, GuestPort
from backends.guests.netfront_native import NativeQueue
from backends.native.ring import FrontRing

if TYPE_CHECKING:
    from backends.xenstore.client import XenStoreClient

PAGE = 4096
# io/netif.h
NETTXF_CSUM_BLANK, NETTXF_DATA_VALIDATED, NETTXF_MORE_DATA, NETTXF_EXTRA_INFO = 1, 2, 4, 8
NETRXF_DATA_VALIDATED, NETRXF_CSUM_BLANK, NETRXF_MORE_DATA, NETRXF_EXTRA_INFO = 1, 2, 4, 8
EXTRA_GSO, EXTRA_MCAST_ADD, EXTRA_MCAST_DEL, EXTRA_HASH, EXTRA_XDP, EXTRA_FLAG_MORE = 1, 2, 3, 4, 5, 1
GSO_TCPV4, GSO_TCPV6 = 1, 2
RSP_NULL = 1
TX_REQ = struct.Struct("<IHHHH")  # gref, offset, flags, id, size (12 bytes)
TX_RSP = struct.Struct("<Hh")  # id, status
RX_REQ = struct.Struct("<HHI")  # id, pad, gref (8 bytes)
RX_RSP = struct.Struct("<HHHh")  # id, offset, flags, status
EXTRA = struct.Struct("<BBHBBH")  # type, flags, gso.size, gso.type, gso.pad, gso.features
TX_SLOT, RX_SLOT, CTRL_SLOT = 12, 8, 16
CTRL_REQ = struct.Struct("<HHIII")  # id, type, data[3]
CTRL_RSP = struct.Struct("<HHII")  # id, type, status, data
# XEN_NETIF_CTRL_TYPE_* / _STATUS_* / _HASH_TYPE_* / _HASH_ALGORITHM_*
CTRL_GET_HASH_FLAGS, CTRL_SET_HASH_FLAGS, CTRL_SET_HASH_KEY = 1, 2, 3
CTRL_GET_HASH_MAPPING_SIZE, CTRL_SET_HASH_MAPPING_SIZE, CTRL_SET_HASH_MAPPING, CTRL_SET_HASH_ALGORITHM = 4, 5, 6, 7
CTRL_SUCCESS, CTRL_NOT_SUPPORTED, CTRL_INVALID_PARAMETER, CTRL_BUFFER_OVERFLOW = 0, 1, 2, 3
HASH_IPV4, HASH_IPV4_TCP, HASH_IPV6, HASH_IPV6_TCP = 1, 2, 4, 8
HASH_ALG_NONE, HASH_ALG_TOEPLITZ = 0, 1
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
                 split: bool = False, tx_pages: int = 64, rx_buffers: int = 256, multicast_control: bool = False,
                 xdp_headroom: int = 0, datapath: str = "c", spin_us: int = 0) -> None:
        if datapath not in ("c", "python"):
            raise ValueError(f"netfront data path {datapath!r}: 'c' or 'python'")
        self.datapath = datapath
        self.spin_us = spin_us  # C path: how long to look at the rings before sleeping (0: never spin)
        self._native: NativeQueue | None = None
        self.guest = guest
        self.multicast_control = multicast_control
        self.xdp_headroom = xdp_headroom
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
        self._rx_hash: tuple[int, int] | None = None  # (XEN_NETIF_CTRL_HASH_TYPE_*, value) of the frame so far
        self._rx_xdp: int | None = None
        # The RX frames delivered: (first response's offset, hash (type, value) or None, XDP extra's headroom or
        # None, the frame's first 96 bytes), newest last.
        self.rx_log: collections.deque[tuple[int, tuple[int, int] | None, int | None, bytes]] = \
            collections.deque(maxlen=4096)
        # Control requests for the TX thread (MCAST_ADD/DEL), and the statuses of the answered ones by slot id.
        self._cmds: collections.deque[tuple[int, bool, bytes]] = collections.deque()
        self._mcast_ids: dict[int, int] = {}  # slot id -> token
        self._tokens = itertools.count(1)
        self.mcast_status: dict[int, int] = {}  # token -> the first slot's status
        self._rx_extra = False
        self._rx_more = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._py_stats = {"tx": 0, "rx": 0, "tx_errors": 0, "rx_errors": 0, "rx_hash": 0, "rx_xdp": 0}
        self._error: BaseException | None = None
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
        if self.multicast_control:
            k["request-multicast-control"] = "1"
        if self.xdp_headroom:
            k["xdp-headroom"] = str(self.xdp_headroom)
        return k

    def mcast(self, add: bool, mac: bytes) -> int:
        """Queue an MCAST_ADD / MCAST_DEL (a first slot of size 0 and one extra, as netif.h and Windows PV
        drivers send it) for the TX thread; returns a token whose answer lands in `mcast_status`."""
        if self.datapath != "python":
            raise RuntimeError("netfront: MCAST_ADD/DEL are sent by the Python data path (datapath='python')")
        token = next(self._tokens)
        self._cmds.append((token, add, mac))
        return token

    @property
    def stats(self) -> dict[str, int]:
        """Packets and errors each way ("tx", "rx", "tx_errors", "rx_errors"; the Python path counts the RX
        frames with HASH / XDP extras, the C path adds its own counters)."""
        if self._native is None:
            return self._py_stats
        c = self._native.stats()
        return {"tx": c["tx_packets"], "rx": c["rx_packets"], "tx_errors": c["tx_errors"] + c["tx_dropped"],
                "rx_errors": c["rx_errors"], **c}

    @property
    def error(self) -> BaseException | None:
        """What stopped the data path early (None while it is healthy)."""
        return self._native.error if self._native is not None else self._error

    def start(self) -> None:
        if self.datapath == "c":
            tx = [(p, self._tx_ref[p]) for p in self._tx_free]
            self._native = NativeQueue(self, tx, self._rx_bufs, spin_us=self.spin_us)
            self._native.start()
            return
        self._post_rx(list(range(len(self._rx_bufs))))
        self._thread = threading.Thread(target=self._main, name="netfront", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._native is not None:
            self._native.stop()  # its stats and error stay readable
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
                want = list(fds) + ([self.tap] if self._tx_room() else [])
                r, _, _ = select.select(want, [], [], 0.1)
                for fd in fds & set(r):
                    port = self.ev_tx if fd == self.ev_tx.fileno() else self.ev_rx
                    port.pending()
                self._tx_responses()
                self._rx_responses()
                self._tx_cmds()
                if self.tap in r:
                    self._tx_frames()
        except BaseException as exc:  # reported to the test
            self._error = exc

    def _tx_cmds(self) -> None:
        sent = False
        while self._cmds and self.tx.free_slots() >= 2:
            token, add, mac = self._cmds.popleft()
            rid = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            self._mcast_ids[rid] = token
            extra = struct.pack("<BB6s", EXTRA_MCAST_ADD if add else EXTRA_MCAST_DEL, 0, mac).ljust(TX_SLOT, b"\0")
            self.tx.put([TX_REQ.pack(0, 0, NETTXF_EXTRA_INFO, rid, 0), extra], TX_SLOT)
            sent = True
        if sent and self.tx.push():
            self.ev_tx.notify()

    def _tx_responses(self) -> None:
        while True:
            for raw in self.tx.consume(TX_SLOT):
                rid, status = TX_RSP.unpack_from(raw)
                if status == RSP_NULL:
                    continue
                if rid in self._mcast_ids:
                    self.mcast_status[self._mcast_ids.pop(rid)] = status
                    continue
                if status < 0:
                    self.stats["tx_errors"] += 1
                page = self._tx_inflight.pop(rid, None)
                if page is not None:
                    self._tx_free.append(page)
            if not self.tx.final_check():
                return

    def _tx_room(self) -> bool:
        """Pages and ring slots for a largest packet (a pool larger than the ring runs out of slots first)."""
        return len(self._tx_free) >= MAX_TX_SLOTS and self.tx.free_slots() > MAX_TX_SLOTS

    def _tx_frames(self) -> None:
        sent = False
        while self._tx_room():
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
                    elif etype == EXTRA_HASH:
                        htype, _alg, value = struct.unpack_from("<BBI", raw, 2)
                        self._rx_hash = (htype, value)
                    elif etype == EXTRA_XDP:
                        self._rx_xdp = size  # u.xdp.headroom: the u16 at the union's start
                    self._rx_extra = bool(eflags & EXTRA_FLAG_MORE)
                else:
                    _rid, off, flags, status = RX_RSP.unpack_from(raw)
                    self._rx_parts.append((buf, off, flags, status))
                    self._rx_extra = bool(flags & NETRXF_EXTRA_INFO)
                    self._rx_more = bool(flags & NETRXF_MORE_DATA)
                if not self._rx_more and not self._rx_extra and self._rx_parts:
                    self._deliver(self._rx_parts, self._rx_gso)
                    self._rx_parts, self._rx_gso, self._rx_hash, self._rx_xdp = [], None, None, None
            if not got and not self.rx.final_check():
                break
        if done:
            self._post_rx(done)

    def _deliver(self, parts: list[tuple[int, int, int, int]], gso: tuple[int, int] | None) -> None:
        if any(status < 0 for _b, _o, _f, status in parts):
            self.stats["rx_errors"] += 1
            return
        frame = b"".join(bytes(self.guest.page_view(self._rx_bufs[b][0])[o:o + s]) for b, o, _f, s in parts)
        self.rx_log.append((parts[0][1], self._rx_hash, self._rx_xdp, frame[:96]))
        self.stats["rx_hash"] += self._rx_hash is not None
        self.stats["rx_xdp"] += self._rx_xdp is not None
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


class NetCtrl:
    """The vif's control ring (feature-ctrl-ring): one page, one event channel, requests answered one at a time
    (a Windows PV driver's pattern).  `request` blocks until the answer (run it off the event loop)."""

    def __init__(self, guest: Guest, backend_domid: int) -> None:
        self.guest = guest
        self.backend = backend_domid
        self.page = guest.alloc_page()
        self.ref = guest.grant(self.page, backend_domid)
        self.ring = FrontRing(guest.page_address(self.page), 1, CTRL_SLOT)
        self.ev: GuestPort = guest.alloc_unbound(backend_domid)
        self.data_page = guest.alloc_page()  # the key / mapping table travel in this page, read-only
        self.data_ref = guest.grant(self.data_page, backend_domid, readonly=True)
        self._next = 0

    def keys(self) -> dict[str, str]:
        return {"ctrl-ring-ref": str(self.ref), "event-channel-ctrl": str(self.ev.port)}

    def post(self, reqs: list[tuple[int, int, int, int]]) -> list[int]:
        """Put requests (type, data0..2) without waiting; returns their ids."""
        ids = []
        raw = []
        for rtype, d0, d1, d2 in reqs:
            ids.append(self._next)
            raw.append(CTRL_REQ.pack(self._next, rtype, d0, d1, d2))
            self._next = (self._next + 1) & 0xFFFF
        if self.ring.put(raw, CTRL_SLOT) != len(raw):
            raise RuntimeError("netfront: ctrl ring full")
        if self.ring.push():
            self.ev.notify()
        return ids

    def collect(self, n: int, timeout: float = 5.0) -> list[tuple[int, int, int, int]]:
        """Wait for `n` responses: (id, type, status, data) each."""
        out: list[tuple[int, int, int, int]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            got = self.ring.consume(CTRL_SLOT)
            out += [CTRL_RSP.unpack_from(r) for r in got]
            if got or len(out) >= n:
                continue
            if self.ring.final_check():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ctrl ring: {len(out)} of {n} responses")
            select.select([self.ev.fileno()], [], [], min(left, 0.1))
            self.ev.pending()
        return out

    def request(self, rtype: int, d0: int = 0, d1: int = 0, d2: int = 0) -> tuple[int, int]:
        """(status, data) of one request."""
        (rid,) = self.post([(rtype, d0, d1, d2)])
        ((got_id, got_type, status, data),) = self.collect(1)
        if (got_id, got_type) != (rid, rtype):
            raise RuntimeError(f"ctrl ring: answer {got_id}/{got_type} to request {rid}/{rtype}")
        return status, data

    def set_key(self, key: bytes, length: int | None = None) -> int:
        self.guest.page_view(self.data_page)[: len(key)] = key
        return self.request(CTRL_SET_HASH_KEY, self.data_ref, len(key) if length is None else length)[0]

    def set_mapping(self, entries: list[int], offset: int = 0) -> int:
        raw = struct.pack(f"<{len(entries)}I", *entries)
        self.guest.page_view(self.data_page)[: len(raw)] = raw
        return self.request(CTRL_SET_HASH_MAPPING, self.data_ref, len(entries), offset)[0]

    def toeplitz(self, key: bytes, flags: int, mapping: list[int]) -> None:
        """What a Windows PV driver does to turn RSS on; every step must succeed."""
        steps = [self.request(CTRL_SET_HASH_ALGORITHM, HASH_ALG_TOEPLITZ)[0], self.request(CTRL_SET_HASH_FLAGS,
                 flags)[0], self.set_key(key), self.request(CTRL_SET_HASH_MAPPING_SIZE, len(mapping))[0],
                 self.set_mapping(mapping)]
        if any(steps):
            raise RuntimeError(f"ctrl ring: hash set-up failed {steps}")

    def close(self) -> None:
        self.ev.close()


async def reconfigure_xdp(xs: XenStoreClient, fe_path: str, headroom: int, *, timeout: float = 10.0) -> None:
    """Linux netfront's xennet_xdp_set: write `xdp-headroom`, go Reconfiguring, wait for the backend's
    Reconfigured, go Connected again."""
    from backends.xenbus.state import XenbusState
    from backends.xenbus.toolstack import wait_for_state

    be = await xs.read_str(f"{fe_path}/backend")
    if be is None:
        raise FileNotFoundError(f"{fe_path}/backend: no such device")

    async def body(tx: Any) -> None:
        await tx.write(f"{fe_path}/xdp-headroom", str(headroom))
        await tx.write(f"{fe_path}/state", str(int(XenbusState.RECONFIGURING)))

    await xs.transaction(body)
    await wait_for_state(xs, be, XenbusState.RECONFIGURED, timeout)
    await xs.write(f"{fe_path}/state", str(int(XenbusState.CONNECTED)))
    await wait_for_state(xs, be, XenbusState.CONNECTED, timeout)
    await asyncio.sleep(0)


async def xenbus_connect(xs: XenStoreClient, fe_path: str, fronts: list[NetFront], *, timeout: float = 20.0,
                         start: bool = True, ctrl: NetCtrl | None = None) -> str:
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
    if ctrl is not None:
        values |= ctrl.keys()
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
