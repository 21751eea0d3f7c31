"""The committed stubs of the cffi modules (backends/_native.pyi, backends/_guest_native.pyi) are what
build_ffi.py generates from the cdefs today: a cdef changed without a rebuild fails here, not in mypy's silence."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _build_ffi() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pvback_build_ffi", ROOT / "build_ffi.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("which", ["backend_module", "guest_module"])
def test_committed_stub_matches_the_cdefs(which: str) -> None:
    b = _build_ffi()
    mod = getattr(b, which)()
    assert mod.stub_path.read_text() == b.stub_text(mod), (
        f"{mod.stub_path.relative_to(ROOT)} is stale: run `python build_ffi.py` and commit the stub")


def test_stub_declares_what_the_module_has() -> None:
    """Every function and constant the built module exposes is in its stub, and nothing else."""
    import backends._guest_native
    import backends._native

    b = _build_ffi()
    for name, built in [("backend_module", backends._native), ("guest_module", backends._guest_native)]:
        text = getattr(b, name)().stub_path.read_text()
        lib_part = text[text.index("class _Lib:"):]
        declared = {m.group(1) for m in re.finditer(r"^    (?:def )?(\w+)[(:]", lib_part, re.M)}
        assert declared == set(dir(built.lib)), name
