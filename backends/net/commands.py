"""`pvback attach nic DOMID [--mac M] [--queues N] [--mtu N] [--devid N] [--rate B,US] [--allow-spoof]` /
`detach nic DOMID DEVID`: the keys libxl writes for `vif=["mac=...,mtu=...,rate=..."]` (backend: mac, mtu,
handle, rate; frontend: mac, mtu, handle), plus our own keys: the cap on the queues offered and the per-vif
anti-spoofing switch.  The xenstore work itself is the daemon's (generic over device types)."""

from __future__ import annotations

import argparse
import os

from backends.net.proto import (
    DEFAULT_MTU,
    MAX_MTU,
    MIN_MTU,
    ProtocolError,
    format_mac,
    parse_mac,
    parse_rate,
    vif_name,
)
from backends.net.switch import parse_bridge
from backends.xenbus.registry import AttachSpec, CommandError, Commands
from backends.xenbus.toolstack import ATTACHED_MARK

MAX_DEVID = 255
MAX_QUEUES = 64
MAX_QUEUES_KEY = "pvback-max-queues"  # backends.net.device reads it
# "1": this vif may send frames with any source MAC (a guest bridging other MACs, VRRP); "0": they are dropped
# and counted (reason "spoof") whatever [net] check_mac says; absent: [net] check_mac.  Read at realize.
ALLOW_SPOOF_KEY = "pvback-allow-spoof"


def random_mac() -> str:
    """libxl's default: Xen's OUI 00:16:3e and three random bytes."""
    return format_mac(b"\x00\x16\x3e" + bytes([os.urandom(1)[0] & 0x7F]) + os.urandom(2))


def nic_spec(domid: int, devid: int, mac: str | None, queues: int | None, mtu: int | None,
             rate: str | None = None, allow_spoof: bool | None = None, bridge: str | None = None,
             iface_id: str | None = None) -> AttachSpec:
    if not 0 <= devid <= MAX_DEVID:
        raise CommandError(f"--devid {devid}: must be 0..{MAX_DEVID}")
    try:
        vif_name(domid, devid, None)
        the_mac = format_mac(parse_mac(mac)) if mac is not None else random_mac()
    except ProtocolError as exc:
        raise CommandError(f"{exc} (e.g. --mac 00:16:3e:12:34:56)") from exc
    if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
        raise CommandError(f"--mtu {mtu}: must be {MIN_MTU}..{MAX_MTU}")
    if queues is not None and not 1 <= queues <= MAX_QUEUES:
        raise CommandError(f"--queues {queues}: must be 1..{MAX_QUEUES}")
    if rate is not None:
        try:
            parse_rate(rate)
        except ProtocolError as exc:
            raise CommandError(f"--rate: {exc} (e.g. --rate 1000000,1000000 for 1 MB/s)") from exc
    the_mtu = str(mtu if mtu is not None else DEFAULT_MTU)
    backend = {"mac": the_mac, "mtu": the_mtu, "handle": str(devid), ATTACHED_MARK: "1"}
    if queues is not None:
        backend[MAX_QUEUES_KEY] = str(queues)
    if rate:
        backend["rate"] = rate
    if allow_spoof is not None:
        backend[ALLOW_SPOOF_KEY] = "1" if allow_spoof else "0"
    # The switch (backends.net.switch): libxl's `bridge=` key, and the OVN binding id.
    if bridge is not None:
        try:
            parse_bridge(bridge)
        except ProtocolError as exc:
            raise CommandError(f"--bridge {exc}") from exc
        backend["bridge"] = bridge
    if iface_id is not None:
        if not iface_id or len(iface_id) > 255 or not iface_id.isprintable():
            raise CommandError("--iface-id: 1..255 printable characters")
        backend["iface-id"] = iface_id
    frontend = {"mac": the_mac, "mtu": the_mtu, "handle": str(devid)}
    return AttachSpec(devid=devid, backend=backend, frontend=frontend)


def _add_attach(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mac", help="the guest's MAC (default: 00:16:3e plus three random bytes, as libxl)")
    p.add_argument("--queues", type=int, help="most queues offered to the frontend (default: [net] max_queues)")
    p.add_argument("--mtu", type=int, help=f"the NIC's MTU (default {DEFAULT_MTU})")
    p.add_argument("--devid", type=int, default=0, help="the NIC's number: the tap is vif<domid>.<devid>")
    p.add_argument("--rate", help="limit the guest's transmit rate: BYTES,USECS (the backend key `rate`, as "
                   "libxl's rate=; change it live with xenstore-write)")
    spoof = p.add_mutually_exclusive_group()
    spoof.add_argument("--allow-spoof", dest="allow_spoof", action="store_true", default=None,
                       help="let the guest send frames with any source MAC (default: [net] check_mac)")
    spoof.add_argument("--check-mac", dest="allow_spoof", action="store_false",
                       help="drop the guest's frames whose source MAC is not --mac, whatever [net] check_mac says")
    p.add_argument("--bridge", help="plug the tap into this OVS or Linux bridge: BR, BR.VLAN, BR:T1:T2 (as xl's "
                   "bridge=)")
    p.add_argument("--iface-id", help="OVS external_ids:iface-id (default: the domain's UUID and the devid)")


def _add_detach(p: argparse.ArgumentParser) -> None:
    p.add_argument("devid", type=int, nargs="?", default=0)


COMMANDS = Commands(
    add_attach_arguments=_add_attach,
    attach_spec=lambda args: nic_spec(args.domid, args.devid, args.mac, args.queues, args.mtu, args.rate,
                                      args.allow_spoof, args.bridge, args.iface_id),
    add_detach_arguments=_add_detach,
    detach_devid=lambda args: int(args.devid),
    describe=lambda args: f"nic {args.devid}",
)
