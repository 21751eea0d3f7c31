"""netback's registration: what the daemon, the CLI, the config loader and `pvback status` need to serve NICs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.net.commands import COMMANDS
from backends.net.config import NET_BACKEND_TYPES, NET_CHOICES, NET_RANGES, NetConfig
from backends.xenbus.registry import DeviceType, Privileges, StatusColumns, register


def _device_class(cfg: Any, type_names: tuple[str, ...]) -> Any:
    from backends.net.device import NetDeviceClass

    return NetDeviceClass(cfg, type_names=type_names)


def _tap_name(domid: str, devid: str, vifname: str | None) -> str:
    """The DEV column: the vif's tap, named as the daemon names it (the toolstack's `vifname`, else
    vif<domid>.<devid>)."""
    from backends.net.proto import ProtocolError, vif_name

    try:
        return vif_name(int(domid), int(devid), vifname)
    except (ProtocolError, ValueError):
        return vifname or "?"


def _live(t: Mapping[str, float]) -> str:
    """What the daemon reports of the vif beyond the counters: its enforced rate, the time TX waited for
    credit, and the times the guest's RX stalled long enough to turn the carrier off."""
    parts = []
    if t.get("status:rate_bytes_per_s"):
        parts.append(f"rate={t['status:rate_bytes_per_s'] / 1e6:.3g}MB/s")
    if t.get("status:tx_credit_waits"):
        parts.append(f"credit_waits={t['status:tx_credit_waits']:.0f} "
                     f"throttled={t.get('status:tx_throttled_ms', 0) / 1000:.1f}s")
    if t.get("status:carrier_offs"):
        parts.append(f"rx_stalls_carrier_off={t['status:carrier_offs']:.0f}")
    switch = _switch_columns(t)
    if switch:
        parts.append(switch)
    return " ".join(parts)


def _switch_columns(v: Mapping[str, float]) -> str:
    """Live switch columns from the metrics endpoint (backends.net.switch.Attachment.status)."""
    parts = []
    if "status:ovs_ofport" in v:
        parts.append(f"ofport={int(v['status:ovs_ofport'])}")
    for key, name in (("ovs_port_repairs", "ovs-repairs"), ("ovsdb_reconnects", "ovsdb-reconnects")):
        if v.get(f"status:{key}"):
            parts.append(f"{name}={int(v[f'status:{key}'])}")
    return " ".join(parts)


def _privileges(c: Any) -> Privileges:
    """Taps are created, configured, attached and put on a Linux bridge whenever a vif is realized:
    CAP_NET_ADMIN for good.  The OVSDB socket is root's (ovsdb-server recreates it when restarted, without the
    ACL the daemon gave it: see README, least privilege)."""
    nodes = ["/dev/net/tun"]
    if c.switch in ("auto", "ovs") and c.ovsdb.startswith("unix:"):
        nodes.append(c.ovsdb.removeprefix("unix:"))
    return Privileges(("CAP_NET_ADMIN",), tuple(nodes), (c.run_dir,) if c.run_dir else ())


DEVICE_TYPE = register(DeviceType(
    name="net",
    kind="nic",
    frontend_type="vif",
    backend_types=NET_BACKEND_TYPES,
    # Not served by default: `vif` is the directory libxl writes for every NIC and Linux's xen-netback (loaded
    # in almost every dom0) serves it; both would race for each device.  Operators add "vif" to [serve]
    # backend_types (or `pvback serve --types ...,vif`) where xen-netback is not loaded, as for blk's `vbd`.
    default_backend_types=(),
    config=NetConfig,
    config_ranges=NET_RANGES,
    config_choices=NET_CHOICES,
    device_class=_device_class,
    commands=COMMANDS,
    privileges=_privileges,
    status=StatusColumns(
        summary_key="mac",
        dev_key="vifname",
        dev_name=_tap_name,
        extra=_live,
        backend_keys=("mtu", "multi-queue-max-queues", "feature-gso-tcpv4", "feature-gso-tcpv6", "hotplug-status",
                      "bridge", "iface-id"),
        frontend_keys=("multi-queue-num-queues", "feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6",
                       "feature-no-csum-offload", "feature-ipv6-csum-offload", "ctrl-ring-ref",
                       "request-multicast-control", "xdp-headroom"),
    ),
))
