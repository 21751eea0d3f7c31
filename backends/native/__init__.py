"""L1: the only importer of the cffi module backends._native.

Everything above L1 uses the typed wrappers in this package (ring, grants, events); `ffi`/`lib` are
re-exported for the data-path modules that hand C buffers to each other.
"""

from __future__ import annotations

from typing import Any

try:
    from backends._native import ffi as _ffi
    from backends._native import lib as _lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "backends._native is not built: run `./dev build` (or `python build_ffi.py`) first"
    ) from exc

ffi: Any = _ffi
lib: Any = _lib

__all__ = ["ffi", "lib"]
