"""L1: the only importer of the cffi module backends._native.

Everything above L1 uses the typed wrappers in this package (ring, grants, events); `ffi`/`lib` are
re-exported for the data-path modules that hand C buffers to each other.  Their types come from
backends/_native.pyi, generated from the cdefs by build_ffi.py: a call with the wrong arguments, a misspelt
function or constant, or a struct field that does not exist is a mypy error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    from backends._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "backends._native is not built: run `./dev build` (or `python build_ffi.py`) first"
    ) from exc

if TYPE_CHECKING:
    from backends._native import (
        CData,
        struct_pv_back_ring,
        struct_pv_blk_pump,
        struct_pv_blk_queue,
        struct_pv_evtchn,
        struct_pv_front_ring,
        struct_pv_gnt,
        struct_pv_io_engine,
    )
else:
    # At run time every cdata is of the one class ffi.CData; the stub's per-struct classes exist for mypy only.
    CData = struct_pv_back_ring = struct_pv_blk_pump = struct_pv_blk_queue = struct_pv_evtchn = \
        struct_pv_front_ring = struct_pv_gnt = struct_pv_io_engine = ffi.CData

__all__ = [
    "CData", "ffi", "lib", "struct_pv_back_ring", "struct_pv_blk_pump", "struct_pv_blk_queue", "struct_pv_evtchn",
    "struct_pv_front_ring",
    "struct_pv_gnt", "struct_pv_io_engine",
]
