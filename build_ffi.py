"""Builds backends._native from csrc/ with cffi in out-of-line API mode.

Each csrc/<name>.cdef declares what Python may call from csrc/<name>.h; every csrc/*.c is compiled in.
The build needs no Xen libraries: the real-Xen shims load libxengnttab/libxenevtchn with dlopen at run time.
Run directly (`python build_ffi.py`) to build in place; setup.py uses `ffibuilder` for wheels.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _have_liburing() -> bool:
    return Path("/usr/include/liburing.h").exists() and ctypes.util.find_library("uring") is not None


def _make_builder(absolute: bool) -> FFI:
    ffi = FFI()
    cdefs = sorted(CSRC.glob("*.cdef"))
    ffi.cdef("\n".join(p.read_text() for p in cdefs))
    headers = "\n".join(f'#include "{p.stem}.h"' for p in cdefs)
    # setuptools wants paths relative to setup.py; a direct compile runs in a temporary directory.
    sources = sorted(str(p if absolute else p.relative_to(ROOT)) for p in CSRC.glob("*.c"))
    libraries = ["pthread"]
    define_macros: list[tuple[str, str | None]] = [("_GNU_SOURCE", None)]
    if _have_liburing() and os.environ.get("PVBACK_NO_URING") != "1":
        libraries.append("uring")
        define_macros.append(("PVBACK_HAVE_URING", "1"))
    ffi.set_source(
        "backends._native",
        headers,
        sources=sources,
        include_dirs=[str(CSRC)],
        libraries=libraries,
        define_macros=define_macros,
        extra_compile_args=["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    )
    return ffi


ffibuilder = _make_builder(absolute=__name__ == "__main__")

if __name__ == "__main__":
    os.chdir(ROOT)
    built = ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose="-v" in sys.argv)
    # compile() leaves the module in tmpdir/backends; install it next to the package sources.
    target = ROOT / "backends" / Path(built).name
    os.replace(built, target)
