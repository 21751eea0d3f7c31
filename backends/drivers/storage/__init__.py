"""Storage drivers behind `StorageDriver`: what a block backend serves a disk from.

The drivers load on first use, not with the package: `nbd_target` (the NBD target grammar, pure) is shared
with blk's protocol module, which must not pull in the C module by importing it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.drivers.storage.base import IoEngine, StorageCaps, StorageDriver, StorageError
    from backends.drivers.storage.file import FileDriver
    from backends.drivers.storage.nbd import NbdDriver
    from backends.drivers.storage.null import NullDriver
    from backends.drivers.storage.qemu_nbd import QemuNbdDriver

_HOME = {
    "IoEngine": "base", "StorageCaps": "base", "StorageDriver": "base", "StorageError": "base",
    "FileDriver": "file", "NbdDriver": "nbd", "NullDriver": "null", "QemuNbdDriver": "qemu_nbd",
}  # fmt: skip

__all__ = [
    "FileDriver", "IoEngine", "NbdDriver", "NullDriver", "QemuNbdDriver", "StorageCaps", "StorageDriver",
    "StorageError",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
