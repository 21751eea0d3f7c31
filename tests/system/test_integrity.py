"""Acceptance: data integrity through `pvback serve` for every negotiable frontend shape and both file engines.

Each case: a guest with its own image, random writes then reads across 512 B..1 MiB (direct requests up to 11
segments, indirect above), then a flush, then the image file compared byte for byte with what the guest wrote.
The cases form a pairwise covering array over ABI (x86_64, x86_32, protocol key missing = x86_32),
ring pages (1, 4), queues (1, 2), persistent grants (on, off) and storage (tmpfs: inline engine; disk:
threaded O_DIRECT engine).
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends.guests.blkfront import SECTOR
from backends.guests.workload import Shadow, full_compare, random_verified
from tests.system.conftest import Bed, Disk, make_image
from tests.system.test_blk_limits import status_metric

IMAGE_SIZE = 8 << 20
# Every size class: sub-page, one page, the largest direct request (11 segments), the smallest indirect one
# (12 segments), and up to the 256-segment (1 MiB) maximum.
SWEEP_SIZES = (512, 1024, 3584, 4096, 8192, 45056, 49152, 65536, 131072, 258048, 1 << 20)


@dataclass(frozen=True)
class Case:
    abi: str  # "x86_64", "x86_32", or "none": x86_32 layout without the protocol key
    order: int
    queues: int
    persistent: bool
    store: str  # "shm" | "disk"

    @property
    def id(self) -> str:
        return f"{self.abi}-o{self.order}-q{self.queues}-{'pers' if self.persistent else 'copy'}-{self.store}"


CASES = [
    Case("x86_64", 0, 1, True, "shm"),
    Case("x86_64", 2, 2, False, "disk"),
    Case("x86_32", 0, 2, True, "disk"),
    Case("x86_32", 2, 1, False, "shm"),
    Case("none", 0, 1, False, "disk"),
    Case("none", 2, 2, True, "shm"),
    Case("x86_64", 2, 2, True, "disk"),
    Case("x86_32", 2, 2, True, "shm"),
]


def test_cases_cover_every_pair() -> None:
    dims = [("x86_64", "x86_32", "none"), (0, 2), (1, 2), (True, False), ("shm", "disk")]
    rows = [(c.abi, c.order, c.queues, c.persistent, c.store) for c in CASES]
    for (i, a), (j, b) in itertools.combinations(enumerate(dims), 2):
        for va, vb in itertools.product(a, b):
            assert any(r[i] == va and r[j] == vb for r in rows), f"no case has {va!r} with {vb!r}"


async def sweep(d: Disk, shadow: Shadow) -> None:
    """Each size written once at its own place (sub-page offsets too), then read back."""
    assert d.info is not None
    off = 0
    placed: list[tuple[int, int]] = []
    for i, size in enumerate(SWEEP_SIZES):
        off += (i % 3) * SECTOR  # some requests start mid-page in the image
        data = bytes((i * 37 + k) & 0xFF for k in range(256)) * (size // 256) + bytes(size % 256)
        await d.front.write(off // SECTOR, data)
        shadow.write(off, data)
        placed.append((off, size))
        off += size
    assert off <= d.info.size_bytes
    for off, size in placed:
        got = await d.front.read(off // SECTOR, size)
        assert got == bytes(shadow.data[off:off + size]), f"read of {size} B at {off} differs"


def engine_of(log: str, image: Path) -> tuple[bool, bool]:
    """(threaded, direct_io) the daemon logged when it realized this image."""
    for line in reversed(log.splitlines()):
        if "msg=realized" in line and str(image) in line:
            t = re.search(r"threaded=(\w+)", line)
            dio = re.search(r"direct_io=(\w+)", line)
            assert t and dio, line
            return t.group(1) == "True", dio.group(1) == "True"
    raise AssertionError(f"no realized line for {image}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_integrity(case: Case, shared_bed: Bed, shm_dir: Path, tmp_path: Path) -> None:
    bed = shared_bed
    image = make_image((shm_dir if case.store == "shm" else tmp_path) / "disk.img", IMAGE_SIZE)
    shadow = Shadow(image.read_bytes())
    d = await bed.disk(image, abi="x86_32" if case.abi == "none" else case.abi,
                       write_protocol=case.abi != "none", ring_page_order=case.order, queues=case.queues,
                       persistent=case.persistent)
    info = d.info
    assert info is not None
    assert (info.sectors * SECTOR, info.ring_page_order, info.queues, info.persistent) == \
        (IMAGE_SIZE, case.order, case.queues, case.persistent)
    assert info.flush and info.max_indirect_segments >= 256
    fe_protocol = await d.xs.read_str(f"{d.front.fe_path}/protocol")
    assert fe_protocol == (None if case.abi == "none" else d.front.abi.name)

    threaded, direct = engine_of(bed.serve.log_text(), image)
    assert (threaded, direct) == ((False, False) if case.store == "shm" else (True, True))

    await sweep(d, shadow)
    # Bounded by the op count, not the clock: a loaded CI machine must not turn coverage into a flake.
    res = await random_verified(d.front, shadow, seconds=30.0, max_ops=160, depth=4, seed=zlib.crc32(case.id.encode()))
    assert not res.mismatches, res.mismatches[:5]
    assert res.writes > 10 and res.reads > 10 and res.flushes >= 1, res.summary()
    await d.front.flush()
    assert image.read_bytes() == bytes(shadow.data), "the image file differs from what the guest wrote"
    assert not await full_compare(d.front, shadow)
    assert await bed.serve.errors(d.domid) == {}
    assert d.front.spurious_responses == 0
    # The frontend notifies as Linux's does, and the backend as Linux's: no notification may have gone missing
    # (the disk's monitor would have recovered it and counted it: backends/blk/stallwatch.py).
    text = await bed.serve.metrics()
    assert (status_metric(text, d.domid, "stall_kicks"), status_metric(text, d.domid, "stall_notifies")) == (0, 0)
