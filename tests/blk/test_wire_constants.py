"""The emulated guest (backends.guests) spells the wire constants itself, as a foreign frontend built from
Xen's headers would; the backend takes them from csrc/blkif.h (checked against backends.blk.proto at import,
backends/blk/dataplane.py).  Here the two independent copies are compared."""

from __future__ import annotations

from backends.blk import proto
from backends.guests import blkfront, guest
from backends.native import ffi, lib


def test_guest_operations_and_statuses_match_the_backend() -> None:
    for name in ("OP_READ", "OP_WRITE", "OP_WRITE_BARRIER", "OP_FLUSH_DISKCACHE", "OP_DISCARD", "OP_INDIRECT",
                 "RSP_OKAY", "RSP_ERROR", "RSP_EOPNOTSUPP"):
        assert getattr(blkfront, name) == getattr(lib, f"PV_BLKIF_{name}"), name


def test_guest_limits_match_the_backend() -> None:
    assert blkfront.MAX_SEGMENTS == lib.PV_BLKIF_MAX_SEGMENTS_PER_REQUEST
    assert blkfront.MAX_INDIRECT_PAGES == lib.PV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
    assert blkfront.SEGS_PER_INDIRECT_PAGE == lib.PV_BLKIF_SEGS_PER_INDIRECT_FRAME
    assert blkfront.SECTOR == proto.SECTOR
    assert guest.PAGE_SIZE == blkfront.PAGE == lib.PV_PAGE_SIZE
    assert ffi.sizeof("struct pv_grant_entry_v1") == guest.GNT_ENTRY_SIZE


def test_guest_layouts_match_the_backend() -> None:
    for name, abi in blkfront.ABIS.items():
        assert abi.slot == proto.SLOT_SIZE[name], name
        assert abi.rsp_size == proto.RSP_SIZE[name], name
