"""Verified block workloads for an emulated blkfront: random writes and reads across sizes, checked against a
shadow copy of what the disk must hold.  Used by `pvback demo`, `pvback guest` and the integrity tests.

Concurrency without ambiguity: each of the `depth` workers owns a disjoint stripe of the disk, so requests in
flight never overlap and the shadow copy is exact at every moment.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from backends.guests.blkfront import BlkFront

SECTOR = 512


@dataclass
class WorkloadResult:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ops(self) -> int:
        return self.reads + self.writes + self.flushes + self.discards

    def summary(self) -> str:
        rate = self.ops / self.seconds if self.seconds else 0.0
        mb = (self.bytes_read + self.bytes_written) / 1e6
        return (f"{self.writes} writes, {self.reads} reads, {self.flushes} flushes, {self.discards} discards; "
                f"{mb:.1f} MB in {self.seconds:.2f} s ({rate:.0f} ops/s)")


class Shadow:
    """What the disk must contain, byte for byte."""

    def __init__(self, initial: bytes) -> None:
        self.data = bytearray(initial)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

    def discard(self, offset: int, length: int) -> None:
        # After a discard the content is unspecified unless the driver guarantees zeroes; tests that check
        # discard read the range back and accept zeroes only when the backend promised them.
        self.data[offset:offset + length] = bytes(length)


DEFAULT_SIZES = (512, 4096, 8192, 16384, 45056, 65536, 131072, 1 << 20)


async def linux_mix(front: BlkFront, shadow: Shadow, result: WorkloadResult) -> None:
    """The request shapes a Linux guest's xen-blkfront sends over a disk's life, in a few requests: the
    partition scan's reads at sector 0 (one page, a readahead window), writes at sector 0 (a filesystem's
    superblock), sub-page I/O, a FUA write, an empty flush (sector (sector_t)-1) and a discard.  Whatever
    `tests/blk/fixtures/linux-blkfront-shapes.json` records from a real Linux guest must be among these
    (tests/system/test_linux_shapes.py).  Sequential, before any worker starts; keeps `shadow` exact."""
    info = front.info
    assert info is not None
    align = max(SECTOR, info.sector_size)
    max_bytes = 4096 * max(11, info.max_indirect_segments)
    sizes = [n for n in (4096, 32768, 131072) if n <= min(info.size_bytes, max_bytes)]
    rng = random.Random(0x11)

    async def write(off: int, data: bytes, *, fua: bool = False) -> None:
        await front.write(off // SECTOR, data, fua=fua)
        shadow.write(off, data)
        result.writes += 1
        result.bytes_written += len(data)

    async def read(off: int, n: int) -> None:
        got = await front.read(off // SECTOR, n)
        result.reads += 1
        result.bytes_read += n
        if got != shadow.data[off:off + n]:
            result.mismatches.append(f"linux mix: read of {n} bytes at {off} differs from what was written")

    for n in sizes:
        await read(0, n)
    if align == SECTOR and info.size_bytes >= 3 * 4096:
        await read(4096 + SECTOR, SECTOR)  # a sub-page read: O_DIRECT or a 512-byte block size
    if info.readonly:
        return
    for n in sizes:
        await write(0, rng.randbytes(n))
    if align == SECTOR and info.size_bytes >= 3 * 4096:
        await write(4096 + 2 * SECTOR, rng.randbytes(SECTOR))
    if info.size_bytes >= 3 * 4096:
        await write(2 * 4096, rng.randbytes(4096), fua=info.flush or info.barrier)
    if info.flush or info.barrier:
        await front.flush()
        result.flushes += 1
    if info.discard and info.size_bytes >= 3 * 4096:
        await front.discard(4096 // SECTOR, 4096 // SECTOR)
        result.discards += 1
        await write(4096, rng.randbytes(4096))  # whatever a discard leaves, the shadow is exact again


async def random_verified(front: BlkFront, shadow: Shadow, *, seconds: float = 2.0, max_ops: int = 2000,
                          depth: int = 8, sizes: tuple[int, ...] = DEFAULT_SIZES, seed: int = 1,
                          write_ratio: float = 0.5, flush_every: int = 64, linux: bool = True) -> WorkloadResult:
    """Random reads and writes, each read checked against the shadow; a flush every `flush_every` writes.
    `linux`: first send the request shapes a Linux guest sends (`linux_mix`)."""
    assert front.info is not None
    disk = front.info.size_bytes
    align = max(SECTOR, front.info.sector_size)
    result = WorkloadResult()
    if linux:
        await linux_mix(front, shadow, result)
    stripe = (disk // depth) // align * align
    usable = [s for s in sizes if s % align == 0 and s <= stripe
              and (-(-s // 4096) <= 11 or -(-s // 4096) <= front.info.max_indirect_segments)]
    if not usable:
        raise ValueError("no request size fits this disk")
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    budget = [max_ops]

    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        base = w * stripe
        while budget[0] > 0 and time.monotonic() < deadline:
            budget[0] -= 1
            size = rng.choice(usable)
            off = base + rng.randrange(0, (stripe - size) // align + 1) * align
            if rng.random() < write_ratio and not front.info.readonly:  # type: ignore[union-attr]
                data = rng.randbytes(size)
                await front.write(off // SECTOR, data)
                shadow.write(off, data)
                result.writes += 1
                result.bytes_written += size
                if flush_every and result.writes % flush_every == 0 and front.info.flush:  # type: ignore[union-attr]
                    await front.flush()
                    result.flushes += 1
            else:
                got = await front.read(off // SECTOR, size)
                result.reads += 1
                result.bytes_read += size
                if got != shadow.data[off:off + size]:
                    result.mismatches.append(f"read of {size} bytes at {off} differs from what was written")

    await asyncio.gather(*(worker(w) for w in range(depth)))
    if front.info.flush:
        await front.flush()
        result.flushes += 1
    result.seconds = time.monotonic() - started
    return result


async def full_compare(front: BlkFront, shadow: Shadow, chunk: int = 1 << 20) -> list[str]:
    """Read the whole disk through the frontend and compare with the shadow."""
    assert front.info is not None
    bad: list[str] = []
    disk = front.info.size_bytes
    step = min(chunk, 4096 * max(11, front.info.max_indirect_segments))
    for off in range(0, disk, step):
        n = min(step, disk - off)
        got = await front.read(off // SECTOR, n)
        if got != shadow.data[off:off + n]:
            bad.append(f"disk bytes {off}..{off + n} differ")
    return bad
