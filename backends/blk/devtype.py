"""blkback's registration: what the daemon, the CLI, the config loader and `pvback status` need to serve disks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.blk.commands import COMMANDS
from backends.blk.config import BLK_BACKEND_TYPES, BLK_RANGES, BlkConfig
from backends.xenbus.registry import DeviceType, StatusColumns, register


def _device_class(cfg: Any, type_names: tuple[str, ...]) -> Any:
    from backends.blk.device import BlkDeviceClass

    return BlkDeviceClass(cfg, type_names=type_names)


def _live(t: Mapping[str, float]) -> str:
    """The disk's limits and how often they bit (from the metrics' status gauges)."""
    parts = []
    if t.get("status:iops_limit"):
        parts.append(f"iops_limit={t['status:iops_limit']:.0f}")
    if t.get("status:bps_limit"):
        parts.append(f"bps_limit={t['status:bps_limit'] / 1e6:.3g}MB/s")
    if parts and t.get("status:limit_burst_ms") is not None:
        parts.append(f"burst={t['status:limit_burst_ms']:.0f}ms")
    if t.get("status:limit_waits"):
        parts.append(f"limit_waits={t['status:limit_waits']:.0f} "
                     f"throttled={t.get('status:limit_throttled_ms', 0) / 1000:.1f}s")
    return " ".join(parts)


DEVICE_TYPE = register(DeviceType(
    name="blk",
    kind="disk",
    frontend_type="vbd",
    backend_types=BLK_BACKEND_TYPES,
    # qdisk is what xl writes for backendtype=qdisk and what no dom0 kernel driver claims; vbd only where
    # xen-blkback is not loaded (it would race us for the device).
    default_backend_types=("qdisk",),
    config=BlkConfig,
    config_ranges=BLK_RANGES,
    device_class=_device_class,
    commands=COMMANDS,
    status=StatusColumns(
        summary_key="params",
        backend_keys=("sectors", "sector-size", "feature-flush-cache", "feature-discard", "feature-persistent",
                      "feature-max-indirect-segments"),
        frontend_keys=("protocol", "ring-page-order", "multi-queue-num-queues", "feature-persistent"),
        extra=_live,
    ),
))
