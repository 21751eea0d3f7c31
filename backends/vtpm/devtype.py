"""The vTPM backend's registration: what the daemon, the CLI, the config loader and `pvback status` need."""

from __future__ import annotations

from typing import Any

from backends.vtpm.commands import COMMANDS
from backends.vtpm.config import VTPM_BACKEND_TYPES, VTPM_CHOICES, VtpmConfig
from backends.xenbus.registry import DeviceType, StatusColumns, register


def _device_class(cfg: Any, type_names: tuple[str, ...]) -> Any:
    from backends.vtpm.device import VtpmDeviceClass

    return VtpmDeviceClass(cfg, type_names=type_names)


def _reconfigure(cls: Any, section: Any) -> None:
    from backends.vtpm.proto import parse_localities

    cls.allowed = parse_localities(section.localities)
    cls.cfg = section


DEVICE_TYPE = register(DeviceType(
    name="vtpm",
    kind="tpm",
    frontend_type="vtpm",
    backend_types=VTPM_BACKEND_TYPES,
    # No dom0 kernel driver serves backend/vtpm (Xen's own backend is the vtpm stubdom): safe by default.
    default_backend_types=VTPM_BACKEND_TYPES,
    config=VtpmConfig,
    config_choices=VTPM_CHOICES,
    device_class=_device_class,
    reconfigure=_reconfigure,
    commands=COMMANDS,
    status=StatusColumns(summary_key="uuid", backend_keys=("version", "feature-protocol-v2", "ready"),
                         frontend_keys=("feature-protocol-v2",)),
))
