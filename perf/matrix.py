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
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


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

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            wls = [WL_BY_NAME["rr4k_qd1"], WL_BY_NAME["rr4k_qd32"], WL_BY_NAME["sr64k_qd8"]]
            return cls(quick=True, reps=1, seconds=1.0, warmup=0.3, image_mib=256, stores=["tmpfs", "disk"],
                       workloads=wls, variants=[(1, 0), (1, 1)], null_variants=[(1, 0)], nbd=True,
                       disk_workloads=[WL_BY_NAME["rr4k_qd32"]], pingpong_rounds=20_000, latency_seconds=1.0)
        return cls(quick=False, reps=5, seconds=2.0, warmup=0.5, image_mib=1024, stores=["tmpfs", "disk"],
                   workloads=list(WORKLOADS), variants=list(VARIANTS), null_variants=[(1, 0), (1, 1)], nbd=True,
                   disk_workloads=list(WORKLOADS), pingpong_rounds=100_000, latency_seconds=3.0)


# ---- host description --------------------------------------------------------------------------------------


def _run_text(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def host_description(store_dirs: dict[str, Path]) -> dict[str, Any]:
    from backends.drivers.storage.file import filesystem_type

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    nbdkit_v = _run_text(["nbdkit", "--version"]).splitlines()
    return {
        "cpu_model": cpu,
        "cpus_online": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": _run_text(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "fio": _run_text(["fio", "--version"]),
        "nbdkit": nbdkit_v[0] if nbdkit_v else "",
        "gcc": (_run_text(["gcc", "--version"]).splitlines() or [""])[0],
        "virtualization": _run_text(["systemd-detect-virt"]) or "unknown",
        "platform": "emulated (no Xen): grant copy = memcpy, event channel = eventfd",
        "stores": {k: {"dir": str(v), "fs": filesystem_type(str(v))} for k, v in store_dirs.items()},
        "io_uring_disabled": _run_text(["sysctl", "-n", "kernel.io_uring_disabled"]),
    }


# ---- processes ---------------------------------------------------------------------------------------------


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None

    def f() -> None:
        os.sched_setaffinity(0, cpus)

    return f


def spawn(argv: list[str], log: Path, *, cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=ROOT, preexec_fn=_pin(cpus))


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_path(path: Path, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text(errors='replace')[-1500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up in {timeout:.0f} s (log {log})")
        time.sleep(0.05)


def thread_cpu_ns(pid: int) -> int:
    from perf.blkload import thread_cpu_ns as f

    return f(pid)


class Serve:
    """`pvback serve` with a bench configuration (one process, optionally pinned)."""

    def __init__(self, work: Path, sim_dir: Path, name: str, *, poll_us: int = 0, cpus: set[int] | None = None,
                 io_threads: int = 32) -> None:
        self.cfg = work / f"serve-{name}.toml"
        # persistent_threshold_bytes = 0: "persistent" cells map every request; max_persistent_grants covers a
        # QD8 x 1 MiB working set (2048 pages) so the LRU never evicts during a run.
        self.cfg.write_text(
            "[serve]\nmetrics_listen = \"\"\nlog_level = \"warning\"\n"
            f"[blk]\nmax_persistent_grants = 4096\npersistent_threshold_bytes = 0\npoll_us = {poll_us}\n"
            f"io_threads = {io_threads}\n")
        self.log = work / f"serve-{name}.log"
        self.settings = {"poll_us": poll_us, "cpus": sorted(cpus) if cpus else "any", "io_threads": io_threads,
                         "max_persistent_grants": 4096, "persistent_threshold_bytes": 0}
        self.proc = spawn([PY, "-m", "backends.daemon.cli", "serve", "--platform", "emulated", "--sim-dir",
                           str(sim_dir), "--config", str(self.cfg)], self.log, cpus=cpus)
        time.sleep(0.8)
        if self.proc.poll() is not None:
            raise RuntimeError(f"pvback serve exited: {self.log.read_text(errors='replace')[-1500:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        stop(self.proc)


# ---- fio and nbdkit ----------------------------------------------------------------------------------------


def fio_argv(w: Wl, *, filename: str | None, direct: bool, engine: str, seconds: float, ramp: float,
             size_mib: int, uri: str | None = None) -> list[str]:
    argv = ["fio", "--name=j", f"--rw={w.rw}", f"--bs={w.bs}", "--time_based=1", f"--runtime={seconds:g}",
            f"--ramp_time={ramp:g}", f"--size={size_mib}m", "--group_reporting=1", "--output-format=json",
            "--lat_percentiles=1", "--percentile_list=50:99:99.9", "--randrepeat=0", "--norandommap=1"]
    if engine == "psync":
        argv += ["--ioengine=psync", f"--numjobs={w.qd}", "--iodepth=1"]
    else:
        argv += [f"--ioengine={engine}", f"--iodepth={w.qd}"]
    if engine == "nbd":
        argv += [f"--uri={uri}"]
    else:
        argv += [f"--filename={filename}", f"--direct={int(direct)}"]
    return argv


def run_fio(argv: list[str], seconds: float, *, extra_pid: int | None = None) -> dict[str, Any]:
    """Run fio; IOPS, MB/s, total-latency percentiles and CPU (fio's own, from wait4, plus `extra_pid`'s, both
    scaled to the measured window)."""
    t0 = time.monotonic()
    c0 = _children_cpu_s()
    x0 = thread_cpu_ns(extra_pid) if extra_pid else 0
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, errb = proc.communicate(timeout=seconds * 4 + 120)
    wall = time.monotonic() - t0
    c1 = _children_cpu_s()
    x1 = thread_cpu_ns(extra_pid) if extra_pid else 0
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {errb.decode(errors='replace')[-800:]}")
    text = out.decode(errors="replace")
    data = json.loads(text[text.index("{"):])
    job = data["jobs"][0]
    d = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
    pct = d.get("lat_ns", {}).get("percentile", {}) or d.get("clat_ns", {}).get("percentile", {})
    runtime_s = d["runtime"] / 1000 or seconds
    # fio and the job processes it reaped (RUSAGE_CHILDREN: nothing else of ours ends meanwhile), scaled from
    # the whole run (set-up and ramp included) to the measured window.
    cpu_fio = (c1 - c0) * (runtime_s / wall)
    cpu_extra = (x1 - x0) / 1e9 * (runtime_s / wall) if extra_pid else 0.0
    return {
        "iops": float(d["iops"]), "mb_s": float(d["bw_bytes"]) / 1e6,
        "p50_us": float(pct.get("50.000000", 0)) / 1e3, "p99_us": float(pct.get("99.000000", 0)) / 1e3,
        "p999_us": float(pct.get("99.900000", 0)) / 1e3,
        "cpu_s": cpu_fio + cpu_extra, "cpu_server_s": cpu_extra, "runtime_s": runtime_s,
        "ops": int(d["total_ios"]),
    }


def _children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Nbdkit:
    def __init__(self, image: Path, work: Path, *, no_cache: bool = False) -> None:
        # A fresh name each time: a socket file left by an earlier nbdkit would look ready before this one is.
        self.sock = work / f"nbd-{time.monotonic_ns()}.sock"
        self.log = work / "nbdkit.log"
        # no_cache: the file plugin has no O_DIRECT; cache=none (write, then sync_file_range and drop the pages)
        # is the nearest it comes to what fio --direct=1 and blkback's O_DIRECT do on the disk store.
        argv = ["nbdkit", "-f", "--unix", str(self.sock), "file", str(image)] + (["cache=none"] if no_cache else [])
        self.proc = spawn(argv, self.log)
        wait_path(self.sock, self.proc, "nbdkit", self.log)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def close(self) -> None:
        stop(self.proc)


# ---- blkback sessions --------------------------------------------------------------------------------------


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


# ---- the run -----------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One measurement of one (store, workload, system) in one repetition."""

    store: str
    workload: str
    system: str  # fio-io_uring | fio-psync | nbd | blk-1q-copy | ... | null-1q-copy
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


Progress = Callable[[str], None]


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


@contextlib.contextmanager
def simulator(work: Path) -> Iterator[Path]:
    work.mkdir(parents=True, exist_ok=True)
    sim_dir = work / "sim"
    log = work / "sim.log"
    proc = spawn([PY, "-m", "backends.daemon.cli", "sim", "--sim-dir", str(sim_dir)], log)
    try:
        wait_path(sim_dir / "sim.pid", proc, "pvback sim", log)
        yield sim_dir
    finally:
        stop(proc)


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
            serve = Serve(work, sim_dir, "main")
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
            with simulator(work / "lat") as sim_dir:
                latency = run_latency(plan, work, sim_dir, images.get("tmpfs") or images[plan.stores[0]],
                                      progress, serve_settings)
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
            _failed(progress, f"{store} {name} rep {rep}", exc)
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
            _failed(progress, f"{name} rep {rep}", exc)
            continue
        for r in res:
            out.append(_blk_sample("null", r, name, rep))
            progress(_line(out[-1]))
    return out


FAILURES: list[str] = []


def _failed(progress: Progress, what: str, exc: Exception) -> None:
    """A session that failed is reported (and listed in the JSON); the rest of a long run goes on."""
    msg = f"{what}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
    FAILURES.append(msg)
    progress(f"FAILED {msg}")


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
        serve = Serve(work, sim_dir, f"lat-{mode}-{how}", poll_us=poll_us, cpus={be_cpu})
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


# ---- aggregation -------------------------------------------------------------------------------------------


def _med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def aggregate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (store, workload, system), with the spread and the ratios to the references of that cell."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["store"], s["workload"], s["system"]), []).append(s)
    cells: list[dict[str, Any]] = []
    for (store, wl, system), ss in groups.items():
        iops = [s["iops"] for s in ss]
        secs = [s["seconds"] for s in ss]
        ops = [s["iops"] * s["seconds"] for s in ss]
        gb = [s["mb_s"] * s["seconds"] / 1e3 for s in ss]
        cpu = [s["cpu_s"] for s in ss]
        be = [s["cpu_backend_s"] for s in ss if s["cpu_backend_s"] is not None]
        be_core = [s["iops"] / (s["cpu_backend_s"] / s["seconds"]) for s in ss if s["cpu_backend_s"]]
        cells.append({
            "store": store, "workload": wl, "system": system, "n": len(ss),
            "iops": _med(iops), "iops_min": min(iops), "iops_max": max(iops),
            "mb_s": _med([s["mb_s"] for s in ss]),
            "p50_us": _med([s["p50_us"] for s in ss]), "p99_us": _med([s["p99_us"] for s in ss]),
            "p999_us": _med([s["p999_us"] for s in ss]),
            "cpu_us_per_op": _med([c / o * 1e6 for c, o in zip(cpu, ops, strict=True) if o]),
            "cpu_s_per_gb": _med([c / g for c, g in zip(cpu, gb, strict=True) if g]),
            "backend_cpu_us_per_op": _med([b / o * 1e6 for b, o in zip(be, ops, strict=False) if o]) if be else None,
            "iops_per_backend_core": _med(be_core) if be_core else None,
            "iops_per_cpu_s": _med([s["iops"] * s["seconds"] / s["cpu_s"] for s in ss if s["cpu_s"]]),
            "errors": sum(s.get("errors", 0) for s in ss),
            "seconds": _med(secs),
        })
    by = {(c["store"], c["workload"], c["system"]): c for c in cells}
    for c in cells:
        ref = [by.get((c["store"], c["workload"], f"fio-{e}")) for e in ("io_uring", "psync")]
        refs = [r for r in ref if r]
        if refs:
            best = max(refs, key=lambda r: r["iops"])
            c["ref_system"] = best["system"]
            c["ratio_to_fio"] = c["iops"] / best["iops"] if best["iops"] else None
            # The same comparison per CPU-second: how far each side is from its own core budget.
            c["per_cpu_ratio_to_fio"] = (c["iops_per_cpu_s"] / best["iops_per_cpu_s"]
                                         if best["iops_per_cpu_s"] else None)
        nbd = by.get((c["store"], c["workload"], "nbd"))
        if nbd and nbd["iops"]:
            c["ratio_to_nbd"] = c["iops"] / nbd["iops"]
    cells.sort(key=lambda c: (c["store"], [w.name for w in WORKLOADS].index(c["workload"])
                              if c["workload"] in WL_BY_NAME else 99, c["system"]))
    return cells


def best_blk(cells: list[dict[str, Any]], store: str, wl: str) -> dict[str, Any] | None:
    cand = [c for c in cells if c["store"] == store and c["workload"] == wl and c["system"].startswith("blk-")]
    return max(cand, key=lambda c: c["iops"]) if cand else None


def evaluate_targets(cells: list[dict[str, Any]], latency: dict[str, Any],
                     ring: dict[str, Any]) -> list[dict[str, Any]]:
    """The brief's targets, for the cells this plan measured."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, detail: str, higher: bool = True) -> None:
        held = None if value is None else (value >= goal if higher else value <= goal)
        out.append({"target": name, "value": value, "goal": goal, "held": held, "detail": detail})

    for store, goal_rr, goal_seq in (("disk", 0.90, 0.95), ("tmpfs", 0.50, 0.80)):
        c = best_blk(cells, store, "rr4k_qd32")
        if c is not None:
            add(f"{store} 4k randread QD32 vs best fio", c.get("ratio_to_fio"), goal_rr,
                f"{c['system']}: {c['iops']:.0f} IOPS vs {c.get('ref_system')}; {c['cpu_us_per_op']:.2f} us CPU/req;"
                f" per CPU-second {c.get('per_cpu_ratio_to_fio') or 0:.2f} x fio")
        for wl in ("sr64k_qd8", "sw64k_qd8", "sr1m_qd8", "sw1m_qd8"):
            c = best_blk(cells, store, wl)
            if c is None:
                continue
            add(f"{store} {wl} vs best fio", c.get("ratio_to_fio"), goal_seq,
                f"{c['system']}: {c['mb_s']:.0f} MB/s vs {c.get('ref_system')}; per CPU-second "
                f"{c.get('per_cpu_ratio_to_fio') or 0:.2f} x fio")
    for store in ("tmpfs", "disk"):
        for wl in ("rr4k_qd32", "rw4k_qd32"):
            c = best_blk(cells, store, wl)
            if c is not None and "ratio_to_nbd" in c:
                add(f"{store} {wl} blkback vs nbdkit", c["ratio_to_nbd"], 3.0, f"{c['system']}: {c['iops']:.0f} IOPS")
    for row in latency.get("blk", []):
        add(f"tmpfs QD1 4k p50 vs eventfd ping-pong ({row['placement']}, {row['wait']})",
            row["ratio_p50_to_pingpong"], 1.5,
            f"{row['p50_us']:.2f} us vs {row['pingpong_p50_us']:.2f} us", higher=False)
    if ring:
        add("ring slots/s cffi batch vs pure C", ring["ratio"], 0.5,
            f"{ring['cffi_slots_per_s'] / 1e6:.2f} M vs {ring['c_slots_per_s'] / 1e6:.2f} M")
    return out


# ---- output ------------------------------------------------------------------------------------------------


def table(cells: list[dict[str, Any]]) -> str:
    hdr = (f"{'store':5s} {'workload':10s} {'system':17s} {'n':>2s} {'IOPS':>10s} {'MB/s':>9s} {'p50 us':>9s} "
           f"{'p99 us':>9s} {'CPU us/op':>9s} {'CPU s/GB':>8s} {'vs fio':>6s} {'vs nbd':>6s}")
    lines = [hdr, "-" * len(hdr)]
    for c in cells:
        rf = c.get("ratio_to_fio")
        rn = c.get("ratio_to_nbd")
        lines.append(
            f"{c['store']:5s} {c['workload']:10s} {c['system']:17s} {c['n']:2d} {c['iops']:10.0f} {c['mb_s']:9.1f} "
            f"{c['p50_us']:9.1f} {c['p99_us']:9.1f} {c['cpu_us_per_op']:9.2f} {c['cpu_s_per_gb']:8.2f} "
            f"{'' if rf is None else f'{rf:6.2f}':>6s} {'' if rn is None else f'{rn:6.2f}':>6s}")
    return "\n".join(lines)


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    cells = result["cells"]
    stores = [s for s in ("tmpfs", "disk", "null") if any(c["store"] == s for c in cells)]
    systems = sorted({c["system"] for c in cells if c["system"].startswith(("blk-", "nbd"))})
    fig, axes = plt.subplots(1, max(1, len([s for s in stores if s != "null"])), figsize=(13, 4.5), squeeze=False)
    for ax, store in zip(axes[0], [s for s in stores if s != "null"], strict=False):
        wls = [w.name for w in WORKLOADS if any(c["store"] == store and c["workload"] == w.name for c in cells)]
        width = 0.8 / max(1, len(systems))
        for i, sysname in enumerate(systems):
            vals = []
            for wl in wls:
                c = next((c for c in cells if c["store"] == store and c["workload"] == wl and c["system"] == sysname),
                         None)
                vals.append(c.get("ratio_to_fio") or 0.0 if c else 0.0)
            ax.bar([x + i * width for x in range(len(wls))], vals, width, label=sysname)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(wls))], wls, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{store}: IOPS / best fio engine")
        ax.set_ylabel("ratio")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "ratios.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(str(p))

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for k, wl in enumerate(("rr4k_qd1", "rr4k_qd32")):
        for s in result["samples"]:
            if s["workload"] == wl and s["hist_ns"] and s["rep"] == 0 and s["store"] in ("tmpfs", "null"):
                xs, cum, total = [], 0, sum(n for _, n in s["hist_ns"])
                ys = []
                for v, n in s["hist_ns"]:
                    cum += n
                    xs.append(v / 1e3)
                    ys.append(cum / total)
                ax[k].plot(xs, ys, label=f"{s['store']} {s['system']}", lw=1)
        for s in result["samples"]:
            if s["workload"] == wl and s["rep"] == 0 and s["store"] == "tmpfs" and not s["hist_ns"]:
                ax[k].scatter([s["p50_us"], s["p99_us"]], [0.5, 0.99], marker="x", s=20, label=f"{s['system']} p50/p99")
        ax[k].set_xscale("log")
        ax[k].set_xlabel("latency (us)")
        ax[k].set_ylabel("CDF")
        ax[k].set_title(f"{wl}: latency distribution (unpinned)")
        if ax[k].get_legend_handles_labels()[0]:
            ax[k].legend(fontsize=6)
    fig.tight_layout()
    p = out_dir / "latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(str(p))

    lat = result.get("latency", {}).get("blk", [])
    if lat:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in lat:
            xs, ys, cum = [], [], 0
            total = sum(n for _, n in row["hist_ns"]) or 1
            for v, n in row["hist_ns"]:
                cum += n
                xs.append(v / 1e3)
                ys.append(cum / total)
            ax.plot(xs, ys, label=f"{row['placement']}/{row['wait']} (ping-pong p50 {row['pingpong_p50_us']:.1f} us)")
        ax.set_xscale("log")
        ax.set_xlabel("round trip (us)")
        ax.set_ylabel("CDF")
        ax.set_title("QD1 4 KiB tmpfs: placement and polling")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / "placement.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(str(p))
    return files


def main(quick: bool, out: str, *, disk_dir: str | None = None, tmpfs_dir: str = "/dev/shm",
         argv: list[str] | None = None, plan: Plan | None = None) -> int:
    plan = plan or Plan.make(quick)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("fio", "nbdkit", "gcc"):
        if shutil.which(tool) is None and (tool != "nbdkit" or plan.nbd):
            print(f"pvback bench: {tool} is not installed (./dev installs it)", file=sys.stderr)
            return 1
    store_dirs = {"tmpfs": Path(tmpfs_dir), "disk": Path(disk_dir or "/var/tmp")}
    store_dirs = {k: v for k, v in store_dirs.items() if k in plan.stores}
    t_start = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:7.1f}s] {msg}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="pvback-bench-"))
    (out_dir / "samples.jsonl").unlink(missing_ok=True)
    ok = False
    try:
        host = host_description(store_dirs)
        progress(f"host: {host['cpu_model']}, {host['cpus_online']} CPUs, kernel {host['kernel']}, "
                 f"stores {host['stores']}; {plan.reps} rep(s) x {plan.seconds:g} s")
        FAILURES.clear()
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
            "failures": list(FAILURES),
            "cells": cells, "targets": targets, "latency": raw["latency"], "ring": raw["ring"],
            "samples": raw["samples"],
        }
        (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
        print()
        print(table(cells))
        print()
        for t in targets:
            mark = "HOLDS" if t["held"] else ("n/a" if t["held"] is None else "MISSES")
            v = "-" if t["value"] is None else f"{t['value']:.2f}"
            print(f"  [{mark:6s}] {t['target']}: {v} (goal {'<=' if 'ping-pong' in t['target'] else '>='} "
                  f"{t['goal']}) {t['detail']}")
        files = plots(result, out_dir)
        print(f"\nwrote {out_dir / 'bench.json'} and {', '.join(files)}")
        ok = True
        return 0
    finally:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"(work directory kept: {work})", file=sys.stderr)


def markdown(result: dict[str, Any]) -> str:
    """perf/RESULTS.md's tables from a bench.json."""
    h = result["host"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Host: {h['cpu_model']}, {h['cpus_online']} vCPUs ({h['virtualization']}), {h['mem_gib']} GiB, "
        f"kernel {h['kernel']}, {h['os']}; {h['fio']}, {h['nbdkit']}; stores: "
        + ", ".join(f"{k} = {v['dir']} ({v['fs']})" for k, v in h["stores"].items()) + "  ",
        f"Plan: {result['plan']['reps']} repetitions x {result['plan']['seconds']:g} s "
        f"(+{result['plan']['warmup']:g} s warm-up) per cell, {result['plan']['image_mib']} MiB images of random "
        "data; cells are medians (IOPS min-max over the repetitions).",
        "",
        "| store | workload | system | IOPS (min-max) | MB/s | p50 us | p99 us | CPU us/op | CPU s/GB | vs fio | "
        "vs fio per CPU-s | vs nbd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f2(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    for c in result["cells"]:
        lines.append(
            f"| {c['store']} | {c['workload']} | {c['system']} | {c['iops']:.0f} ({c['iops_min']:.0f}-"
            f"{c['iops_max']:.0f}) | {c['mb_s']:.1f} | {c['p50_us']:.1f} | {c['p99_us']:.1f} | "
            f"{c['cpu_us_per_op']:.2f} | {c['cpu_s_per_gb']:.2f} | {f2(c.get('ratio_to_fio'))} | "
            f"{f2(c.get('per_cpu_ratio_to_fio'))} | {f2(c.get('ratio_to_nbd'))} |")
    lines += ["", "Null driver (backend CPU only): IOPS per backend core", "",
              "| workload | system | IOPS | backend CPU us/op | IOPS per backend core |", "|---|---|---|---|---|"]
    for c in result["cells"]:
        if c["store"] == "null":
            lines.append(f"| {c['workload']} | {c['system']} | {c['iops']:.0f} | {f2(c['backend_cpu_us_per_op'])} | "
                         f"{c['iops_per_backend_core'] or 0:.0f} |")
    lat = result.get("latency", {})
    lines += ["", "QD1 4 KiB random read on tmpfs, by CPU placement (eventfd ping-pong measured in the same run)", "",
              "| placement | wait | backend poll_us | frontend spin_us | IOPS | p50 us | p99 us | ping-pong p50 us | "
              "ratio p50 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in lat.get("blk", []):
        lines.append(f"| {r['placement']} (be cpu{r['backend_cpu']}, fe cpu{r['frontend_cpu']}) | {r['wait']} | "
                     f"{r['backend_poll_us']} | {r['frontend_spin_us']} | {r['iops']:.0f} | {r['p50_us']:.2f} | "
                     f"{r['p99_us']:.2f} | {r['pingpong_p50_us']:.2f} | {r['ratio_p50_to_pingpong']:.2f} |")
    ring = result.get("ring") or {}
    if ring:
        lines += ["", f"Ring: pure C loop {ring['c_slots_per_s'] / 1e6:.2f} M slots/s, cffi batch of 32 "
                      f"{ring['cffi_slots_per_s'] / 1e6:.2f} M slots/s, ratio {ring['ratio']:.2f}."]
    lines += ["", "Targets", "", "| target | value | goal | holds | detail |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        op = "<=" if "ping-pong" in t["target"] else ">="
        lines.append(f"| {t['target']} | {f2(t['value'])} | {op} {t['goal']} | "
                     f"{'yes' if t['held'] else 'NO'} | {t['detail']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="print perf/RESULTS.md tables from a bench.json")
    ap.add_argument("bench_json")
    data = json.loads(Path(ap.parse_args().bench_json).read_text())
    # Recomputed from the raw samples, so a file written by an older aggregation gets today's columns.
    data["cells"] = aggregate(data["samples"])
    data["targets"] = evaluate_targets(data["cells"], data.get("latency", {}), data.get("ring", {}))
    print(markdown(data), end="")
