"""The benchmark matrix behind `pvback bench`: blkback on the emulated platform against the machine's own limits,
all measured in the same run on the same backing files with the same block size and outstanding I/O.

Per cell (store x workload) it runs
  - fio with io_uring and with psync on the file (the device limit; the better of the two is the reference),
  - fio's nbd engine against nbdkit serving the same file (the peer userspace block protocol),
  - blkback: `pvback serve` in its own process, a guest process (perf/blkload.py) whose C loop drives the rings,
    for 1 and 2 queues x grant copy and persistent maps,
and, once per workload, blkback over the null driver (the framework's own CPU ceiling).  A latency section
measures QD1 4 KiB on tmpfs under explicit CPU placements next to the bare eventfd ping-pong in the same
placement, and the ring section the cffi batch call against the pure-C loop.

Everything is reported as medians over the repetitions, with ratios to the reference measured alongside.

This module is the entry point (`pvback bench`, and `python -m perf.matrix bench.json` for the markdown); the
work is in runner.py (processes, fio, nbdkit, the simulator), analysis.py (samples -> cells -> targets),
report.py (table, markdown, plots) and blk_cells.py (what the blk cells are and how each is measured).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from perf import runner
from perf.blk_cells import WL_BY_NAME, WORKLOADS, Plan, Wl, aggregate, evaluate_targets, run_matrix
from perf.report import markdown, plots, table, target_lines

__all__ = ["WL_BY_NAME", "WORKLOADS", "Plan", "Wl", "aggregate", "evaluate_targets", "main", "markdown", "plots",
           "table"]


def main(quick: bool, out: str, *, disk_dir: str | None = None, tmpfs_dir: str = "/dev/shm",
         argv: list[str] | None = None, plan: Plan | None = None) -> int:
    plan = plan or Plan.make(quick)
    if runner.tools_missing("pvback bench", ("fio", *(("nbdkit",) if plan.nbd else ()), "gcc")):
        return 1
    store_dirs = {"tmpfs": Path(tmpfs_dir), "disk": Path(disk_dir or "/var/tmp")}
    store_dirs = {k: v for k, v in store_dirs.items() if k in plan.stores}

    def body(out_dir: Path, work: Path, progress: runner.Progress) -> int:
        (out_dir / "samples.jsonl").unlink(missing_ok=True)
        host = runner.host_description(store_dirs)
        progress(f"{runner.host_line(host)}, "
                 f"stores {host['stores']}; {plan.reps} rep(s) x {plan.seconds:g} s")
        runner.FAILURES.clear()
        raw = run_matrix(plan, work, store_dirs, progress, journal=out_dir / "samples.jsonl")
        cells = aggregate(raw["samples"])
        targets = evaluate_targets(cells, raw["latency"], raw["ring"])
        result = {
            "command": " ".join(argv) if argv else f"pvback bench{' --quick' if quick else ''} --out {out}",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": host,
            "plan": {"quick": plan.quick, "reps": plan.reps, "seconds": plan.seconds, "warmup": plan.warmup,
                     "image_mib": plan.image_mib, "stores": plan.stores},
            "serve_settings": raw["serve_settings"],
            "references": {"fio": {"tmpfs": "buffered", "disk": "--direct=1"},
                           "nbdkit": {"tmpfs": "nbdkit file", "disk": "nbdkit file cache=none"}},
            "failures": list(runner.FAILURES),
            "cells": cells, "targets": targets, "latency": raw["latency"], "ring": raw["ring"],
            "samples": raw["samples"],
        }
        (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
        print()
        print(table(cells))
        print()
        for line in target_lines(targets):
            print(line)
        files = plots(result, out_dir, [w.name for w in WORKLOADS])
        print(f"\nwrote {out_dir / 'bench.json'} and {', '.join(files)}")
        return 0

    return runner.run_bench(out, "pvback-bench-", body)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several bench.json of independent matrix runs as one result: every repetition of every run is a run of
    its own (reps renumbered), the latency and ring sections listed per run; cells and targets recomputed
    from the raw samples, so a file written by an older aggregation gets today's columns."""
    out = dict(results[0])
    samples: list[dict[str, Any]] = []
    for i, r in enumerate(results):
        for smp in r["samples"]:
            samples.append({**smp, "rep": i * 1000 + int(smp["rep"])})
    out["samples"] = samples
    latency = [r.get("latency", {}) for r in results]
    ring = [r.get("ring", {}) for r in results]
    out["cells"] = aggregate(samples)
    out["targets"] = evaluate_targets(out["cells"], latency, ring)
    if len(results) > 1:
        out["latency"] = latency[-1]
        out["ring"] = ring[-1]
        out["command"] = " + ".join(r["command"] for r in results)
        out["date"] = " + ".join(r["date"] for r in results)
        out["plan"] = {**results[0]["plan"], "reps": sum(r["plan"]["reps"] for r in results),
                       "runs": len(results)}
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="print perf/RESULTS.md tables from one or more bench.json (several: "
                                             "independent runs, every repetition judged as a run of its own)")
    ap.add_argument("bench_json", nargs="+")
    print(markdown(merge([json.loads(Path(p).read_text()) for p in ap.parse_args().bench_json])), end="")
