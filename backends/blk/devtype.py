"""blkback's registration: what the daemon, the CLI, the config loader and `pvback status` need to serve disks."""

from __future__ import annotations

from typing import Any

from backends.blk.commands import COMMANDS
from backends.blk.config import BLK_BACKEND_TYPES, BLK_RANGES, BlkConfig
from backends.xenbus.registry import DeviceType, StatusColumns, register


def _device_class(cfg: Any, type_names: tuple[str, ...]) -> Any:
    from backends.blk.device import BlkDeviceClass

    return BlkDeviceClass(cfg, type_names=type_names)


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
    ),
))
