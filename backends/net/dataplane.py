"""One netif queue: the C data path (csrc/netback.h) driven by a pump thread of its own (backends.xenbus.pump).

The pump is one C call (`pv_net_queue_run`) that waits on the event channel(s) and the queue's tap fd and, per
wakeup, drains the TX ring into the tap and the tap into the RX ring.  It holds no GIL; Python never runs per
packet.  The loop thread only starts and stops pumps and reads counters.

The queues of one vif share a `VifControl` (csrc/netctrl.h): the ctrl ring (served by queue 0's pump), the
Toeplitz steering with its hand-off rings between queues, and the multicast list and filter.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.native import ffi, lib
from backends.platform.base import EventChannel, GrantMapping
from backends.xenbus.pump import QueueDataplane

RULES = tuple(ffi.string(lib.pv_netif_reason_name(i)).decode() for i in range(int(lib.PV_NETIF_NR_REASONS)))
_COUNTERS = (
    "tx_packets", "tx_bytes", "tx_dropped", "tx_gso", "tx_csum_blank", "tx_zero_frags", "tx_mcast",
    "rx_packets", "rx_bytes", "rx_dropped", "rx_gso", "rx_stalls", "rx_purges", "tx_events", "rx_events", "tap_wakeups",
    "grant_copy_calls", "grant_copy_segs", "tx_notifies", "rx_notifies", "tx_credit_waits", "tx_throttled_ns",
)  # fmt: skip
_CTRL_COUNTERS = (
    "rx_steered", "rx_handoff_in", "rx_handoff_drops", "rx_mcast_filtered", "rx_hash_extras", "mcast_add",
    "mcast_del", "mcast_full", "ctrl_requests", "ctrl_errors",
)  # fmt: skip


class VifShared:
    """What the queues of one vif share (csrc/netvif.h): the TX credit of the toolstack's `rate` (unlimited
    until `set_rate`, changed live) and the count of RX-stalled queues that turns the tap's carrier off."""

    def __init__(self) -> None:
        v = lib.pv_net_vif_create()
        if v == ffi.NULL:
            raise MemoryError("net vif")
        self.c: Any = v
        # Freed with the last reference (the vif's, and each NetQueueConfig's: no queue outlives it).
        weakref.finalize(self, lib.pv_net_vif_destroy, v)

    def set_rate(self, nbytes: int, usecs: int) -> None:
        """`nbytes` every `usecs`; 0 bytes: unlimited.  Queues waiting for credit see it at their next look
        (NetQueue.credit_kick makes that now)."""
        lib.pv_net_vif_set_rate(self.c, nbytes, usecs)

    @property
    def carrier_offs(self) -> int:
        return int(lib.pv_net_vif_carrier_offs(self.c))


class QueueDeadError(Exception):
    """The frontend broke a fatal netif rule: the vif must be disabled (from the control path)."""


@dataclass(frozen=True)
class NetQueueConfig:
    frontend_domid: int
    mac: bytes
    rx_headroom: int = 0
    rx_sg: bool = True
    rx_gso_tcpv4: bool = False
    rx_gso_tcpv6: bool = False
    rx_csum: bool = False
    check_mac: bool = True
    rx_drain_timeout_ms: int = 0  # 0: a frame waits for posted buffers for ever (the tap queue bounds the rest)
    vif: VifShared | None = None  # the vif's `rate` and carrier; None: TX never limited, carrier left alone
    tx_csum_full: bool = False  # finish partial checksums, drop GSO: the switch takes neither (backends.net.switch)
    poll_us: int = 0  # the pump keeps polling this long after a busy pass before sleeping (NetConfig.poll_us)


class VifControl:
    """The C per-vif control plane shared by a vif's queues.  Create before the queues, close after every
    queue's pump has stopped and its C queue is freed (they hold pointers into it)."""

    def __init__(self, nr_queues: int, frontend_domid: int, gnt: Any, *, handoff: bool = True) -> None:
        """`handoff`: allocate the hand-off rings (2 MiB per queue) that steering needs; without a ctrl ring the
        frontend cannot select a hash, and each queue keeps the frames its tap queue gets."""
        err = ffi.new("char[]", 256)
        v = lib.pv_netctrl_create(nr_queues, frontend_domid, gnt, 1 if handoff else 0, err, 256)
        if v == ffi.NULL:
            raise ValueError(f"net control: {ffi.string(err).decode(errors='replace')}")
        self._v: Any = v
        self.nr_queues = nr_queues
        self._state: tuple[int, mmap.mmap, Any] | None = None  # fd (locked), mapping, its C view

    def use_state(self, path: Path, ident: bytes, *, load: bool) -> bool:
        """Publish the control state into `path` (created 0600, locked: a second daemon serving a vif of the
        same name gets OSError and the caller keeps it in memory).  With `load`, a valid state of the same
        16-byte `ident` found there is taken up: True."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            size = ffi.sizeof("struct pv_netctrl_state")
            fresh = os.fstat(fd).st_size != size
            if fresh:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        view = ffi.from_buffer(mm)
        who = ffi.new("uint8_t[16]", ident[:16].ljust(16, b"\0"))
        rc = int(lib.pv_netctrl_use_state(self.c, view, size, who, 1 if load and not fresh else 0))
        self._state = (fd, mm, view)
        if rc < 0:
            raise ValueError("net control: cannot use the state file")
        return rc == 1

    @property
    def c(self) -> Any:
        if self._v is None:
            raise ValueError("vif control closed")
        return self._v

    def attach_ctrl(self, ring: Any, ev: Any) -> None:
        """The ctrl ring page (mapped) and its event channel's C handle (None: tests without events)."""
        if lib.pv_netctrl_attach_ctrl(self.c, ring, ev if ev is not None else ffi.NULL) < 0:
            raise ValueError("net control: cannot attach the ctrl ring")

    def ctrl_run(self) -> int:
        n = int(lib.pv_netctrl_ctrl_run(self.c))
        if n < 0:
            raise QueueDeadError("ctrl ring: req_prod ran away")
        return n

    def set_multicast_control(self, on: bool) -> None:
        lib.pv_netctrl_set_mcast_control(self.c, 1 if on else 0)

    def hash_config(self) -> dict[str, Any]:
        h = ffi.new("struct pv_net_hash *")
        lib.pv_netctrl_get_hash(self.c, h)
        return {"alg": int(h.alg), "flags": int(h.flags), "size": int(h.size), "key": bytes(h.key),
                "mapping": [int(h.mapping[i]) for i in range(int(h.size))]}

    @property
    def mcast_count(self) -> int:
        return int(lib.pv_netctrl_mcast_count(self.c))

    def close(self, *, discard: Path | None = None) -> None:
        """Free the C object (after every queue), then let go of the state file (`discard`: delete it first, the
        vif is gone for good)."""
        if self._v is not None:
            v, self._v = self._v, None
            lib.pv_netctrl_destroy(v)
        if self._state is not None:
            fd, mm, view = self._state
            self._state = None
            if discard is not None:
                discard.unlink(missing_ok=True)
            ffi.release(view)
            mm.close()
            os.close(fd)  # the lock goes with it


class NetQueue:
    """The C queue object; every method is one C call."""

    def __init__(self, tx_ring: Any, rx_ring: Any, cfg: NetQueueConfig, tap_fd: int, gnt: Any, ev_tx: Any,
                 ev_rx: Any) -> None:
        c = ffi.new("struct pv_net_queue_config *")
        c.frontend_domid = cfg.frontend_domid
        c.tap_fd = tap_fd
        c.rx_headroom = cfg.rx_headroom
        c.rx_sg = cfg.rx_sg
        c.rx_gso_tcpv4 = cfg.rx_gso_tcpv4
        c.rx_gso_tcpv6 = cfg.rx_gso_tcpv6
        c.rx_csum = cfg.rx_csum
        c.check_mac = cfg.check_mac
        c.rx_drain_timeout_ms = cfg.rx_drain_timeout_ms
        c.vif = cfg.vif.c if cfg.vif is not None else ffi.NULL
        c.tx_csum_full = cfg.tx_csum_full
        c.poll_us = cfg.poll_us
        c.mac[0:6] = bytes(cfg.mac)
        err = ffi.new("char[]", 256)
        q = lib.pv_net_queue_create(tx_ring, rx_ring, c, gnt, ev_tx if ev_tx is not None else ffi.NULL,
                                    ev_rx if ev_rx is not None else ffi.NULL, err, 256)
        if q == ffi.NULL:
            raise ValueError(f"net queue: {ffi.string(err).decode(errors='replace')}")
        self._q: Any = q
        self.cfg = cfg
        self._stats = ffi.new("struct pv_net_stats *")
        self._cstats = ffi.new("struct pv_netctrl_stats *")

    def join(self, vif: VifControl, index: int) -> None:
        """Become queue `index` of `vif` (before the pump runs)."""
        if lib.pv_net_queue_join_ctrl(self.c, vif.c, index) < 0:
            raise ValueError("net queue: cannot join the vif")

    def set_rx_headroom(self, headroom: int) -> None:
        if lib.pv_net_queue_set_rx_headroom(self.c, headroom) < 0:
            raise ValueError(f"rx headroom {headroom} too large")

    @property
    def c(self) -> Any:
        if self._q is None:
            raise ValueError("net queue closed")
        return self._q

    @property
    def closed(self) -> bool:
        return self._q is None

    def _check(self, n: int) -> int:
        if n == -lib.PV_NET_EDEAD:
            raise QueueDeadError(f"frontend broke a fatal netif rule ({self.dead_reason()})")
        if n == -lib.PV_NET_EEVTCHN:
            raise OSError("event channel: pending/unmask/poll failed")
        if n == -lib.PV_NET_ETAP:
            raise OSError("tap: read failed (interface deleted?)")
        if n == -lib.PV_NET_ECTRL:
            raise QueueDeadError("ctrl ring: req_prod ran away (more requests than the ring holds)")
        return n

    def tx(self) -> int:
        return self._check(int(lib.pv_net_queue_tx(self.c)))

    def rx(self) -> int:
        return self._check(int(lib.pv_net_queue_rx(self.c)))

    def run(self, stop_fd: int) -> None:
        """Pump until `stop_fd` is readable (blocks; releases the GIL)."""
        self._check(int(lib.pv_net_queue_run(self.c, stop_fd)))

    def credit_kick(self) -> None:
        """Re-check the TX credit now (after the rate changed); the pump thread does it."""
        lib.pv_net_queue_credit_kick(self.c)

    def dead_reason(self) -> str:
        lib.pv_net_queue_get_stats(self.c, self._stats)
        r = int(self._stats.dead_reason)
        return RULES[r] if r < len(RULES) else str(r)

    def stats(self) -> dict[str, int]:
        s = self._stats
        lib.pv_net_queue_get_stats(self.c, s)
        out = {name: int(getattr(s, name)) for name in _COUNTERS}
        c = self._cstats
        lib.pv_net_queue_get_ctrl_stats(self.c, c)
        out.update({name: int(getattr(c, name)) for name in _CTRL_COUNTERS})
        for i, name in enumerate(RULES):
            if i:
                out[f"rule_{name}"] = int(s.rules[i])
        return out

    def close(self) -> None:
        if self._q is not None:
            q, self._q = self._q, None
            lib.pv_net_queue_destroy(q)


class NetDataplane(QueueDataplane):
    """One queue of a connected vif: owns its two ring mappings, its event channel(s), the C queue and the
    queue's pump thread.  `on_dead` is called once, on the event loop, when the frontend broke a fatal rule or
    the event channel / tap failed: the device disables the vif."""

    def __init__(self, tx_ring: GrantMapping, rx_ring: GrantMapping, ev_tx: EventChannel, ev_rx: EventChannel | None,
                 gnt: Any, tap_fd: int, cfg: NetQueueConfig, *, on_dead: Callable[[str], None] | None = None,
                 name: str = "net", vif: VifControl | None = None, index: int = 0,
                 ctrl: tuple[GrantMapping, EventChannel] | None = None) -> None:
        """`vif`: join it as queue `index`.  `ctrl` (queue 0 only): the ctrl ring and its event channel, served by
        this queue's pump and released with it (after the C queue)."""
        self._queue = NetQueue(tx_ring.address, rx_ring.address, cfg, tap_fd, gnt, ev_tx.c,
                               ev_rx.c if ev_rx is not None else None)
        rings, events = [tx_ring, rx_ring], [ev_tx] + ([ev_rx] if ev_rx is not None else [])
        try:
            if ctrl is not None:
                if vif is None or index != 0:
                    raise ValueError("the ctrl ring goes with queue 0 of a vif")
                vif.attach_ctrl(ctrl[0].address, ctrl[1].c)
                rings.append(ctrl[0])
                events.append(ctrl[1])
            if vif is not None:
                self._queue.join(vif, index)
        except BaseException:
            self._queue.close()
            raise
        super().__init__(name, self._queue, rings, events, on_dead=on_dead, errors=(QueueDeadError, OSError))

    @property
    def queue(self) -> NetQueue:
        return self._queue
