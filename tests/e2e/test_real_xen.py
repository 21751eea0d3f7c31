"""End to end on real Xen: Xen 4.17 + a Debian dom0 booted under QEMU (TCG), a PV domU created with xl.

One boot serves every check: the fixture builds everything from nothing (tests/e2e/build.sh), boots Xen with
the project tree shared read-only over 9p, and collects the dom0 driver's `RESULT` lines from the serial
console (tests/e2e/dom0/run_tests.py).  In dom0 the product itself runs: `pvback serve`, `pvback dm-stub` as
xl's device model, `pvback attach/detach/status`.  Each check is one pytest test here; the report lists the
build, boot and test stages with their wall times.

PVBACK_E2E_REUSE=1 keeps the built rootfs in $PVBACK_E2E_WORK (default /var/tmp/pvback-e2e-cache) between
runs, PVBACK_E2E_TESTS=a+b runs a subset: both are for iterating by hand, CI sets neither.  Logs of the last
run stay in tests/e2e/build/last/ (serial console, stage table, guest console, libxl's and the daemon's logs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent
ROOT = E2E.parent.parent
BUILD_TIMEOUT_S = 900  # debootstrap + apt from the mirror: ~1-4 min; a stuck mirror must not eat the CI budget
BOOT_TIMEOUT_S = 2520  # QEMU: boot ~15-60 s; dom0-init.sh bounds its driver at 2400 s (~1000 s idle, 1600 s at load 40)
LOG_DIR = E2E / "build" / "last"  # survives pytest's tmp rotation; git-ignored
# The request shapes real Linux xen-blkfront sends; a unit test on the emulated blkfront covers every one.
SHAPES_FIXTURE = ROOT / "tests" / "blk" / "fixtures" / "linux-blkfront-shapes.json"
# The keys real Linux xen-netfront writes; tests/net/test_proto.py parses them as netback does.
NETFRONT_FIXTURE = ROOT / "tests" / "net" / "fixtures" / "linux-netfront-keys.json"
NETFRONT_RUN_KEYS = ("backend", "event-channel", "event-channel-tx", "event-channel-rx", "tx-ring-ref", "rx-ring-ref",
                     "mac")  # values that differ from run to run

pytestmark = pytest.mark.e2e


def _dom0_checks() -> list[str]:
    """The checks a run makes, in the order dom0's driver reports them."""
    spec = importlib.util.spec_from_file_location("pvback_e2e_run_tests", E2E / "dom0" / "run_tests.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.CHECKS)


ALL_CHECKS = _dom0_checks()
SELECTED = [t for t in os.environ.get("PVBACK_E2E_TESTS", "").split("+") if t] or ALL_CHECKS


@dataclass
class E2ERun:
    stages: list[tuple[str, float]] = field(default_factory=list)  # (name, seconds)
    results: dict[str, tuple[bool, str]] = field(default_factory=dict)
    serial_log: Path | None = None
    failure: str | None = None  # the build or the boot itself went wrong
    done: bool = False

    def table(self) -> str:
        width = max([len(n) for n, _ in self.stages] + [10])
        lines = [f"{'stage':<{width}}  wall time", f"{'-' * width}  ---------"]
        lines += [f"{n:<{width}}  {s:7.1f} s" for n, s in self.stages]
        return "\n".join(lines)


def _ensure_qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        return qemu
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86"],
                       env=env, capture_output=True, timeout=600, check=False)
        qemu = shutil.which("qemu-system-x86_64")
        if qemu:
            return qemu
    pytest.skip("\n" + "!" * 78 + "\nREAL-XEN E2E SKIPPED: qemu-system-x86_64 is not installed and could not be "
                "installed (apt-get install qemu-system-x86)\n" + "!" * 78)


def _kill_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float) -> None:
    """TERM the process group (build.sh unmounts its chroot on TERM), then KILL what is left; by PID only."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _build(work: Path, run: E2ERun) -> None:
    t0 = time.monotonic()
    proc = subprocess.Popen([str(E2E / "build.sh"), str(work)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc, 30)
        raise AssertionError(f"build.sh did not finish within {BUILD_TIMEOUT_S} s; see {work}/build.log") from None
    finally:
        _kill_group(proc, 30)
    for m in re.finditer(r"^STAGE (\S+) ([\d.]+)$", out, re.M):
        run.stages.append((f"build: {m.group(1)}", float(m.group(2))))
    run.stages.append(("build: total", time.monotonic() - t0))
    if proc.returncode != 0:
        raise AssertionError(f"build.sh failed ({proc.returncode}):\n{err[-3000:]}")


def _precompile() -> None:
    """Bytecode for dom0: it imports pvback from the read-only share, where it cannot write __pycache__, and
    compiling every module in every process costs seconds under TCG.  Any 3.11.x writes the same format."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "backends"), str(E2E / "dom0")],
                   capture_output=True, timeout=300, check=False)


def _boot(qemu: str, work: Path, out: Path, serial: Path, run: E2ERun) -> None:
    tests = "+".join(SELECTED)
    # Xen's multiboot module list: "kernel args,initrd"; a comma inside args would have to be doubled.
    dom0_cmdline = f"console=hvc0 earlyprintk=xen root=/dev/vda rw init=/sbin/dom0-init pvtests={tests}"
    cmd = [
        qemu, "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64", "-smp", "2", "-m", "3072",
        "-nographic", "-monitor", "none", "-serial", "stdio", "-nic", "none", "-no-reboot",
        "-drive", f"file={work / 'dom0.img'},if=virtio,format=raw,cache=unsafe",
        # dom0's /dev/vdb: the driver domain's root disk, served to it by dom0's pvback (build-dd.sh)
        "-drive", f"file={work / 'dd.img'},if=virtio,format=raw,cache=unsafe",
        "-virtfs", f"local,path={ROOT},mount_tag=host0,security_model=none,readonly=on,id=host0",
        "-virtfs", f"local,path={out},mount_tag=out0,security_model=none,id=out0",
        "-kernel", str(work / "xen"),
        "-append", "console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all console_timestamps=boot noreboot "
                   "dom0_mem=1536M,max:1536M dom0_max_vcpus=2",
        "-initrd", f"{work / 'vmlinuz'} {dom0_cmdline},{work / 'initrd'}",
    ]
    marks = [  # (stage name, pattern) in boot order
        ("boot: Xen to dom0 kernel", re.compile(r"Linux version \d")),
        ("boot: dom0 kernel to init", re.compile(r"STAGE dom0-init")),
        ("boot: xenstored/xenconsoled/xl up", re.compile(r"STAGE xen-tools")),
    ]
    t0 = time.monotonic()
    last = t0
    current: str | None = None  # the dom0 driver's stage now running
    # stdin must be /dev/null, not closed: `-serial stdio` fails on a closed fd.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        _kill_group(proc, 0.1)

    killer = threading.Timer(BOOT_TIMEOUT_S, kill)
    killer.start()
    assert proc.stdout is not None
    try:
        with serial.open("w") as log:
            for raw in proc.stdout:
                now = time.monotonic()
                line = raw.decode(errors="replace").rstrip("\r\n")
                log.write(f"[{now - t0:8.3f}] {line}\n")
                log.flush()
                if marks:
                    if marks[0][1].search(line):
                        run.stages.append((marks.pop(0)[0], now - last))
                        last = now
                else:
                    m = re.search(r"STAGE (\S+)", line)
                    if m:
                        run.stages.append((f"test: {current}" if current else "boot: dom0 driver start", now - last))
                        last = now
                        current = None if m.group(1) == "tests-done" else m.group(1)
                m = re.search(r"RESULT (\S+) (PASS|FAIL) ?(.*)", line)
                if m:
                    run.results[m.group(1)] = (m.group(2) == "PASS", f"{m.group(3)} (at {now - t0:.0f} s)")
                if "PVBACK-E2E-DONE" in line:
                    run.done = True
        proc.wait(60)
    finally:
        killer.cancel()
        _kill_group(proc, 5)
    run.stages.append(("boot: poweroff", time.monotonic() - last))
    run.stages.append(("QEMU total (boot + tests)", time.monotonic() - t0))
    if not run.done:
        tail = "\n".join(serial.read_text(errors="replace").splitlines()[-25:])
        if timed_out.is_set():
            run.failure = f"QEMU killed after {BOOT_TIMEOUT_S} s without dom0 finishing; serial tail:\n{tail}"
        else:
            run.failure = f"QEMU exited ({proc.returncode}) before dom0 finished; serial tail:\n{tail}"


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt.startswith(prefix) or mnt == prefix[:-1]:
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _remove_work(work: Path) -> str | None:
    """rm -rf WORK, but never through a mount point: a chroot's bind-mounted /dev left behind by a killed build
    must be unmounted first, not emptied."""
    for mnt in _mounts_under(work):
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=60, check=False)
    left = _mounts_under(work)
    if left:
        return f"not removing {work}: still mounted: {', '.join(left)}"
    shutil.rmtree(work, ignore_errors=True)
    return None


class _Summary:
    """A plugin registered by the fixture: prints the stage table in pytest's terminal summary (after the
    progress dots, whatever the capture mode)."""

    def __init__(self) -> None:
        self.reports: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        for report in self.reports:
            terminalreporter.section("real-Xen e2e stages")
            for line in report.splitlines():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def e2e(request: pytest.FixtureRequest) -> Iterator[E2ERun]:
    qemu = _ensure_qemu()
    summary = _Summary()
    request.config.pluginmanager.register(summary, "pvback-e2e-summary")
    keep = LOG_DIR
    shutil.rmtree(keep, ignore_errors=True)
    out = keep / "out"
    out.mkdir(parents=True)
    reuse = os.environ.get("PVBACK_E2E_REUSE") == "1"
    if reuse:
        work = Path(os.environ.get("PVBACK_E2E_WORK", "/var/tmp/pvback-e2e-cache"))
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="pvback-e2e-", dir="/var/tmp"))
    run = E2ERun(serial_log=keep / "serial.log")
    t0 = time.monotonic()
    try:
        try:
            _build(work, run)
            _precompile()
            assert run.serial_log is not None
            _boot(qemu, work, out, run.serial_log, run)
        except AssertionError as exc:
            run.failure = str(exc)
        if (work / "build.log").exists():
            shutil.copy(work / "build.log", keep / "build.log")
        run.stages.append(("end to end (build + QEMU)", time.monotonic() - t0))
        yield run
    finally:
        lines = [f"real-Xen e2e stages (logs: {keep}):"]
        lines += ["  " + ln for ln in run.table().splitlines()]
        lines += [f"  RESULT {n} {'PASS' if ok else 'FAIL'} {d}" for n, (ok, d) in run.results.items()]
        if run.failure:
            lines.append(f"  failure: {run.failure.splitlines()[0]}")
        if not reuse:
            problem = _remove_work(work)
            if problem:
                lines.append(f"  {problem}")
        (keep / "stages.txt").write_text("\n".join(lines) + "\n")
        summary.reports.append("\n".join(lines))


@pytest.mark.timeout(BUILD_TIMEOUT_S + BOOT_TIMEOUT_S + 180)
def test_boot_and_stages(e2e: E2ERun) -> None:
    """Xen boots dom0, the toolstack comes up, the dom0 driver runs to the end and powers off."""
    assert e2e.failure is None, e2e.failure
    names = [n for n, _ in e2e.stages]
    for stage in ("boot: Xen to dom0 kernel", "boot: dom0 kernel to init", "boot: xenstored/xenconsoled/xl up"):
        assert stage in names, f"boot never reached '{stage}'; serial log: {e2e.serial_log}"
    assert "dom0-boot" not in e2e.results, e2e.results.get("dom0-boot")
    assert "dom0-driver" not in e2e.results, e2e.results.get("dom0-driver")


@pytest.mark.timeout(BUILD_TIMEOUT_S + BOOT_TIMEOUT_S + 180)
@pytest.mark.parametrize("name", ALL_CHECKS)
def test_dom0(e2e: E2ERun, name: str) -> None:
    if name not in SELECTED:
        pytest.skip(f"not in PVBACK_E2E_TESTS={os.environ.get('PVBACK_E2E_TESTS')}")
    if name not in e2e.results:
        raise AssertionError(f"no RESULT line for {name} ({e2e.failure or 'dom0 driver never reported it'}); "
                             f"serial log: {e2e.serial_log}")
    ok, detail = e2e.results[name]
    assert ok, f"{name}: {detail}"


@pytest.mark.timeout(BUILD_TIMEOUT_S + BOOT_TIMEOUT_S + 180)
def test_linux_request_shapes_in_fixture(e2e: E2ERun) -> None:
    """Every request shape Linux's xen-blkfront sent pvback in this run (dom0 wrote them to out/shapes.json) is
    in the fixture: the emulated blkfront is made to send each shape of the fixture, so a shape only real Linux
    sends would otherwise be exercised nowhere but here."""
    if "blk-shapes" not in SELECTED:
        pytest.skip(f"blk-shapes not in PVBACK_E2E_TESTS={os.environ.get('PVBACK_E2E_TESTS')}")
    path = LOG_DIR / "out" / "shapes.json"
    assert path.exists(), f"dom0 wrote no {path} ({e2e.failure or e2e.results.get('blk-shapes')})"
    got = json.loads(path.read_text())
    shapes = set(got["shapes"])
    assert shapes, f"pvback reported no request shapes from Linux {got['kernel']}: {e2e.results.get('blk-shapes')}"
    assert SHAPES_FIXTURE.exists(), (f"{SHAPES_FIXTURE} is missing: create it from {path} "
                                     f"(Linux {got['kernel']} sent {sorted(shapes)})")
    fixture = json.loads(SHAPES_FIXTURE.read_text())
    missing = sorted(shapes - set(fixture["shapes"]))
    assert not missing, (f"Linux {got['kernel']} (fixture: {fixture['kernel']}) sent request shapes missing from "
                         f"{SHAPES_FIXTURE.relative_to(ROOT)}: {missing}; update the fixture and make the emulated "
                         "blkfront send them")


@pytest.mark.timeout(BUILD_TIMEOUT_S + BOOT_TIMEOUT_S + 180)
def test_linux_netfront_keys_in_fixture(e2e: E2ERun) -> None:
    """The keys Linux's xen-netfront wrote for vif 0 in this run (dom0 wrote them to out/netfront-keys.json) are
    the fixture's, with the same values where a value is a choice (features, queues, headroom, trusted): a key or
    value only real Linux sends would otherwise reach netback's parser nowhere but here."""
    if "net-ping" not in SELECTED:
        pytest.skip(f"net-ping not in PVBACK_E2E_TESTS={os.environ.get('PVBACK_E2E_TESTS')}")
    path = LOG_DIR / "out" / "netfront-keys.json"
    assert path.exists(), f"dom0 wrote no {path} ({e2e.failure or e2e.results.get('net-ping')})"
    got = json.loads(path.read_text())
    fixture = json.loads(NETFRONT_FIXTURE.read_text())
    run_keys, fix_keys = got["frontend"], fixture["frontend"]
    assert run_keys, f"no netfront keys recorded from Linux {got['kernel']}"
    new = sorted(set(run_keys) - set(fix_keys))
    changed = sorted(k for k in set(run_keys) & set(fix_keys)
                     if k not in NETFRONT_RUN_KEYS and run_keys[k] != fix_keys[k])
    assert not new and not changed, (
        f"Linux {got['kernel']} (fixture: {fixture['kernel']}) wrote netfront keys the fixture lacks {new} or with "
        f"other values {[(k, run_keys[k], fix_keys[k]) for k in changed]}: update "
        f"{NETFRONT_FIXTURE.relative_to(ROOT)} and make tests/net/test_proto.py parse them")
