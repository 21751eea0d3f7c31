"""Storage drivers: capability probing, the inline/threaded choice, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.drivers.storage import FileDriver, NullDriver, StorageError
from backends.drivers.storage.file import filesystem_type


def test_tmpfs_file_runs_inline(tmp_path: Path) -> None:
    if filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    p = Path("/dev/shm") / f"pvback-drv-{os.getpid()}.img"
    p.write_bytes(b"\0" * (1 << 20))
    try:
        with FileDriver(p) as d:
            caps = d.capabilities()
            assert not caps.threaded and not caps.direct_io and d.engine().inline
            assert caps.sectors == 2048 and caps.can_discard and caps.needs_flush and not caps.readonly
    finally:
        p.unlink()


def test_disk_file_threaded(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    p.write_bytes(b"\0" * (1 << 20))
    d = FileDriver(p, mode="threaded", threads=2)
    d.open()
    try:
        assert d.capabilities().threaded and not d.engine().inline
    finally:
        d.close()
        d.close()  # idempotent


def test_readonly_and_refusals(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    p.write_bytes(b"\0" * 4096)
    with FileDriver(p, readonly=True, mode="inline") as d:
        c = d.capabilities()
        assert c.readonly and not c.can_discard
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"\0" * 1000)
    with pytest.raises(StorageError, match="multiple"):
        FileDriver(odd).open()
    with pytest.raises(StorageError):
        FileDriver(tmp_path / "missing.img").open()
    with pytest.raises(StorageError):
        FileDriver(tmp_path).open()  # a directory
    with pytest.raises(StorageError):
        FileDriver(p, sector_size=3000)


def test_null_driver() -> None:
    with NullDriver(1 << 30) as d:
        assert d.capabilities().sectors == 2 << 20 and d.engine().inline
    with pytest.raises(StorageError):
        NullDriver(1000)
