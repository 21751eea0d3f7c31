"""Interleaved A/B of daemon settings on the many-guests benchmark: for each repetition and each variant (a
fresh `pvback serve` with its `[blk]` keys, the order alternating between repetitions), the scaling steps
(N guests, 4 KiB random reads at QD 8 each, as `pvback bench --guests`) and the hostile case (a healthy guest
next to a healthy peer, a spinning poller and a hostile guest).

    python -m perf.guests_ab --n 1 2 8 16 32 --reps 3 --variant 'tpq:pumps=0' --variant 'sh2:pumps=2' \
        --out /tmp/ab.json
    python -m perf.guests_ab --n 4 32 --placement split --no-hostile --variant data: --variant nodata:store=null \
        --out /tmp/ab.json

A variant's `store=null` serves every guest from the null driver (no data: the backend's own cost without
the memory traffic of the data it serves); otherwise each guest has its own 16 MiB image in tmpfs.
`--placement split` puts the daemon on one CPU and the guests on the others (Xen's placement).

Per repetition and variant: each step's aggregate IOPS, its ratio to that repetition-and-variant's best
step, Jain's index and the worst share, the daemon's CPU; the hostile case's share of the fair share and of
the poller case.  The summary gives the median [min-max] over repetitions per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from perf.blk_guests import GuestSpec, fio_jobs, hostile_case, jain, make_images, run_guests, split_cpus, worst_share
from perf.runner import Serve, simulator

IMAGE_MIB = 16


def parse_variant(text: str) -> tuple[str, dict[str, int], str]:
    """'name:key=value,...': `[blk]` keys (integers), and `store` (tmpfs or null), which is not one."""
    name, _, kvs = text.partition(":")
    pairs = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)
    store = pairs.pop("store", "tmpfs")
    if store not in ("tmpfs", "null"):
        raise ValueError(f"variant {name}: store {store!r} is not tmpfs or null")
    return name, {k: int(v) for k, v in pairs.items()}, store


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = sorted({(r["variant"], r["what"], r.get("n", 0)) for r in rows}, key=lambda k: (k[1], k[2], k[0]))
    for variant, what, n in keys:
        rs = [r for r in rows if r["variant"] == variant and r["what"] == what and r.get("n", 0) == n]
        row: dict[str, Any] = {"variant": variant, "what": what, "n": n, "reps": len(rs)}
        for key in ("iops", "over_best", "jain", "worst", "daemon_cpu", "daemon_us_per_io", "guest_cpu",
                    "guest_us_per_io", "sleeps_per_io", "share_of_fair", "share_vs_poller", "healthy", "hostile"):
            xs = [float(r[key]) for r in rs if key in r]
            if xs:
                row[key] = [statistics.median(xs), min(xs), max(xs)]
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1, 2, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--no-hostile", action="store_true")
    ap.add_argument("--fio", action="store_true", help="run the benchmark's fio reference before each step")
    ap.add_argument("--placement", choices=("shared", "split"), default="shared")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    work = Path(tempfile.mkdtemp(prefix="pvback-gab-"))
    img_dir = Path("/dev/shm") / f"pvback-gab-{os.getpid()}"
    rows: list[dict[str, Any]] = []
    daemon_cpus, guest_cpus = split_cpus() if args.placement == "split" else (None, None)
    meta = {"load_before": os.getloadavg(), "start": time.time(), "placement": args.placement,
            "variants": {name: {**keys, "store": store} for name, keys, store in variants}}
    try:
        images = make_images(img_dir, max(max(args.n), 2), IMAGE_MIB)
        with simulator(work) as sim:
            for rep in range(args.reps):
                order = variants if rep % 2 == 0 else list(reversed(variants))
                for name, keys, store in order:
                    disks: list[Path | str] = list(images) if store == "tmpfs" else \
                        [f"null:{IMAGE_MIB << 20}"] * len(images)
                    blk = {"io_threads": 4, **keys}
                    serve = Serve(work, sim, f"ab-{name}-{rep}", sections={"blk": blk}, settings={"blk": blk},
                                  cpus=daemon_cpus)
                    try:
                        steps = []
                        for n in args.n:
                            if args.fio:
                                # What the benchmark does before each step (its reference), and what that
                                # leaves behind on the machine.
                                fio_jobs(images[:n], qd=8, bs=4096, seconds=args.seconds, ramp=args.warmup)
                            res, daemon = run_guests(sim, work, serve.pid, [GuestSpec(f"g{i}") for i in range(n)],
                                                     disks[:n], seconds=args.seconds, warmup=args.warmup,
                                                     cpus=guest_cpus)
                            per = [float(r["iops"]) for r in res]
                            ops = sum(int(r["ops"]) for r in res) or 1
                            window = max(float(r["elapsed_s"]) for r in res) or 1.0
                            guest_cpu = sum(float(r["cpu_frontend_s"]) for r in res)
                            # Both sides of the ring: the daemon's CPU and the guests' own (their wake-ups,
                            # rings and notifies), per I/O, and how often a guest slept.
                            steps.append({"variant": name, "rep": rep, "what": "scaling", "n": n, "iops": sum(per),
                                          "jain": jain(per), "worst": worst_share(per), "per": per,
                                          "daemon_cpu": daemon["cpu_cores"],
                                          "daemon_us_per_io": daemon["cpu_cores"] / sum(per) * 1e6 if sum(per) else 0.0,
                                          "guest_cpu": guest_cpu / window, "guest_us_per_io": guest_cpu / ops * 1e6,
                                          "sleeps_per_io": sum(int(r["sleeps"]) for r in res) / ops,
                                          "load1": os.getloadavg()[0]})
                            st = steps[-1]
                            print(f"rep {rep} {name} n={n}: {sum(per):.0f} IOPS jain {jain(per):.3f} worst "
                                  f"{worst_share(per):.2f} daemon {daemon['cpu_cores']:.2f} cores "
                                  f"{st['daemon_us_per_io']:.2f} us/IO, guests {st['guest_cpu']:.2f} cores "
                                  f"{st['guest_us_per_io']:.2f} us/IO, load {os.getloadavg()[0]:.1f}", flush=True)
                        best = max(s["iops"] for s in steps)
                        for s in steps:
                            s["over_best"] = s["iops"] / best if best else 0.0
                        rows += steps
                        if not args.no_hostile:
                            def progress(msg: str, nm: str = name) -> None:
                                print(nm, msg, flush=True)

                            h = hostile_case(work, sim, serve, disks, qd=8, seconds=args.seconds,
                                             warmup=args.warmup, progress=progress, guest_cpus=guest_cpus)
                            rows.append({"variant": name, "rep": rep, "what": "hostile", "n": 2,
                                         "share_of_fair": h["share_of_fair"], "share_vs_poller": h["share_vs_poller"],
                                         "healthy": h["healthy_with_hostile_iops"], "hostile": h["hostile_iops"],
                                         "raw": h, "load1": os.getloadavg()[0]})
                    finally:
                        serve.close()
                    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "summary": summarize(rows)},
                                                         indent=1))
    finally:
        shutil.rmtree(img_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    meta["load_after"] = os.getloadavg()
    meta["end"] = time.time()
    summary = summarize(rows)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    for s in summary:
        print(json.dumps(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
