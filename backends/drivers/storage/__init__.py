"""Storage drivers behind `StorageDriver`: what a block backend serves a disk from."""

from backends.drivers.storage.base import IoEngine, StorageCaps, StorageDriver, StorageError
from backends.drivers.storage.file import FileDriver
from backends.drivers.storage.nbd import NbdDriver
from backends.drivers.storage.null import NullDriver
from backends.drivers.storage.qemu_nbd import QemuNbdDriver

__all__ = [
    "FileDriver", "IoEngine", "NbdDriver", "NullDriver", "QemuNbdDriver", "StorageCaps", "StorageDriver",
    "StorageError",
]
