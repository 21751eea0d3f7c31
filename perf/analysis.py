"""From samples to cells: medians per cell, the spread, CPU per operation and per GB, ratios to the references
measured in the same cell, and the targets.  Generic over the cell key (store, workload, system): a device type
supplies which systems are its references (`relate`), its workload order and its targets.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

CellKey = tuple[str, str, str]  # (store, workload, system)
Cell = dict[str, Any]
# Adds the ratio keys to one cell, given every cell of the run by key.
Relate = Callable[[Cell, Mapping[CellKey, Cell]], None]


@dataclass
class Sample:
    """One measurement of one (store, workload, system) in one repetition.

    store: where the data goes (for blk: tmpfs, disk, null); system: what served it (for blk: fio-io_uring,
    fio-psync, nbd, blk-1q-copy, ..., null-1q-copy).
    """

    store: str
    workload: str
    system: str
    rep: int
    iops: float
    mb_s: float
    p50_us: float
    p99_us: float
    p999_us: float
    cpu_s: float  # all CPU of the measured window (frontend + backend, or fio (+ nbdkit))
    cpu_backend_s: float | None
    seconds: float
    errors: int = 0
    hist_ns: list[tuple[int, int]] = field(default_factory=list)


def cell_key(c: Mapping[str, Any]) -> CellKey:
    return (c["store"], c["workload"], c["system"])


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def summarise(ss: list[dict[str, Any]]) -> Cell:
    """The medians of one cell's samples (all of the same key) and the derived costs."""
    store, wl, system = cell_key(ss[0])
    iops = [s["iops"] for s in ss]
    secs = [s["seconds"] for s in ss]
    ops = [s["iops"] * s["seconds"] for s in ss]
    gb = [s["mb_s"] * s["seconds"] / 1e3 for s in ss]
    cpu = [s["cpu_s"] for s in ss]
    be = [s["cpu_backend_s"] for s in ss if s["cpu_backend_s"] is not None]
    be_core = [s["iops"] / (s["cpu_backend_s"] / s["seconds"]) for s in ss if s["cpu_backend_s"]]
    return {
        "store": store, "workload": wl, "system": system, "n": len(ss),
        "iops": median(iops), "iops_min": min(iops), "iops_max": max(iops),
        "mb_s": median([s["mb_s"] for s in ss]),
        "p50_us": median([s["p50_us"] for s in ss]), "p99_us": median([s["p99_us"] for s in ss]),
        "p999_us": median([s["p999_us"] for s in ss]),
        "cpu_us_per_op": median([c / o * 1e6 for c, o in zip(cpu, ops, strict=True) if o]),
        "cpu_s_per_gb": median([c / g for c, g in zip(cpu, gb, strict=True) if g]),
        "backend_cpu_us_per_op": median([b / o * 1e6 for b, o in zip(be, ops, strict=False) if o]) if be else None,
        "iops_per_backend_core": median(be_core) if be_core else None,
        "iops_per_cpu_s": median([s["iops"] * s["seconds"] / s["cpu_s"] for s in ss if s["cpu_s"]]),
        "errors": sum(s.get("errors", 0) for s in ss),
        "seconds": median(secs),
    }


def aggregate(samples: list[dict[str, Any]], *, relate: Relate | None = None,
              workload_order: list[str] | None = None) -> list[Cell]:
    """Median per cell key, then `relate` adds each cell's ratios; sorted by store, workload order, system."""
    groups: dict[CellKey, list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault(cell_key(s), []).append(s)
    cells = [summarise(ss) for ss in groups.values()]
    by = {cell_key(c): c for c in cells}
    if relate is not None:
        for c in cells:
            relate(c, by)
    order = workload_order or []
    cells.sort(key=lambda c: (c["store"], order.index(c["workload"]) if c["workload"] in order else 99, c["system"]))
    return cells


def ratio_to_best(c: Cell, by: Mapping[CellKey, Cell], systems: tuple[str, ...], name: str) -> None:
    """`ref_system`, `ratio_to_<name>` and `per_cpu_ratio_to_<name>` against the best (by IOPS) of `systems`
    measured in the same store and workload (nothing if none was)."""
    refs = [r for r in (by.get((c["store"], c["workload"], s)) for s in systems) if r]
    if not refs:
        return
    best = max(refs, key=lambda r: r["iops"])
    c["ref_system"] = best["system"]
    c[f"ratio_to_{name}"] = c["iops"] / best["iops"] if best["iops"] else None
    # The same comparison per CPU-second: how far each side is from its own core budget.
    c[f"per_cpu_ratio_to_{name}"] = c["iops_per_cpu_s"] / best["iops_per_cpu_s"] if best["iops_per_cpu_s"] else None


def ratio_to(c: Cell, by: Mapping[CellKey, Cell], system: str, name: str) -> None:
    """`ratio_to_<name>` against `system` in the same store and workload, if it was measured and did I/O."""
    peer = by.get((c["store"], c["workload"], system))
    if peer and peer["iops"]:
        c[f"ratio_to_{name}"] = c["iops"] / peer["iops"]


def best_cell(cells: list[Cell], store: str, workload: str, system_prefix: str) -> Cell | None:
    """The cell with the most IOPS among the systems named `system_prefix*` in one store and workload."""
    cand = [c for c in cells if c["store"] == store and c["workload"] == workload
            and c["system"].startswith(system_prefix)]
    return max(cand, key=lambda c: c["iops"]) if cand else None


def per_run_ratios(samples: list[dict[str, Any]], key: CellKey, refs: tuple[str, ...]) -> list[float]:
    """The ratio of cell `key` to the best of `refs` (same store and workload), one per run: each repetition
    against the references measured in that same repetition, never against another one's."""
    store, wl, system = key
    by_rep: dict[int, dict[str, float]] = {}
    for s in samples:
        if s["store"] == store and s["workload"] == wl and (s["system"] == system or s["system"] in refs):
            by_rep.setdefault(int(s["rep"]), {})[s["system"]] = float(s["iops"])
    out = []
    for _rep, d in sorted(by_rep.items()):
        best = max((d[r] for r in refs if r in d), default=0.0)
        if system in d and best > 0:
            out.append(d[system] / best)
    return out


# A target is judged on at least this many independent runs (repetitions measured against their own
# references), and holds only if it holds in every one: one that holds in one run and misses in another misses.
MIN_RUNS = 3


def judge(runs: list[float], goal: float, higher: bool = True) -> tuple[float | None, bool | None]:
    """(median, held) of a target measured once per run; held is None below MIN_RUNS runs (not judged)."""
    if not runs:
        return None, None
    med = median(runs)
    if len(runs) < MIN_RUNS:
        return med, None
    return med, all(r >= goal if higher else r <= goal for r in runs)


@dataclass
class Targets:
    """The targets a run is judged by: each one a value against a goal, held or not (None: not measured, or
    measured in fewer than MIN_RUNS runs when the per-run values are given)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, value: float | None, goal: float, detail: str, higher: bool = True,
            runs: list[float] | None = None) -> None:
        if runs is not None:
            value, held = judge(runs, goal, higher)
            self.rows.append({"target": name, "value": value, "goal": goal, "held": held, "detail": detail,
                              "runs": list(runs), "n_runs": len(runs),
                              "min": min(runs) if runs else None, "max": max(runs) if runs else None})
            return
        held = None if value is None else (value >= goal if higher else value <= goal)
        self.rows.append({"target": name, "value": value, "goal": goal, "held": held, "detail": detail})
