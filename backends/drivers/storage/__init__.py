"""Storage drivers behind `StorageDriver`: what a block backend serves a disk from."""

from backends.drivers.storage.base import IoEngine, StorageCaps, StorageDriver, StorageError
from backends.drivers.storage.file import FileDriver
from backends.drivers.storage.null import NullDriver

__all__ = ["FileDriver", "IoEngine", "NullDriver", "StorageCaps", "StorageDriver", "StorageError"]
