#!/usr/bin/env python3
"""The dom0 side of the real-Xen end-to-end test.  Runs inside the test dom0 (Debian's python3.11), started by
dom0-init from the read-only 9p share; prints for the host test, on the console:

    STAGE <name>                            when a stage starts (the host times the stages)
    RESULT <check> PASS|FAIL <detail>       one line per check

Everything goes through the product, as an operator would use it: `pvback serve` serves the disks,
`pvback dm-stub` is xl's device model for the guest's qdisk disks, `pvback attach/detach` and
`xl create/block-attach/block-detach` create and remove them, `pvback status` shows them.

One PV guest (tests/e2e/domU-init.sh) runs every disk check in turn: three disks from `xl create` (rw, ro, and
one on dm-log-writes whose log is replayed here afterwards), one `pvback attach`ed right after it starts and
never detached (it must go with the domain), one hot-plugged while it runs, then a reboot.  Its verdicts come
back through its console (xenconsoled's log), with the lines its kernel logged about its disks, and are
cross-checked here against the image files, pvback's metrics and its log.  Every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

try:  # the host: mypy, and the pytest side reading CHECKS
    from tests.e2e.dom0 import driver_domain, logwrites, ovs_case
    from tests.e2e.dom0.shared import judge_step, stop_process
except ImportError:  # dom0 runs this file as a script from the share, next to logwrites.py
    import driver_domain  # type: ignore[import-not-found,no-redef]
    import logwrites  # type: ignore[import-not-found,no-redef]
    import ovs_case  # type: ignore[import-not-found,no-redef]
    from shared import judge_step, stop_process  # type: ignore[import-not-found,no-redef]

HERE = Path(__file__).resolve().parent
CONSOLE_DIR = Path("/var/log/xen/console")
WORK = Path("/var/lib/pvback-e2e")  # ext4, so O_DIRECT and hole punching behave as on a real dom0
OUT = Path("/mnt/out")
DOMU_KERNEL = "/opt/pvback-e2e/vmlinuz"
DOMU_RAMDISK = "/opt/pvback-e2e/domU.cpio.gz"
PVBACK = "/usr/local/bin/pvback"  # build.sh: runs backends.daemon.cli from the share with dom0's python3
DM_STUB = "/usr/local/lib/pvback/dm-stub"  # build.sh: exec pvback dm-stub "$@"
METRICS = "127.0.0.1:9477"
SERVE_LOG = Path("/tmp/pvback-serve.log")
PVBACK_USER = "pvback"  # build.sh creates it (contrib/sysusers.d/pvback.conf); [daemon] user "auto" picks it
CAP_NET_ADMIN = 1 << 12  # what `pvback serve` keeps after the drop: the vif's taps (backends/net/devtype.py)
GUEST = "pvguest"
MiB = 1 << 20
XVDA, XVDB, XVDD, XVDE = 51712, 51728, 51760, 51776
# dm-log-writes under xvdd (domU-init.sh's LW_*: tags at 28 MiB, 8 rounds; 6 files in a 16 MiB ext4)
LW_NAME = "pvlw"
LW_DEV = Path(f"/dev/mapper/{LW_NAME}")
LW_DATA_MIB, LW_LOG_MIB = 32, 256
LW_TAG_BASE, LW_TAG_SIZE, LW_ROUNDS = 28 * MiB, 4096, 8
LW_FILES = 6
DOMAIN_GONE_TIMEOUT_S = 30  # from the domain's death to pvback letting go of its disk
DOMAIN_DEATH_TIMEOUT_S = 120  # from the guest's reboot (or the loop's end) to libxl having destroyed the domain
GUEST_TIMEOUT_S = 720  # the whole guest scenario, reboot included (its NIC checks added ~20 %: 600 -> 720)
HOTPLUG_ACTION_TIMEOUT_S = 60
# The guest's vTPM (xl's vtpm=[...]), served by `pvback serve --types qdisk,vtpm` with one swtpm: a fixed uuid,
# so its state dir is known (/var/lib/pvback/vtpm/<uuid>, fresh in every run: dom0.img is rebuilt).
VTPM_UUID = "6f1c3b2a-9d4e-4f7a-8b21-5c0e7d9a4e16"
VTPM_DEVID = 0
# Its state is encrypted with a key `pvback vtpm-manager` releases (#17): the manager (key-file KEK, private
# store) runs beside `pvback serve`, the vTPM is provisioned for the guest's domain UUID (fixed in the xl cfg,
# so the binding holds across xl create and the reboot) and devid, and `pvback serve` asks it over its socket.
DOMAIN_UUID = "3d0f6a52-71c4-4b8e-9a15-e2b7c40d8f93"
MGR_DIR = Path("/var/lib/pvback-vtpm-manager")  # its store, 0700 (made by --init)
MGR_KEK = Path("/etc/pvback/vtpm-kek")  # 32 random bytes, 0600 (made by --init)
MGR_SOCKET = Path("/run/pvback/vtpm-manager.sock")
MGR_CONFIG = Path("/tmp/vtpm-manager.toml")
MGR_LOG = Path("/tmp/pvback-vtpm-manager.log")
SERVE_CONFIG = Path("/tmp/pvback-e2e.toml")
VTPM_STATE = Path("/var/lib/pvback/vtpm")
# The guest's NICs (xl's vif=[...], served by `pvback serve --types ...,vif`, plugged by the hotplug script an
# operator installs with pvback, contrib/xen/vif-pvback, as build.sh does): vif 0 from xl create, vif 1 from
# `xl network-attach`.  dom0's side of vif N is the tap vif<domid>.N with 198.18.N.1/24 and fd00:N::1/64.
VIF_SCRIPT = "vif-pvback"
# `pvback status` (a CLI run): its start alone took 20-50 s under TCG on a loaded 2-core host, and 60 s did not
# suffice at load 40.
STATUS_TIMEOUT_S = 180
VIF_MACS = {0: "00:16:3e:5e:00:01", 1: "00:16:3e:5e:00:02"}
NET_PORT_UP, NET_PORT_DOWN = 5701, 5702  # domU-init.sh: the guest sends to the first, receives from the second
NET_MIB = {"net-tcp": 8, "net-attach": 2, "net-reboot": 2}  # each way: vif 0 moves more, the others show traffic
NET_MAX_BYTES = 64 * MiB  # what one upload may send before dom0 hangs up

# Checks, in the order they are reported; the host test makes one pytest test of each.
CHECKS = ["platform", "pvback-serve", "xl-boot", "xl-qdisk-stub", "blk-rw-xl", "blk-big", "blk-discard",
          "blk-ro", "pvback-status", "blk-flush", "blk-fs-replay", "blk-domain-gone", "blk-rw-attach", "blk-fs",
          "blk-hotplug", "guest-klog", "blk-reboot", "blk-shapes", "vtpm-tools", "vtpm-reboot", "net-ping", "net-tcp",
          "net-attach", "net-ovs", "net-reboot", "least-privilege", *driver_domain.CHECKS]
# The guest's step name for each check it takes part in (domU-init.sh's `want`).
GUEST_STEP = {"xl-boot": "boot", "blk-rw-xl": "rw", "blk-big": "big", "blk-discard": "discard", "blk-ro": "ro",
              "blk-flush": "flush", "blk-fs-replay": "fs-replay", "blk-domain-gone": "gone",
              "blk-rw-attach": "rw-attach", "blk-fs": "fs", "blk-hotplug": "hotplug", "guest-klog": "klog",
              "blk-reboot": "reboot", "vtpm-tools": "tpm", "vtpm-reboot": "tpm-reboot", "net-ping": "net-ping",
              "net-tcp": "net-tcp", "net-attach": "net-attach", "net-reboot": "net-reboot", "net-ovs": "net-ovs"}
NET_STEPS = {"net-ping", "net-tcp", "net-attach", "net-reboot", "net-ovs"}
REBOOT_STEPS = ("reboot", "tpm-reboot", "net-reboot")  # the steps the guest reports after its reboot
STEP_CHECK = {v: k for k, v in GUEST_STEP.items()}
NEEDS_GUEST = set(GUEST_STEP) | {"xl-qdisk-stub", "pvback-status", "blk-shapes"}


def say(line: str) -> None:
    print(line, flush=True)


class TestFailure(Exception):
    pass


def run(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TestFailure(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from exc
    if check and cp.returncode != 0:
        err = (cp.stderr or cp.stdout).strip().splitlines()
        raise TestFailure(f"`{' '.join(cmd)}` exited {cp.returncode}: {' | '.join(err[-3:])}")
    return cp


def wait_until(what: str, cond: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(interval)
    raise TestFailure(f"timed out after {timeout:.0f} s waiting for {what}")


class Report:
    """One RESULT line per selected check, the first verdict wins; checks never reported fail at the end."""

    def __init__(self, selected: list[str]) -> None:
        self.selected = selected
        self.done: dict[str, bool] = {}

    def __call__(self, check: str, ok: bool, detail: str) -> None:
        if check in self.done or check not in self.selected:
            return
        self.done[check] = ok
        say(f"RESULT {check} {'PASS' if ok else 'FAIL'} {detail}")

    def fail_rest(self, why: str) -> None:
        for check in self.selected:
            self(check, False, why)

    @property
    def failed(self) -> int:
        return sum(1 for ok in self.done.values() if not ok)


# ---- least privilege (#19) ----

def user_exists() -> bool:
    try:
        pwd.getpwnam(PVBACK_USER)
        return True
    except KeyError:
        return False


def proc_status(pid: int) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in Path(f"/proc/{pid}/status").read_text()
                                             .splitlines())}


def status_problems(what: str, st: dict[str, str], uid: int, gid: int, want_caps: int) -> list[str]:
    """What the kernel says the process holds, against the drop's promise: the user, `want_caps` permitted and
    effective and nothing else, nothing a child could inherit, no_new_privs."""
    problems = []
    if st["Uid"].split() != [str(uid)] * 4 or st["Gid"].split() != [str(gid)] * 4:
        problems.append(f"{what}: Uid {st['Uid']} Gid {st['Gid']}")
    if "0" in st["Groups"].split():
        problems.append(f"{what}: in group root ({st['Groups']})")
    problems += [f"{what}: {k} {st[k]} (want {want_caps:#x})" for k in ("CapPrm", "CapEff")
                 if int(st[k], 16) != want_caps]
    problems += [f"{what}: {k} {st[k]}" for k in ("CapInh", "CapBnd", "CapAmb") if int(st[k], 16)]
    if st.get("NoNewPrivs") != "1":
        problems.append(f"{what}: NoNewPrivs {st.get('NoNewPrivs')}")
    return problems


def t_least_privilege(daemon: Daemon, scenario: Scenario | None) -> str:
    """`pvback serve`, after a whole run of disks, a vTPM and NICs over gntdev/evtchn/xenstored, runs as the
    pvback user with CAP_NET_ADMIN alone (the vif's taps; qdisk and vtpm keep none), no_new_privs; its swtpm
    (read while it ran) with no capability at all; /dev/xen/evtchn (opened per bound port, after the drop)
    carries an ACL entry for the pvback group; the vTPM manager released the key to the pvback uid."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        raise TestFailure("pvback serve is not running")
    pw = pwd.getpwnam(PVBACK_USER)
    problems = status_problems("pvback serve", proc_status(daemon.proc.pid), pw.pw_uid, pw.pw_gid, CAP_NET_ADMIN)
    swtpms = scenario.swtpm_status if scenario is not None else {}
    if not swtpms:
        problems.append("no swtpm status was read while the vTPM ran")
    for pid, st in swtpms.items():
        problems += status_problems(f"swtpm {pid}", st, pw.pw_uid, pw.pw_gid, 0)
    evtchn = os.stat("/dev/xen/evtchn")
    try:
        raw = os.getxattr("/dev/xen/evtchn", "system.posix_acl_access")
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        raw = b""
    entries = {(tag, ident): perm for tag, perm, ident in struct.iter_unpack("<HHI", raw[4:])}
    if entries.get((0x08, pw.pw_gid), 0) & 6 != 6 and evtchn.st_mode & 0o006 != 0o006:  # ACL_GROUP pvback: rw
        problems.append(f"/dev/xen/evtchn (mode {evtchn.st_mode & 0o777:04o}): no rw ACL entry for group "
                        f"{pw.pw_gid}: {entries}")
    log = SERVE_LOG.read_text(errors="replace")
    if not re.search(r'msg="dropped privileges" .*capabilities=CAP_NET_ADMIN', log):
        problems.append("no `dropped privileges ... capabilities=CAP_NET_ADMIN` line in the serve log")
    releases = [ln for ln in Manager.log().splitlines() if "op=release" in ln and "result=ok" in ln]
    if not releases or any(f"peer_uid={pw.pw_uid}" not in ln for ln in releases):
        problems.append(f"the vTPM manager's releases were not all to uid {pw.pw_uid}: {releases[:2]}")
    if problems:
        raise TestFailure("; ".join(problems))
    return (f"pvback serve (pid {daemon.proc.pid}): uid/gid {pw.pw_uid}/{pw.pw_gid}, CapEff=CapPrm=CAP_NET_ADMIN, "
            f"CapInh/CapBnd/CapAmb 0, no_new_privs; swtpm {','.join(map(str, swtpms))}: same uid, no capability; "
            f"/dev/xen/evtchn rw for group {pw.pw_gid}; {len(releases)} key release(s) to uid {pw.pw_uid}")


# ---- disks ----

def sha_region(path: Path, off_mib: int, n_mib: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(off_mib * MiB)
        for _ in range(n_mib):
            h.update(f.read(MiB).ljust(MiB, b"\0"))
    return h.hexdigest()


def make_disk(name: str, size_mib: int, random_at: list[tuple[int, int]],
              marker: bytes = b"") -> tuple[Path, list[str]]:
    """A sparse image with random data at each (offset MiB, length MiB); returns the path and their shas."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{name}.img"
    path.unlink(missing_ok=True)
    shas = []
    with path.open("wb") as f:
        f.truncate(size_mib * MiB)
        f.write(b"PVBACK-E2E-DISK\n")
        for off, n in random_at:
            f.seek(off * MiB)
            h = hashlib.sha256()
            for _ in range(n):
                chunk = os.urandom(MiB)
                h.update(chunk)
                f.write(chunk)
            shas.append(h.hexdigest())
        if marker:
            f.seek(200 * MiB)
            f.write(marker)
        f.flush()
        os.fsync(f.fileno())
    if user_exists():
        shutil.chown(path, PVBACK_USER, PVBACK_USER)  # `pvback serve` opens it after dropping to that user
    return path, shas


def qdisk(path: Path, vdev: str, access: str = "rw") -> str:
    return f"backendtype=qdisk,format=raw,vdev={vdev},access={access},target={path}"


# ---- xl and the guest ----

def domid_of(name: str) -> int | None:
    cp = run(["xl", "domid", name], timeout=30, check=False)
    return int(cp.stdout.strip()) if cp.returncode == 0 and cp.stdout.strip().isdigit() else None


def console_log(name: str) -> Path:
    return CONSOLE_DIR / f"guest-{name}.log"


def console_text(name: str) -> str:
    try:
        return console_log(name).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def xs_read(path: str) -> str | None:
    cp = run(["xenstore-read", path], timeout=20, check=False)
    return cp.stdout.strip() if cp.returncode == 0 else None


def dm_stub_pids(domid: int) -> list[str]:
    cp = run(["pgrep", "-f", f"dm-stub .*-xen-domid {domid}( |$)"], check=False)
    return [p for p in cp.stdout.split() if p != str(os.getpid())]


def stub_ran(domid: int) -> bool:
    """The stub for `domid` came up (its line in libxl's device-model log, rotated on a reboot)."""
    for log in Path("/var/log/xen").glob(f"qemu-dm-{GUEST}.log*"):
        if f"dm-stub: domid={domid} running" in log.read_text(errors="replace"):
            return True
    return False


def keep_logs(*paths: Path) -> None:
    """Copy logs to the host (the writable out0 share): guest consoles, libxl's, the daemon's."""
    if not OUT.is_dir():
        return
    for log in paths:
        try:
            if log.exists():
                shutil.copy(log, OUT / log.name)
        except OSError:
            pass


def thread_stacks(pid: int) -> list[str]:
    """Each thread of `pid`: its name, state, wait channel and kernel stack, one line each."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda p: int(p.name)):
        def read(name: str, task: Path = task) -> str:
            try:
                return (task / name).read_text(errors="replace").strip()
            except OSError as exc:
                return f"({exc.strerror})"
        state = next((ln.split(":", 1)[1].strip() for ln in read("status").splitlines()
                      if ln.startswith("State:")), "?")
        stack = " < ".join(ln.split()[-1] for ln in read("stack").splitlines() if ln.strip())
        out.append(f"{task.name} {read('comm')} {state} wchan={read('wchan')} stack: {stack or '-'}")
    return out


def tail_lines(path: Path, lines: int) -> list[bytes]:
    """The last `lines` lines of a log too big to read whole (xenstored's request trace); [] if it is not there."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - lines * 200))
            return f.read().splitlines()[-lines:]
    except OSError:
        return []


def keep_tail(path: Path, lines: int) -> None:
    """The last `lines` of a log too big to copy whole, to the host."""
    tail = tail_lines(path, lines)
    if OUT.is_dir() and tail:
        with contextlib.suppress(OSError):
            (OUT / f"{path.name}.tail").write_bytes(b"\n".join(tail) + b"\n")


XENSTORED_LOG = Path("/var/log/xen/xenstored.log")
XENSTORED_TRACE = Path("/var/log/xen/xenstored-trace.log")  # dom0-init.sh: only when driver-domain checks run


XENCTX = "/usr/lib/xen-4.17/bin/xenctx"  # xen-utils: a guest vCPU's registers and stack
# This long without a console line other than the guest's heartbeat (every 30 s, guest-lib.sh hb_start): stuck.
STALL_REPORT_S = 150
HEARTBEAT = re.compile(r"^DOMU-HB [^\n]*\n?", re.M)
FATAL_GUEST = re.compile(r"[^\n]*(disabled for further use|Kernel panic|BUG: |Oops: )[^\n]*")


# ---- the daemon ----

class Manager:
    """`pvback vtpm-manager` for the whole run (key-file KEK, a new store), stopped by PID; the guest's vTPM is
    provisioned in it with `pvback vtpm create` before the guest exists."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.problem: str | None = None

    def start(self) -> None:
        MGR_LOG.unlink(missing_ok=True)
        MGR_CONFIG.write_text(f'[manager]\nstate_dir = "{MGR_DIR}"\nsocket = "{MGR_SOCKET}"\n'
                              f'kek_source = "file"\nkek_file = "{MGR_KEK}"\nrelease_uids = {release_uids()}\n')
        with MGR_LOG.open("wb") as f:
            self.proc = subprocess.Popen([PVBACK, "vtpm-manager", "--config", str(MGR_CONFIG), "--init"],
                                         stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_until("the vTPM manager to listen", self._ready, 60, 0.5)
            out = run([PVBACK, "vtpm", "create", "--socket", str(MGR_SOCKET), "--domain-uuid", DOMAIN_UUID,
                       "--devid", str(VTPM_DEVID), "--vtpm-uuid", VTPM_UUID], timeout=60)
            say(f"  vtpm-manager pid {self.proc.pid} provisioned: {' '.join(out.stdout.split())[:300]}")
        except (TestFailure, subprocess.SubprocessError, OSError) as exc:
            self.problem = f"{exc}; log: {self.log()[-500:]}"
            say(f"  vtpm-manager: {self.problem}")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise TestFailure(f"`pvback vtpm-manager` exited {self.proc.returncode}")
        return run([PVBACK, "vtpm", "list", "--socket", str(MGR_SOCKET)], check=False).returncode == 0

    @staticmethod
    def log() -> str:
        return MGR_LOG.read_text(errors="replace") if MGR_LOG.exists() else ""

    def releases(self, domid: int) -> list[str]:
        """The manager's log lines of a key released for this domain's vTPM."""
        be = f"/local/domain/0/backend/vtpm/{domid}/{VTPM_DEVID}"
        return [ln for ln in self.log().splitlines()
                if "msg=request" in ln and "op=release" in ln and "result=ok" in ln and f"backend={be}" in ln]

    def stop(self) -> int | None:
        return stop_process(self.proc)


def release_uids() -> list[int]:
    """root, and the user `pvback serve` drops to when it exists ([daemon] user = "auto")."""
    try:
        return sorted({0, pwd.getpwnam(PVBACK_USER).pw_uid})
    except KeyError:
        return [0]


def plaintext_in(value: bytes, *roots: Path) -> list[str]:
    """The files under roots holding `value` as it is."""
    return [str(p) for r in roots if r.exists() for p in r.rglob("*")
            if p.is_file() and not p.is_socket() and value in p.read_bytes()]


class Daemon:
    """`pvback serve`, for the whole run; stopped by PID."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.problem: str | None = None
        self.t_ready = 0.0

    def start(self, extra_config: str = "") -> None:
        SERVE_LOG.unlink(missing_ok=True)
        # A manager that cannot be reached fails the vTPM within a minute, not manager_wait_s's default 300 s.
        SERVE_CONFIG.write_text(f'[vtpm]\nstate_dir = "{VTPM_STATE}"\nmanager_socket = "{MGR_SOCKET}"\n'
                                "manager_wait_s = 60.0\n" + extra_config)
        t0 = time.monotonic()
        with SERVE_LOG.open("wb") as f:
            self.proc = subprocess.Popen(
                [PVBACK, "serve", "--platform", "xen", "--types", "qdisk,vtpm,vif", "--metrics", METRICS,
                 "--config", str(SERVE_CONFIG)],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # 180 s: on a loaded 2-core host the imports alone took 40-100 s under TCG.
            wait_until("`pvback serve` to answer on its metrics endpoint", self._ready, 180, 0.5)
            self.t_ready = time.monotonic() - t0
        except TestFailure as exc:
            self.problem = f"{exc} (last error: {self.last_error}); log: {self.tail()}"
            self.stop()

    last_error = ""

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise TestFailure(f"`pvback serve` exited {self.proc.returncode}")
        try:
            self.metrics()
            return True
        except OSError as exc:
            self.last_error = str(exc)
            return False

    @staticmethod
    def metrics() -> str:
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def tail(self, n: int = 3) -> str:
        if not SERVE_LOG.exists():
            return "(no log)"
        return " | ".join(SERVE_LOG.read_text(errors="replace").strip().splitlines()[-n:])

    def check(self) -> None:
        if self.problem:
            raise TestFailure(f"pvback serve is not available: {self.problem}")
        if self.proc is None or self.proc.poll() is not None:
            raise TestFailure(f"pvback serve is not running: {self.tail()}")

    def stop(self) -> int | None:
        return stop_process(self.proc)


def metric_samples(metrics: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for m in re.finditer(rf'^{name}\{{([^}}]*)\}} (\S+)$', metrics, re.M):
        labels = {k: json.loads(f'"{v}"') for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1))}
        out.append((labels, float(m.group(2))))
    return out


def requests_of(metrics: str, domid: int, devid: int, op: str | None = None) -> float:
    return sum(v for labels, v in metric_samples(metrics, "pvback_requests_total")
               if labels.get("domid") == str(domid) and labels.get("devid") == str(devid)
               and (op is None or labels.get("op") == op))


def errors_of(metrics: str, domid: int, devid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in metric_samples(metrics, "pvback_errors_total"):
        if labels.get("domid") == str(domid) and labels.get("devid") == str(devid) and v:
            out[labels.get("reason", "?")] = out.get(labels.get("reason", "?"), 0.0) + v
    return out


def status_of(metrics: str, domid: int, devid: int, key: str) -> float:
    """One `pvback status` value of a device, as the metrics endpoint exports it."""
    return sum(v for labels, v in metric_samples(metrics, "pvback_device_status")
               if labels.get("domid") == str(domid) and labels.get("devid") == str(devid)
               and labels.get("key") == key)


def shapes_in_metrics(metrics: str) -> set[str]:
    return {labels["shape"] for labels, v in metric_samples(metrics, "pvback_request_shapes_total")
            if v and "shape" in labels}


def shapes_in_log(text: str) -> set[str]:
    """The serve log's `msg="request shapes"` lines (one per disk disconnect): shapes="<shape>=<n> ..." (logfmt,
    so the value is JSON-quoted)."""
    found: set[str] = set()
    for line in text.splitlines():
        if 'msg="request shapes"' not in line:
            continue
        m = re.search(r'\bshapes=("(?:[^"\\]|\\.)*"|\S+)', line)
        if not m:
            continue
        value = json.loads(m.group(1)) if m.group(1).startswith('"') else m.group(1)
        for item in str(value).split():
            shape, _, count = item.rpartition("=")
            if shape and count != "0":
                found.add(shape)
    return found


def xs_exists(path: str) -> bool:
    return run(["xenstore-exists", path], timeout=20, check=False).returncode == 0


def fds_on(pid: int, path: Path) -> list[str]:
    """The fds of process `pid` open on `path` (readlink of /proc/PID/fd/*)."""
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target == str(path) or target == f"{path} (deleted)":
            found.append(fd.name)
    return found


# ---- the guest's TCP peers ----

class NetServers:
    """dom0's end of the guest's TCP transfers, on every address (the guest reaches them through its vifs):
    NET_PORT_UP takes what the guest sends until it closes and records its sha256; NET_PORT_DOWN reads a line
    "N" and sends the first N MiB of `data` (sha256 in `shas[N]`, on the guest's command line), then closes.
    Threads, stopped by closing their sockets."""

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data or os.urandom(max(NET_MIB.values()) * MiB)
        self.shas = {n: hashlib.sha256(self.data[:n * MiB]).hexdigest() for n in sorted(set(NET_MIB.values()))}
        self.received: list[tuple[str, int, str]] = []  # (peer address, bytes, sha256)
        self.sent: list[tuple[str, int, str]] = []  # (peer address, bytes sent, "" or the error)
        self.socks: list[socket.socket] = []
        self.stopping = threading.Event()
        for port, handler in ((NET_PORT_UP, self._take), (NET_PORT_DOWN, self._give)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(4)
            self.socks.append(sock)
            threading.Thread(target=self._serve, args=(sock, handler), daemon=True).start()

    def _serve(self, sock: socket.socket, handler: Callable[[socket.socket, str], None]) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(120)
                try:
                    handler(conn, peer[0])
                except OSError as exc:
                    say(f"  net server: {peer[0]}: {exc}")

    def _take(self, conn: socket.socket, peer: str) -> None:
        h = hashlib.sha256()
        n = 0
        while n < NET_MAX_BYTES:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        self.received.append((peer, n, h.hexdigest()))

    def _give(self, conn: socket.socket, peer: str) -> None:
        line = b""
        while b"\n" not in line and len(line) < 16:
            chunk = conn.recv(16)
            if not chunk:
                break
            line += chunk
        mib = int(line.strip()) if line.strip().isdigit() else 0
        if mib not in self.shas:
            self.sent.append((peer, 0, f"asked for {line!r}"))
            return
        data = self.data[:mib * MiB]
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            self.sent.append((peer, len(data), ""))
        except OSError as exc:
            self.sent.append((peer, 0, str(exc)))
            raise

    def got(self, sha: str | None) -> tuple[str, int, str] | None:
        return next((r for r in self.received if r[2] == sha), None)

    def stop(self) -> None:
        self.stopping.set()
        for sock in self.socks:
            # shutdown first: a thread blocked in accept() keeps a merely closed socket listening, and the next
            # NetServers (the driver-domain checks) would find the port taken.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def tap_name(domid: int, devid: int) -> str:
    return f"vif{domid}.{devid}"


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def xs_tree(path: str) -> dict[str, str]:
    """Every key under a xenstore directory with its value (`xenstore-ls`, one space of indent per level),
    as relative paths: {"feature-sg": "1", "queue-0/tx-ring-ref": "8", ...}."""
    out: dict[str, str] = {}
    stack: list[str] = []
    cp = run(["xenstore-ls", path], timeout=20, check=False)
    for line in cp.stdout.splitlines():
        m = re.match(r'^( *)(\S+) = "(.*)"$', line)
        if not m:
            continue
        del stack[len(m.group(1)):]
        stack.append(m.group(2))
        out["/".join(stack)] = m.group(3)
    return out


# ---- checks ----

def t_platform(report: Report) -> None:
    """XenPlatform in dom0: the C module loads, gntdev/evtchn open, grant copy probed, self-grant map/copy,
    a loopback event channel; in a child process so a crash in C cannot take the driver down."""
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent.parent))
    try:
        cp = subprocess.run([sys.executable, str(HERE / "check_platform.py")], capture_output=True, text=True,
                            timeout=90, env=env)
    except subprocess.TimeoutExpired:
        report("platform", False, "check_platform.py did not finish within 90 s")
        return
    out = cp.stdout.strip().splitlines()
    for ln in out:
        say(f"  {ln}")
    if cp.returncode != 0:
        bad = [ln for ln in out if " FAIL " in ln] or (cp.stderr.strip().splitlines()[-3:])
        report("platform", False, f"check_platform exited {cp.returncode}: {' | '.join(bad)}")
        return
    summary = "; ".join(ln.split(" ", 3)[-1] for ln in out if ln.startswith("CHECK summary"))
    report("platform", True, f"{summary} [{time.monotonic() - t0:.1f} s]")


class Scenario:
    """The one guest and everything dom0 does around it."""

    def __init__(self, report: Report, daemon: Daemon, manager: Manager, steps: list[str],
                 ovs: ovs_case.OvsCase | None = None) -> None:
        self.report = report
        self.ovs = ovs  # the net-ovs check's switch and peer (tests/e2e/dom0/ovs_case.py)
        self.daemon = daemon
        self.manager = manager
        self.swtpm_status: dict[int, dict[str, str]] = {}  # each vTPM's swtpm, read while it ran
        self.steps = steps
        self.t0 = time.monotonic()
        self.domids: list[int] = []
        self.handled: set[str] = set()
        self.seen_steps: set[str] = set()
        self.actions: dict[str, str] = {}  # dom0 action -> "ok ..." or the failure
        self.stub_notes: list[str] = []
        self.pending_fs: str | None = None  # the guest's fs detail, until dom0 has fsck'ed the image
        self.kv: dict[str, str] = {}
        self.klog_errors: list[str] = []  # the guest kernel's block/fs error lines (DOMU-KLOG ... error:)
        self.seen_klog = 0
        self.kernel = "?"  # uname -r of the domU
        # Checks the guest passed whose verdict waits for dom0: the log replay, the domain's death.
        self.pending: dict[str, str] = {}
        self.lw: dict[str, str] = {}  # the dm-log-writes setup: loop devices, or why there is none
        self.gone_seen: dict[int, float] = {}  # domid -> when dom0 saw it begin to go (reboot) or gone
        self.dead_at: dict[int, float] = {}  # domid -> when its /local/domain/<domid> was seen removed
        self.attach_e = "never run"
        self.net: NetServers | None = None  # dom0's TCP peers, while the guest runs
        self.net_notes: dict[str, str] = {}  # what dom0 found around the NIC phases (addressing, detach checks)
        self.net_actions: dict[str, str] = {}  # xl network-attach/-detach: "ok <seconds>" or the failure
        self.netfront: dict[str, str] = {}  # the keys Linux's xen-netfront wrote for vif 0


    def stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:.1f} s]"

    # -- setup --

    def make_disks(self) -> None:
        self.img_a, (self.sha_a1, self.sha_a64) = make_disk("a", 256, [(1, 1), (64, 64)], marker=b"BOOT0")
        self.img_b, (self.sha_b1,) = make_disk("b", 16, [(1, 1)])
        self.sha_b_file = hashlib.sha256(self.img_b.read_bytes()).hexdigest()
        self.img_c, (self.sha_c100,) = make_disk("c", 128, [(100, 1)])
        self.img_e, _ = make_disk("e", 8, [])

    def setup_logwrites(self) -> None:
        """dm-log-writes over two loop devices (data, log), served to the guest as xvdd.  On failure the guest's
        steps on xvdd fail at once (pvlw=0) and say so; the rest of the run goes on."""
        try:
            run(["modprobe", "dm-log-writes"])
            data, log = WORK / "lw-data.img", WORK / "lw-log.img"
            for f, mib in ((data, LW_DATA_MIB), (log, LW_LOG_MIB)):
                f.unlink(missing_ok=True)
                with f.open("wb") as fh:
                    fh.truncate(mib * MiB)
            self.lw["data_file"], self.lw["log_file"] = str(data), str(log)
            self.lw["data"] = run(["losetup", "-f", "--show", str(data)]).stdout.strip()
            self.lw["log"] = run(["losetup", "-f", "--show", str(log)]).stdout.strip()
            table = f"0 {LW_DATA_MIB * MiB // 512} log-writes {self.lw['data']} {self.lw['log']}"
            run(["dmsetup", "create", LW_NAME, "--table", table])
            run(["dmsetup", "mknodes", LW_NAME], check=False)  # no udev in this dom0 to make /dev/mapper/*
            wait_until(f"{LW_DEV} to appear", LW_DEV.exists, 10)
            if user_exists():  # dmsetup made the node root's 0600 (no udev rule here): `pvback serve` opens it
                shutil.chown(os.path.realpath(LW_DEV), PVBACK_USER, PVBACK_USER)
            self.lw["ok"] = "1"
        except (TestFailure, OSError) as exc:
            self.lw["problem"] = f"dm-log-writes setup failed: {exc}"
            say(f"  {self.lw['problem']}")

    def write_cfg(self) -> Path:
        lw = "ok" in self.lw
        extra = (f"console=hvc0 rdinit=/init quiet pvsteps={'+'.join(self.steps) or 'none'} pva={self.sha_a1} "
                 f"pvbig={self.sha_a64} pvb={self.sha_b1} pvc={self.sha_c100} pvlw={int(lw)}"
                 + "".join(f" pvnet{n}={sha}" for n, sha in (self.net.shas.items() if self.net else [])))
        disks = [qdisk(self.img_a, "xvda"), qdisk(self.img_b, "xvdb", "ro")]
        if lw:
            disks.append(qdisk(LW_DEV, "xvdd"))
        cfg = Path("/tmp") / f"{GUEST}.cfg"
        cfg.write_text("\n".join([
            f'name = "{GUEST}"', f'uuid = "{DOMAIN_UUID}"', 'type = "pv"', f'kernel = "{DOMU_KERNEL}"',
            f'ramdisk = "{DOMU_RAMDISK}"',
            f'extra = "{extra}"', "memory = 384", "vcpus = 1",
            'on_poweroff = "destroy"', 'on_reboot = "restart"', 'on_crash = "destroy"',
            "disk = [ " + ", ".join(f"'{d}'" for d in disks) + " ]",
            *([f'vtpm = [ "backend=Domain-0,uuid={VTPM_UUID}" ]'] if {"tpm", "tpm-reboot"} & set(self.steps) else []),
            # The NIC served by `pvback serve`: the vif line an operator writes (README), pvback's hotplug script.
            *([f'vif = [ "mac={VIF_MACS[0]},script={VIF_SCRIPT}"'
               + (f', "{ovs_case.VIF_SPEC},script={VIF_SCRIPT}"' if self.ovs is not None else "") + " ]"]
              if self.net else []),
            # libxl starts a "device model" for a PV guest's qdisk disks: pvback's stand-in answers its QMP,
            # the disks themselves are served by `pvback serve` watching backend/qdisk.
            f'device_model_override = "{DM_STUB}"', 'device_model_version = "qemu-xen"',
        ]) + "\n")
        return cfg

    def create(self) -> None:
        cfg = self.write_cfg()
        console_log(GUEST).unlink(missing_ok=True)
        t0 = time.monotonic()
        run(["xl", "create", str(cfg)], timeout=180)
        self.t_create = time.monotonic() - t0
        domid = domid_of(GUEST)
        if domid is None:
            raise TestFailure("xl create succeeded but the domain is not listed")
        self.domids.append(domid)
        self.check_stub(domid)
        if "gone" in self.steps:
            # Before the guest has loaded blkfront: it finds xvde with the xl disks, or soon after.
            self.act("pvback attach xvde", [PVBACK, "attach", "disk", str(domid), str(self.img_e), "--vdev", "xvde",
                                            "--platform", "xen", "--timeout", "60"], 90)
            self.attach_e = self.actions.pop("pvback attach xvde")  # not one of the hotplug check's actions

    def check_stub(self, domid: int) -> None:
        """What libxl and the stub left in xenstore for this domain's qdisk disks."""
        problems = []
        for devid, img in ((XVDA, self.img_a), (XVDB, self.img_b)):
            params = xs_read(f"/local/domain/0/backend/qdisk/{domid}/{devid}/params")
            if params != f"raw:{img}" and params != f"aio:{img}":
                problems.append(f"backend/qdisk/{domid}/{devid}/params is {params!r}")
        state = xs_read(f"/local/domain/0/device-model/{domid}/state")
        if state != "running":
            problems.append(f"device-model/{domid}/state is {state!r}")
        if not dm_stub_pids(domid) and domid_of(GUEST) == domid and not stub_ran(domid):
            # The dom0 loop may see the guest's phase late (other checks poll meanwhile), when the domain is
            # already being destroyed and libxl has reaped its stub: the stub's own log says whether it ran.
            problems.append(f"no `pvback dm-stub` process for domain {domid}, and none logged it ran")
        self.stub_notes.append(f"domain {domid}: " + ("; ".join(problems) if problems else "ok"))

    # -- the guest's reports --

    def on_step(self, step: str, ok: bool, detail: str) -> None:
        judge_step(self.report, STEP_CHECK.get(step), ok, detail, self.stamp, lambda: self.verify(step, detail),
                   TestFailure)

    def verify(self, step: str, detail: str) -> str | None:
        """dom0's side of a check the guest passed; None when the verdict has to wait for later events."""
        kv = self.kv
        if step == "boot":
            return f"xl create {self.t_create:.1f} s"
        if step == "rw":
            got = sha_region(self.img_a, 2, 1)
            if kv.get("rw-wsha") != got:
                raise TestFailure(f"image [2,3) MiB has sha {got[:16]}, the domU wrote {kv.get('rw-wsha', '?')[:16]}")
            return "dom0 read the domU's write in the image"
        if step == "big":
            got = sha_region(self.img_a, 128, 64)
            if kv.get("big-wsha") != got:
                raise TestFailure(f"image [128,192) MiB has sha {got[:16]}, the domU wrote "
                                  f"{kv.get('big-wsha', '?')[:16]}")
            return "dom0 verified the 64 MiB the domU wrote"
        if step == "discard":
            with self.img_a.open("rb") as f:
                f.seek(8 * MiB)
                if f.read(4 * MiB) != bytes(4 * MiB):
                    raise TestFailure("the discarded 4 MiB still hold data in the image file")
                try:
                    hole = os.lseek(f.fileno(), 8 * MiB, os.SEEK_DATA) >= 12 * MiB
                except OSError:
                    hole = True
            return f"image range {'is a hole' if hole else 'reads zeros'}"
        if step == "ro":
            if hashlib.sha256(self.img_b.read_bytes()).hexdigest() != self.sha_b_file:
                raise TestFailure("the read-only disk's image changed")
            return "image unchanged"
        if step == "rw-attach":
            got = sha_region(self.img_c, 101, 1)
            if kv.get("attach-wsha") != got:
                raise TestFailure(f"image [101,102) MiB has sha {got[:16]}, the domU wrote "
                                  f"{kv.get('attach-wsha', '?')[:16]}")
            return f"created by `pvback attach` ({self.actions.get('pvback attach', '?')}); dom0 read the domU's write"
        if step == "fs":
            self.pending_fs = detail  # judged once dom0 can fsck the detached image
            return None
        if step == "flush":
            self.verify_flush(detail)
            return None
        if step == "fs-replay":
            self.pending["blk-fs-replay"] = detail  # judged on the log once the guest is gone
            return None
        if step == "gone":
            self.verify_gone(detail)
            return None
        if step == "klog":
            if self.klog_errors:
                raise TestFailure(f"the guest kernel logged {len(self.klog_errors)} block/fs errors, the first: "
                                  f"{self.klog_errors[0]}")
            return "dom0 saw no error line either"
        if step == "hotplug":
            bad = [f"{k}: {v}" for k, v in self.actions.items() if not v.startswith("ok")]
            if bad:
                raise TestFailure("; ".join(bad))
            return ", ".join(f"{k} {v[3:]}" for k, v in self.actions.items())
        if step in ("tpm", "tpm-reboot"):
            return self.verify_tpm(step)
        if step == "net-ovs":
            if self.ovs is None:
                raise TestFailure("no OVS case in this run")
            try:
                return self.ovs.verify(kv.get("net-up-ovs"))
            except ovs_case.OvsProblem as exc:
                raise TestFailure(str(exc)) from exc
        if step in NET_STEPS:
            return self.verify_net(step)
        if step == "reboot":
            if "DOMU-PHASE rebooting" not in console_text(GUEST):
                raise TestFailure("the domU passed without having rebooted")
            with self.img_a.open("rb") as f:
                f.seek(200 * MiB)
                if not f.read(5) == b"BOOT1":
                    raise TestFailure("boot marker not updated in the image")
            if len(self.domids) < 2:
                raise TestFailure("no second domain id seen after the reboot")
            return f"domain {self.domids[0]} -> {self.domids[1]}"
        return "ok"

    def verify_tpm(self, step: str) -> str:
        """What libxl wrote for the guest's vtpm=[...] and what pvback made of it: the backend dir, swtpm running
        on the state of this uuid, the commands counted; the key released by the vTPM manager, no NV plaintext."""
        if self.manager.problem:
            raise TestFailure(f"the vTPM manager is not available: {self.manager.problem}")
        domid = self.domids[-1]
        be = f"/local/domain/0/backend/vtpm/{domid}/{VTPM_DEVID}"
        keys = {k: xs_read(f"{be}/{k}") for k in ("uuid", "resume", "feature-protocol-v2", "ready", "state")}
        if keys["uuid"] != VTPM_UUID:
            raise TestFailure(f"{be}/uuid is {keys['uuid']!r}, xl cfg says {VTPM_UUID}")
        if keys["feature-protocol-v2"] != "1" or keys["state"] != "4":
            raise TestFailure(f"{be}: {keys}")
        state = Path("/var/lib/pvback/vtpm") / VTPM_UUID / "tpm2"
        if not (state / "tpm2-00.permall").exists():
            raise TestFailure(f"no swtpm state in {state}")
        pids = run(["pgrep", "-f", f"swtpm socket .*{VTPM_UUID}"], check=False).stdout.split()
        if len(pids) != 1:
            raise TestFailure(f"{len(pids)} swtpm processes for vTPM {VTPM_UUID}: {pids}")
        metrics = self.daemon.metrics()
        cmds = requests_of(metrics, domid, VTPM_DEVID, "command")
        errors = errors_of(metrics, domid, VTPM_DEVID)
        if cmds < 3:
            raise TestFailure(f"pvback counted {cmds:.0f} TPM commands for {domid}/vtpm {VTPM_DEVID}")
        major = self.kv.get("tpm-major", "?")
        tpmlog = "; ".join(line for _, _, line in re.findall(r"DOMU-TPMLOG (\S+) (error|info): ([^\n]*)",
                                                             console_text(GUEST)))
        if step == "tpm-reboot":
            if len(self.domids) < 2:
                raise TestFailure("no second domain id seen after the reboot")
            if self.kv.get("tpm-nv") != self.kv.get("tpm-nv-after"):
                raise TestFailure(f"NV value {self.kv.get('tpm-nv')} before the reboot, "
                                  f"{self.kv.get('tpm-nv-after')} after")
        # #17: the key came from the manager, for this very domain, and the NV value the guest wrote is nowhere
        # on disk in the clear (swtpm's state is encrypted with it).
        released = self.manager.releases(domid)
        if not released:
            raise TestFailure(f"the vTPM manager's log shows no key released for domain {domid}: "
                              f"{self.manager.log()[-400:]}")
        self.swtpm_status[int(pids[0])] = proc_status(int(pids[0]))
        swtpm_argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
        if not any(a.startswith(b"fd=") and b"mode=aes-256-cbc" in a for a in swtpm_argv):
            raise TestFailure(f"swtpm {pids[0]} was not given a state key by fd: {swtpm_argv}")
        nv = bytes.fromhex(self.kv.get("tpm-nv", ""))
        if len(nv) != 32:
            raise TestFailure(f"the guest reported no 32-byte NV value ({self.kv.get('tpm-nv')!r})")
        leaked = plaintext_in(nv, VTPM_STATE, MGR_DIR, MGR_LOG, SERVE_LOG)
        if leaked:
            raise TestFailure(f"the guest's NV value is in the clear in {leaked}")
        permall = (state / "tpm2-00.permall").stat().st_size
        return (f"dom0: {be} uuid/resume={keys['resume']}/protocol-v2/Connected, swtpm pid {pids[0]}, "
                f"{cmds:.0f} commands, errors {errors or 'none'}; manager released the key "
                f"({len(released)}x for domain {domid}), key by fd, NV value not in the clear in "
                f"{VTPM_STATE}/{VTPM_UUID} (permall {permall} B), the manager's store or logs; kernel: "
                f"tpm_version_major={major}, /dev/tpmrm0 {self.kv.get('tpm-rm', '?')}; tpm lines: {tpmlog or 'none'}")

    def verify_flush(self, detail: str) -> None:
        """pvback counted the guest's flushes on xvdd, without an error; the log replay comes at the end."""
        domid = self.domids[-1]
        try:
            guest = int(self.kv.get("lw-flushes", "").split(",")[-1])
        except ValueError as exc:
            raise TestFailure(f"no flush counts from the guest (DOMU-KV lw-flushes {self.kv.get('lw-flushes')!r})") \
                from exc
        metrics = self.daemon.metrics()
        flushes = requests_of(metrics, domid, XVDD, "flush")
        errors = errors_of(metrics, domid, XVDD)
        if flushes < max(2, guest):
            raise TestFailure(f"pvback counted {flushes:.0f} flushes on {domid}/xvdd, the guest completed {guest}")
        if errors:
            raise TestFailure(f"pvback counted errors on {domid}/xvdd: {errors}")
        self.pending["blk-flush"] = f"{detail}; pvback counted {flushes:.0f} flushes on xvdd, no error"
        return None

    def verify_gone(self, detail: str) -> None:
        """The guest wrote xvde; while the domain lives, pvback serve holds the image open (else the fd check
        after its death would prove nothing)."""
        got = sha_region(self.img_e, 1, 1)
        if self.kv.get("gone-wsha") != got:
            raise TestFailure(f"image [1,2) MiB has sha {got[:16]}, the domU wrote "
                              f"{self.kv.get('gone-wsha', '?')[:16]}")
        assert self.daemon.proc is not None
        fds = fds_on(self.daemon.proc.pid, self.img_e)
        if not fds:
            raise TestFailure(f"pvback serve (pid {self.daemon.proc.pid}) has no fd on {self.img_e} while serving it")
        be = f"/local/domain/0/backend/qdisk/{self.domids[-1]}/{XVDE}"
        marked = xs_read(f"{be}/pvback-attached")
        self.pending["blk-domain-gone"] = (f"{detail}; attached by `pvback attach` {self.attach_e}, pvback serve had "
                                           f"fd {','.join(fds)} on it, {be}/pvback-attached={marked}")
        return None

    def domain_leftovers(self, domid: int) -> list[str]:
        be = f"/local/domain/0/backend/qdisk/{domid}/{XVDE}"
        fe = f"/local/domain/{domid}/device/vbd/{XVDE}"
        out = [f"{p} still in xenstore" for p in (be, fe) if xs_exists(p)]
        assert self.daemon.proc is not None
        fds = fds_on(self.daemon.proc.pid, self.img_e)
        if fds:
            out.append(f"pvback serve (pid {self.daemon.proc.pid}) still has fd {','.join(fds)} on {self.img_e}")
        return out

    def poll_domain_gone(self, domid: int) -> bool:
        """One look at the domain that had xvde, from when it started to go (its reboot, or the end): once libxl
        has removed its xenstore dir (it has died), within DOMAIN_GONE_TIMEOUT_S its backend and frontend dirs
        are gone, pvback serve holds no fd on the image, and `pvback status` no longer lists it.  True once
        judged."""
        if "blk-domain-gone" not in self.pending:
            return True
        now = time.monotonic()
        if domid not in self.dead_at:
            if xs_exists(f"/local/domain/{domid}"):
                if now - self.gone_seen[domid] < DOMAIN_DEATH_TIMEOUT_S:
                    return False
                detail = self.pending.pop("blk-domain-gone")
                self.report("blk-domain-gone", False, f"domU passed ({detail}) but domain {domid} was still in "
                                                      f"xenstore {DOMAIN_DEATH_TIMEOUT_S} s after it began to go")
                return True
            self.dead_at[domid] = now
        left = self.domain_leftovers(domid)
        took = now - self.dead_at[domid]
        if left and took < DOMAIN_GONE_TIMEOUT_S:
            return False
        detail = self.pending.pop("blk-domain-gone")
        try:
            if left:
                raise TestFailure(f"{DOMAIN_GONE_TIMEOUT_S} s after domain {domid} died: {'; '.join(left)}")
            out = run([PVBACK, "status", "--platform", "xen", "--metrics", METRICS, "--interval", "0"],
                      timeout=STATUS_TIMEOUT_S).stdout
            rows = [ln for ln in out.splitlines() if ln.split()[:3] == ["qdisk", str(domid), str(XVDE)]]
            if rows:
                raise TestFailure(f"`pvback status` still lists the dead domain's disk: {rows[0]}")
            self.report("blk-domain-gone", True, f"{detail}; domain {domid} died: backend + frontend dirs gone and "
                                                 f"image closed by pvback serve {took:.1f} s after libxl removed "
                                                 f"the domain's xenstore dir, not in `pvback status` {self.stamp()}")
        except (TestFailure, OSError) as exc:
            self.report("blk-domain-gone", False, f"domU passed ({detail}) but dom0: {exc} {self.stamp()}")
        return True

    # -- dom0's actions, when the guest asks --

    def act(self, name: str, cmd: list[str], timeout: float = HOTPLUG_ACTION_TIMEOUT_S) -> None:
        t0 = time.monotonic()
        try:
            run(cmd, timeout=timeout)
            self.actions[name] = f"ok {time.monotonic() - t0:.1f} s"
        except TestFailure as exc:
            self.actions[name] = str(exc)
            say(f"  dom0 action {name} failed: {exc}")

    def on_phase(self, phase: str) -> None:
        domid = self.domids[-1]
        if phase == "want-xvdc":
            say("STAGE guest:hotplug")
            self.act("pvback attach", [PVBACK, "attach", "disk", str(domid), str(self.img_c), "--vdev", "xvdc",
                                       "--platform", "xen", "--timeout", "60"], 90)
            self.check_status(domid)  # after the attach: the guest is waiting for xvdc
        elif phase == "release-xvdc":
            self.act("pvback detach", [PVBACK, "detach", "disk", str(domid), "xvdc", "--platform", "xen",
                                       "--timeout", "60"], 90)
        elif phase == "xvdc-gone":
            self.check_fs()
            self.act("xl block-attach", ["xl", "block-attach", GUEST, qdisk(self.img_c, "xvdc")])
        elif phase == "xvdc-checked":
            self.act("xl block-detach", ["xl", "block-detach", GUEST, "xvdc"])
            try:
                listed = run(["xl", "block-list", GUEST], timeout=30).stdout.strip().splitlines()
                say(f"  xl block-list after block-detach: {' | '.join(' '.join(ln.split()) for ln in listed)}")
            except TestFailure as exc:
                say(f"  xl block-list failed: {exc}")
        elif phase.startswith("net-addr-"):
            self.address_tap(domid, int(phase.rsplit("-", 1)[1]), phase)
        elif phase == "want-vif1":
            say("STAGE guest:net-attach")
            # devid=1: with the OVS vif (devid 2) from xl create, libxl would pick 3.
            self.act("xl network-attach", ["xl", "network-attach", GUEST, "devid=1", f"mac={VIF_MACS[1]}",
                                           f"script={VIF_SCRIPT}"], 90)
            self.net_actions["xl network-attach"] = self.actions.pop("xl network-attach")  # not blk-hotplug's
        elif phase == "release-vif1":
            self.act("xl network-detach", ["xl", "network-detach", GUEST, "1"], 90)
            self.net_actions["xl network-detach"] = self.actions.pop("xl network-detach")
            self.net_notes["detach"] = self.check_vif_gone(domid, 1)
        elif phase in ("ovs-up", "release-vif2") and self.ovs is not None:
            self.on_ovs_phase(domid, phase)
        elif phase == "rebooting":
            say("STAGE guest:reboot")
            # The domain dies right after saying so: the domain-gone check counts from here (an upper bound).
            self.gone_seen.setdefault(domid, time.monotonic())
        elif phase == "second-boot":
            new = domid_of(GUEST)
            if new is not None and new not in self.domids:
                self.gone_seen.setdefault(self.domids[-1], time.monotonic())
                self.domids.append(new)
            self.check_stub(self.domids[-1])

    # -- NICs --

    def address_tap(self, domid: int, devid: int, phase: str) -> None:
        """dom0's end of vif `devid`: 198.18.devid.1/24 and fd00:devid::1/64 on the tap pvback created (no route
        leaves this dom0: QEMU gives it no NIC).  For vif 0 of the first boot, also what netfront wrote."""
        tap = tap_name(domid, devid)
        t0 = time.monotonic()
        try:
            wait_until(f"the tap {tap}", lambda: link_exists(tap), 30)
            run(["ip", "addr", "replace", f"198.18.{devid}.1/24", "dev", tap])
            run(["ip", "-6", "addr", "replace", f"fd00:{devid}::1/64", "dev", tap, "nodad"])
            run(["ip", "link", "set", tap, "up"])
            be = f"/local/domain/0/backend/vif/{domid}/{devid}"
            wait_until(f"{be}/state to be 4 (Connected)", lambda: xs_read(f"{be}/state") == "4", 60)
            link = run(["ip", "-br", "link", "show", tap]).stdout.split()
            self.net_notes[phase] = (f"ok {tap} {' '.join(link[1:3])} addressed {time.monotonic() - t0:.1f} s "
                                     f"after the guest asked, backend Connected")
        except TestFailure as exc:
            self.net_notes[phase] = str(exc)
            say(f"  {phase}: {exc}")
            return
        if phase == "net-addr-0":
            self.record_netfront(domid)

    def record_netfront(self, domid: int) -> None:
        """What Linux's xen-netfront negotiated, into the console log and OUT/netfront-keys.json: we learn what a
        real netfront sends (the emulated one was written from the headers)."""
        fe = f"/local/domain/{domid}/device/vif/0"
        be = f"/local/domain/0/backend/vif/{domid}/0"
        self.netfront = xs_tree(fe)
        backend = xs_tree(be)
        for k, v in sorted(self.netfront.items()):
            say(f"  netfront {fe}/{k} = {v}")
        for k, v in sorted(backend.items()):
            say(f"  netback {be}/{k} = {v}")
        try:
            if OUT.is_dir():
                (OUT / "netfront-keys.json").write_text(json.dumps(
                    {"kernel": self.kernel, "frontend": self.netfront, "backend": backend}, indent=1) + "\n")
        except OSError as exc:
            say(f"  cannot write {OUT}/netfront-keys.json: {exc}")

    def netfront_summary(self) -> str:
        fe = self.netfront
        if not fe:
            return "netfront keys not recorded"
        feats = sorted(k for k, v in fe.items() if k.startswith(("feature-", "request-")) and v == "1")
        queues = fe.get("multi-queue-num-queues", "1 (key absent)")
        split = "split" if any(k.endswith("event-channel-tx") for k in fe) else "one event channel"
        return f"netfront: queues {queues}, {split}, {' '.join(feats)}"

    def check_vif_gone(self, domid: int, devid: int) -> str:
        """After `xl network-detach`: the tap, the backend and frontend dirs are gone, `pvback status` no longer
        lists the vif."""
        tap = tap_name(domid, devid)
        be = f"/local/domain/0/backend/vif/{domid}/{devid}"
        fe = f"/local/domain/{domid}/device/vif/{devid}"
        t0 = time.monotonic()
        try:
            wait_until(f"{tap} to be deleted", lambda: not link_exists(tap), 20)
            wait_until(f"{be} and {fe} to be removed", lambda: not xs_exists(be) and not xs_exists(fe), 20)
            took = time.monotonic() - t0
            out = run([PVBACK, "status", "--platform", "xen", "--metrics", METRICS, "--interval", "0"],
                      timeout=STATUS_TIMEOUT_S).stdout
            rows = [ln for ln in out.splitlines() if ln.split()[:3] == ["vif", str(domid), str(devid)]]
            if rows:
                raise TestFailure(f"`pvback status` still lists the detached vif: {rows[0]}")
            return (f"ok tap {tap}, {be} and the frontend dir gone {took:.1f} s after xl network-detach "
                    f"returned, not in `pvback status`")
        except TestFailure as exc:
            return str(exc)

    def on_ovs_phase(self, domid: int, phase: str) -> None:
        assert self.ovs is not None
        tap = tap_name(domid, ovs_case.DEVID)
        if phase == "ovs-up":
            say("STAGE guest:net-ovs")

            def shown() -> tuple[dict[str, float], dict[str, str | None]]:
                # What `pvback status` shows, from its sources (a CLI start costs seconds under TCG).
                status = {labels.get("key", ""): v for labels, v in
                          metric_samples(self.daemon.metrics(), "pvback_device_status")
                          if labels.get("domid") == str(domid) and labels.get("devid") == str(ovs_case.DEVID)}
                be = f"/local/domain/0/backend/vif/{domid}/{ovs_case.DEVID}"
                return status, {k: xs_read(f"{be}/{k}") for k in ("bridge", "hotplug-status", "state", "iface-id")}

            gid = pwd.getpwnam(PVBACK_USER).pw_gid if user_exists() else None
            self.ovs.on_up(tap, vm_name=GUEST, vm_uuid=DOMAIN_UUID, shown=shown, pvback_gid=gid)
            return

        def detach() -> str:
            self.act("xl network-detach 2", ["xl", "network-detach", GUEST, str(ovs_case.DEVID)], 90)
            return self.actions.pop("xl network-detach 2")

        def gone() -> str:
            """check_vif_gone without starting `pvback status` (a CLI start under TCG on a loaded host has taken
            over a minute): what it reads, pvback's metrics, must no longer list the vif."""
            be = f"/local/domain/0/backend/vif/{domid}/{ovs_case.DEVID}"
            fe = f"/local/domain/{domid}/device/vif/{ovs_case.DEVID}"
            t0 = time.monotonic()
            try:
                wait_until(f"{tap} to be deleted", lambda: not link_exists(tap), 20)
                wait_until(f"{be} and {fe} to be removed", lambda: not xs_exists(be) and not xs_exists(fe), 20)
                took = time.monotonic() - t0
                listed = [labels for labels, _ in metric_samples(self.daemon.metrics(), "pvback_device_state")
                          if labels.get("type") == "vif" and labels.get("domid") == str(domid)
                          and labels.get("devid") == str(ovs_case.DEVID)]
                if listed:
                    raise TestFailure(f"pvback's metrics still list the detached vif: {listed[0]}")
                return (f"ok tap {tap}, {be} and the frontend dir gone {took:.1f} s after xl network-detach "
                        f"returned, not in pvback's metrics")
            except (TestFailure, OSError) as exc:
                return str(exc)

        self.ovs.on_release(tap, detach, gone)

    def verify_net(self, step: str) -> str | None:
        kv = self.kv
        assert self.net is not None
        domid = self.domids[-1]
        if step == "net-ping":
            note = self.net_notes.get("net-addr-0", "dom0 never addressed its tap")
            if not note.startswith("ok"):
                raise TestFailure(note)
            return (f"dom0: {note[3:]}; {self.netfront_summary()}; guest offloads {kv.get('net-offloads', '?')}, "
                    f"{kv.get('net-queues', '?')} tx queues")
        if step in ("net-tcp", "net-attach", "net-reboot"):
            tag, devid, phase = {"net-tcp": ("b1-0", 0, "net-addr-0"), "net-attach": ("b1-1", 1, "net-addr-1"),
                                 "net-reboot": ("b2-0", 0, "net-addr-b2-0")}[step]
            note = self.net_notes.get(phase, "dom0 never addressed its tap")
            if not note.startswith("ok"):
                raise TestFailure(note)
            want = kv.get(f"net-up-{tag}")
            got = self.net.got(want)
            if got is None:
                raise TestFailure(f"the guest sent sha {want}, dom0 received {self.net.received}")
            if got[1] != NET_MIB[step] * MiB:
                raise TestFailure(f"dom0 received {got[1]} bytes, the guest sent {NET_MIB[step] * MiB}")
            metrics = self.daemon.metrics()
            moved = {d: sum(v for labels, v in metric_samples(metrics, "pvback_bytes_total")
                            if labels.get("domid") == str(domid) and labels.get("devid") == str(devid)
                            and labels.get("direction") == d) for d in ("tx", "rx")}
            detail = f"dom0 received the guest's sha from {got[0]}"
            if step != "net-attach":  # vif 1 is detached by now: its counters went with it
                detail += (f"; pvback counted {moved['tx'] / MiB:.1f} MiB tx, {moved['rx'] / MiB:.1f} MiB rx on "
                           f"vif{domid}.{devid}")
            if step == "net-attach":
                bad = [f"{k}: {self.net_actions.get(k, 'never run')}"
                       for k in ("xl network-attach", "xl network-detach")
                       if not self.net_actions.get(k, "").startswith("ok")]
                detach = self.net_notes.get("detach", "never checked")
                if bad or not detach.startswith("ok"):
                    raise TestFailure("; ".join([*bad, detach]))
                return (f"{detail}; xl network-attach {self.net_actions['xl network-attach'][3:]}, "
                        f"xl network-detach {self.net_actions['xl network-detach'][3:]}; {detach[3:]}")
            if step == "net-reboot":
                if len(self.domids) < 2:
                    raise TestFailure("no second domain id seen after the reboot")
                return f"{detail}; domain {self.domids[0]} -> {domid}"
            return detail
        return "ok"

    def stop_net(self) -> None:
        if self.net is not None:
            self.net.stop()

    def check_status(self, domid: int) -> None:
        """`pvback status` while both disks are Connected and xvda has served the guest's I/O."""
        t0 = time.monotonic()
        try:
            out = run([PVBACK, "status", "--platform", "xen", "--metrics", METRICS, "--interval", "0"],
                      timeout=STATUS_TIMEOUT_S).stdout
            rows = {}
            for ln in out.splitlines():
                cols = ln.split()
                if len(cols) >= 7 and cols[0] == "qdisk" and cols[1] == str(domid):
                    rows[int(cols[2])] = cols
            for devid in (XVDA, XVDB):
                if devid not in rows:
                    raise TestFailure(f"`pvback status` does not list qdisk {domid}/{devid}:\n{out}")
                if rows[devid][4:6] != ["Connected", "Connected"]:
                    raise TestFailure(f"`pvback status` shows {domid}/{devid} as {rows[devid][4:6]}")
            reqs = rows[XVDA][6]
            if not reqs.isdigit() or int(reqs) == 0:
                raise TestFailure(f"`pvback status` shows {reqs!r} requests for xvda after the guest's I/O")
            metrics = self.daemon.metrics()
            metered = requests_of(metrics, domid, XVDA)
            # xen-blkfront offers persistent grants, and pvback maps the pages of every request of 16 KiB and
            # more; registered io_uring buffers stay 0 here (off under Xen, and dom0's build has no io_uring).
            maps = status_of(metrics, domid, XVDA, "persistent_maps")
            if maps == 0:
                raise TestFailure("xvda served the guest's I/O without a single persistent mapping")
            fixed = status_of(metrics, domid, XVDA, "fixed_buffer_reqs")
            refused = status_of(metrics, domid, XVDA, "fixed_buffer_refusals")
            # A notification that went missing (either way) and that the disk's monitor made up for: counted,
            # so that a hang it saved the run from still shows here (backends/blk/stallwatch.py).
            lost = {key: sum(status_of(metrics, domid, devid, key) for devid in (XVDA, XVDB))
                    for key in ("stall_kicks", "stall_notifies")}
            self.report("pvback-status", True, f"xvda and xvdb Connected, xvda {reqs} requests (metrics endpoint: "
                                               f"{metered:.0f}), {maps:.0f} persistent mappings, {fixed:.0f} "
                                               f"requests on registered io_uring buffers, {refused:.0f} "
                                               f"registrations refused; lost notifications made up for: "
                                               f"{lost['stall_kicks']:.0f} to pvback, {lost['stall_notifies']:.0f} "
                                               f"to the guest [{time.monotonic() - t0:.1f} s]")
        except (TestFailure, OSError) as exc:
            self.report("pvback-status", False, str(exc))

    def check_fs(self) -> None:
        """The guest's filesystem, read by dom0's own e2fsprogs while xvdc is detached."""
        if self.pending_fs is None:
            return
        detail = self.pending_fs
        try:
            head = run(["dumpe2fs", "-h", str(self.img_c)], timeout=60).stdout
            features = re.search(r"^Filesystem features:\s*(.*)$", head, re.M)
            if not features or "has_journal" not in features.group(1).split():
                raise TestFailure(f"the guest's ext4 has no journal: features "
                                  f"{features.group(1) if features else '?'} (domU mke2fs.conf not Debian's?)")
            run(["e2fsck", "-fn", str(self.img_c)], timeout=120)
            dump = Path("/tmp/pvback-fs-big")
            dump.unlink(missing_ok=True)
            run(["debugfs", "-R", f"dump /big {dump}", str(self.img_c)], timeout=60)
            got = hashlib.sha256(dump.read_bytes()).hexdigest()
            if got != self.kv.get("fs-bigsha"):
                raise TestFailure(f"/big read by dom0's debugfs has sha {got[:16]}, the domU wrote "
                                  f"{self.kv.get('fs-bigsha')}")
            self.report("blk-fs", True, f"{detail}; dom0: has_journal, e2fsck -fn of the detached image clean, "
                                        f"/big matches {self.stamp()}")
        except (TestFailure, OSError) as exc:
            self.report("blk-fs", False, f"domU passed ({detail}) but dom0: {exc}")

    # -- the loop --

    def stall_report(self, quiet_s: float) -> None:
        """The guest's console has not moved for `quiet_s`: where each side stands.  Its vCPU time (still
        running, or blocked waiting), each disk queue's ring (requests the guest produced, pvback consumed and
        answered, and what it holds), Xen's view of the guest's event channels (pending, masked), and every
        daemon thread's kernel stack."""
        say(f"  stall: the guest's console has been quiet for {quiet_s:.0f} s")
        domid = self.domids[-1] if self.domids else None
        for cmd in (["xl", "vcpu-list", GUEST], ["xl", "list", "-v", GUEST]):
            for ln in run(cmd, timeout=30, check=False).stdout.strip().splitlines():
                say(f"  stall: {' '.join(cmd[:2])}: {ln}")
        try:
            metrics = self.daemon.metrics()
        except OSError as exc:
            say(f"  stall: no metrics: {exc}")
            metrics = ""
        rings: dict[tuple[str, str], list[str]] = {}
        for labels, v in metric_samples(metrics, "pvback_queue_ring"):
            if domid is None or labels.get("domid") == str(domid):
                rings.setdefault((labels.get("devid", "?"), labels.get("queue", "?")), []).append(
                    f"{labels.get('key')}={v:.0f}")
        for (devid, queue), vals in sorted(rings.items()):
            say(f"  stall: qdisk {domid}/{devid} queue {queue}: {' '.join(vals)}; "
                f"requests {requests_of(metrics, domid or 0, int(devid)):.0f}")
        if domid is not None:
            run(["xl", "debug-keys", "e"], timeout=30, check=False)
            dump = run(["xl", "dmesg"], timeout=30, check=False).stdout.splitlines()
            start = max((i for i, ln in enumerate(dump) if "dumping event-channel info" in ln), default=len(dump))
            section = ""
            for ln in dump[start:]:
                m = re.search(r"Event channel information for domain (\d+)", ln)
                if m:
                    section = m.group(1)
                    continue
                # The guest's own ports, and dom0's ports bound to the guest (d=<guest>).
                if section == str(domid) or (section == "0" and re.search(rf"\bd={domid}\b", ln)):
                    say(f"  stall: evtchn dom{section}: {ln.split(')', 1)[-1].strip()}")
            # Xen's view of the guest's vCPU (upcall pending/masked: spinning with events masked, e.g. in its
            # console's write loop, looks unlike blocked waiting for an event), then where its kernel is: the
            # guest boots dom0's kernel and a PV kernel is not relocated, so dom0's /proc/kallsyms names the
            # functions on its stack (Debian's /boot/System.map is a stub).
            run(["xl", "debug-keys", "q"], timeout=30, check=False)
            dump = run(["xl", "dmesg"], timeout=30, check=False).stdout.splitlines()
            head = max((i for i, ln in enumerate(dump) if f"VCPU information and callbacks for domain {domid}:" in ln),
                       default=len(dump))
            for ln in dump[head:head + 8]:
                say(f"  stall: xen: {ln.split(')', 1)[-1].strip()}")
            ctx = run([XENCTX, "-s", "/proc/kallsyms", "-S", str(domid), "0"], timeout=30, check=False)
            for ln in (ctx.stdout + ctx.stderr).strip().splitlines()[:60]:
                say(f"  stall: xenctx: {ln}")
        if self.daemon.proc is not None:
            for line in thread_stacks(self.daemon.proc.pid):  # where a stuck backend waits
                say(f"  pvback-serve thread {line}")

    def run(self) -> None:
        self.daemon.check()
        say("STAGE guest:create")
        self.make_disks()
        if NET_STEPS & set(self.steps):
            self.net = NetServers()
        if self.ovs is not None and self.net is not None:
            net = self.net
            self.ovs.start_peer(lambda: NetServers(net.data))
            if self.ovs.switch.problem:  # no vif 2 then (its plug would fail xl create), the guest skips the step
                self.report("net-ovs", False, self.ovs.switch.problem)
                self.steps.remove("net-ovs")
                self.ovs = None
        if "flush" in self.steps or "fs-replay" in self.steps:
            self.setup_logwrites()
            for check in ("blk-flush", "blk-fs-replay"):
                if "problem" in self.lw:
                    self.report(check, False, self.lw["problem"])
        self.create()
        say("STAGE guest:disks")
        results = re.compile(r"DOMU-RESULT (\S+) (PASS|FAIL) ?(.*)")
        deadline = self.t0 + GUEST_TIMEOUT_S
        gone_since: float | None = None
        next_poll_dom = next_poll_gone = 0.0
        final_look = False
        last_text, last_change, stall_reported = "", time.monotonic(), False
        while True:
            text = console_text(GUEST)
            for k, v in re.findall(r"DOMU-KV (\S+) (\S+)", text):
                self.kv.setdefault(k, v)
            for m in results.finditer(text):
                if m.group(1) not in self.seen_steps:
                    self.seen_steps.add(m.group(1))
                    self.on_step(m.group(1), m.group(2) == "PASS", m.group(3).strip())
            kernel = re.search(r"DOMU-PHASE init (\S+)", text)
            if kernel:
                self.kernel = kernel.group(1)
            klog = re.findall(r"DOMU-KLOG (\S+) (error|info): ([^\n]*)", text)
            for step, kind, line in klog[self.seen_klog:]:
                if kind == "error":
                    self.klog_errors.append(line.strip())
                    # The guest fails the step's PASS itself; this covers lines outside any step.
                    check = STEP_CHECK.get(step, "guest-klog")
                    self.report(check, False, f"guest kernel: {line.strip()} {self.stamp()}")
            self.seen_klog = len(klog)
            for phase in re.findall(r"DOMU-PHASE (\S+)", text):
                if phase not in self.handled:
                    self.handled.add(phase)
                    self.on_phase(phase)
            fatal = FATAL_GUEST.search(text)
            if fatal:
                raise TestFailure(f"guest kernel: {fatal.group(0).strip()}")
            now = time.monotonic()
            if self.domids and self.domids[0] in self.gone_seen and now >= next_poll_gone:
                next_poll_gone = now + 1
                self.poll_domain_gone(self.domids[0])
            if now >= next_poll_dom:
                # `xl` is a process start under TCG, and CPU dom0 burns is CPU the guest does not get: poll
                # often only once the guest has said its last word.
                next_poll_dom = now + (1 if text.rstrip().endswith(("DOMU-DONE", "Power down", "halted"))
                                       or re.search(r"DOMU-RESULT (net-)?reboot", text) else 10)
                domid = domid_of(GUEST)
                if domid is not None and domid not in self.domids:
                    self.gone_seen.setdefault(self.domids[-1], now)
                    self.domids.append(domid)  # the reboot's new domain
                if domid is None:
                    gone_since = gone_since or now
                    self.gone_seen.setdefault(self.domids[-1], now)
                    # A reboot leaves a gap between the old domain and the new one.
                    after = [s for s in REBOOT_STEPS if s in self.steps and s not in self.seen_steps]
                    if not after or now - gone_since > 60:
                        if final_look:
                            break
                        # The console was read before this pass acted on it (a phase may take a while, and the
                        # guest goes on meanwhile): one more pass reads what it said before it went.
                        final_look = True
                        next_poll_dom = 0.0
                        continue
                else:
                    gone_since = None
            progress = HEARTBEAT.sub("", text)  # the heartbeat says the guest lives, not that it moves on
            if progress != last_text:
                last_text, last_change = progress, now
            elif now - last_change > STALL_REPORT_S and not stall_reported:
                stall_reported = True  # once while waiting, once more at the deadline: did anything move?
                self.stall_report(now - last_change)
            if now > deadline:
                tail = " | ".join(last_text.strip().splitlines()[-4:])
                self.stall_report(now - last_change)
                raise TestFailure(f"the guest did not finish within {GUEST_TIMEOUT_S} s; console tail: {tail}")
            time.sleep(0.25)
        say("STAGE guest:teardown")
        if "blk-domain-gone" in self.pending and self.domids:
            self.gone_seen.setdefault(self.domids[0], time.monotonic())
            while not self.poll_domain_gone(self.domids[0]):  # bounded by its own two timeouts
                time.sleep(0.5)
        if self.pending_fs is not None:
            self.report("blk-fs", False, f"domU passed ({self.pending_fs}) but dom0 never saw xvdc detached to fsck "
                                         f"the image: {self.actions.get('pvback detach', 'detach never requested')}")
        missing = [s for s in self.steps if s not in self.seen_steps]
        if missing:
            tail = " | ".join(console_text(GUEST).strip().splitlines()[-4:])
            for s in missing:
                self.report(STEP_CHECK[s], False, f"the guest never reported '{s}'; console tail: {tail}")

    def finish_logwrites(self) -> None:
        """After the guest and the daemon are gone: remove dm-log-writes (which completes its log), replay the
        log and judge the checks that waited for it."""
        if not self.lw:
            return
        problems: list[str] = []
        if "ok" in self.lw:
            status = run(["dmsetup", "status", LW_NAME], check=False).stdout.strip()
            if "logging_disabled" in status:
                problems.append(f"dm-log-writes stopped logging (status: {status})")
            try:
                wait_until(f"`dmsetup remove {LW_NAME}` to succeed (something still holds {LW_DEV} open)",
                           lambda: run(["dmsetup", "remove", LW_NAME], check=False).returncode == 0, 30, 1)
            except TestFailure as exc:
                problems.append(str(exc))
        for key in ("log", "data"):
            if key in self.lw:
                run(["losetup", "-d", self.lw[key]], check=False)
        for check in ("blk-flush", "blk-fs-replay"):
            if check not in self.pending:
                continue
            detail = self.pending.pop(check)
            t0 = time.monotonic()
            try:
                if problems:
                    raise TestFailure("; ".join(problems))
                verdict = self.replay_check(check)
                self.report(check, True, f"{detail}; dm-log-writes replay: {verdict} "
                                         f"[replay {time.monotonic() - t0:.1f} s]")
            except (TestFailure, logwrites.LogError, OSError) as exc:
                self.report(check, False, f"domU passed ({detail}) but the dm-log-writes replay: {exc}")

    def replay_check(self, check: str) -> str:
        log = logwrites.read_log(Path(self.lw["log_file"]))
        size = LW_DATA_MIB * MiB
        replay = logwrites.Replay(log, Path(f"/tmp/lw-replay-{check}.img"), size)
        try:
            if check == "blk-flush":
                seed = self.kv.get("lw-seed", "?")
                tags = [f"PVBACK-LW-TAG {i:02d} {seed}\n".encode().ljust(LW_TAG_SIZE, b"\0")
                        for i in range(LW_ROUNDS)]
                counts = [int(c) for c in self.kv.get("lw-flushes", "").split(",") if c.isdigit()]
                end = f"PVBACK-LW-END {seed}\n".encode().ljust(LW_TAG_SIZE, b"\0")
                verdict = logwrites.check_ordered_rounds(log, replay, LW_TAG_BASE, LW_TAG_SIZE, tags, counts, end)
                # The replayer itself: every entry replayed must give exactly what the data device holds.
                replay.advance(len(log.entries))
                with Path(self.lw["data_file"]).open("rb") as f:
                    if f.read() != replay.read(0, size):
                        raise TestFailure(f"the whole log ({len(log.entries)} entries) replayed differs from the "
                                          "data device: the log or its reader is incomplete")
                return f"{verdict}; all {len(log.entries)} entries replayed == the data device"
            shas = [self.kv.get(f"lwfs-{k}", "?") for k in range(LW_FILES)]
            return logwrites.check_fs_replay(log, replay, shas, Path("/tmp"))
        finally:
            replay.target.unlink(missing_ok=True)

    def finish_stub_check(self) -> None:
        """After the guest: every stub answered libxl's QMP with commands it knows and went with its domain."""
        if "xl-qdisk-stub" not in self.report.selected:
            return
        # libxl rotates the device model's log when the domain restarts (the reboot): .log.1 is the first one.
        logs = sorted(Path("/var/log/xen").glob(f"qemu-dm-{GUEST}.log*"))
        keep_logs(*logs)
        text = "".join(p.read_text(errors="replace") for p in logs)
        sent = sorted(set(re.findall(r"dm-stub: domid=\d+ qmp (\S+)", text)))
        unknown = sorted(set(re.findall(r"dm-stub: domid=\d+ qmp (\S+) -> error", text)))
        left = {d: dm_stub_pids(d) for d in self.domids}
        problems = [n for n in self.stub_notes if not n.endswith(": ok")]
        if "qmp_capabilities" not in sent:
            problems.append(f"libxl never completed the QMP handshake (device model log: {text.strip()[-200:]!r})")
        if unknown:
            problems.append(f"libxl sent QMP commands the stub answered with an error: {unknown}")
        problems += [f"dm-stub of domain {d} still running: pids {p}" for d, p in left.items() if p]
        if problems:
            self.report("xl-qdisk-stub", False, "; ".join(problems))
        else:
            self.report("xl-qdisk-stub", True, f"{len(self.domids)} stubs (domains {self.domids}) answered QMP "
                                               f"{', '.join(sent)}; backend/qdisk params + device-model state "
                                               f"right; all reaped")


def report_shapes(report: Report, scenario: Scenario, live: set[str]) -> None:
    """The request shapes Linux's blkfront sent over the run (pvback's serve log + the last scrape), to the host
    as OUT/shapes.json: the host test holds them against tests/blk/fixtures/linux-blkfront-shapes.json."""
    text = SERVE_LOG.read_text(errors="replace") if SERVE_LOG.exists() else ""
    logged = shapes_in_log(text)
    shapes = sorted(logged | live)
    doc = {"kernel": scenario.kernel, "shapes": shapes, "from_log": sorted(logged), "from_metrics": sorted(live)}
    try:
        if OUT.is_dir():
            (OUT / "shapes.json").write_text(json.dumps(doc, indent=1) + "\n")
    except OSError as exc:
        say(f"  cannot write {OUT}/shapes.json: {exc}")
    if not shapes:
        report("blk-shapes", False, "pvback reported no request shapes (no `msg=\"request shapes\"` line in its log, "
                                    "no pvback_request_shapes_total sample)")
    else:
        report("blk-shapes", True, f"{len(shapes)} request shapes from Linux {scenario.kernel} "
                                   f"({len(logged)} in the serve log, {len(live)} in the last scrape): "
                                   f"{' '.join(shapes)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", default="all", help="'all' or check names joined with '+'")
    args = ap.parse_args()
    selected = list(CHECKS) if args.tests == "all" else [t for t in args.tests.split("+") if t]
    report = Report(selected)
    for name in selected:
        if name not in CHECKS:
            say(f"RESULT {name} FAIL unknown check (known: {', '.join(CHECKS)})")
    if "platform" in selected:
        say("STAGE platform")
        t_platform(report)
    need_guest = any(c in NEEDS_GUEST for c in selected)
    daemon = Daemon()
    manager = Manager()
    scenario: Scenario | None = None
    # Before `pvback serve`: it gives its group an ACL entry on the OVSDB socket when it drops privileges.
    ovs = ovs_case.OvsCase(say) if "net-ovs" in selected and need_guest else None
    if ovs is not None:
        say("STAGE ovs-start")
        ovs.start()
    if {"vtpm-tools", "vtpm-reboot"} & set(selected):
        say("STAGE vtpm-manager-start")
        manager.start()
    need_dd = any(c in driver_domain.CHECKS for c in selected)  # dom0's pvback serves the driver domain's disk
    if need_guest or need_dd or "pvback-serve" in selected:
        say("STAGE pvback-serve-start")
        daemon.start(ovs.serve_config() if ovs is not None else "")
    try:
        if need_guest:
            steps = [GUEST_STEP[c] for c in CHECKS if c in GUEST_STEP and c in selected]
            scenario = Scenario(report, daemon, manager, steps, ovs)
            try:
                scenario.run()
            except Exception as exc:  # whatever broke, every check still gets its RESULT line
                why = str(exc) if isinstance(exc, TestFailure) else f"{type(exc).__name__}: {exc}"
                say(f"  guest scenario failed: {why}")
                for c in selected:
                    if c in NEEDS_GUEST:
                        report(c, False, why)
            finally:
                scenario.stop_net()
                if domid_of(GUEST) is not None:
                    run(["xl", "destroy", GUEST], timeout=60, check=False)
                wait_until_gone = time.monotonic() + 20
                while scenario.domids and any(dm_stub_pids(d) for d in scenario.domids) \
                        and time.monotonic() < wait_until_gone:
                    time.sleep(0.5)  # libxl reaps the stub right after the domain; give it a moment
                scenario.finish_stub_check()
        if need_dd:  # after the main guest: its memory is free again
            driver_domain.run(sys.modules[__name__], report, daemon, selected)
    finally:
        shapes: set[str] = set()
        if scenario is not None and "blk-shapes" in selected and daemon.proc is not None:
            try:  # devices still connected have said nothing in the log yet
                shapes |= shapes_in_metrics(daemon.metrics())
            except OSError as exc:
                say(f"  final metrics scrape failed: {exc}")
        if "least-privilege" in selected:
            try:
                report("least-privilege", True, t_least_privilege(daemon, scenario))
            except (TestFailure, OSError, KeyError) as exc:
                report("least-privilege", False, str(exc))
        say("STAGE pvback-serve-stop")
        rc = daemon.stop()
        mgr_rc = manager.stop()
        if ovs is not None:
            say("STAGE ovs-stop")
            keep_logs(ovs_case.OVS_DIR / "ovs-vswitchd.log", ovs_case.OVS_DIR / "ovsdb-server.log")
            ovs.stop()
        if mgr_rc not in (None, 0):
            say(f"  vtpm-manager exited {mgr_rc} on SIGTERM")
        if "pvback-serve" in selected:
            text = SERVE_LOG.read_text(errors="replace") if SERVE_LOG.exists() else ""
            errors = [ln for ln in text.splitlines() if "level=error" in ln or "Traceback" in ln]
            if daemon.problem:
                report("pvback-serve", False, daemon.problem)
            elif rc != 0:
                report("pvback-serve", False, f"`pvback serve` exited {rc} on SIGTERM; log: {daemon.tail(5)}")
            elif errors:
                report("pvback-serve", False, f"{len(errors)} errors in its log, first: {errors[0][:300]}")
            else:
                loop = re.search(r"loop=(\w+)", text)
                report("pvback-serve", True, f"up in {daemon.t_ready:.1f} s (loop {loop.group(1) if loop else '?'}),"
                                             f" served the run, clean exit on SIGTERM")
        if scenario is not None and "blk-shapes" in selected:
            report_shapes(report, scenario, shapes)
        if scenario is not None:
            say("STAGE dm-log-writes-replay")
            scenario.finish_logwrites()
        keep_logs(console_log(GUEST), Path(f"/var/log/xen/qemu-dm-{GUEST}.log"),
                  Path(f"/var/log/xen/xl-{GUEST}.log"), SERVE_LOG, MGR_LOG, XENSTORED_LOG)
        keep_tail(XENSTORED_TRACE, 4000)
    report.fail_rest("not reported by the dom0 driver (see the serial log)")
    say("STAGE tests-done")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
