"""Bare eventfd ping-pong round trip between two processes (perf/eventfd_pingpong.c): the baseline the
project's kick -> response latency is compared to.  Both sides pinned to one CPU, and across two CPUs.

Run: `.venv/bin/python -m pytest perf/bench_event.py -q -s`.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from perf._build import build


@dataclass(frozen=True)
class Rtt:
    mode: str
    rounds: int
    p50_us: float
    p99_us: float
    p999_us: float
    min_us: float
    mean_us: float


def cpu_modes() -> dict[str, tuple[int, int]]:
    """{mode: (parent cpu, child cpu)}: the same CPU, and two different CPUs when this process may use two."""
    cpus = sorted(os.sched_getaffinity(0))
    modes = {"same-cpu": (cpus[0], cpus[0])}
    if len(cpus) >= 2:
        modes["cross-cpu"] = (cpus[0], cpus[1])
    return modes


def pingpong(mode: str, rounds: int, *, warmup: int | None = None, out_dir: Path | None = None) -> Rtt:
    parent, child = cpu_modes()[mode]
    exe = build("eventfd_pingpong", out_dir=out_dir)
    warm = rounds // 20 + 10 if warmup is None else warmup
    proc = subprocess.run(
        [str(exe), str(rounds), str(warm), str(parent), str(child)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    f = dict(kv.split("=", 1) for kv in proc.stdout.split())
    return Rtt(
        mode, int(f["rounds"]), float(f["p50_us"]), float(f["p99_us"]), float(f["p999_us"]),
        float(f["min_us"]), float(f["mean_us"]),
    )


ROUNDS = 50_000


@pytest.mark.parametrize("mode", ["same-cpu", "cross-cpu"])
def test_eventfd_rtt(benchmark: Any, mode: str) -> None:
    if mode not in cpu_modes():
        pytest.skip("this process may use only one CPU")
    result: list[Rtt] = []
    benchmark.pedantic(lambda: result.append(pingpong(mode, ROUNDS)), rounds=1, iterations=1)
    r = result[0]
    benchmark.extra_info.update(p50_us=r.p50_us, p99_us=r.p99_us, p999_us=r.p999_us, min_us=r.min_us)
    print(
        f"\neventfd RTT {mode} ({r.rounds} round trips): p50 {r.p50_us:.2f} us, p99 {r.p99_us:.2f} us,"
        f" p99.9 {r.p999_us:.2f} us, min {r.min_us:.2f} us"
    )
