"""The blk cells of the benchmark: the plan (stores x workloads x systems), the sessions that measure them (fio
and nbdkit on the same file, blkback through a guest process for each queue/grant-mode variant, the null
driver), the latency and ring sections, and what blk's cells are compared with and judged by.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perf import analysis
from perf.analysis import Cell, CellKey, Sample, Targets
from perf.runner import PY, Nbdkit, Progress, Serve, failed, fio_argv, run_fio, simulator, spawn


@dataclass(frozen=True)
class Wl:
    name: str
    rw: str
    bs: int
    qd: int

    @property
    def write(self) -> bool:
        return "write" in self.rw

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rw": self.rw, "bs": self.bs, "qd": self.qd}


WORKLOADS = [
    Wl("rr4k_qd1", "randread", 4096, 1),
    Wl("rr4k_qd32", "randread", 4096, 32),
    Wl("rw4k_qd1", "randwrite", 4096, 1),
    Wl("rw4k_qd32", "randwrite", 4096, 32),
    Wl("sr64k_qd8", "read", 65536, 8),
    Wl("sw64k_qd8", "write", 65536, 8),
    Wl("sr1m_qd8", "read", 1 << 20, 8),
    Wl("sw1m_qd8", "write", 1 << 20, 8),
]
WL_BY_NAME = {w.name: w for w in WORKLOADS}
VARIANTS = [(1, 0), (1, 1), (2, 0), (2, 1)]  # (queues, persistent)


def variant_name(queues: int, persistent: int) -> str:
    return f"blk-{queues}q-{'persist' if persistent else 'copy'}"


@dataclass
class Plan:
    quick: bool
    reps: int
    seconds: float
    warmup: float
    image_mib: int
    stores: list[str]
    workloads: list[Wl]
    variants: list[tuple[int, int]]
    null_variants: list[tuple[int, int]]
    nbd: bool
    disk_workloads: list[Wl]
    pingpong_rounds: int
    latency_seconds: float

    latency: bool = True

    @classmethod
    def make(cls, quick: bool, *, reps: int | None = None, workloads: list[str] | None = None,
             stores: list[str] | None = None, variants: list[str] | None = None, latency: bool = True) -> Plan:
        """The standard plans; the keywords select cells of it (`pvback bench --reps/--workloads/--stores/
        --variants/--no-latency`): a targeted run measures the same cells the same way as the full one."""
        if quick:
            wls = [WL_BY_NAME["rr4k_qd1"], WL_BY_NAME["rr4k_qd32"], WL_BY_NAME["sr64k_qd8"]]
            plan = cls(quick=True, reps=1, seconds=1.0, warmup=0.3, image_mib=256, stores=["tmpfs", "disk"],
                       workloads=wls, variants=[(1, 0), (1, 1)], null_variants=[(1, 0)], nbd=True,
                       disk_workloads=[WL_BY_NAME["rr4k_qd32"]], pingpong_rounds=20_000, latency_seconds=1.0)
        else:
            plan = cls(quick=False, reps=5, seconds=2.0, warmup=0.5, image_mib=1024, stores=["tmpfs", "disk"],
                       workloads=list(WORKLOADS), variants=list(VARIANTS), null_variants=[(1, 0), (1, 1)],
                       nbd=True, disk_workloads=list(WORKLOADS), pingpong_rounds=100_000, latency_seconds=3.0)
        if reps is not None:
            if reps < 1:
                raise ValueError(f"--reps {reps}: at least 1")
            plan.reps = reps
        if workloads is not None:
            unknown = [w for w in workloads if w not in WL_BY_NAME]
            if unknown:
                raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WL_BY_NAME)}")
            plan.workloads = [WL_BY_NAME[w] for w in workloads]
            plan.disk_workloads = list(plan.workloads)
        if stores is not None:
            if not stores or any(s not in ("tmpfs", "disk") for s in stores):
                raise ValueError(f"stores {stores}: tmpfs and/or disk")
            plan.stores = list(stores)
        if variants is not None:
            by_name = {variant_name(q, p)[4:]: (q, p) for q, p in VARIANTS}
            unknown = [v for v in variants if v not in by_name]
            if unknown:
                raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
            plan.variants = [by_name[v] for v in variants]
            plan.null_variants = [v for v in plan.null_variants if v in plan.variants] or plan.null_variants[:1]
        plan.latency = latency
        return plan


def blk_serve(work: Path, sim_dir: Path, name: str, *, poll_us: int = 0, cpus: set[int] | None = None,
              io_threads: int = 32, extra: Mapping[str, int | str] | None = None, root: Path | None = None) -> Serve:
    """`pvback serve` configured for the blk cells (`extra`: more [blk] keys; `root`: another source tree)."""
    # persistent_threshold_bytes = 0: "persistent" cells map every request; max_persistent_grants covers a
    # QD8 x 1 MiB working set (2048 pages) so the LRU never evicts during a run.
    blk = {"max_persistent_grants": 4096, "persistent_threshold_bytes": 0, "poll_us": poll_us,
           "io_threads": io_threads, **(extra or {})}
    settings: dict[str, Any] = {"poll_us": poll_us, "cpus": sorted(cpus) if cpus else "any",
                                "io_threads": io_threads, "max_persistent_grants": 4096,
                                "persistent_threshold_bytes": 0, **(extra or {})}
    if root is not None:
        settings["root"] = str(root)
    return Serve(work, sim_dir, name, sections={"blk": blk}, settings=settings, cpus=cpus, root=root)


# ---- sessions ----------------------------------------------------------------------------------------------


def run_blkload(sim_dir: Path, work: Path, params: str, wls: list[Wl], *, queues: int, persistent: int,
                seconds: float, warmup: float, backend_pid: int, spin_us: int = 0, cpus: set[int] | None = None,
                tag: str = "") -> list[dict[str, Any]]:
    out = work / f"load-{tag or 'x'}-{os.getpid()}-{time.monotonic_ns()}.json"
    log = work / "blkload.log"
    argv = [PY, "-m", "perf.blkload", "--sim-dir", str(sim_dir), "--params", params, "--queues", str(queues),
            "--persistent", str(persistent), "--workloads", json.dumps([w.as_dict() for w in wls]),
            "--seconds", f"{seconds:g}", "--warmup", f"{warmup:g}", "--spin-us", str(spin_us),
            "--backend-pid", str(backend_pid), "--out", str(out)]
    proc = spawn(argv, log, cpus=cpus)
    timeout = len(wls) * (seconds + warmup) * 3 + 90
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"blkload ({tag}) timed out; log {log}") from None
    if rc != 0 or not out.exists():
        raise RuntimeError(f"blkload ({tag}) failed ({rc}): {log.read_text(errors='replace')[-2000:]}")
    res: list[dict[str, Any]] = json.loads(out.read_text())
    out.unlink()
    return res


def make_image(path: Path, mib: int) -> None:
    """Random data, written once (fio and blkback then read real data, not holes)."""
    if path.exists() and path.stat().st_size == mib << 20:
        return
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(chunk[i % 7:] + chunk[: i % 7])
        f.flush()
        os.fsync(f.fileno())


def run_matrix(plan: Plan, work: Path, store_dirs: dict[str, Path], progress: Progress,
               journal: Path | None = None) -> dict[str, Any]:
    """Every sample is also appended to `journal` (JSON lines) as soon as it is measured: a long run that
    fails late keeps what it measured."""
    samples: list[Sample] = []
    images = {s: store_dirs[s] / f"pvback-bench-{os.getpid()}.img" for s in plan.stores}
    latency: dict[str, Any] = {}
    ring: dict[str, Any] = {}
    serve_settings: dict[str, Any] = {}
    try:
        for s, img in images.items():
            progress(f"creating {plan.image_mib} MiB image on {s}: {img}")
            make_image(img, plan.image_mib)
        with simulator(work) as sim_dir:
            serve = blk_serve(work, sim_dir, "main")
            serve_settings["main"] = serve.settings
            try:
                for rep in range(plan.reps):
                    got: list[Sample] = []
                    for store in plan.stores:
                        wls = plan.workloads if store == "tmpfs" else plan.disk_workloads
                        got += _rep_store(plan, work, sim_dir, serve, store, images[store], wls, rep, progress)
                    got += _rep_null(plan, work, sim_dir, serve, rep, progress)
                    samples += got
                    if journal is not None:
                        with open(journal, "a") as f:
                            for smp in got:
                                f.write(json.dumps(smp.__dict__) + "\n")
            finally:
                serve.close()
        # Sections of their own (a fresh simulator): a failure here is reported, it does not lose the matrix.
        try:
            if not plan.latency:
                raise _Skipped("not asked for (--no-latency)")
            with simulator(work / "lat") as sim_dir:
                latency = run_latency(plan, work, sim_dir, images.get("tmpfs") or images[plan.stores[0]],
                                      progress, serve_settings)
        except _Skipped:
            latency = {"blk": [], "pingpong": {}}
        except Exception as exc:
            progress(f"latency section failed: {exc}")
            latency = {"error": str(exc), "blk": [], "pingpong": {}}
        try:
            ring = run_ring(plan, progress)
        except Exception as exc:
            progress(f"ring section failed: {exc}")
            ring = {}
    finally:
        for img in images.values():
            with contextlib.suppress(OSError):
                img.unlink()
    return {"samples": [s.__dict__ for s in samples], "latency": latency, "ring": ring,
            "serve_settings": serve_settings}


class _Skipped(Exception):
    pass


def _rep_store(plan: Plan, work: Path, sim_dir: Path, serve: Serve, store: str, image: Path, wls: list[Wl],
               rep: int, progress: Progress) -> list[Sample]:
    out: list[Sample] = []
    direct = store == "disk"
    for w in wls:
        for engine in ("io_uring", "psync"):
            r = run_fio(fio_argv(w, filename=str(image), direct=direct, engine=engine, seconds=plan.seconds,
                                 ramp=plan.warmup, size_mib=plan.image_mib), plan.seconds)
            out.append(Sample(store, w.name, f"fio-{engine}", rep, r["iops"], r["mb_s"], r["p50_us"], r["p99_us"],
                              r["p999_us"], r["cpu_s"], None, r["runtime_s"]))
            progress(_line(out[-1]))
    if plan.nbd:
        nbd = Nbdkit(image, work, no_cache=direct)
        try:
            for w in wls:
                r = run_fio(fio_argv(w, filename=None, direct=False, engine="nbd", seconds=plan.seconds,
                                     ramp=plan.warmup, size_mib=plan.image_mib, uri=nbd.uri), plan.seconds,
                            extra_pid=nbd.proc.pid)
                out.append(Sample(store, w.name, "nbd", rep, r["iops"], r["mb_s"], r["p50_us"], r["p99_us"],
                                  r["p999_us"], r["cpu_s"], r["cpu_server_s"], r["runtime_s"]))
                progress(_line(out[-1]))
        finally:
            nbd.close()
            # nbdkit writes through the page cache: flush it now, or its writeback competes with the next cells.
            os.sync()
    for queues, persistent in plan.variants:
        name = variant_name(queues, persistent)
        try:
            res = run_blkload(sim_dir, work, f"aio:{image}", wls, queues=queues, persistent=persistent,
                              seconds=plan.seconds, warmup=plan.warmup, backend_pid=serve.pid, tag=f"{store}-{name}")
        except RuntimeError as exc:
            failed(progress, f"{store} {name} rep {rep}", exc)
            continue
        for r in res:
            out.append(_blk_sample(store, r, name, rep))
            progress(_line(out[-1]))
    return out


def _rep_null(plan: Plan, work: Path, sim_dir: Path, serve: Serve, rep: int, progress: Progress) -> list[Sample]:
    out: list[Sample] = []
    for queues, persistent in plan.null_variants:
        name = "null-" + variant_name(queues, persistent)[4:]
        try:
            res = run_blkload(sim_dir, work, f"null:{plan.image_mib << 20}", plan.workloads, queues=queues,
                              persistent=persistent, seconds=plan.seconds, warmup=plan.warmup,
                              backend_pid=serve.pid, tag=name)
        except RuntimeError as exc:
            failed(progress, f"{name} rep {rep}", exc)
            continue
        for r in res:
            out.append(_blk_sample("null", r, name, rep))
            progress(_line(out[-1]))
    return out


def _blk_sample(store: str, r: dict[str, Any], system: str, rep: int) -> Sample:
    be = r["cpu_backend_s"]
    return Sample(store, r["name"], system, rep, r["iops"], r["mb_s"], r["p50_us"], r["p99_us"], r["p999_us"],
                  r["cpu_frontend_s"] + (be or 0.0), be, r["elapsed_s"], r["errors"],
                  [tuple(x) for x in r["hist_ns"]])  # type: ignore[misc]


def _line(s: Sample) -> str:
    return (f"{s.store:5s} {s.workload:10s} {s.system:17s} rep {s.rep}: {s.iops:11.0f} IOPS {s.mb_s:9.1f} MB/s "
            f"p50 {s.p50_us:8.1f} us p99 {s.p99_us:8.1f} us")


# ---- latency under explicit placement ------------------------------------------------------------------------


def run_latency(plan: Plan, work: Path, sim_dir: Path, image: Path, progress: Progress,
                serve_settings: dict[str, Any]) -> dict[str, Any]:
    """QD1 4 KiB random reads on tmpfs vs the bare eventfd ping-pong, per CPU placement, with and without
    brief polling (backend poll_us, frontend spin)."""
    from perf.bench_event import cpu_modes, pingpong

    cpus = sorted(os.sched_getaffinity(0))
    modes = cpu_modes()
    w = WL_BY_NAME["rr4k_qd1"]
    out: dict[str, Any] = {"pingpong": {}, "blk": []}
    for mode in modes:
        rtt = pingpong(mode, plan.pingpong_rounds)
        out["pingpong"][mode] = rtt.__dict__
        progress(f"eventfd ping-pong {mode}: p50 {rtt.p50_us:.2f} us p99 {rtt.p99_us:.2f} us")
    configs: list[tuple[str, str, int, int]] = [("same-cpu", "block", 0, 0)]
    if "cross-cpu" in modes:
        configs += [("cross-cpu", "block", 0, 0), ("cross-cpu", "poll", 50, 50)]
    for mode, how, poll_us, spin_us in configs:
        be_cpu, fe_cpu = (cpus[0], cpus[0]) if mode == "same-cpu" else (cpus[1], cpus[0])
        serve = blk_serve(work, sim_dir, f"lat-{mode}-{how}", poll_us=poll_us, cpus={be_cpu})
        serve_settings[f"lat-{mode}-{how}"] = serve.settings
        try:
            res = run_blkload(sim_dir, work, f"aio:{image}", [w], queues=1, persistent=0,
                              seconds=plan.latency_seconds, warmup=plan.warmup, backend_pid=serve.pid,
                              spin_us=spin_us, cpus={fe_cpu}, tag=f"lat-{mode}-{how}")[0]
        finally:
            serve.close()
        pp = out["pingpong"][mode]
        row = {"placement": mode, "wait": how, "backend_poll_us": poll_us, "frontend_spin_us": spin_us,
               "backend_cpu": be_cpu, "frontend_cpu": fe_cpu, "iops": res["iops"], "p50_us": res["p50_us"],
               "p99_us": res["p99_us"], "p999_us": res["p999_us"], "mean_us": res["lat_mean_us"],
               "cpu_backend_s": res["cpu_backend_s"], "cpu_frontend_s": res["cpu_frontend_s"],
               "seconds": res["elapsed_s"], "pingpong_p50_us": pp["p50_us"],
               "ratio_p50_to_pingpong": res["p50_us"] / pp["p50_us"], "hist_ns": res["hist_ns"]}
        out["blk"].append(row)
        progress(f"QD1 4k tmpfs {mode}/{how}: p50 {res['p50_us']:.2f} us p99 {res['p99_us']:.2f} us = "
                 f"{row['ratio_p50_to_pingpong']:.2f} x ping-pong p50 {pp['p50_us']:.2f} us")
    return out


def run_ring(plan: Plan, progress: Progress) -> dict[str, Any]:
    from perf.bench_ring import measure

    r = measure(400_000 if plan.quick else 2_000_000, rounds=2 if plan.quick else 3)
    progress(f"ring: C {r.c_slots_per_s / 1e6:.2f} M slots/s, cffi batch {r.cffi_slots_per_s / 1e6:.2f} M, "
             f"ratio {r.ratio:.2f}")
    return {"c_slots_per_s": r.c_slots_per_s, "cffi_slots_per_s": r.cffi_slots_per_s, "ratio": r.ratio}


# ---- analysis ----------------------------------------------------------------------------------------------


def relate(c: Cell, by: Mapping[CellKey, Cell]) -> None:
    """blk's references: the better fio engine on the same file, and nbdkit serving it."""
    analysis.ratio_to_best(c, by, ("fio-io_uring", "fio-psync"), "fio")
    analysis.ratio_to(c, by, "nbd", "nbd")


FIO_REFS = ("fio-io_uring", "fio-psync")


def aggregate(samples: list[dict[str, Any]]) -> list[Cell]:
    """Median per (store, workload, system), with the spread and the ratios to the references of that cell;
    blk cells also get their ratios per run (`ratio_to_fio_runs`, `ratio_to_nbd_runs`): each repetition
    against the references of that repetition."""
    cells = analysis.aggregate(samples, relate=relate, workload_order=[w.name for w in WORKLOADS])
    for c in cells:
        if c["system"].startswith("blk-"):
            key = analysis.cell_key(c)
            c["ratio_to_fio_runs"] = analysis.per_run_ratios(samples, key, FIO_REFS)
            c["ratio_to_nbd_runs"] = analysis.per_run_ratios(samples, key, ("nbd",))
    return cells


def best_blk(cells: list[Cell], store: str, wl: str) -> Cell | None:
    return analysis.best_cell(cells, store, wl, "blk-")


def evaluate_targets(cells: list[dict[str, Any]], latency: dict[str, Any] | list[dict[str, Any]],
                     ring: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The brief's targets, for the cells this plan measured.  Each is judged on its per-run values (median,
    min-max, holds only if every run holds, not judged below analysis.MIN_RUNS runs).  `latency` and `ring`
    may be lists: the sections of several matrix runs merged (python -m perf.matrix a.json b.json c.json)."""
    t = Targets()
    add = t.add
    for store, goal_rr, goal_seq in (("disk", 0.90, 0.95), ("tmpfs", 0.80, 0.80)):
        c = best_blk(cells, store, "rr4k_qd32")
        if c is not None:
            add(f"{store} 4k randread QD32 vs best fio", c.get("ratio_to_fio"), goal_rr,
                f"{c['system']}: {c['iops']:.0f} IOPS vs {c.get('ref_system')}; {c['cpu_us_per_op']:.2f} us CPU/req"
                f" ({c.get('backend_cpu_us_per_op') or 0:.2f} backend); per CPU-second "
                f"{c.get('per_cpu_ratio_to_fio') or 0:.2f} x fio", runs=c.get("ratio_to_fio_runs", []))
        for wl in ("sr64k_qd8", "sw64k_qd8", "sr1m_qd8", "sw1m_qd8"):
            c = best_blk(cells, store, wl)
            if c is None:
                continue
            add(f"{store} {wl} vs best fio", c.get("ratio_to_fio"), goal_seq,
                f"{c['system']}: {c['mb_s']:.0f} MB/s vs {c.get('ref_system')}; per CPU-second "
                f"{c.get('per_cpu_ratio_to_fio') or 0:.2f} x fio", runs=c.get("ratio_to_fio_runs", []))
    for store in ("tmpfs", "disk"):
        for wl in ("rr4k_qd32", "rw4k_qd32"):
            c = best_blk(cells, store, wl)
            if c is not None and "ratio_to_nbd" in c:
                add(f"{store} {wl} blkback vs nbdkit", c["ratio_to_nbd"], 3.0, f"{c['system']}: {c['iops']:.0f} IOPS",
                    runs=c.get("ratio_to_nbd_runs", []))
    lat_runs = latency if isinstance(latency, list) else [latency]
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for lat in lat_runs:
        for row in lat.get("blk", []):
            rows.setdefault((row["placement"], row["wait"]), []).append(row)
    for (placement, wait), rs in rows.items():
        add(f"tmpfs QD1 4k p50 vs eventfd ping-pong ({placement}, {wait})", None, 1.5,
            "p50 " + ", ".join(f"{r['p50_us']:.2f}" for r in rs) + " us vs ping-pong "
            + ", ".join(f"{r['pingpong_p50_us']:.2f}" for r in rs) + " us", higher=False,
            runs=[r["ratio_p50_to_pingpong"] for r in rs])
    ring_runs = [r for r in (ring if isinstance(ring, list) else [ring]) if r]
    if ring_runs:
        add("ring slots/s cffi batch vs pure C", None, 0.5,
            ", ".join(f"{r['cffi_slots_per_s'] / 1e6:.2f} M vs {r['c_slots_per_s'] / 1e6:.2f} M" for r in ring_runs),
            runs=[r["ratio"] for r in ring_runs])
    return t.rows
