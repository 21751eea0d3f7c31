"""The bench's verdict on a target: per-run ratios against the references of the same run, the median with its
spread, at least three runs, and a target that holds in one run and misses in another is a miss."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from perf import analysis, matrix  # noqa: E402
from perf.blk_cells import aggregate, evaluate_targets  # noqa: E402
from perf.report import markdown, target_lines, targets_table  # noqa: E402


def smp(system: str, rep: int, iops: float, store: str = "tmpfs", wl: str = "rr4k_qd32") -> dict[str, Any]:
    return analysis.Sample(store, wl, system, rep, iops, iops * 4096 / 1e6, 10.0, 20.0, 30.0, 1.0,
                           0.5 if system.startswith("blk-") else None, 2.0).__dict__


def run_samples(ratios: list[float], fio: list[float]) -> list[dict[str, Any]]:
    out = []
    for rep, (r, f) in enumerate(zip(ratios, fio, strict=True)):
        out += [smp("fio-psync", rep, f), smp("fio-io_uring", rep, f / 4), smp("nbd", rep, f / 10),
                smp("blk-2q-persist", rep, r * f), smp("blk-1q-copy", rep, r * f / 2)]
    return out


def tmpfs_rr(targets: list[dict[str, Any]]) -> dict[str, Any]:
    return next(t for t in targets if t["target"] == "tmpfs 4k randread QD32 vs best fio")


def test_per_run_ratio_uses_the_same_runs_reference() -> None:
    # fio swings 2x between runs; blk tracks it at 0.85: each run's ratio is 0.85, whatever the medians do.
    samples = run_samples([0.85, 0.85, 0.85], [1e6, 2e6, 1.2e6])
    assert analysis.per_run_ratios(samples, ("tmpfs", "rr4k_qd32", "blk-2q-persist"),
                                   ("fio-io_uring", "fio-psync")) == [0.85, 0.85, 0.85]
    cells = aggregate(samples)
    c = next(c for c in cells if c["system"] == "blk-2q-persist")
    assert [round(x, 6) for x in c["ratio_to_fio_runs"]] == [0.85, 0.85, 0.85]
    assert [round(x, 6) for x in c["ratio_to_nbd_runs"]] == [8.5, 8.5, 8.5]
    t = tmpfs_rr(evaluate_targets(cells, {}, {}))
    assert t["held"] is True and t["n_runs"] == 3 and abs(t["value"] - 0.85) < 1e-9
    assert t["min"] == t["max"]


def test_a_target_that_misses_in_one_run_misses() -> None:
    samples = run_samples([0.95, 0.90, 0.70], [1e6, 1e6, 1e6])  # median 0.90 >= 0.8, one run below
    t = tmpfs_rr(evaluate_targets(aggregate(samples), {}, {}))
    assert t["value"] == 0.90 and t["held"] is False
    assert abs(t["min"] - 0.70) < 1e-9 and abs(t["max"] - 0.95) < 1e-9
    line = next(x for x in target_lines([t]))
    assert "MISSES" in line and "0.70-0.95 over 3 runs" in line


def test_fewer_than_three_runs_is_not_judged() -> None:
    t = tmpfs_rr(evaluate_targets(aggregate(run_samples([0.95, 0.96], [1e6, 1e6])), {}, {}))
    assert t["held"] is None and t["n_runs"] == 2
    assert "not judged" in target_lines([t])[0]
    assert analysis.judge([], 0.8) == (None, None)
    assert analysis.judge([0.9, 0.9, 0.9], 1.5, higher=False) == (0.9, True)
    assert analysis.judge([0.9, 1.6, 0.9], 1.5, higher=False) == (0.9, False)


def test_independent_matrix_runs_merge_into_runs() -> None:
    """Three bench.json of one repetition each: three runs (reps renumbered), latency rows per run grouped."""
    results = []
    for i, (r, pp) in enumerate([(0.9, 1.2), (0.85, 1.6), (0.95, 1.3)]):
        samples = run_samples([r], [1e6 * (i + 1)])
        lat = {"blk": [{"placement": "same-cpu", "wait": "block", "p50_us": pp * 5, "pingpong_p50_us": 5.0,
                        "ratio_p50_to_pingpong": pp, "backend_cpu": 0, "frontend_cpu": 0, "backend_poll_us": 0,
                        "frontend_spin_us": 0, "iops": 1e5, "p99_us": pp * 9}], "pingpong": {}}
        results.append({"command": f"run{i}", "date": f"d{i}", "samples": samples, "latency": lat,
                        "ring": {"ratio": 0.8, "c_slots_per_s": 1e7, "cffi_slots_per_s": 8e6},
                        "plan": {"reps": 1, "seconds": 2, "warmup": 0.5, "image_mib": 64},
                        "host": {"cpu_model": "x", "cpus_online": 2, "virtualization": "vm", "mem_gib": 1,
                                 "kernel": "k", "os": "o", "fio": "fio-3", "nbdkit": "n",
                                 "stores": {"tmpfs": {"dir": "/dev/shm", "fs": "tmpfs"}}}})
    merged = matrix.merge(results)
    assert merged["plan"]["runs"] == 3 and merged["plan"]["reps"] == 3
    rr = tmpfs_rr(merged["targets"])
    assert rr["n_runs"] == 3 and rr["held"] is True and abs(rr["value"] - 0.9) < 1e-9
    qd1 = next(t for t in merged["targets"] if "ping-pong (same-cpu, block)" in t["target"])
    assert qd1["n_runs"] == 3 and qd1["held"] is False and qd1["value"] == 1.3  # 1.6 > 1.5 in one run
    ring = next(t for t in merged["targets"] if "cffi" in t["target"])
    assert ring["held"] is True and ring["n_runs"] == 3
    md = markdown(merged)
    assert "| min-max (runs) |" in md and "0.85-0.95 over 3 runs" in md
    table = targets_table(merged)
    assert any("| NO |" in row and "ping-pong" in row for row in table)


def test_single_value_targets_keep_their_table() -> None:
    """Device types that add single values (no per-run list) keep the old table and verdicts."""
    t = analysis.Targets()
    t.add("x", 0.9, 0.8, "d")
    t.add("y", None, 0.8, "d")
    assert [r["held"] for r in t.rows] == [True, None]
    table = targets_table({"targets": t.rows})
    assert "| target | value | goal | holds | detail |" in table


def test_plan_selects_cells_of_the_standard_plan() -> None:
    full = matrix.Plan.make(False)
    p = matrix.Plan.make(False, reps=3, workloads=["rr4k_qd32", "sr64k_qd8"], stores=["tmpfs"],
                         variants=["2q-persist"], latency=False)
    assert (p.reps, p.seconds, p.image_mib) == (3, full.seconds, full.image_mib)
    assert [w.name for w in p.workloads] == [w.name for w in p.disk_workloads] == ["rr4k_qd32", "sr64k_qd8"]
    assert p.stores == ["tmpfs"] and p.variants == [(2, 1)] and not p.latency
    assert p.null_variants == [(1, 0)]  # the null driver's baseline stays measured
    for bad in ({"reps": 0}, {"workloads": ["rr4k_qd7"]}, {"stores": ["nvme"]}, {"variants": ["3q-persist"]}):
        try:
            matrix.Plan.make(False, **bad)  # type: ignore[arg-type]
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")
