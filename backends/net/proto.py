"""netif's xenstore protocol, pure: the keys netback writes, the strict parsing of the frontend's keys and of
the toolstack's `mac`/`mtu`/`rate`/`vifname`.  No I/O here (the device class reads and writes the keys).

Facts: Linux drivers/net/xen-netback/xenbus.c (netback_probe, connect, read_xenbus_vif_flags,
connect_data_rings, xen_net_read_rate, xen_net_read_mac) and Xen's io/netif.h.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The key grammar every device type shares, re-exported as net's own.
from backends.xenbus.keys import ProtocolError as ProtocolError
from backends.xenbus.keys import frontend_queue_dirs as frontend_queue_dirs
from backends.xenbus.keys import parse_bool as parse_bool
from backends.xenbus.keys import parse_uint as parse_uint

EVTCHN_MAX_PORT = (1 << 17) - 1  # FIFO ABI: 2^17 ports
GRANT_REF_MAX = (1 << 32) - 1
DEFAULT_MTU = 1500  # io/netif.h: "If this node is absent the frontend should assume an MTU value of 1500"
MIN_MTU = 68
MAX_MTU = 65535 - 14  # a frame (MTU + Ethernet header) must fit netif's 16-bit size
# XDP headroom the frontend may ask for in the first RX buffer.  Linux clamps to XEN_NETIF_MAX_XDP_HEADROOM
# (0x7FFF), more than a 4 KiB page could ever hold; Linux netfront asks for XDP_PACKET_HEADROOM (256).  A
# larger value would leave too little of the page for a frame: refused (that vif fails).
MAX_XDP_HEADROOM = 1024
# The host-side MAC of every vif (Xen's vif scripts, XenServer): the guest's own MAC is the backend `mac` key.
HOST_MAC = "fe:ff:ff:ff:ff:ff"
IFNAMSIZ = 16


@dataclass(frozen=True)
class BackendOffer:
    """What this backend offers a frontend (written at probe, before InitWait)."""

    max_queues: int = 2
    gso: bool = True  # feature-gso-tcpv4/6: only when the host side can carry GSO frames (a plain tap can)
    split_event_channels: bool = True
    xdp_headroom: bool = True
    ctrl_ring: bool = True  # feature-ctrl-ring: the Toeplitz hash, its key, flags and mapping table (netctrl.c)
    multicast_control: bool = True  # feature-(dynamic-)multicast-control: MCAST_ADD/DEL and the RX filter


def probe_keys(offer: BackendOffer) -> dict[str, str]:
    """Linux netback_probe's keys (a backend advertises only what it honours)."""
    gso = "1" if offer.gso else "0"
    mcast = "1" if offer.multicast_control else "0"
    return {
        "feature-sg": "1",
        "feature-gso-tcpv4": gso,
        "feature-gso-tcpv6": gso,
        "feature-ipv6-csum-offload": "1",
        "feature-rx-copy": "1",
        "feature-rx-flip": "0",
        "feature-xdp-headroom": "1" if offer.xdp_headroom else "0",
        "feature-split-event-channels": "1" if offer.split_event_channels else "0",
        "multi-queue-max-queues": str(offer.max_queues),
        "feature-ctrl-ring": "1" if offer.ctrl_ring else "0",
        "feature-multicast-control": mcast,
        "feature-dynamic-multicast-control": mcast,
    }


@dataclass(frozen=True)
class QueueRings:
    tx_ring_ref: int
    rx_ring_ref: int
    event_channel_tx: int
    event_channel_rx: int  # == event_channel_tx when the frontend uses one channel

    @property
    def split(self) -> bool:
        return self.event_channel_tx != self.event_channel_rx


@dataclass(frozen=True)
class CtrlRing:
    ring_ref: int
    event_channel: int


@dataclass(frozen=True)
class FrontendConfig:
    queues: tuple[QueueRings, ...]
    rx_notify: bool  # feature-rx-notify: the frontend notifies when it posts RX buffers
    sg: bool
    gso_tcpv4: bool
    gso_tcpv6: bool
    ip_csum: bool  # not feature-no-csum-offload: the frontend accepts csum_blank IPv4 frames on RX
    ipv6_csum: bool
    xdp_headroom: int
    multicast_control: bool
    ctrl: CtrlRing | None = None  # the frontend's control ring (ctrl-ring-ref + event-channel-ctrl)

    @property
    def rx_csum(self) -> bool:
        """Partial checksums may be handed to the frontend (both families: the tap cannot tell them apart)."""
        return self.ip_csum and self.ipv6_csum

    @property
    def rx_gso(self) -> tuple[bool, bool]:
        """GSO frames may be handed to the frontend (needs SG and partial checksums, as Linux's
        xenvif_fix_features)."""
        ok = self.sg and self.rx_csum
        return ok and self.gso_tcpv4, ok and self.gso_tcpv6


def frontend_key_names(nr_queues: int) -> list[str]:
    """Every frontend key parse_frontend may read (read them once: a frontend can rewrite them any time)."""
    names = ["multi-queue-num-queues", "request-rx-copy", "feature-rx-notify", "feature-sg", "feature-gso-tcpv4",
             "feature-gso-tcpv6", "feature-no-csum-offload", "feature-ipv6-csum-offload", "xdp-headroom",
             "request-multicast-control", "ctrl-ring-ref", "event-channel-ctrl"]
    for d in frontend_queue_dirs(nr_queues):
        names += [d + k for k in ("tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx",
                                  "event-channel-rx")]
    return names


def _queue(keys: dict[str, str], d: str) -> QueueRings:
    tx = parse_uint(keys.get(d + "tx-ring-ref"), d + "tx-ring-ref", 0, GRANT_REF_MAX)
    rx = parse_uint(keys.get(d + "rx-ring-ref"), d + "rx-ring-ref", 0, GRANT_REF_MAX)
    # Linux tries event-channel-tx (+ -rx) first, then event-channel.
    if d + "event-channel-tx" in keys or d + "event-channel-rx" in keys:
        etx = parse_uint(keys.get(d + "event-channel-tx"), d + "event-channel-tx", 1, EVTCHN_MAX_PORT)
        erx = parse_uint(keys.get(d + "event-channel-rx"), d + "event-channel-rx", 1, EVTCHN_MAX_PORT)
        if etx == erx:
            raise ProtocolError(f"{d}event-channel-tx and -rx are the same port {etx}")
    else:
        etx = erx = parse_uint(keys.get(d + "event-channel"), d + "event-channel", 1, EVTCHN_MAX_PORT)
    return QueueRings(tx, rx, etx, erx)


def parse_frontend(keys: dict[str, str], *, max_queues: int) -> FrontendConfig:
    """The frontend's keys at connect, strictly: anything malformed is a ProtocolError (that vif fails)."""
    nq = parse_uint(keys.get("multi-queue-num-queues"), "multi-queue-num-queues", 1, max_queues, 1)
    # "request-rx-copy": missing counts as 0 and 0 is -EOPNOTSUPP in Linux (rx-flip is long gone).
    if not parse_bool(keys.get("request-rx-copy"), "request-rx-copy", False):
        raise ProtocolError("frontend does not request rx-copy (request-rx-copy=1): rx-flip is not supported")
    queues = tuple(_queue(keys, d) for d in frontend_queue_dirs(nq))
    seen: set[int] = set()
    for q in queues:
        for port in {q.event_channel_tx, q.event_channel_rx}:
            if port in seen:
                raise ProtocolError(f"event channel {port} used by two queues")
            seen.add(port)
    headroom = parse_xdp_headroom(keys.get("xdp-headroom"))
    ctrl: CtrlRing | None = None
    if "ctrl-ring-ref" in keys:
        # Linux connect_ctrl_ring: no ctrl-ring-ref = no control ring; with one, event-channel-ctrl is required.
        ctrl = CtrlRing(parse_uint(keys.get("ctrl-ring-ref"), "ctrl-ring-ref", 0, GRANT_REF_MAX),
                        parse_uint(keys.get("event-channel-ctrl"), "event-channel-ctrl", 1, EVTCHN_MAX_PORT))
        if ctrl.event_channel in seen:
            raise ProtocolError(f"event-channel-ctrl {ctrl.event_channel} is also a queue's event channel")
    return FrontendConfig(
        queues=queues,
        rx_notify=parse_bool(keys.get("feature-rx-notify"), "feature-rx-notify"),
        sg=parse_bool(keys.get("feature-sg"), "feature-sg"),
        gso_tcpv4=parse_bool(keys.get("feature-gso-tcpv4"), "feature-gso-tcpv4"),
        gso_tcpv6=parse_bool(keys.get("feature-gso-tcpv6"), "feature-gso-tcpv6"),
        ip_csum=not parse_bool(keys.get("feature-no-csum-offload"), "feature-no-csum-offload"),
        ipv6_csum=parse_bool(keys.get("feature-ipv6-csum-offload"), "feature-ipv6-csum-offload"),
        xdp_headroom=headroom,
        multicast_control=parse_bool(keys.get("request-multicast-control"), "request-multicast-control"),
        ctrl=ctrl,
    )


def parse_xdp_headroom(value: str | None) -> int:
    """`xdp-headroom` (at connect, and again when the frontend goes Reconfiguring to attach or detach XDP)."""
    headroom = parse_uint(value, "xdp-headroom", 0, 0xFFFF, 0)
    headroom = min(headroom, 0x7FFF)  # XEN_NETIF_MAX_XDP_HEADROOM, as Linux clamps
    if headroom > MAX_XDP_HEADROOM:
        raise ProtocolError(f"xdp-headroom {headroom} leaves too little of an RX page (at most {MAX_XDP_HEADROOM})")
    return headroom


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def parse_mac(value: str | None) -> bytes:
    """Six hex bytes separated by ':' (Linux xen_net_read_mac; a bad value is fatal for the vif)."""
    if value is None:
        raise ProtocolError("mac missing")
    if not _MAC_RE.match(value):
        raise ProtocolError(f"mac {value[:32]!r} is not six hex bytes separated by ':'")
    mac = bytes.fromhex(value.replace(":", ""))
    if mac[0] & 1:
        raise ProtocolError(f"mac {value} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mtu(value: str | None) -> int:
    return parse_uint(value, "mtu", MIN_MTU, MAX_MTU, DEFAULT_MTU)


@dataclass(frozen=True)
class Rate:
    """TX credit (Linux netback's credit scheduler): `bytes` per `usecs`."""

    bytes: int
    usecs: int


_RATE_RE = re.compile(r"^([0-9]{1,20}),([0-9]{1,20})$")


def parse_rate(value: str | None) -> Rate | None:
    """`bytes,usecs`; None = unlimited (missing).  A malformed value raises ProtocolError, which the device
    only logs: Linux warns and leaves traffic unlimited."""
    if value is None or value == "":
        return None
    m = _RATE_RE.match(value)
    if not m:
        raise ProtocolError(f"rate {value[:32]!r} is not BYTES,USECS")
    b, u = int(m.group(1)), int(m.group(2))
    if b >= 1 << 64 or u >= 1 << 32 or u == 0:
        raise ProtocolError(f"rate {value!r} out of range")
    return Rate(b, u)


_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def vif_name(domid: int, devid: int, vifname: str | None) -> str:
    """The tap's name: the toolstack's `vifname` if it set one, else vif<domid>.<devid> (libxl's default)."""
    if vifname:
        if not _IFNAME_RE.match(vifname) or vifname in (".", ".."):
            raise ProtocolError(f"vifname {vifname[:32]!r} is not a usable interface name")
        return vifname
    name = f"vif{domid}.{devid}"
    if len(name) >= IFNAMSIZ:
        raise ProtocolError(f"interface name {name} too long")
    return name
