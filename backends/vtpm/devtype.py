"""The vTPM backend's registration: what the daemon, the CLI, the config loader and `pvback status` need."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.vtpm.commands import COMMANDS
from backends.vtpm.config import VTPM_BACKEND_TYPES, VTPM_CHOICES, VtpmConfig
from backends.xenbus.registry import DeviceType, Privileges, StatusColumns, register


def _device_class(cfg: Any, type_names: tuple[str, ...]) -> Any:
    from backends.vtpm.device import VtpmDeviceClass

    return VtpmDeviceClass(cfg, type_names=type_names)


def _reconfigure(cls: Any, section: Any) -> None:
    from backends.vtpm.proto import parse_localities

    cls.allowed = parse_localities(section.localities)
    cls.cfg = section


def status_columns(values: Mapping[str, float]) -> str:
    """`pvback status`'s live columns of one vTPM, from the daemon's metrics (VtpmData.status_values and the
    request/error counters): swtpm pid, TPM version, commands, errors, cancels, p50 latency."""
    def n(key: str) -> str:
        return f"{values[key]:.0f}" if key in values else "-"

    version = values.get("status:version")
    p50 = values.get("status:p50_us")
    parts = [f"swtpm_pid={n('status:swtpm_pid')}",
             f"tpm={'-' if version is None else ('2.0' if version >= 2 else '1.2')}",
             f"commands={n('requests:command')}", f"errors={n('errors')}", f"cancels={n('requests:cancel')}",
             f"p50={'-' if p50 is None else f'{p50:.0f}us'}"]
    tpm12 = sum(v for k, v in values.items() if k.startswith("requests:tpm12_"))
    if tpm12:
        parts.append(f"tpm12_answered={tpm12:.0f}")  # TPM 1.2 commands of the guest kernel (proto.py)
    if values.get("status:manager_retries"):  # waiting for (or was waiting for) a vTPM manager that was down
        parts.append(f"manager_retries={n('status:manager_retries')}")
    if values.get("status:swtpm_restarts"):
        parts.append(f"swtpm_restarts={n('status:swtpm_restarts')}")
    return " ".join(parts)


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
    # swtpm runs as the daemon's user, without capabilities, in these directories; the vTPM manager's socket
    # (0660 root's) is connected to per device, after the drop (its release_uids must name that user).
    privileges=lambda c: Privileges(device_nodes=(c.manager_socket,) if c.manager_socket else (),
                                    dirs=(c.state_dir, c.run_dir)),
    status=StatusColumns(summary_key="uuid", backend_keys=("version", "feature-protocol-v2", "ready"),
                         frontend_keys=("feature-protocol-v2",), extra=status_columns),
))
