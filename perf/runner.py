"""What every benchmark cell runs on, whatever the device type: the host description, child processes (spawn,
stop by PID, CPU pinning, waiting for a socket), the simulator, `pvback serve` with a bench configuration, fio
and nbdkit, CPU accounting, and the list of sessions that failed without stopping a long run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

Progress = Callable[[str], None]


# ---- host description --------------------------------------------------------------------------------------


def run_text(argv: list[str]) -> str:
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
    nbdkit_v = run_text(["nbdkit", "--version"]).splitlines()
    return {
        "cpu_model": cpu,
        "cpus_online": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": run_text(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "fio": run_text(["fio", "--version"]),
        "nbdkit": nbdkit_v[0] if nbdkit_v else "",
        "gcc": (run_text(["gcc", "--version"]).splitlines() or [""])[0],
        "virtualization": run_text(["systemd-detect-virt"]) or "unknown",
        "platform": "emulated (no Xen): grant copy = memcpy, event channel = eventfd",
        "stores": {k: {"dir": str(v), "fs": filesystem_type(str(v))} for k, v in store_dirs.items()},
        "io_uring_disabled": run_text(["sysctl", "-n", "kernel.io_uring_disabled"]),
    }


# ---- processes ---------------------------------------------------------------------------------------------


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None

    def f() -> None:
        os.sched_setaffinity(0, cpus)

    return f


def spawn(argv: list[str], log: Path, *, cpus: set[int] | None = None,
          root: Path | None = None) -> subprocess.Popen[bytes]:
    """root: the source tree the child imports `backends` from (default: this one; an A/B run points the daemon
    of one side at another build)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root or ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=root or ROOT, preexec_fn=_pin(cpus))


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


def children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@contextlib.contextmanager
def simulator(work: Path) -> Iterator[Path]:
    """`pvback sim` in a child process for the length of the block; yields its sim directory."""
    work.mkdir(parents=True, exist_ok=True)
    sim_dir = work / "sim"
    log = work / "sim.log"
    proc = spawn([PY, "-m", "backends.daemon.cli", "sim", "--sim-dir", str(sim_dir)], log)
    try:
        wait_path(sim_dir / "sim.pid", proc, "pvback sim", log)
        yield sim_dir
    finally:
        stop(proc)


class Serve:
    """`pvback serve` on the simulator with a bench configuration (one process, optionally pinned).

    sections: the device types' config sections (e.g. {"blk": {...}}), written after [serve]; serve_keys:
    more keys of [serve] (e.g. backend_types); `settings` is what the result records about this process;
    prefix: a command that execs the daemon (`ip netns exec NS`: the PID stays the daemon's).
    """

    def __init__(self, work: Path, sim_dir: Path, name: str, *, sections: Mapping[str, Mapping[str, int | str]],
                 settings: dict[str, Any], cpus: set[int] | None = None,
                 serve_keys: Mapping[str, object] | None = None, prefix: list[str] | None = None,
                 root: Path | None = None) -> None:
        self.cfg = work / f"serve-{name}.toml"
        text = "[serve]\nmetrics_listen = \"\"\nlog_level = \"warning\"\n"
        text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in (serve_keys or {}).items())
        for section, keys in sections.items():
            text += f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
        self.cfg.write_text(text)
        self.log = work / f"serve-{name}.log"
        self.settings = settings
        self.proc = spawn([*(prefix or []), PY, "-m", "backends.daemon.cli", "serve", "--platform", "emulated",
                           "--sim-dir", str(sim_dir), "--config", str(self.cfg)], self.log, cpus=cpus,
                           root=root)
        time.sleep(0.8)
        if self.proc.poll() is not None:
            raise RuntimeError(f"pvback serve exited: {self.log.read_text(errors='replace')[-1500:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        stop(self.proc)


# ---- fio and nbdkit ----------------------------------------------------------------------------------------


class FioJob(Protocol):
    """What fio needs of a workload."""

    @property
    def rw(self) -> str: ...
    @property
    def bs(self) -> int: ...
    @property
    def qd(self) -> int: ...


def fio_argv(w: FioJob, *, filename: str | None, direct: bool, engine: str, seconds: float, ramp: float,
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
    c0 = children_cpu_s()
    x0 = thread_cpu_ns(extra_pid) if extra_pid else 0
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, errb = proc.communicate(timeout=seconds * 4 + 120)
    wall = time.monotonic() - t0
    c1 = children_cpu_s()
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


# ---- failures ----------------------------------------------------------------------------------------------

FAILURES: list[str] = []


def failed(progress: Progress, what: str, exc: Exception) -> None:
    """A session that failed is reported (and listed in the JSON); the rest of a long run goes on."""
    msg = f"{what}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
    FAILURES.append(msg)
    progress(f"FAILED {msg}")


# ---- the plumbing of a `pvback bench ...` command ---------------------------------------------------------


def tools_missing(command: str, tools: tuple[str, ...] | list[str]) -> bool:
    """True (after saying which on stderr) when one of `tools` is not on PATH."""
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"{command}: {tool} is not installed (./dev installs it)", file=sys.stderr)
            return True
    return False


def not_root(command: str) -> bool:
    """True (after saying so on stderr) when this process is not root: network namespaces and taps need it."""
    if os.geteuid() != 0:
        print(f"{command}: needs root (network namespaces and taps)", file=sys.stderr)
        return True
    return False


def host_line(host: dict[str, Any]) -> str:
    """The host in one progress line: CPU model, online CPUs, kernel."""
    return f"host: {host['cpu_model']}, {host['cpus_online']} CPUs, kernel {host['kernel']}"


def first_line(argv: list[str]) -> str:
    """The first line of what `argv` prints (a tool's --version), "" when it prints nothing."""
    return (run_text(argv).splitlines() or [""])[0]


def result_head(argv: list[str] | None, command: str, host: dict[str, Any], plan: Any) -> dict[str, Any]:
    """The keys every bench JSON starts with: the command line that made it, the date, the host and the plan."""
    return {
        "command": " ".join(argv) if argv else command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": host,
        "plan": plan.__dict__,
    }


def write_report(out_dir: Path, stem: str, result: dict[str, Any], md: str, target_lines: list[str]) -> None:
    """`stem`.json and `stem`.md in `out_dir`; the markdown and the targets' verdicts printed as well."""
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{stem}.md").write_text(md)
    print()
    print(md)
    for line in target_lines:
        print(line)
    print(f"\nwrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")


def run_bench(out: str, prefix: str, body: Callable[[Path, Path, Progress], int], *, tmp: str | None = None) -> int:
    """body(out_dir, work, progress) with `out` made, a fresh work directory and a progress printer stamped
    with the seconds since the start.  The work directory goes when body returns 0 and is kept (and named on
    stderr) otherwise, so that a failed run can be looked at."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:7.1f}s] {msg}", flush=True)

    work = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
    ok = False
    try:
        rc = body(out_dir, work, progress)
        ok = rc == 0
        return rc
    finally:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"(work directory kept: {work})", file=sys.stderr)
