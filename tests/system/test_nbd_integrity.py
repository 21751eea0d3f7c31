"""Acceptance: data integrity through the NBD driver: an nbdkit file export (`nbd:unix:/sock`) and a qcow2
image (`qcow2:/path`, served by the driver's own qemu-nbd), each checked byte for byte against what the guest
wrote (the exported file itself; the qcow2 converted back to raw with qemu-img)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.guests.workload import Shadow, full_compare, random_verified
from backends.xenbus.toolstack import remove_device
from tests.system.conftest import Bed, Disk, Nbdkit, make_image
from tests.system.test_integrity import sweep

IMAGE_SIZE = 8 << 20


@pytest.fixture
def nbdkit_export(tmp_path: Path) -> Iterator[tuple[Nbdkit, Path]]:
    image = make_image(tmp_path / "export.img", IMAGE_SIZE)
    server = Nbdkit(image, tmp_path)
    try:
        yield server, image
    finally:
        server.stop()


async def _exercise(d: Disk, shadow: Shadow, seed: int) -> None:
    await sweep(d, shadow)
    res = await random_verified(d.front, shadow, seconds=1.5, max_ops=120, depth=4, seed=seed)
    assert not res.mismatches, res.mismatches[:5]
    assert res.writes > 10 and res.reads > 10, res.summary()
    await d.front.flush()
    assert not await full_compare(d.front, shadow)


async def _detach(bed: Bed, d: Disk) -> None:
    """Close the frontend and remove the device: the daemon lets go of the export (and stops qemu-nbd)."""
    await d.front.close()
    clean = await remove_device(await bed.dom0(), backend_domid=0, frontend_domid=d.domid, type_name="qdisk",
                                devid=d.devid, frontend_type="vbd", timeout=10)
    assert clean, "the backend did not reach Closed"


@pytest.mark.parametrize("abi,persistent", [("x86_64", True), ("x86_32", False)])
async def test_nbdkit_file_export(abi: str, persistent: bool, shared_bed: Bed,
                                  nbdkit_export: tuple[Nbdkit, Path]) -> None:
    server, image = nbdkit_export
    shadow = Shadow(image.read_bytes())
    d = await shared_bed.disk(None, params=f"nbd:unix:{server.sock}", abi=abi, ring_page_order=1, queues=2,
                              persistent=persistent)
    assert d.info is not None and d.info.size_bytes == IMAGE_SIZE and d.info.flush
    await _exercise(d, shadow, seed=3 if persistent else 4)
    assert await asyncio.to_thread(image.read_bytes) == bytes(shadow.data)
    assert await shared_bed.serve.errors(d.domid) == {}
    await _detach(shared_bed, d)
    assert server.proc.poll() is None, "nbdkit died"


async def test_qcow2_image(shared_bed: Bed, tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(IMAGE_SIZE)], check=True,
                   timeout=30)
    shadow = Shadow(bytes(IMAGE_SIZE))  # a new qcow2 reads as zeros
    d = await shared_bed.disk(None, params=f"qcow2:{image}", ring_page_order=2, queues=1, persistent=True)
    assert d.info is not None and d.info.size_bytes == IMAGE_SIZE
    await _exercise(d, shadow, seed=5)
    assert await shared_bed.serve.errors(d.domid) == {}
    await _detach(shared_bed, d)
    # The frontend's close already left the backend Closed (its driver still open, ready for a reconnect), so
    # the removal did not wait for the driver: qemu-nbd goes once the daemon sees the directory gone.  Until
    # then it holds qemu's write lock on the image, and `qemu-img info` (a shared lock) fails.
    async with asyncio.timeout(10):
        while subprocess.run(["qemu-img", "info", str(image)], capture_output=True, timeout=30).returncode:
            await asyncio.sleep(0.05)
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True,
                   timeout=60)
    assert os.path.getsize(raw) == IMAGE_SIZE
    assert raw.read_bytes() == bytes(shadow.data), "the qcow2 image holds something else than the guest wrote"
