"""Targeted blk cells, A/B interleaved: a few (store, workload) cells measured for several daemon variants and
fio in turns, every repetition, so that a change is judged against a reference and a baseline measured at the
same moment on a machine other people share.

    python -m perf.blk_ab --store tmpfs --workload rr4k_qd32 --reps 5 \
        --variant 'base:2:1:root=/tmp/base' --variant 'new:2:1' --variant 'poll20:2:1:poll_us=20'

A variant is NAME:QUEUES:PERSISTENT[:KEY=VALUE...]: KEY is a [blk] key of `pvback serve` (poll_us, io_threads,
...), `spin_us` (the guest spins that long on its ring before it sleeps) or `root` (the source tree whose
`backends` the daemon runs, for a code A/B). Each repetition runs fio
psync and io_uring on the same file, then every variant (a fresh daemon each), in an order that alternates
between repetitions; the ratio of a variant in a repetition is its IOPS over the better fio engine of that
repetition. The summary is the median ratio with its min-max over the repetitions, CPU per request (all in,
and the daemon's alone) and the guest's wake-ups per request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perf.blk_cells import WL_BY_NAME, Wl, blk_serve, make_image, run_blkload
from perf.runner import fio_argv, run_fio, simulator


@dataclass
class Variant:
    name: str
    queues: int
    persistent: int
    extra: dict[str, int | str] = field(default_factory=dict)
    root: Path | None = None


def parse_variant(text: str) -> Variant:
    parts = text.split(":")
    if len(parts) < 3:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME:QUEUES:PERSISTENT[:KEY=VALUE...]")
    v = Variant(parts[0], int(parts[1]), int(parts[2]))
    for kv in parts[3:]:
        k, _, val = kv.partition("=")
        if k == "root":
            v.root = Path(val)
        else:
            v.extra[k] = int(val) if val.lstrip("-").isdigit() else val
    return v


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (store, workload, system): median ratio to the same repetition's best fio, its spread, CPU costs."""
    out: list[dict[str, Any]] = []
    keys: list[tuple[str, str, str]] = []
    for r in rows:
        k = (r["store"], r["workload"], r["system"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rs = [r for r in rows if (r["store"], r["workload"], r["system"]) == k]
        ratios = [r["ratio"] for r in rs if r.get("ratio") is not None]

        def m(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            xs = [r[key] for r in rs if r.get(key) is not None]
            return float(statistics.median(xs)) if xs else None

        out.append({"store": k[0], "workload": k[1], "system": k[2], "n": len(rs), "iops": m("iops"),
                    "ratio": float(statistics.median(ratios)) if ratios else None,
                    "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
                    "cpu_us_per_op": m("cpu_us_per_op"), "backend_cpu_us_per_op": m("backend_cpu_us_per_op"),
                    "guest_sleeps_per_op": m("guest_sleeps_per_op"), "p50_us": m("p50_us")})
    return out


def render(summary: list[dict[str, Any]]) -> str:
    lines = ["| store | workload | system | runs | IOPS | vs best fio, median (min-max) | CPU us/op | backend us/op "
             "| guest wake-ups/op | p50 us |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: float | None, fmt: str = ".2f") -> str:
        return "" if x is None else format(x, fmt)

    for s in summary:
        ratio = f"{s['ratio']:.2f} ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})" if s["ratio"] is not None else ""
        lines.append(f"| {s['store']} | {s['workload']} | {s['system']} | {s['n']} | {f(s['iops'], '.0f')} | {ratio} "
                     f"| {f(s['cpu_us_per_op'])} | {f(s['backend_cpu_us_per_op'])} | "
                     f"{f(s['guest_sleeps_per_op'], '.3f')} | {f(s['p50_us'], '.1f')} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store_dir = {"tmpfs": Path("/dev/shm"), "disk": Path(args.disk_dir)}[args.store]
    image = store_dir / f"pvback-ab-{os.getpid()}.img"
    wls: list[Wl] = [WL_BY_NAME[w] for w in args.workload]
    variants: list[Variant] = args.variant
    rows: list[dict[str, Any]] = []
    journal = Path(args.out) if args.out else None
    try:
        make_image(image, args.image_mib)
        with simulator(work) as sim:
            for rep in range(args.reps):
                got: list[dict[str, Any]] = []
                for w in wls:
                    for eng in args.fio:
                        r = run_fio(fio_argv(w, filename=str(image), direct=args.store == "disk", engine=eng,
                                             seconds=args.seconds, ramp=args.warmup, size_mib=args.image_mib),
                                    args.seconds)
                        ops = r["iops"] * r["runtime_s"]
                        got.append({"store": args.store, "workload": w.name, "system": f"fio-{eng}", "rep": rep,
                                    "iops": r["iops"], "p50_us": r["p50_us"], "cpu_us_per_op": r["cpu_s"] / ops * 1e6,
                                    "t": time.time()})
                order = variants if rep % 2 == 0 else list(reversed(variants))
                for v in order:
                    serve = blk_serve(work, sim, f"ab-{v.name}", poll_us=int(v.extra.get("poll_us", 0)),
                                      extra={k: x for k, x in v.extra.items() if k not in ("poll_us", "spin_us")},
                                      root=v.root)
                    try:
                        res = run_blkload(sim, work, f"aio:{image}", wls, queues=v.queues, persistent=v.persistent,
                                          seconds=args.seconds, warmup=args.warmup, backend_pid=serve.pid,
                                          spin_us=int(v.extra.get("spin_us", 0)), tag=v.name)
                    finally:
                        serve.close()
                    for r in res:
                        ops = r["iops"] * r["elapsed_s"]
                        be = r["cpu_backend_s"]
                        got.append({"store": args.store, "workload": r["name"], "system": v.name, "rep": rep,
                                    "iops": r["iops"], "p50_us": r["p50_us"], "errors": r["errors"],
                                    "cpu_us_per_op": (r["cpu_frontend_s"] + (be or 0.0)) / ops * 1e6,
                                    "backend_cpu_us_per_op": (be or 0.0) / ops * 1e6,
                                    "guest_sleeps_per_op": r["sleeps"] / ops, "lat_max_us": r["lat_max_us"],
                                    "t": time.time()})
                for w in wls:
                    best = max((g["iops"] for g in got if g["workload"] == w.name and g["system"].startswith("fio-")),
                               default=0.0)
                    for g in got:
                        if g["workload"] == w.name and best:
                            g["ratio"] = g["iops"] / best
                for g in got:
                    print(f"rep {rep} {g['workload']:10s} {g['system']:14s} {g['iops']:10.0f} IOPS "
                          f"ratio {g.get('ratio', 0):.2f} CPU {g['cpu_us_per_op']:.2f} us/op"
                          + (f" backend {g['backend_cpu_us_per_op']:.2f}" if "backend_cpu_us_per_op" in g else ""),
                          flush=True)
                    if journal is not None:
                        with open(journal, "a") as f:
                            f.write(json.dumps(g) + "\n")
                rows += got
    finally:
        image.unlink(missing_ok=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.blk_ab", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--store", choices=["tmpfs", "disk"], default="tmpfs")
    ap.add_argument("--disk-dir", default="/var/tmp")
    ap.add_argument("--workload", action="append", required=True, choices=sorted(WL_BY_NAME))
    ap.add_argument("--variant", action="append", type=parse_variant, required=True)
    ap.add_argument("--fio", type=lambda s: s.split(","), default=["psync", "io_uring"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--image-mib", type=int, default=1024)
    ap.add_argument("--work", default=f"/tmp/pvback-ab-{os.getpid()}")
    ap.add_argument("--out", default="", help="append every row as a JSON line to this file")
    args = ap.parse_args(argv)
    rows = run(args)
    print()
    print(render(summarise(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
