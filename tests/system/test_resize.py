"""Online resize: the operator grows the image while the guest is connected."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from backends.guests.blkfront import RSP_ERROR, BlkIOError
from tests.system.conftest import Bed


async def _wait_sectors(bed: Bed, path: str, want: int, timeout: float = 10.0) -> None:
    xs = await bed.dom0()
    watch = await xs.watch(f"{path}/sectors")
    try:
        async with asyncio.timeout(timeout):
            async for _ in watch:
                if await xs.read_str(f"{path}/sectors") == str(want):
                    return
    finally:
        await watch.close()


async def test_grow_while_connected(shared_bed: Bed, tmp_path: Path) -> None:
    image = tmp_path / "grow.img"
    image.write_bytes(os.urandom(4 << 20))
    d = await shared_bed.disk(image)
    assert d.info is not None and d.info.sectors == (4 << 20) // 512
    old_end = d.info.sectors
    # Past the end: refused before the resize.
    try:
        await d.front.write(old_end, b"x" * 4096)
        raise AssertionError("a write past the end of the disk succeeded")
    except BlkIOError as exc:
        assert exc.status == RSP_ERROR
    os.truncate(image, 8 << 20)
    await _wait_sectors(shared_bed, d.paths.backend, (8 << 20) // 512)
    # The backend re-signalled its state (same value) so a frontend watching it re-reads `sectors`.
    assert await d.xs.read_str(f"{d.paths.backend}/state") == "4"
    data = os.urandom(65536)
    await d.front.write(old_end, data)
    await d.front.flush()
    assert await d.front.read(old_end, len(data)) == data
    with open(image, "rb") as f:
        f.seek(old_end * 512)
        assert f.read(len(data)) == data
