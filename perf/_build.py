"""Compile the benchmarks' small C programs at run time (cached by source hash, under build/perf)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
PERF = Path(__file__).resolve().parent


def build(program: str, *, with_ring: bool = False, out_dir: Path | None = None) -> Path:
    """gcc -O2 perf/<program>.c (+ csrc/ring.c) -> an executable; rebuilt only when a source changes."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is required to build the benchmark programs")
    sources = [PERF / f"{program}.c"] + ([CSRC / "ring.c", CSRC / "ring.h"] if with_ring else [])
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    out_dir = out_dir or ROOT / "build" / "perf"
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / f"{program}-{digest}"
    if not exe.exists():
        tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
        cmd = [gcc, "-O2", "-std=gnu11", "-Wall", "-Wextra", f"-I{CSRC}", "-o", str(tmp)]
        cmd += [str(p) for p in sources if p.suffix == ".c"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"building {program} failed:\n{proc.stderr}")
        tmp.replace(exe)  # atomic: concurrent runs never execute a half-written binary
    return exe
