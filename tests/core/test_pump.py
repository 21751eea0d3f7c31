"""csrc/pump.c, the poll loop every pump thread runs, driven from C with real fds (its handlers are C
function pointers: blk's queue handlers, later a tap's and a swtpm socket's)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_pump_loop(tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler (./dev installs gcc)")
    exe = tmp_path / "pump_check"
    subprocess.run([cc, "-O1", "-Wall", "-Werror", "-std=gnu11", f"-I{ROOT / 'csrc'}", "-o", str(exe),
                    str(Path(__file__).with_name("pump_check.c")), str(ROOT / "csrc" / "pump.c")], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and lines and all(ln.startswith("PASS") for ln in lines), out.stdout + out.stderr
    assert len(lines) == 4
