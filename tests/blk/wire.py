"""blkif requests/responses packed with `struct`, from the official layouts (reference/xen-layouts.txt),
independently of csrc/blkif.h, so tests check the C against the headers rather than against itself."""

from __future__ import annotations

import struct

X86_64 = 2
X86_32 = 1
SLOT = {X86_64: 112, X86_32: 108}
RSP = {X86_64: 16, X86_32: 12}

Seg = tuple[int, int, int]  # gref, first_sect, last_sect


def _segs(segs: list[Seg]) -> bytes:
    out = b"".join(struct.pack("<IBBH", g, f, la, 0) for g, f, la in segs[:11])
    return out.ljust(88, b"\0")


def rw(
    abi: int, op: int, rid: int, sector: int, segs: list[Seg], *, nr_segments: int | None = None, handle: int = 0
) -> bytes:
    n = len(segs) if nr_segments is None else nr_segments
    if abi == X86_64:
        head = struct.pack("<BBHIQQ", op, n, handle, 0, rid, sector)
    else:
        head = struct.pack("<BBHQQ", op, n, handle, rid, sector)
    return (head + _segs(segs)).ljust(SLOT[abi], b"\0")


def discard(abi: int, rid: int, sector: int, nr: int, flag: int = 0, op: int = 5) -> bytes:
    if abi == X86_64:
        b = struct.pack("<BBHIQQQ", op, flag, 0, 0, rid, sector, nr)
    else:
        b = struct.pack("<BBHQQQ", op, flag, 0, rid, sector, nr)
    return b.ljust(SLOT[abi], b"\0")


def indirect(abi: int, iop: int, rid: int, sector: int, nseg: int, grefs: list[int], handle: int = 0) -> bytes:
    g = (list(grefs) + [0] * 8)[:8]
    if abi == X86_64:
        b = struct.pack("<BBHIQQHH8II", 6, iop, nseg, 0, rid, sector, handle, 0, *g, 0)
    else:
        b = struct.pack("<BBHQQHH8IQ", 6, iop, nseg, rid, sector, handle, 0, *g, 0)
    assert len(b) == 64
    return b.ljust(SLOT[abi], b"\0")


def indirect_page(segs: list[Seg]) -> bytes:
    return b"".join(struct.pack("<IBBH", g, f, la, 0) for g, f, la in segs)


def response(abi: int, data: bytes) -> tuple[int, int, int]:
    """(id, operation, status); also checks the padding is zero."""
    if abi == X86_64:
        rid, op, pad1, status, pad2 = struct.unpack("<QBBhI", data[:16])
        assert pad1 == 0 and pad2 == 0, data.hex()
    else:
        rid, op, pad1, status = struct.unpack("<QBBh", data[:12])
        assert pad1 == 0, data.hex()
    return rid, op, status
