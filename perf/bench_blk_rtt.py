"""Kick -> response round trip through blkback (QD1 4 KiB random reads on a tmpfs image; the guest's C loop in
its own process, `pvback serve` in another) next to the bare eventfd ping-pong (perf/eventfd_pingpong.c)
measured in the same run with the same CPU placement.  The target: p50 <= 1.5 x the ping-pong's p50.

Run: `.venv/bin/python -m pytest perf/bench_blk_rtt.py -q -s`  (about 20 s).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from perf.bench_event import cpu_modes, pingpong
from perf.blk_cells import WL_BY_NAME, blk_serve, make_image, run_blkload
from perf.runner import simulator

SECONDS = 2.0
PINGPONG_ROUNDS = 30_000
# placement -> (backend poll_us, frontend spin_us)
CASES = {("same-cpu", "block"): (0, 0), ("cross-cpu", "block"): (0, 0), ("cross-cpu", "poll"): (50, 50)}


@pytest.mark.parametrize(("mode", "wait"), list(CASES))
def test_blk_qd1_rtt_vs_pingpong(benchmark: Any, mode: str, wait: str) -> None:
    modes = cpu_modes()
    if mode not in modes:
        pytest.skip("this process may use only one CPU")
    be_cpu, fe_cpu = modes[mode][1], modes[mode][0]
    poll_us, spin_us = CASES[(mode, wait)]
    work = Path(tempfile.mkdtemp(prefix="pvback-rtt-"))
    image = Path("/dev/shm") / f"pvback-rtt-{os.getpid()}.img"
    out: dict[str, Any] = {}

    def run() -> None:
        pp = pingpong(mode, PINGPONG_ROUNDS)
        with simulator(work) as sim_dir:
            serve = blk_serve(work, sim_dir, f"{mode}-{wait}", poll_us=poll_us, cpus={be_cpu})
            try:
                r = run_blkload(sim_dir, work, f"aio:{image}", [WL_BY_NAME["rr4k_qd1"]], queues=1, persistent=0,
                                seconds=SECONDS, warmup=0.5, backend_pid=serve.pid, spin_us=spin_us,
                                cpus={fe_cpu}, tag="rtt")[0]
            finally:
                serve.close()
        out.update(pp=pp, r=r)

    try:
        make_image(image, 64)
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        image.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    pp, r = out["pp"], out["r"]
    ratio = r["p50_us"] / pp.p50_us
    benchmark.extra_info.update(blk_p50_us=r["p50_us"], blk_p99_us=r["p99_us"], pingpong_p50_us=pp.p50_us,
                                ratio=ratio, backend_cpu=be_cpu, frontend_cpu=fe_cpu)
    assert r["errors"] == 0 and r["ops"] > 0
    verdict = "meets" if ratio <= 1.5 else "ABOVE"
    print(f"\nQD1 4k tmpfs {mode}/{wait}: blkback p50 {r['p50_us']:.2f} us p99 {r['p99_us']:.2f} us; eventfd "
          f"ping-pong p50 {pp.p50_us:.2f} us; ratio {ratio:.2f} ({verdict} the 1.5 target)")
