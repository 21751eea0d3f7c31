"""`pvback bench` end to end on a tiny matrix: every process is started and stopped by the benchmark itself, the
output has the promised shape (table, JSON with the host, ratios, targets, PNGs).  No timing assertions: CI
machines are shared and slow; what must hold is that every measurement ran and is internally consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perf import matrix

pytestmark = pytest.mark.timeout(240)


def tiny_plan() -> matrix.Plan:
    wls = [matrix.WL_BY_NAME["rr4k_qd1"], matrix.WL_BY_NAME["sr64k_qd8"]]
    return matrix.Plan(quick=True, reps=1, seconds=0.3, warmup=0.1, image_mib=32, stores=["tmpfs"], workloads=wls,
                       variants=[(1, 0), (2, 1)], null_variants=[(1, 0)], nbd=True, disk_workloads=[],
                       pingpong_rounds=2000, latency_seconds=0.3)


def test_bench_tiny_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shm = Path("/dev/shm")
    before = set(shm.glob("pvback-bench-*.img"))
    rc = matrix.main(True, str(out), tmpfs_dir=str(shm), plan=tiny_plan(), argv=["pvback", "bench", "(tiny)"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "store workload" in text and "vs fio" in text
    data = json.loads((out / "bench.json").read_text())
    assert data["failures"] == [] and "error" not in data["latency"]
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(data["samples"])
    for key in ("command", "date", "host", "plan", "cells", "targets", "latency", "ring", "samples"):
        assert key in data
    host = data["host"]
    assert host["kernel"] and host["fio"].startswith("fio-") and host["stores"]["tmpfs"]["fs"]
    systems = {(c["store"], c["workload"], c["system"]) for c in data["cells"]}
    for wl in ("rr4k_qd1", "sr64k_qd8"):
        for system in ("fio-io_uring", "fio-psync", "nbd", "blk-1q-copy", "blk-2q-persist"):
            assert ("tmpfs", wl, system) in systems
        assert ("null", wl, "null-1q-copy") in systems
    for c in data["cells"]:
        assert c["iops"] > 0 and c["mb_s"] > 0 and c["errors"] == 0
        assert c["p50_us"] <= c["p99_us"]
        if c["store"] == "tmpfs":
            ref = next(r for r in data["cells"] if (r["store"], r["workload"], r["system"]) ==
                       ("tmpfs", c["workload"], c["ref_system"]))
            assert c["ratio_to_fio"] == pytest.approx(c["iops"] / ref["iops"])
        if c["system"].startswith(("blk-", "null-")):
            assert c["backend_cpu_us_per_op"] is not None and c["backend_cpu_us_per_op"] > 0
            # MB/s follows from IOPS and the block size
            bs = matrix.WL_BY_NAME[c["workload"]].bs
            assert c["mb_s"] == pytest.approx(c["iops"] * bs / 1e6, rel=0.02)
    assert data["latency"]["pingpong"]["same-cpu"]["p50_us"] > 0
    assert data["latency"]["blk"] and all(r["iops"] > 0 for r in data["latency"]["blk"])
    assert data["ring"]["ratio"] > 0
    names = [t["target"] for t in data["targets"]]
    assert any("ping-pong" in n for n in names) and any("cffi" in n for n in names)
    # One repetition is one run: every target shows its value but is not judged (a verdict needs >= 3 runs).
    assert all(t["held"] is None and t["n_runs"] == 1 and t["value"] is not None for t in data["targets"])
    for png in ("ratios.png", "latency.png", "placement.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(shm.glob("pvback-bench-*.img")) <= before  # the run removed its image
