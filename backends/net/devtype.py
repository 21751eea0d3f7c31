"""netback's registration: what the daemon, the CLI, the config loader and `pvback status` need to serve NICs."""

from __future__ import annotations

from typing import Any

from backends.net.commands import COMMANDS
from backends.net.config import NET_BACKEND_TYPES, NET_RANGES, NetConfig
from backends.xenbus.registry import DeviceType, StatusColumns, register


def _device_class(cfg: Any, type_names: tuple[str, ...]) -> Any:
    from backends.net.device import NetDeviceClass

    return NetDeviceClass(cfg, type_names=type_names)


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
    device_class=_device_class,
    commands=COMMANDS,
    status=StatusColumns(
        summary_key="mac",
        backend_keys=("mtu", "multi-queue-max-queues", "feature-gso-tcpv4", "feature-gso-tcpv6", "hotplug-status"),
        frontend_keys=("multi-queue-num-queues", "feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6",
                       "feature-no-csum-offload", "feature-ipv6-csum-offload"),
    ),
))
