#!/usr/bin/env python3
"""The dom0 side of the real-Xen end-to-end test.  Runs inside the test dom0 (Debian's python3.11), started by
dom0-init from the read-only 9p share; prints for the host test, on the console:

    STAGE test:<name>                       when a test starts (the host times the stages)
    RESULT <name> PASS|FAIL <detail>        one line per test

Every wait is bounded.  Guests are PV domUs with the busybox initramfs of tests/e2e/domU-init.sh; their
verdicts come back through their consoles (xenconsoled's guest logs) and are cross-checked here against
the disk image files.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
E2E = HERE.parent
SHARE = E2E.parent.parent  # the project tree
CONSOLE_DIR = Path("/var/log/xen/console")
WORK = Path("/var/lib/pvback-e2e")  # ext4, so O_DIRECT and hole punching behave as on a real dom0
OUT = Path("/mnt/out")
DOMU_KERNEL = "/opt/pvback-e2e/vmlinuz"
DOMU_RAMDISK = "/opt/pvback-e2e/domU.cpio.gz"
DM_STUB = E2E / "dm-stub.py"
SERVE_BLK = HERE / "serve_blk.py"
MiB = 1 << 20
DISK_SIZE = 256 * MiB
XVDA = 51712  # (202 << 8) | (0 << 4)


def say(line: str) -> None:
    print(line, flush=True)


class TestFailure(Exception):
    pass


class GuestFatal(TestFailure):
    """The guest reported an unrecoverable error: stop waiting for it."""


def run(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TestFailure(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from exc
    if check and cp.returncode != 0:
        err = (cp.stderr or cp.stdout).strip().splitlines()
        raise TestFailure(f"{' '.join(cmd)} exited {cp.returncode}: {' | '.join(err[-3:])}")
    return cp


def wait_until(what: str, cond: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(interval)
    raise TestFailure(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- disks ----

def sha_region(path: Path, off_mib: int, n_mib: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(off_mib * MiB)
        for _ in range(n_mib):
            h.update(f.read(MiB).ljust(MiB, b"\0"))
    return h.hexdigest()


def make_disk(name: str) -> tuple[Path, str, str]:
    """A 256 MiB sparse image: random 1 MiB at 1 MiB, random 64 MiB at 64 MiB, boot marker at 200 MiB.
    Returns (path, sha of [1,2) MiB, sha of [64,128) MiB)."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{name}.img"
    path.unlink(missing_ok=True)
    small = os.urandom(MiB)
    big_h = hashlib.sha256()
    with path.open("wb") as f:
        f.truncate(DISK_SIZE)
        f.write(b"PVBACK-E2E-DISK\n")
        f.seek(MiB)
        f.write(small)
        f.seek(64 * MiB)
        for _ in range(64):
            chunk = os.urandom(MiB)
            big_h.update(chunk)
            f.write(chunk)
        f.seek(200 * MiB)
        f.write(b"BOOT0")
        f.flush()
        os.fsync(f.fileno())
    return path, hashlib.sha256(small).hexdigest(), big_h.hexdigest()


# ---- guests ----

def console_log(name: str) -> Path:
    return CONSOLE_DIR / f"guest-{name}.log"


def console_text(name: str) -> str:
    try:
        return console_log(name).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def domid_of(name: str) -> int | None:
    cp = run(["xl", "domid", name], timeout=20, check=False)
    return int(cp.stdout.strip()) if cp.returncode == 0 and cp.stdout.strip().isdigit() else None


def write_cfg(name: str, test: str, expect: str = "", disks: list[str] | None = None, memory: int = 256,
              on_reboot: str = "destroy") -> Path:
    extra = f"console=hvc0 rdinit=/init quiet pvtest={test}" + (f" pvexpect={expect}" if expect else "")
    lines = [
        f'name = "{name}"',
        'type = "pv"',
        f'kernel = "{DOMU_KERNEL}"',
        f'ramdisk = "{DOMU_RAMDISK}"',
        f'extra = "{extra}"',
        f"memory = {memory}",
        "vcpus = 1",
        'on_poweroff = "destroy"',
        f'on_reboot = "{on_reboot}"',
        'on_crash = "destroy"',
    ]
    if disks:
        lines.append("disk = [ " + ", ".join(f"'{d}'" for d in disks) + " ]")
        # The qdisk route: libxl spawns a "device model" for the PV guest; ours only answers libxl's QMP and
        # the userspace backend already watching backend/qdisk serves the disk.
        lines.append(f'device_model_override = "{DM_STUB}"')
        lines.append('device_model_version = "qemu-xen"')
    cfg = Path("/tmp") / f"{name}.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def qdisk(path: Path, access: str = "rw") -> str:
    return f"backendtype=qdisk,format=raw,vdev=xvda,access={access},target={path}"


def xl_create(cfg: Path, paused: bool = False) -> int:
    name = re.search(r'name = "([^"]+)"', cfg.read_text())
    assert name
    console_log(name.group(1)).unlink(missing_ok=True)
    run(["xl", "create", *(["-p"] if paused else []), str(cfg)], timeout=90)
    domid = domid_of(name.group(1))
    if domid is None:
        raise TestFailure(f"xl create {cfg.name} succeeded but the domain is not listed")
    return domid


def destroy(name: str) -> None:
    if domid_of(name) is not None:
        run(["xl", "destroy", name], timeout=30, check=False)


def domu_lines(name: str, prefix: str) -> list[str]:
    return [ln.split(prefix, 1)[1].strip() for ln in console_text(name).splitlines() if prefix in ln]


def domu_kv(name: str) -> dict[str, str]:
    kv = {}
    for rest in domu_lines(name, "DOMU-KV "):
        k, _, v = rest.partition(" ")
        kv[k] = v
    return kv


FATAL_GUEST = re.compile(r"[^\n]*(disabled for further use|Kernel panic|BUG: |Oops: )[^\n]*")


def diagnose(name: str) -> str:
    """What a hung guest was doing, for the failure message: its xl state and the toolstack's log tails."""
    parts = []
    cp = run(["xl", "list", name], timeout=20, check=False)
    parts.append("xl list: " + (cp.stdout.strip().splitlines()[-1] if cp.returncode == 0 else "gone"))
    for log in (Path(f"/var/log/xen/qemu-dm-{name}.log"), Path(f"/var/log/xen/xl-{name}.log")):
        if log.exists():
            lines = log.read_text(errors="replace").strip().splitlines()[-3:]
            parts.append(f"{log.name}: {' | '.join(lines)}")
    return "; ".join(parts)


def wait_console(name: str, marker: str, what: str, timeout: float) -> None:
    def seen() -> bool:
        text = console_text(name)
        fatal = FATAL_GUEST.search(text)
        if fatal:
            raise GuestFatal(f"guest kernel: {fatal.group(0).strip()} (while waiting for {what})")
        return marker in text

    wait_until(f"{what} ({marker})", seen, timeout)


def wait_domu_verdict(name: str, test: str, timeout: float) -> str:
    """Wait for the domU's verdict line and for the domain to be gone; return the detail or raise."""
    pat = re.compile(rf"DOMU {re.escape(test)} (PASS|FAIL) ?(.*)")
    found: list[re.Match[str]] = []

    def verdict() -> bool:
        text = console_text(name)
        m = pat.search(text)
        if m:
            found.append(m)
            return True
        # The frontend gave up on the disk: nothing more will come, do not sit out the timeout.
        fatal = FATAL_GUEST.search(text)
        if fatal:
            raise GuestFatal(f"guest kernel: {fatal.group(0).strip()}; "
                              f"console tail: {' | '.join(text.strip().splitlines()[-4:])}")
        return False

    try:
        wait_until(f"domU {name} to report (its console: {console_log(name)})", verdict, timeout)
    except GuestFatal:
        raise
    except TestFailure:
        tail = " | ".join(console_text(name).strip().splitlines()[-4:])
        raise TestFailure(f"no verdict from {name} in {timeout:.0f} s; console tail: {tail or '(empty)'}; "
                          f"{diagnose(name)}") from None
    wait_until(f"{name} to power off", lambda: domid_of(name) is None, 30, 0.5)
    m = found[-1]
    if m.group(1) != "PASS":
        raise TestFailure(f"domU: {m.group(2)}")
    return m.group(2)


# ---- the backend ----

class Server:
    """serve_blk.py, running for all disk tests; stopped by PID."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path("/tmp/serve_blk.log")
        self.unavailable: str | None = None

    def start(self) -> None:
        self.log.unlink(missing_ok=True)
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen([sys.executable, str(SERVE_BLK)], stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_until("serve_blk.py to report readiness", self._ready, 30)
        except TestFailure as exc:
            self.unavailable = f"{exc}; log: {self.tail()}"
        if self.unavailable:
            self.stop()

    def _ready(self) -> bool:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        m = re.search(r"SERVE-UNAVAILABLE (.*)", text)
        if m:
            self.unavailable = m.group(1)
            return True
        if "SERVE-READY" in text:
            return True
        if self.proc is not None and self.proc.poll() is not None:
            self.unavailable = f"serve_blk.py exited {self.proc.returncode}: {self.tail()}"
            return True
        return False

    def tail(self) -> str:
        if not self.log.exists():
            return "(no log)"
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])

    def check(self) -> None:
        if self.unavailable:
            raise TestFailure(f"blkback not available: {self.unavailable}")
        if self.proc is None or self.proc.poll() is not None:
            raise TestFailure(f"serve_blk.py is not running: {self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


SERVER = Server()


# ---- tests ----

def t_platform() -> str:
    """XenPlatform in dom0: the C module loads, gntdev/evtchn open, grant copy probed, self-grant map/copy,
    a loopback event channel; in a child process so a crash in C cannot take the driver down."""
    cp = run([sys.executable, str(HERE / "check_platform.py")], timeout=60, check=False)
    out = cp.stdout.strip().splitlines()
    for ln in out:
        say(f"  {ln}")
    if cp.returncode != 0:
        bad = [ln for ln in out if " FAIL " in ln] or (cp.stderr.strip().splitlines()[-3:])
        raise TestFailure(f"check_platform exited {cp.returncode}: {' | '.join(bad)}")
    return "; ".join(ln.split(" ", 3)[-1] for ln in out if ln.startswith("CHECK summary"))


def t_xl_boot() -> str:
    name = "t-boot"
    cfg = write_cfg(name, "boot")
    t0 = time.monotonic()
    try:
        xl_create(cfg)
        detail = wait_domu_verdict(name, "boot", 60)
    finally:
        destroy(name)
        keep_console(name)
    return f"{detail}; create->poweroff {time.monotonic() - t0:.1f} s"


def t_xl_qdisk_stub() -> str:
    """libxl's qdisk route without a backend: xl create must get through dm-stub.py's QMP handshake, write
    backend/qdisk nodes for us to serve, and kill the stub when the guest is gone."""
    name = "t-stub"
    img, _, _ = make_disk(name)
    cfg = write_cfg(name, "boot", disks=[qdisk(img)])
    t0 = time.monotonic()
    domid = -1
    try:
        domid = xl_create(cfg)
        t_create = time.monotonic() - t0
        be = f"/local/domain/0/backend/qdisk/{domid}/{XVDA}"
        params = run(["xenstore-read", f"{be}/params"]).stdout.strip()
        if params != f"aio:{img}":
            raise TestFailure(f"{be}/params is {params!r}")
        state = run(["xenstore-read", f"/local/domain/0/device-model/{domid}/state"]).stdout.strip()
        if state != "running":
            raise TestFailure(f"device-model state {state!r}")
        detail = wait_domu_verdict(name, "boot", 90)
    finally:
        destroy(name)
        keep_console(name)
    if domid < 0:
        raise TestFailure("no domain")
    left = run(["pgrep", "-f", f"{DM_STUB}.*-xen-domid {domid}"], check=False).stdout.split()
    if left:
        raise TestFailure(f"dm-stub still running after the guest went: pids {left}")
    return f"xl create {t_create:.1f} s, backend params {params}; {detail}; stub reaped"


def _disk_test(name: str, test: str, route: str, timeout: float = 90, access: str = "rw",
               memory: int = 256, on_reboot: str = "destroy") -> tuple[Path, str, dict[str, str], str]:
    """Create a guest with one disk served by pvback, wait for its verdict; returns (image, detail, kv, sha
    of [1,2) MiB as dom0 wrote it)."""
    SERVER.check()
    img, small_sha, big_sha = make_disk(name)
    expect = big_sha if test == "big" else small_sha
    t0 = time.monotonic()
    try:
        if route == "xl":
            cfg = write_cfg(name, test, expect, [qdisk(img, access)], memory, on_reboot)
            xl_create(cfg)
        else:
            cfg = write_cfg(name, test, expect, None, memory, on_reboot)
            domid = xl_create(cfg, paused=True)
            xs_attach(domid, img, access)
            run(["xl", "unpause", name], timeout=20)
        detail = wait_domu_verdict(name, test, timeout)
    finally:
        destroy(name)
        keep_console(name)
    return img, f"{detail} ({time.monotonic() - t0:.1f} s)", domu_kv(name), small_sha


def xs_attach(domid: int, img: Path, access: str = "rw") -> None:
    """The nodes `pvback attach` writes (libxl's layout), by hand with xenstore-write.  backend/qdisk: the
    dom0 kernel has no driver for that type, so it cannot race us."""
    be = f"/local/domain/0/backend/qdisk/{domid}/{XVDA}"
    fe = f"/local/domain/{domid}/device/vbd/{XVDA}"
    mode = "w" if access == "rw" else "r"
    run(["xenstore-write", f"{be}/frontend", fe, f"{be}/frontend-id", str(domid), f"{be}/online", "1",
         f"{be}/removable", "0", f"{be}/dev", "xvda", f"{be}/type", "qdisk", f"{be}/mode", mode,
         f"{be}/params", f"aio:{img}", f"{be}/device-type", "disk", f"{be}/state", "1"])
    run(["xenstore-chmod", "-r", f"/local/domain/0/backend/qdisk/{domid}", "n0", f"r{domid}"])
    run(["xenstore-write", f"{fe}/backend", be, f"{fe}/backend-id", "0", f"{fe}/virtual-device", str(XVDA),
         f"{fe}/device-type", "disk"])
    # Last: xenbus in the guest probes the frontend when state=1 appears.
    run(["xenstore-write", f"{fe}/state", "1"])
    run(["xenstore-chmod", "-r", fe, f"n{domid}", "r0"])


def xs_detach(domid: int, timeout: float = 15) -> None:
    """What libxl does to unplug: online=0, state=5, wait for Closed, remove both directories."""
    be = f"/local/domain/0/backend/qdisk/{domid}/{XVDA}"
    fe = f"/local/domain/{domid}/device/vbd/{XVDA}"
    run(["xenstore-write", f"{be}/online", "0", f"{be}/state", "5"])

    def closed() -> bool:
        cp = run(["xenstore-read", f"{be}/state"], check=False)
        return cp.stdout.strip() == "6"

    wait_until("the backend to reach Closed (6) after unplug", closed, timeout)
    run(["xenstore-rm", fe], check=False)
    run(["xenstore-rm", be], check=False)


def keep_console(name: str) -> None:
    """Copy the guest's console and the toolstack's logs to the host (the writable out0 share)."""
    if not OUT.is_dir():
        return
    for log in (console_log(name), Path(f"/var/log/xen/qemu-dm-{name}.log"), Path(f"/var/log/xen/xl-{name}.log")):
        try:
            if log.exists():
                shutil.copy(log, OUT / log.name)
        except OSError:
            pass


def t_blk_rw(route: str) -> Callable[[], str]:
    def test() -> str:
        name = f"t-rw-{route}"
        img, detail, kv, _ = _disk_test(name, "rw", route)
        got = sha_region(img, 2, 1)
        if kv.get("wsha") != got:
            raise TestFailure(f"dom0 reads {got[:16]} where the domU wrote {kv.get('wsha', '?')[:16]}")
        return f"{detail}; dom0 verified the domU's write"
    return test


def t_blk_big() -> str:
    img, detail, kv, _ = _disk_test("t-big", "big", "xl", timeout=150, memory=384)
    got = sha_region(img, 128, 64)
    if kv.get("wsha") != got:
        raise TestFailure(f"dom0 reads {got[:16]} where the domU wrote {kv.get('wsha', '?')[:16]}")
    return f"{detail}; dom0 verified 64 MiB written by the domU"


def t_blk_fs() -> str:
    img, detail, kv, _ = _disk_test("t-fs", "fs", "xl", timeout=120)
    run(["e2fsck", "-fn", str(img)], timeout=60)
    dump = Path("/tmp/t-fs-big")
    dump.unlink(missing_ok=True)
    run(["debugfs", "-R", f"dump /big {dump}", str(img)], timeout=30)
    got = hashlib.sha256(dump.read_bytes()).hexdigest()
    if got != kv.get("bigsha"):
        raise TestFailure(f"/big read by dom0's debugfs has sha {got[:16]}, the domU wrote {kv.get('bigsha')}")
    return f"{detail}; dom0 e2fsck -fn clean and /big matches"


def t_blk_discard() -> str:
    img, detail, _kv, _ = _disk_test("t-discard", "discard", "xl")
    with img.open("rb") as f:
        f.seek(8 * MiB)
        zero = f.read(4 * MiB) == bytes(4 * MiB)
        try:
            hole = os.lseek(f.fileno(), 8 * MiB, os.SEEK_DATA) >= 12 * MiB
        except OSError:
            hole = True
    if not zero:
        raise TestFailure("the discarded 4 MiB still hold the data in the image file")
    return f"{detail}; image range {'is a hole' if hole else 'reads zeros'}"


def t_blk_ro() -> str:
    img, detail, _kv, before = _disk_test("t-ro", "ro", "xl", access="ro")
    if sha_region(img, 1, 1) != before:
        raise TestFailure("the read-only disk's image changed")
    return f"{detail}; image unchanged"


def t_blk_hotplug() -> str:
    SERVER.check()
    name = "t-hotplug"
    img, small_sha, _ = make_disk(name)
    cfg = write_cfg(name, "hotplug", small_sha)
    t0 = time.monotonic()
    try:
        domid = xl_create(cfg, paused=True)
        xs_attach(domid, img)
        run(["xl", "unpause", name], timeout=20)
        wait_console(name, "DOMU-PHASE attached", "the domU to read the disk", 60)
        xs_detach(domid)
        wait_console(name, "DOMU-PHASE detached", "the domU to see the disk go", 60)
        xs_attach(domid, img)
        detail = wait_domu_verdict(name, "hotplug", 60)
    finally:
        destroy(name)
        keep_console(name)
    return f"{detail} ({time.monotonic() - t0:.1f} s)"


def t_blk_reboot() -> str:
    img, detail, _kv, _ = _disk_test("t-reboot", "reboot", "xl", timeout=150, on_reboot="restart")
    if "DOMU-PHASE rebooting" not in console_text("t-reboot"):
        raise TestFailure("the domU passed without having rebooted")
    with img.open("rb") as f:
        f.seek(200 * MiB)
        if f.read(5) != b"BOOT1":
            raise TestFailure("boot marker not updated in the image")
    return detail


TESTS: dict[str, Callable[[], str]] = {
    "platform": t_platform,
    "xl-boot": t_xl_boot,
    "xl-qdisk-stub": t_xl_qdisk_stub,
    "blk-rw-xs": t_blk_rw("xs"),
    "blk-rw-xl": t_blk_rw("xl"),
    "blk-fs": t_blk_fs,
    "blk-big": t_blk_big,
    "blk-discard": t_blk_discard,
    "blk-ro": t_blk_ro,
    "blk-hotplug": t_blk_hotplug,
    "blk-reboot": t_blk_reboot,
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", default="all", help="'all' or names joined with '+'")
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = str(SHARE)
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    names = list(TESTS) if args.tests == "all" else [t for t in args.tests.split("+") if t]
    failed = 0
    server_started = False
    try:
        for name in names:
            fn = TESTS.get(name)
            say(f"STAGE test:{name}")
            if fn is None:
                say(f"RESULT {name} FAIL unknown test (known: {', '.join(TESTS)})")
                failed += 1
                continue
            if name.startswith("blk-") and not server_started:
                SERVER.start()
                server_started = True
            t0 = time.monotonic()
            try:
                detail = fn()
                say(f"RESULT {name} PASS {detail} [{time.monotonic() - t0:.1f} s]")
            except Exception as exc:  # one test's failure must not stop the others
                failed += 1
                say(f"RESULT {name} FAIL {type(exc).__name__ if not isinstance(exc, TestFailure) else ''}"
                    f"{': ' if not isinstance(exc, TestFailure) else ''}{exc} [{time.monotonic() - t0:.1f} s]")
    finally:
        SERVER.stop()
        if OUT.is_dir() and SERVER.log.exists():
            shutil.copy(SERVER.log, OUT / "serve_blk.log")
    say("STAGE tests-done")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
