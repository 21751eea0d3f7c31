"""Device types: what a device package (blk, net, vtpm, ...) registers so the daemon, the CLI, the config loader,
`pvback status` and the metrics endpoint can serve it without naming it.

A device type is one package under backends/ with a `devtype` module that calls `register(DeviceType(...))`
(the daemon imports every `backends/<pkg>/devtype.py`, and the modules named in `$PVBACK_DEVICE_MODULES`).
Everything type-specific sits behind the fields below; the bus itself still only sees `DeviceClass`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.xenbus.device import DeviceClass


class CommandError(Exception):
    """An operator's mistake in a device type's command arguments: one line saying what and how to fix it."""


@dataclass(frozen=True)
class AttachSpec:
    """What `pvback attach` writes for one device, as libxl would: the keys beyond the standard ones."""

    devid: int
    backend: dict[str, str]
    frontend: dict[str, str]


@dataclass(frozen=True)
class Commands:
    """`pvback attach KIND` / `pvback detach KIND`: the type's own arguments; the xenstore work is generic."""

    # Adds the type's positional arguments and options after `attach KIND DOMID`.
    add_attach_arguments: Callable[[argparse.ArgumentParser], None]
    # Checks the arguments and the target (before any node exists) and says what to write; CommandError.
    attach_spec: Callable[[argparse.Namespace], AttachSpec]
    # Adds the argument naming the device after `detach KIND DOMID` (e.g. a vdev).
    add_detach_arguments: Callable[[argparse.ArgumentParser], None]
    # The devid the detach arguments name; CommandError.
    detach_devid: Callable[[argparse.Namespace], int]
    # How the operator names one device in messages ("disk xvdb").
    describe: Callable[[argparse.Namespace], str]
    # `pvback limit KIND DOMID ...` (optional): adds the type's limit options after the detach arguments
    # (argparse rejects a bad value: one line, exit 2), and says which backend keys they set (the device
    # watches them and applies them live); CommandError.
    add_limit_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    limit_keys: Callable[[argparse.Namespace], dict[str, str]] | None = None


@dataclass(frozen=True)
class StatusColumns:
    """What `pvback status` shows of a device of this type."""

    summary_key: str = ""  # a backend key shown first (blk: params)
    # The DEV column: the backend key `dev_key` (blk: the vdev libxl writes), or what `dev_name` makes of
    # (domid, devid, that key's value or None) for a type whose device name is derived (net: its tap).
    dev_key: str = "dev"
    dev_name: Callable[[str, str, str | None], str] | None = None
    backend_keys: tuple[str, ...] = ()  # negotiated features worth showing, from the backend dir
    frontend_keys: tuple[str, ...] = ()  # ... and from the frontend dir ("fe:" prefixed)
    # Text added to the device's row from what the daemon's metrics endpoint reports for it (`pvback status` runs
    # apart from the daemon, so this is all it knows of the device's live state).  The mapping holds the
    # device's totals "requests", "bytes", "errors", "ring_full", per operation "requests:<op>", and the
    # numbers its class data reports under stats()["status"] as "status:<key>" (the pvback_device_status gauge).
    extra: Callable[[Mapping[str, float]], str] | None = None


@dataclass(frozen=True)
class Privileges:
    """What a device type needs from the host once the daemon has dropped root (backends.daemon.privdrop):
    the capabilities it keeps, the device nodes it opens while serving, and the directories it writes (made
    and handed to the daemon's user before the drop)."""

    capabilities: tuple[str, ...] = ()  # "CAP_NET_ADMIN"
    device_nodes: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceType:
    name: str  # the config section and the name in messages: "blk"
    kind: str  # what an operator calls one: `pvback attach disk`, the DOMAINS table's DISKS column
    frontend_type: str  # the guest's directory: device/vbd
    backend_types: tuple[str, ...]  # backend directories it can serve: qdisk, vbd
    default_backend_types: tuple[str, ...]  # served when [serve] backend_types is not set
    config: type[Any]  # the `[name]` section: a dataclass whose defaults are the documented defaults
    # (config section, the backend type names one bus serves) -> the bus's DeviceClass
    device_class: Callable[[Any, tuple[str, ...]], DeviceClass]
    # Integer keys' accepted ranges and string keys' choices, checked by the loader.
    config_ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    config_choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # A reload's new section for a running class: connected devices keep what they connected with.
    reconfigure: Callable[[Any, Any], None] = lambda cls, section: setattr(cls, "cfg", section)
    commands: Commands | None = None
    status: StatusColumns = field(default_factory=StatusColumns)
    # A device's counters in the metrics endpoint's shape (backends.daemon.metrics): from its class data.
    stats: Callable[[Any], dict[str, Any]] = lambda data: data.stats() if hasattr(data, "stats") else {}
    # (config section) -> what serving this type needs after the drop; the default: nothing beyond the
    # platform's own nodes (the operator gives the daemon's user its images).
    privileges: Callable[[Any], Privileges] = lambda section: Privileges()


_TYPES: dict[str, DeviceType] = {}


def register(dt: DeviceType) -> DeviceType:
    """Add a device type (idempotent for the same object; a clash of names is a programming error)."""
    old = _TYPES.get(dt.name)
    if old is dt:
        return dt
    if old is not None:
        raise ValueError(f"device type {dt.name!r} registered twice")
    for other in _TYPES.values():
        clash = set(other.backend_types) & set(dt.backend_types)
        if clash or other.kind == dt.kind:
            raise ValueError(f"device types {other.name!r} and {dt.name!r} both claim "
                             f"{', '.join(sorted(clash)) or 'kind ' + dt.kind}")
    _TYPES[dt.name] = dt
    return dt


def unregister(name: str) -> None:
    """For tests that register a type of their own."""
    _TYPES.pop(name, None)


def device_types() -> list[DeviceType]:
    return list(_TYPES.values())


def for_backend_type(backend_type: str) -> DeviceType:
    for dt in _TYPES.values():
        if backend_type in dt.backend_types:
            return dt
    raise KeyError(backend_type)


def for_kind(kind: str) -> DeviceType:
    for dt in _TYPES.values():
        if dt.kind == kind:
            return dt
    raise KeyError(kind)
