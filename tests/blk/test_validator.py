"""The C copy-out + validator (csrc/blkif.c) over raw slot bytes, both ABIs, every malformed class."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.native import ffi, lib

from . import wire
from .wire import X86_32, X86_64

ABIS = st.sampled_from([X86_32, X86_64])
DISK_SECTORS = 1 << 20  # 512 MiB


def disk(**kw: Any) -> Any:
    d = ffi.new("struct pv_blkif_disk *")
    d.sectors = kw.get("sectors", DISK_SECTORS)
    d.sector_size = kw.get("sector_size", 512)
    d.max_indirect_segments = kw.get("max_indirect", 256)
    d.readonly = kw.get("readonly", 0)
    d.can_flush = kw.get("flush", 1)
    d.can_barrier = kw.get("barrier", 1)
    d.can_discard = kw.get("discard", 1)
    d.can_secure_discard = kw.get("secure", 0)
    return d


def check(abi: int, slot: bytes, d: Any | None = None) -> tuple[int, Any]:
    assert len(slot) == wire.SLOT[abi]
    out = ffi.new("struct pv_blkif_req *")
    rc = int(lib.pv_blkif_copy_validate(abi, slot, d if d is not None else disk(), out))
    return rc, out


def seg_lists(min_size: int = 1, max_size: int = 11) -> st.SearchStrategy[list[wire.Seg]]:
    seg = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 7), st.integers(0, 7)).map(
        lambda t: (t[0], min(t[1], t[2]), max(t[1], t[2]))
    )
    return st.lists(seg, min_size=min_size, max_size=max_size)


@given(ABIS, st.sampled_from([0, 1]), st.integers(0, 2**64 - 1), seg_lists(), st.integers(0, DISK_SECTORS))
def test_valid_rw_accepted_and_fields_copied(abi: int, op: int, rid: int, segs: list[wire.Seg], sector: int) -> None:
    total = sum(la - f + 1 for _, f, la in segs)
    sector = min(sector, DISK_SECTORS - total)
    rc, out = check(abi, wire.rw(abi, op, rid, sector, segs, handle=0x1234))
    assert rc == lib.PV_BLKIF_OK
    assert (out.id, out.sector_number, out.operation, out.op) == (rid, sector, op, op)
    assert out.nr_segments == len(segs) and out.handle == 0x1234 and out.nr_sectors == total
    assert [(out.seg[i].gref, out.seg[i].first_sect, out.seg[i].last_sect) for i in range(len(segs))] == segs


@given(ABIS, st.integers(0, 255).filter(lambda op: op > 6), st.integers(0, 2**64 - 1))
def test_unknown_op_is_eopnotsupp(abi: int, op: int, rid: int) -> None:
    rc, out = check(abi, wire.rw(abi, op, rid, 0, [(1, 0, 7)]))
    assert rc == lib.PV_BLKIF_E_BAD_OP
    assert lib.pv_blkif_reason_status(rc) == lib.PV_BLKIF_RSP_EOPNOTSUPP
    assert out.id == rid  # still echoed in the error response


@given(ABIS, st.sampled_from([0, 1]), st.integers(12, 255))
def test_segment_count_bounds(abi: int, op: int, n: int) -> None:
    assert check(abi, wire.rw(abi, op, 1, 0, [(1, 0, 7)], nr_segments=0))[0] == lib.PV_BLKIF_E_NSEG
    assert check(abi, wire.rw(abi, op, 1, 0, [(1, 0, 7)] * 11, nr_segments=n))[0] == lib.PV_BLKIF_E_NSEG
    rc = check(abi, wire.rw(abi, op, 1, 0, [(1, 0, 7)] * 11, nr_segments=11))[0]
    assert rc == lib.PV_BLKIF_OK
    assert lib.pv_blkif_reason_status(lib.PV_BLKIF_E_NSEG) == lib.PV_BLKIF_RSP_ERROR


@given(ABIS, st.sampled_from([2, 3]))
def test_flush_and_barrier_allow_zero_segments(abi: int, op: int) -> None:
    rc, out = check(abi, wire.rw(abi, op, 5, 0, [], nr_segments=0))
    assert rc == lib.PV_BLKIF_OK and out.nr_sectors == 0
    off = disk(flush=0, barrier=0)
    assert check(abi, wire.rw(abi, op, 5, 0, [], nr_segments=0), off)[0] == lib.PV_BLKIF_E_UNSUPPORTED


@pytest.mark.parametrize("abi", [X86_32, X86_64], ids=["x86_32", "x86_64"])
@pytest.mark.parametrize("op", [2, 3], ids=["barrier", "flush"])
@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("sector", [2**64 - 1, 2**64 - 8, DISK_SECTORS, DISK_SECTORS + 3, 5, 0])
def test_empty_flush_and_barrier_carry_no_range(abi: int, op: int, sector_size: int, sector: int) -> None:
    """Linux blkfront sends an empty flush/barrier with the block layer's sector_number of (sector_t)-1; with no
    segments there is no range to check (Linux blkback checks it only when there are sectors), on 512- and
    4096-byte disks alike.  Refusing it made blkfront turn flushes off for good."""
    d = disk(sector_size=sector_size)
    rc, out = check(abi, wire.rw(abi, op, 77, sector, [], nr_segments=0), d)
    assert (rc, out.nr_sectors, out.sector_number, out.id) == (lib.PV_BLKIF_OK, 0, sector, 77)
    assert lib.pv_blkif_reason_status(rc) == lib.PV_BLKIF_RSP_OKAY


@pytest.mark.parametrize("abi", [X86_32, X86_64], ids=["x86_32", "x86_64"])
@pytest.mark.parametrize("op", [2, 3], ids=["barrier", "flush"])
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_flush_and_barrier_with_data_keep_their_range(abi: int, op: int, sector_size: int) -> None:
    """With segments the request writes data: its range and alignment are checked like a write's."""
    d = disk(sector_size=sector_size)
    assert check(abi, wire.rw(abi, op, 1, 2**64 - 8, [(3, 0, 7)]), d)[0] == lib.PV_BLKIF_E_OVERFLOW
    assert check(abi, wire.rw(abi, op, 1, DISK_SECTORS, [(3, 0, 7)]), d)[0] == lib.PV_BLKIF_E_RANGE
    assert check(abi, wire.rw(abi, op, 1, DISK_SECTORS - 8, [(3, 0, 7)]), d)[0] == lib.PV_BLKIF_OK
    misaligned = check(abi, wire.rw(abi, op, 1, 4, [(3, 0, 7)]), d)[0]
    assert misaligned == (lib.PV_BLKIF_E_ALIGN if sector_size == 4096 else lib.PV_BLKIF_OK)


def shape_name(index: int) -> str:
    buf = ffi.new("char[]", 64)
    assert lib.pv_blkif_shape_name(index, buf, 64) > 0
    return str(ffi.string(buf).decode())


def shape_of(abi: int, slot: bytes, segs: list[wire.Seg] | None = None, **kw: Any) -> str:
    d = disk(**kw)
    out = ffi.new("struct pv_blkif_req *")
    assert lib.pv_blkif_parse(abi, slot, out) == lib.PV_BLKIF_OK
    if segs is None:
        return shape_name(int(lib.pv_blkif_shape(d, out, out.seg, min(out.nr_segments, 11))))
    c = ffi.new("struct pv_blkif_segment[]", [{"gref": g, "first_sect": f, "last_sect": la} for g, f, la in segs])
    return shape_name(int(lib.pv_blkif_shape(d, out, c, len(segs))))


@pytest.mark.parametrize("abi", [X86_32, X86_64], ids=["x86_32", "x86_64"])
def test_request_shapes(abi: int) -> None:
    full, sub = (1, 0, 7), (1, 0, 0)
    assert shape_of(abi, wire.rw(abi, 3, 1, 2**64 - 1, [], nr_segments=0)) == "flush/0/max/-"
    assert shape_of(abi, wire.rw(abi, 2, 1, 2**64 - 1, [], nr_segments=0)) == "barrier/0/max/-"
    assert shape_of(abi, wire.rw(abi, 0, 1, 0, [sub])) == "read/1/zero/sub"
    assert shape_of(abi, wire.rw(abi, 1, 1, 8, [full] * 3)) == "write/2-11/inside/full"
    assert shape_of(abi, wire.rw(abi, 1, 1, 8, [full, sub])) == "write/2-11/inside/sub"
    assert shape_of(abi, wire.rw(abi, 2, 1, DISK_SECTORS, [full])) == "barrier/1/beyond/full"
    assert shape_of(abi, wire.discard(abi, 1, 16, 8)) == "discard/0/inside/-"
    assert shape_of(abi, wire.discard(abi, 1, 16, 8, flag=1)) == "discard-secure/0/inside/-"
    assert shape_of(abi, wire.indirect(abi, 0, 1, 64, 40, [9]), [full] * 40) == "indirect-read/12+/inside/full"
    assert shape_of(abi, wire.indirect(abi, 1, 1, 64, 12, [9]), []) == "indirect-write/12+/inside/-"
    assert shape_of(abi, wire.indirect(abi, 3, 1, 64, 12, [9]), []) == "other/12+/inside/-"
    assert shape_of(abi, wire.rw(abi, 9, 1, 8, [full])) == "other/1/inside/full"


def test_shape_names_are_distinct_and_bounded() -> None:
    names = [shape_name(i) for i in range(lib.PV_BLKIF_NR_SHAPES)]
    assert len(set(names)) == lib.PV_BLKIF_NR_SHAPES
    buf = ffi.new("char[]", 64)
    assert lib.pv_blkif_shape_name(lib.PV_BLKIF_NR_SHAPES, buf, 64) == -1
    assert lib.pv_blkif_shape_name(0, buf, 4) == -1  # "read/0/zero/-" does not fit


@given(ABIS, st.integers(0, 10), st.integers(1, 7), st.integers(0, 7))
def test_first_after_last(abi: int, pos: int, first: int, delta: int) -> None:
    last = max(0, first - 1 - delta % first)
    segs = [(9, 0, 7)] * 11
    segs[pos] = (9, first, last)
    assert check(abi, wire.rw(abi, 0, 1, 0, segs))[0] == lib.PV_BLKIF_E_SECT_ORDER


@given(ABIS, st.integers(0, 10), st.integers(8, 255))
def test_last_beyond_page(abi: int, pos: int, last: int) -> None:
    segs = [(9, 0, 7)] * 11
    segs[pos] = (9, 0, last)
    assert check(abi, wire.rw(abi, 1, 1, 0, segs))[0] == lib.PV_BLKIF_E_SECT_PAGE


@given(ABIS, st.sampled_from([0, 1]), seg_lists(), st.integers(0, 2**64 - 1))
def test_range_end_and_wrap(abi: int, op: int, segs: list[wire.Seg], sector: int) -> None:
    total = sum(la - f + 1 for _, f, la in segs)
    rc = check(abi, wire.rw(abi, op, 1, sector, segs))[0]
    if sector + total >= 2**64:
        assert rc == lib.PV_BLKIF_E_OVERFLOW
    elif sector + total > DISK_SECTORS:
        assert rc == lib.PV_BLKIF_E_RANGE
    else:
        assert rc == lib.PV_BLKIF_OK


@pytest.mark.parametrize("abi", [X86_32, X86_64])
def test_exact_end_and_wrap_edges(abi: int) -> None:
    assert check(abi, wire.rw(abi, 0, 1, DISK_SECTORS - 8, [(1, 0, 7)]))[0] == lib.PV_BLKIF_OK
    assert check(abi, wire.rw(abi, 0, 1, DISK_SECTORS - 7, [(1, 0, 7)]))[0] == lib.PV_BLKIF_E_RANGE
    assert check(abi, wire.rw(abi, 0, 1, 2**64 - 8, [(1, 0, 7)]))[0] == lib.PV_BLKIF_E_OVERFLOW
    # A disk that claims 2^64-1 sectors: wrap must still be caught, not compared after overflow.
    big = disk(sectors=2**64 - 1)
    assert check(abi, wire.rw(abi, 0, 1, 2**64 - 4, [(1, 0, 7)]), big)[0] == lib.PV_BLKIF_E_OVERFLOW


@given(ABIS, st.sampled_from([0, 1]), st.integers(0, DISK_SECTORS // 8 - 2), st.integers(0, 7), st.integers(0, 7))
def test_alignment_4096(abi: int, op: int, block: int, first: int, last: int) -> None:
    first, last = min(first, last), max(first, last)
    d = disk(sector_size=4096)
    aligned = check(abi, wire.rw(abi, op, 1, block * 8, [(1, 0, 7), (2, 0, 7)]), d)[0]
    assert aligned == lib.PV_BLKIF_OK
    rc = check(abi, wire.rw(abi, op, 1, block * 8 + 1, [(1, 0, 7)]), d)[0]
    assert rc == lib.PV_BLKIF_E_ALIGN
    rc = check(abi, wire.rw(abi, op, 1, block * 8, [(1, first, last)]), d)[0]
    assert rc == (lib.PV_BLKIF_OK if (first, last) == (0, 7) else lib.PV_BLKIF_E_ALIGN)


@given(ABIS, st.sampled_from([1, 2, 3]))
def test_writes_to_readonly_refused(abi: int, op: int) -> None:
    ro = disk(readonly=1)
    assert check(abi, wire.rw(abi, op, 1, 0, [(1, 0, 7)]), ro)[0] == lib.PV_BLKIF_E_READONLY
    assert check(abi, wire.discard(abi, 1, 0, 8), ro)[0] == lib.PV_BLKIF_E_READONLY
    assert check(abi, wire.indirect(abi, 1, 1, 0, 20, [3]), ro)[0] == lib.PV_BLKIF_E_READONLY
    assert check(abi, wire.rw(abi, 0, 1, 0, [(1, 0, 7)]), ro)[0] == lib.PV_BLKIF_OK
    assert check(abi, wire.indirect(abi, 0, 1, 0, 20, [3]), ro)[0] == lib.PV_BLKIF_OK


@given(ABIS, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.sampled_from([0, 1]))
def test_discard_ranges(abi: int, sector: int, nr: int, flag: int) -> None:
    rc, out = check(abi, wire.discard(abi, 77, sector, nr, flag), disk(secure=1))
    if sector + nr >= 2**64:
        assert rc == lib.PV_BLKIF_E_OVERFLOW
    elif sector + nr > DISK_SECTORS:
        assert rc == lib.PV_BLKIF_E_RANGE
    else:
        assert rc == lib.PV_BLKIF_OK
        assert (out.id, out.sector_number, out.nr_sectors, out.flag) == (77, sector, nr, flag)


@pytest.mark.parametrize("abi", [X86_32, X86_64])
def test_discard_feature_and_secure(abi: int) -> None:
    assert check(abi, wire.discard(abi, 1, 0, 8), disk(discard=0))[0] == lib.PV_BLKIF_E_UNSUPPORTED
    assert check(abi, wire.discard(abi, 1, 0, 8, flag=1), disk(secure=0))[0] == lib.PV_BLKIF_E_UNSUPPORTED
    assert check(abi, wire.discard(abi, 1, 1, 8), disk(sector_size=4096))[0] == lib.PV_BLKIF_E_ALIGN
    assert check(abi, wire.rw(abi, 4, 1, 0, [(1, 0, 7)]))[0] == lib.PV_BLKIF_E_UNSUPPORTED  # RESERVED_1


@given(ABIS, st.integers(0, 2**16 - 1), st.integers(0, 255))
def test_indirect_header(abi: int, nseg: int, iop: int) -> None:
    rc, out = check(abi, wire.indirect(abi, iop, 42, 8, nseg, [5, 6, 7]), disk(max_indirect=256))
    if iop not in (0, 1):
        assert rc == lib.PV_BLKIF_E_INDIRECT_OP
    elif not 1 <= nseg <= 256:
        assert rc == lib.PV_BLKIF_E_INDIRECT_NSEG
    else:
        assert rc == lib.PV_BLKIF_OK
        assert out.indirect == 1 and out.op == iop and out.operation == 6 and out.id == 42
        assert out.nr_indirect_pages == (nseg + 511) // 512
        assert list(out.indirect_grefs)[:3] == [5, 6, 7]


@pytest.mark.parametrize("abi", [X86_32, X86_64])
def test_indirect_limits(abi: int) -> None:
    assert check(abi, wire.indirect(abi, 0, 1, 0, 1, [1]), disk(max_indirect=0))[0] == lib.PV_BLKIF_E_UNSUPPORTED
    big = disk(max_indirect=4096)
    assert check(abi, wire.indirect(abi, 0, 1, 0, 4096, [1] * 8), big)[0] == lib.PV_BLKIF_OK
    assert check(abi, wire.indirect(abi, 0, 1, 0, 4097, [1] * 8), big)[0] == lib.PV_BLKIF_E_INDIRECT_NSEG
    assert check(abi, wire.indirect(abi, 2, 1, 0, 4, [1]))[0] == lib.PV_BLKIF_E_INDIRECT_OP


@given(seg_lists(1, 300), st.integers(0, DISK_SECTORS))
def test_indirect_segments_second_stage(segs: list[wire.Seg], sector: int) -> None:
    d = disk()
    req = ffi.new("struct pv_blkif_req *")
    req.sector_number = sector
    arr = ffi.new("struct pv_blkif_segment[]", len(segs))
    for i, (g, f, la) in enumerate(segs):
        arr[i].gref, arr[i].first_sect, arr[i].last_sect = g, f, la
    total = sum(la - f + 1 for _, f, la in segs)
    rc = int(lib.pv_blkif_validate_segments(d, req, arr, len(segs)))
    assert rc == (lib.PV_BLKIF_OK if sector + total <= DISK_SECTORS else lib.PV_BLKIF_E_RANGE)
    if rc == lib.PV_BLKIF_OK:
        assert req.nr_sectors == total
    arr[len(segs) - 1].last_sect = 9
    assert int(lib.pv_blkif_validate_segments(d, req, arr, len(segs))) == lib.PV_BLKIF_E_SECT_PAGE


@settings(max_examples=400)
@given(ABIS, st.binary(min_size=112, max_size=112), st.booleans())
def test_fuzz_random_slots(abi: int, raw: bytes, ro: bool) -> None:
    slot = raw[: wire.SLOT[abi]]
    rc, out = check(abi, slot, disk(readonly=int(ro)))
    assert 0 <= rc < lib.PV_BLKIF_NR_REASONS
    if rc == lib.PV_BLKIF_OK:
        # whatever got through is within every bound
        assert out.operation in (0, 1, 2, 3, 5, 6)
        if out.operation == 5:
            assert out.sector_number + out.nr_sectors <= DISK_SECTORS
        elif out.operation != 6:
            assert out.nr_sectors == 0 or out.sector_number + out.nr_sectors <= DISK_SECTORS
            assert out.nr_segments <= 11
    status = int(lib.pv_blkif_reason_status(rc))
    buf = ffi.new("uint8_t[]", b"\xaa" * 32)
    size = int(lib.pv_blkif_make_response(abi, buf, out.id, out.operation, status))
    assert size == wire.RSP[abi]
    data = bytes(ffi.buffer(buf, 32))
    assert wire.response(abi, data[:size]) == (out.id, out.operation, status)
    assert data[size:] == b"\xaa" * (32 - size)  # nothing written past the response


def test_response_layout_exact() -> None:
    buf = ffi.new("uint8_t[]", b"\xff" * 16)
    lib.pv_blkif_make_response(X86_64, buf, 0x0102030405060708, 6, -2)
    assert bytes(ffi.buffer(buf, 16)) == bytes.fromhex("0807060504030201") + b"\x06\x00\xfe\xff" + b"\0" * 4
    ffi.memmove(buf, b"\xff" * 16, 16)
    lib.pv_blkif_make_response(X86_32, buf, 7, 1, -1)
    assert bytes(ffi.buffer(buf, 16)) == bytes.fromhex("0700000000000000") + b"\x01\x00\xff\xff" + b"\xff" * 4
    assert lib.pv_blkif_make_response(9, buf, 1, 1, 0) == 0


def test_reason_names() -> None:
    names = [ffi.string(lib.pv_blkif_reason_name(i)).decode() for i in range(lib.PV_BLKIF_NR_REASONS)]
    assert len(set(names)) == lib.PV_BLKIF_NR_REASONS and names[0] == "ok"
    from backends.blk.dataplane import REASONS

    assert tuple(names) == REASONS
