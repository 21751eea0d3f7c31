"""The benchmark code in perf/ works: tiny runs, sane output, no timing asserts (perf/ itself is run with
`.venv/bin/python -m pytest perf -q`)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from perf.bench_event import cpu_modes, pingpong  # noqa: E402
from perf.bench_ring import BATCH, CHUNK, CffiRingLoop, c_loop_rate, measure  # noqa: E402


def test_ring_benchmarks_smoke(tmp_path: Path) -> None:
    loop = CffiRingLoop()
    try:
        moved = loop.run(100)
        # Whole batches, every request answered and taken back by the front: the ring is empty again.
        assert moved == math.ceil(100 / BATCH) * BATCH
        assert loop.front.c.req_prod_pvt == loop.front.c.rsp_cons == moved
        assert loop.back.c.req_cons == loop.back.c.rsp_prod_pvt == moved
    finally:
        loop.close()
    assert c_loop_rate(2 * CHUNK, out_dir=tmp_path) > 0
    r = measure(CHUNK, rounds=1, out_dir=tmp_path)
    assert r.c_slots_per_s > 0 and r.cffi_slots_per_s > 0
    assert math.isfinite(r.ratio) and r.ratio > 0


def test_eventfd_benchmark_smoke(tmp_path: Path) -> None:
    for mode in cpu_modes():
        r = pingpong(mode, 300, warmup=10, out_dir=tmp_path)
        assert r.mode == mode and r.rounds == 300
        assert 0 < r.min_us <= r.p50_us <= r.p99_us <= r.p999_us
        assert r.mean_us >= r.min_us
