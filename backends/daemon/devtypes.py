"""Finding the device types: every `backends/<package>/devtype.py`, and the modules listed in
`$PVBACK_DEVICE_MODULES` (comma-separated dotted names: device types that live outside this tree, and tests').
Importing one registers it (backends.xenbus.registry); the daemon never names a type."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil

import backends
from backends.xenbus.registry import DeviceType, device_types

ENV = "PVBACK_DEVICE_MODULES"
_loaded = False


def load_device_types() -> list[DeviceType]:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(backends.__path__):
            if info.ispkg and importlib.util.find_spec(f"backends.{info.name}.devtype") is not None:
                importlib.import_module(f"backends.{info.name}.devtype")
        for name in filter(None, (m.strip() for m in os.environ.get(ENV, "").split(","))):
            importlib.import_module(name)
        _loaded = True
    return device_types()


def all_backend_types() -> list[str]:
    return [t for dt in load_device_types() for t in dt.backend_types]


def default_backend_types() -> list[str]:
    return [t for dt in load_device_types() for t in dt.default_backend_types]
