"""Where the many-guests benchmark's time goes: N guests (perf.blkload, one process each) on one daemon, with
every thread of the daemon and of the guests sampled while they run.

    python -m perf.guests_probe --n 1 --reps 4 --pin none same split --out /tmp/probe.json
    python -m perf.guests_probe --n 2 32 --image-mib 16 --region-mib 1 16 --out /tmp/ws.json
    python -m perf.guests_probe --n 2 --hostile --blk spurious_pause_max_us=5000 --out /tmp/h.json

Per run: each guest's IOPS (and per 250 ms from the daemon's metrics), and for each thread its CPU, its
run-queue wait (/proc/<pid>/task/<tid>/schedstat), its voluntary/involuntary switches and migrations
(/proc/<pid>/task/<tid>/sched), and the CPU it sat on in each 20 ms sample (/proc/<pid>/task/<tid>/stat
field 39).  `--pin same|split` (one guest) puts the guest process and the daemon's pump thread on one CPU or
on the two, to see what placement alone does.  A diagnostic: the benchmark is perf/blk_guests.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from perf.blk_guests import jain, make_images
from perf.runner import PY, spawn, stop

TICK = 0.05


def tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def task_stat(pid: int, tid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        run, wait, slices = (int(x) for x in Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
        sched = Path(f"/proc/{pid}/task/{tid}/sched").read_text()
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    f = text[text.rindex(")") + 2:].split()
    vals = dict(re.findall(r"^(se\.nr_migrations|nr_voluntary_switches|nr_involuntary_switches)\s+:\s+(\d+)",
                           sched, re.M))
    return {"cpu": int(f[36]), "run_ns": run, "wait_ns": wait, "slices": slices,
            "migrations": int(vals.get("se.nr_migrations", 0)), "vol": int(vals.get("nr_voluntary_switches", 0)),
            "invol": int(vals.get("nr_involuntary_switches", 0))}


class Sampler(threading.Thread):
    """Every TICK: each watched thread's CPU; at start and end: its counters."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.stop_evt = threading.Event()
        self.first: dict[tuple[str, int], dict[str, int]] = {}
        self.last: dict[tuple[str, int], dict[str, int]] = {}
        self.cpus: dict[tuple[str, int], list[int]] = {}

    def snap(self) -> dict[tuple[str, int], dict[str, int]]:
        out = {}
        for name, pid in self.pids.items():
            for tid in tasks(pid):
                st = task_stat(pid, tid)
                if st is not None:
                    out[(name, tid)] = st
        return out

    def run(self) -> None:
        self.first = self.snap()
        while not self.stop_evt.wait(TICK):
            s = self.snap()
            for k, st in s.items():
                self.cpus.setdefault(k, []).append(st["cpu"])
            self.last = s

    def result(self, wall: float) -> list[dict[str, Any]]:
        out = []
        for k, end in self.last.items():
            beg = self.first.get(k)
            if beg is None:
                continue
            d = {key: end[key] - beg[key] for key in ("run_ns", "wait_ns", "slices", "migrations", "vol", "invol")}
            if d["run_ns"] < 0.002 * wall * 1e9:
                continue  # idle threads (the control loop between scrapes, the I/O pool)
            cpus = self.cpus.get(k, [])
            out.append({"proc": k[0], "tid": k[1], "cpu_frac": d["run_ns"] / 1e9 / wall,
                        "wait_frac": d["wait_ns"] / 1e9 / wall,
                        "wait_us_per_slice": d["wait_ns"] / 1e3 / max(1, d["slices"]),
                        "slices": d["slices"], "migrations": d["migrations"], "vol": d["vol"], "invol": d["invol"],
                        "on_cpu0": cpus.count(0) / len(cpus) if cpus else 0.0, "cpu_samples": cpus})
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Reads completed per frontend domid."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("pvback_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels.get("op") == "read":
                out[labels["domid"]] = out.get(labels["domid"], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_once(work: Path, sim: Path, serve_pid: int, port: int, images: list[Path], *, n: int, seconds: float,
             region_mib: int, pin: str, hostile: bool, poller: bool, warm: bool = False) -> dict[str, Any]:
    tag = f"{time.monotonic_ns()}"
    warmers = []
    if warm:
        # A SCHED_IDLE spinner per CPU: runs only when nothing else wants the CPU, so the vCPU never halts.
        for cpu in range(os.cpu_count() or 1):
            warmers.append(spawn(["taskset", "-c", str(cpu), "chrt", "-i", "0", PY, "-c", "while True: pass"],
                                 work / "warm.log"))
    start = work / f"start-{tag}"
    procs = []
    names = [f"g{i}" for i in range(n)]
    for i, name in enumerate(names):
        bad = (hostile or poller) and i == n - 1
        wl = {"name": "w", "rw": "randread", "bs": 4096, "qd": 32 if bad else 8}
        argv = [PY, "-m", "perf.blkload", "--sim-dir", str(sim), "--params", f"aio:{images[i]}", "--queues", "1",
                "--persistent", "0", "--workloads", json.dumps([wl]), "--seconds", f"{seconds:g}", "--warmup", "1",
                "--name", name, "--start-file", str(start), "--out", str(work / f"{tag}-{name}.json"),
                "--region-mib", str(region_mib)]
        if bad and hostile:
            argv.append("--hostile")
        if bad and poller:
            argv += ["--spin-us", "4000000000"]
        procs.append(spawn(argv, work / f"guest-{name}.log"))
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{start}.ready.{nm}").exists() for nm in names):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("a guest did not connect: " + (work / "guest-g0.log").read_text()[-800:])
            time.sleep(0.05)
        before = set(tasks(serve_pid))
        pump_tids: list[int] = []
        t_go = time.time() + 0.5
        (work / "t").write_text(repr(t_go))
        os.replace(work / "t", start)
        time.sleep(max(0.0, t_go + 1.0 - time.time()))  # past the warm-up
        if pin != "none":
            # The pump: the daemon thread that ran most in the last 100 ms.
            sa = {t: task_stat(serve_pid, t) for t in tasks(serve_pid)}
            time.sleep(0.1)
            sb = {t: task_stat(serve_pid, t) for t in tasks(serve_pid)}
            busy = sorted((sbt["run_ns"] - sat["run_ns"], t) for t, sbt in sb.items() if sbt and (sat := sa.get(t)))
            pump_tids = [busy[-1][1]]
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(procs[0].pid)], check=True, capture_output=True)
            subprocess.run(["taskset", "-p", "-c", "0" if pin == "same" else "1", str(pump_tids[0])], check=True,
                           capture_output=True)
        pids = {"daemon": serve_pid, **{nm: p.pid for nm, p in zip(names, procs, strict=True)}}
        sampler = Sampler(pids)
        sampler.start()
        t0 = time.monotonic()
        series: list[tuple[float, dict[str, float]]] = []
        la0 = os.getloadavg()[0]
        while time.monotonic() - t0 < seconds - 1.3:
            series.append((time.monotonic() - t0, scrape(port)))
            time.sleep(0.25)
        sampler.stop_evt.set()
        sampler.join()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        pauses = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("pvback_device_status{") and 'key="spurious_pauses"' in line)
        wall = time.monotonic() - t0
        threads = sampler.result(wall)
        results = {}
        for nm, p in zip(names, procs, strict=True):
            p.wait(timeout=seconds + 60)
            results[nm] = json.loads((work / f"{tag}-{nm}.json").read_text())[0]
        per = [float(results[nm]["iops"]) for nm in names]
        # IOPS per 250 ms per domid
        rates: dict[str, list[float]] = {}
        for (ta, a), (tb, b) in itertools.pairwise(series):
            for dom in b:
                rates.setdefault(dom, []).append((b[dom] - a.get(dom, 0.0)) / (tb - ta))
        for t in threads:
            t["new"] = t["proc"] == "daemon" and t["tid"] not in before
        return {"n": n, "pin": pin, "hostile": hostile, "poller": poller, "region_mib": region_mib,
                "per_guest_iops": per, "aggregate": sum(per), "jain": jain(per), "threads": threads,
                "rates_250ms": rates, "load1": la0, "pump_tids": pump_tids, "spurious_pauses": pauses}
    finally:
        for p in procs + warmers:
            stop(p)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--image-mib", type=int, default=16)
    ap.add_argument("--region-mib", type=int, nargs="+", default=[0])
    ap.add_argument("--pin", nargs="+", default=["none"], choices=("none", "same", "split"))
    ap.add_argument("--hostile", action="store_true")
    ap.add_argument("--poller", action="store_true")
    ap.add_argument("--warm", nargs="+", type=int, default=[0], help="0/1: SCHED_IDLE spinners keep the vCPUs awake")
    ap.add_argument("--blk", nargs="*", default=[], help="KEY=VALUE of [blk]")
    ap.add_argument("--variant", nargs="*", default=[], help="NAME:KEY=VALUE,KEY=VALUE: daemons compared in turn")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pvback-probe-"))
    img_dir = Path("/dev/shm") / f"pvback-probe-{os.getpid()}"
    from perf.runner import simulator

    base = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.blk)}
    variants = [("base", base)]
    if args.variant:
        variants = []
        for text in args.variant:
            name, _, kvs = text.partition(":")
            keys = dict(base)
            keys.update({k: int(v) for k, v in (kv.split("=", 1) for kv in kvs.split(",") if kv)})
            variants.append((name, keys))
    out: list[dict[str, Any]] = []
    try:
        images = make_images(img_dir, max(max(args.n), 2), args.image_mib)
        with simulator(work) as sim:
            for rep in range(args.reps):
                order = variants if rep % 2 == 0 else list(reversed(variants))
                for vname, keys in order:
                    port = free_port()
                    cfg = work / f"serve-{vname}.toml"
                    cfg.write_text(f'[serve]\nmetrics_listen = "127.0.0.1:{port}"\nlog_level = "warning"\n[blk]\n'
                                   "io_threads = 4\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
                    serve = spawn([PY, "-m", "backends.daemon.cli", "serve", "--platform", "emulated", "--sim-dir",
                                   str(sim), "--config", str(cfg)], work / f"serve-{vname}.log")
                    time.sleep(1.0)
                    try:
                        for n in args.n:
                            for region in args.region_mib:
                                for pin, warm in [(p, w) for p in args.pin for w in args.warm]:
                                    r = run_once(work, sim, serve.pid, port, images, n=n, seconds=args.seconds,
                                                 region_mib=region, pin=pin, hostile=args.hostile,
                                                 poller=args.poller, warm=bool(warm))
                                    r["rep"], r["variant"], r["blk"], r["warm"] = rep, vname, keys, warm
                                    out.append(r)
                                    th = r["threads"]
                                    dm = [t for t in th if t["proc"] == "daemon"]
                                    gs = [t for t in th if t["proc"] != "daemon"]

                                    def med(xs: list[float]) -> float:
                                        return statistics.median(xs) if xs else 0.0

                                    print(f"rep {rep} {vname} n={n} region={region} pin={pin} warm={warm}: agg "
                                          f"{r['aggregate']:.0f} jain {r['jain']:.3f} load {r['load1']:.1f} | "
                                          f"daemon thr {len(dm)} cpu {sum(t['cpu_frac'] for t in dm):.2f} "
                                          f"wait {sum(t['wait_frac'] for t in dm):.2f} | guests cpu "
                                          f"{sum(t['cpu_frac'] for t in gs):.2f} wait "
                                          f"{sum(t['wait_frac'] for t in gs):.2f} | wait/slice us daemon "
                                          f"{med([t['wait_us_per_slice'] for t in dm]):.0f} guest "
                                          f"{med([t['wait_us_per_slice'] for t in gs]):.0f} | pauses "
                                          f"{r['spurious_pauses']:.0f}", flush=True)
                                    Path(args.out).write_text(json.dumps(out, indent=1))
                    finally:
                        stop(serve)
    finally:
        shutil.rmtree(img_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
