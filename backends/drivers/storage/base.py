"""The storage driver interface and the handle of the C I/O engine a driver hands to the block data path.

A driver answers one capability query (`capabilities()`, what the backend advertises in xenstore and how the
C engine should run) and owns one `IoEngine` (csrc/ioengine.h) between `open()` and `close()`.  The data path
never calls the driver per request: it only passes `engine().c` to C.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from backends.native import ffi, lib, struct_pv_io_engine
from backends.native.handle import CHandle


class StorageError(OSError):
    """The backing store cannot be opened or used as configured."""


@dataclass(frozen=True)
class StorageCaps:
    size_bytes: int
    logical_sector_size: int = 512  # `sector-size`: every request is aligned to it
    physical_sector_size: int = 512
    readonly: bool = False
    can_discard: bool = False
    can_secure_discard: bool = False
    discard_granularity: int = 0  # bytes; 0 = logical sector size
    discard_alignment: int = 0
    needs_flush: bool = True  # a volatile cache sits below us: advertise feature-flush-cache
    threaded: bool = False  # engine runs a worker pool (O_DIRECT/block devices) rather than inline
    direct_io: bool = False

    @property
    def sectors(self) -> int:
        """Size in 512-byte units (the `sectors` key, 2024 blkif semantics)."""
        return self.size_bytes // 512


class IoEngine(CHandle[struct_pv_io_engine]):
    """Owns one `struct pv_io_engine *`; closes it once.  Close only after every queue using it is gone."""

    def __init__(self, c: struct_pv_io_engine, what: str) -> None:
        if c == ffi.NULL:
            raise StorageError(f"cannot create {what} I/O engine")
        super().__init__(c)

    def _closed_message(self) -> str:
        return "I/O engine closed"

    @classmethod
    def null(cls) -> IoEngine:
        return cls(lib.pv_io_engine_null_open(), "null")

    @classmethod
    def file(cls, fd: int, nr_threads: int) -> IoEngine:
        """The fd is duplicated inside: the caller keeps its own.  nr_threads=0 runs I/O inline."""
        err = ffi.new("char[]", 256)
        c = lib.pv_io_engine_file_open(fd, nr_threads, err, 256)
        if c == ffi.NULL:
            raise StorageError(f"file I/O engine: {ffi.string(err).decode(errors='replace')}")
        return cls(c, "file")

    @property
    def inline(self) -> bool:
        return bool(lib.pv_io_engine_inline(self.c))

    def map_file(self) -> None:
        """Inline file engines: serve reads and writes through a shared mapping of the file (one memcpy, no
        syscall per request).  Raises StorageError if it cannot; the engine then keeps using preadv/pwritev."""
        err = ffi.new("char[]", 256)
        rc = int(lib.pv_io_engine_file_map(self.c, err, 256))
        if rc < 0:
            raise StorageError(-rc, f"file I/O engine: {ffi.string(err).decode(errors='replace')}")

    @property
    def map_faults(self) -> int:
        """Mapped copies that faulted and were redone with a syscall (the file shrank, tmpfs was full)."""
        return int(lib.pv_io_engine_file_map_faults(self.c))

    def _free(self, c: struct_pv_io_engine) -> None:
        lib.pv_io_engine_close(c)


class StorageDriver(abc.ABC):
    """One backing store.  open() -> capabilities()/engine() -> close(); close() is idempotent."""

    name: str

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def capabilities(self) -> StorageCaps: ...

    @abc.abstractmethod
    def engine(self) -> IoEngine:
        """The engine for the data path (valid until close())."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def current_size(self) -> int | None:
        """The backing store's size now, for online resize; None if it cannot change under us."""
        return None

    def __enter__(self) -> StorageDriver:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
