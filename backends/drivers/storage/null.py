"""The null storage driver: every request completes at once and touches no data (SPDK's bdev_null).

It measures the framework's own cost.  Reads hand the guest whatever the queue's bounce page held (zeros, or
this same guest's earlier data), never another guest's: bounce pages are per queue.
"""

from __future__ import annotations

from backends.drivers.storage.base import IoEngine, StorageCaps, StorageDriver, StorageError


class NullDriver(StorageDriver):
    name = "null"

    def __init__(self, size_bytes: int, *, sector_size: int = 512, readonly: bool = False) -> None:
        if sector_size not in (512, 1024, 2048, 4096):
            raise StorageError(f"null: sector size {sector_size} is not 512..4096")
        if size_bytes <= 0 or size_bytes % sector_size:
            raise StorageError(f"null: size {size_bytes} is not a positive multiple of {sector_size}")
        self._caps = StorageCaps(
            size_bytes=size_bytes,
            logical_sector_size=sector_size,
            physical_sector_size=sector_size,
            readonly=readonly,
            can_discard=not readonly,
            discard_granularity=sector_size,
            needs_flush=True,
        )
        self._engine: IoEngine | None = None

    def open(self) -> None:
        if self._engine is None:
            self._engine = IoEngine.null()

    def capabilities(self) -> StorageCaps:
        return self._caps

    def engine(self) -> IoEngine:
        if self._engine is None:
            raise StorageError("null driver not open")
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
