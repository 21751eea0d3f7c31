"""The driver-domain checks of the real-Xen test (#19), run by run_tests.py in dom0 after the main guest is gone.

dom0 starts the driver domain `pvdd`: a PV domU with driver_domain=1 whose root disk (QEMU's second disk, dom0's
/dev/vdb; tests/e2e/build-dd.sh) and NIC are served by dom0's own `pvback serve`.  Its /sbin/dd-init
(tests/e2e/dd-init.sh) runs `xl devd` and `pvback serve --types qdisk,vif` there.  Then a guest `pvddguest`
(the test domU's initramfs with rdinit=/init-dd, tests/e2e/domU-dd-init.sh) gets its disk and NIC from the driver
domain, configured as an operator would:

    disk = ['backend=pvdd,backendtype=qdisk,format=raw,vdev=xvda,access=rw,target=/var/lib/pvback-dd/guest.img']
    vif  = ['backend=pvdd,mac=...,script=vif-pvback']

dom0 talks to dd-init through xenstore (the driver domain's data/pvback-e2e: cmd written here, ack there) to have
the image hashed and fsck'ed where it lives, and pvback SIGKILLed and restarted while the guest does I/O.  The
guest's NIC reaches dom0 through the driver domain, which routes between 198.18.9.0/24 (the guest .2, its tap
end .1) and 198.18.8.0/24 (dom0 .1 on the tap of the driver domain's own vif, the driver domain .3).
"""

from __future__ import annotations

import grp
import os
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

DD = "pvdd"
GUEST = "pvddguest"
DD_DISK = "/dev/vdb"  # QEMU's second virtio disk: dd.img
DD_RAMDISK = "/opt/pvback-e2e/dd.cpio.gz"
DD_MEM, GUEST_MEM = 384, 256
DD_MAC, GUEST_MAC = "00:16:3e:5e:00:10", "00:16:3e:5e:00:11"
DD_NET = "198.18.8"  # dom0 .1 on its tap of the driver domain's vif, the driver domain's eth0 .3
GUEST_NET = "198.18.9"  # the guest .2, the driver domain's end of its tap .1: routed by the driver domain
CTL = "data/pvback-e2e"  # under the driver domain's home
IMG = "/var/lib/pvback-dd/guest.img"  # in the driver domain (dd-init.sh makes it)
NET_MIB = 2
STALE_WAIT_S = 30  # libxl waits 10 s for the driver domain to remove a backend, devd needs a moment more
DD_READY_TIMEOUT_S = 600  # xl create to `pvback serve` answering inside: 60-90 s on an idle host, 5 min loaded (TCG)
GUEST_TIMEOUT_S = 600
CMD_TIMEOUT_S = 330  # a command to dd-init: its kill waits up to 300 s for the new daemon (12-120 s seen under TCG)

CHECKS = ["dd-boot", "dd-blk-rw", "dd-blk-fs", "dd-net", "dd-restart", "dd-reboot", "dd-serve"]
GUEST_STEP = {"dd-blk-rw": "rw", "dd-blk-fs": "fs", "dd-net": "net", "dd-restart": "restart",
              "dd-reboot": "reboot"}
STEP_CHECK = {v: k for k, v in GUEST_STEP.items()}


class DriverDomain:
    """The driver domain and dom0's side of the checks; `rt` is run_tests (helpers, NetServers, the Daemon)."""

    def __init__(self, rt: ModuleType, report: Any, daemon: Any, selected: list[str]) -> None:
        self.rt = rt
        self.report = report
        self.daemon = daemon
        self.selected = [c for c in selected if c in CHECKS]
        self.steps = [GUEST_STEP[c] for c in CHECKS if c in GUEST_STEP and c in self.selected]
        self.t0 = time.monotonic()
        self.dd_domid: int | None = None
        self.state: dict[str, str] = {}  # the driver domain's data/pvback-e2e/state, parsed
        self.img_sha64 = ""
        self.seq = 0
        self.kv: dict[str, str] = {}
        self.seen: set[str] = set()
        self.handled: set[str] = set()
        self.domids: list[int] = []
        self.net: Any = None
        self.kill_detail: str | None = None
        self.notes: list[str] = []
        self.dd_lines = 0  # the driver domain's console lines already echoed

    def stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:.1f} s]"

    def say(self, line: str) -> None:
        self.rt.say(line)

    # -- the driver domain --

    def write_dd_cfg(self) -> Path:
        rt = self.rt
        cfg = Path("/tmp") / f"{DD}.cfg"
        cfg.write_text("\n".join([
            f'name = "{DD}"', 'type = "pv"', f'kernel = "{rt.DOMU_KERNEL}"', f'ramdisk = "{DD_RAMDISK}"',
            'extra = "console=hvc0 rdinit=/init quiet"', f"memory = {DD_MEM}", "vcpus = 1",
            # libxl makes its home's libxl/ and device-model/ writable to it: xl devd and the dm-stub write there.
            "driver_domain = 1",
            'on_poweroff = "destroy"', 'on_reboot = "destroy"', 'on_crash = "destroy"',
            # Its root disk and its NIC, served by dom0's pvback: pvback boots the domain that runs pvback.
            f"disk = [ 'backendtype=qdisk,format=raw,vdev=xvda,access=rw,target={DD_DISK}' ]",
            f'vif = [ "mac={DD_MAC},script={rt.VIF_SCRIPT}" ]',
            f'device_model_override = "{rt.DM_STUB}"', 'device_model_version = "qemu-xen"',
        ]) + "\n")
        return cfg

    def domid(self, name: str) -> int | None:
        """`xl domid`, with room for a dom0 starved by three domains' TCG vCPUs (30 s was seen to pass)."""
        cp = self.rt.run(["xl", "domid", name], timeout=120, check=False)
        out = cp.stdout.strip()
        return int(out) if cp.returncode == 0 and out.isdigit() else None

    def xs_dd(self, key: str) -> str | None:
        return self.rt.xs_read(f"/local/domain/{self.dd_domid}/{CTL}/{key}")  # type: ignore[no-any-return]

    def start(self) -> None:
        rt = self.rt
        rt.console_log(DD).unlink(missing_ok=True)
        # No udev in this dom0: devtmpfs made the node root's 0600.  What udev does (group disk, 0660): dom0's
        # `pvback serve` opens it after dropping to the pvback user, who is in group disk.
        os.chown(DD_DISK, 0, grp.getgrnam("disk").gr_gid)
        os.chmod(DD_DISK, 0o660)
        t0 = time.monotonic()
        rt.run(["xl", "create", str(self.write_dd_cfg())], timeout=180)
        self.t_create = time.monotonic() - t0
        self.dd_domid = self.domid(DD)
        if self.dd_domid is None:
            raise rt.TestFailure(f"xl create {DD} succeeded but the domain is not listed")
        self.address_tap()
        state = ""

        def ready() -> bool:
            nonlocal state
            self.echo_dd()
            state = self.xs_dd("state") or ""
            if state.startswith("fail"):
                raise rt.TestFailure(f"the driver domain says: {state}; console: {self.console_tail()}")
            if self.domid(DD) is None:
                raise rt.TestFailure(f"the driver domain died; console: {self.console_tail()}")
            return state.startswith("ready")

        rt.wait_until(f"{DD}'s pvback serve to be ready ({CTL}/state)", ready, DD_READY_TIMEOUT_S, 1)
        self.t_ready = time.monotonic() - t0
        self.state = dict(kv.split("=", 1) for kv in state.split()[1:] if "=" in kv)
        img = (self.xs_dd("img") or "").split()
        if len(img) != 2:
            raise rt.TestFailure(f"{CTL}/img is {img}")
        self.img_sha64 = img[1]

    def address_tap(self) -> None:
        rt = self.rt
        tap = rt.tap_name(self.dd_domid, 0)
        rt.wait_until(f"the tap {tap} of the driver domain's vif", lambda: rt.link_exists(tap), 30)
        rt.run(["ip", "addr", "replace", f"{DD_NET}.1/24", "dev", tap])
        rt.run(["ip", "link", "set", tap, "up"])
        rt.run(["ip", "route", "replace", f"{GUEST_NET}.0/24", "via", f"{DD_NET}.3", "dev", tap])

    def echo_dd(self) -> None:
        """The driver domain's own lines (dd-init's, its initramfs') to the serial log, as they come."""
        lines = [ln for ln in self.rt.console_text(DD).splitlines()
                 if ln.startswith(("DD-", "DD-INITRAMFS")) and not ln.startswith("DD-LOG")]
        for ln in lines[self.dd_lines:]:
            # Not "STAGE <name>": the host times the dom0 driver's stages by that word.
            self.say(f"  {DD}: {ln[:300].replace('DD-STAGE', 'DD-AT')}")
        self.dd_lines = len(lines)

    def console_tail(self, n: int = 6) -> str:
        return " | ".join(self.rt.console_text(DD).strip().splitlines()[-n:])

    def cmd(self, *words: str, timeout: float = CMD_TIMEOUT_S) -> tuple[bool, str]:
        """One command to dd-init; its verdict and detail."""
        rt = self.rt
        self.seq += 1
        seq = str(self.seq)
        rt.run(["xenstore-write", f"/local/domain/{self.dd_domid}/{CTL}/cmd", " ".join([seq, *words])], timeout=20)
        ack = ""

        def acked() -> bool:
            nonlocal ack
            ack = self.xs_dd("ack") or ""
            return ack.split(" ", 1)[0] == seq

        rt.wait_until(f"{DD} to answer `{' '.join(words)}`", acked, timeout, 0.5)
        self.echo_dd()
        _, verdict, detail = [*ack.split(" ", 2), "", ""][:3]
        return verdict == "ok", detail

    def check_boot(self) -> str:
        """pvback serve in the driver domain: its own domid learned from xenstore, the pvback user, CAP_NET_ADMIN
        alone, no_new_privs; and its root disk came from dom0's pvback."""
        rt = self.rt
        problems = []
        if self.state.get("learned") != str(self.dd_domid):
            problems.append(f"pvback serve learned domid {self.state.get('learned')}, xl says {self.dd_domid}")
        ok, st = self.cmd("status")
        if not ok:
            problems.append(f"status: {st}")
        fields = {k: v.split() for k, v in re.findall(r"(\w+):\s*([^;]*);", st)}
        import pwd
        pw = pwd.getpwnam(rt.PVBACK_USER)  # the same uid in the driver domain: its root is dom0's rootfs
        if fields.get("Uid", [""])[:1] != [str(pw.pw_uid)] or len(set(fields.get("Uid", []))) != 1:
            problems.append(f"Uid {fields.get('Uid')} (want {pw.pw_uid} x4)")
        for k, want in (("CapEff", rt.CAP_NET_ADMIN), ("CapPrm", rt.CAP_NET_ADMIN), ("CapInh", 0), ("CapAmb", 0),
                        ("CapBnd", 0)):
            got = fields.get(k, ["?"])[0]
            if not re.fullmatch(r"[0-9a-f]+", got) or int(got, 16) != want:
                problems.append(f"{k} {got} (want {want:#x})")
        if fields.get("NoNewPrivs") != ["1"]:
            problems.append(f"NoNewPrivs {fields.get('NoNewPrivs')}")
        reqs = rt.requests_of(self.daemon.metrics(), self.dd_domid, rt.XVDA)
        if reqs <= 0:
            problems.append(f"dom0's pvback counted {reqs:.0f} requests on the driver domain's root disk")
        if problems:
            raise rt.TestFailure("; ".join(problems))
        return (f"xl create {self.t_create:.1f} s, pvback serve inside answering {self.t_ready:.1f} s after it "
                f"(its own start {self.state.get('up')} s); domid {self.dd_domid} learned from xenstore; uid "
                f"{pw.pw_uid}, CapEff=CapPrm=CAP_NET_ADMIN, no_new_privs; root disk served by dom0's pvback "
                f"({reqs:.0f} requests)")

    def stop(self) -> None:
        """SIGTERM pvback serve inside (dd-serve: exit 0, no error logged), then the domain powers itself off."""
        rt = self.rt
        try:
            if self.dd_domid is None or self.domid(DD) is None:
                self.report("dd-serve", False, "the driver domain is not running")
                return
            ok, detail = self.cmd("stop", timeout=60)
            if ok and re.search(r"\brc=0 errors=0\b", detail):
                self.report("dd-serve", True, f"pvback serve in the driver domain served the run and exited on "
                                              f"SIGTERM: {detail} {self.stamp()}")
            else:
                self.report("dd-serve", False, f"stop: {detail}")
            rt.wait_until(f"{DD} to power off", lambda: self.domid(DD) is None, 60, 1)
        except rt.TestFailure as exc:
            self.report("dd-serve", False, str(exc))
        finally:
            rt.run(["xl", "destroy", DD], timeout=120, check=False)  # fails harmlessly once it is gone

    # -- the guest --

    def write_guest_cfg(self) -> Path:
        rt = self.rt
        extra = (f"console=hvc0 rdinit=/init-dd quiet pvsteps={'+'.join(self.steps) or 'none'} "
                 f"pvdd64={self.img_sha64} pvnet{NET_MIB}={self.net.shas[NET_MIB] if self.net else '-'}")
        cfg = Path("/tmp") / f"{GUEST}.cfg"
        cfg.write_text("\n".join([
            f'name = "{GUEST}"', 'type = "pv"', f'kernel = "{rt.DOMU_KERNEL}"', f'ramdisk = "{rt.DOMU_RAMDISK}"',
            f'extra = "{extra}"', f"memory = {GUEST_MEM}", "vcpus = 1",
            'on_poweroff = "destroy"', 'on_reboot = "restart"', 'on_crash = "destroy"',
            # What an operator writes for a guest served by a pvback driver domain (docs/driver-domain.md).
            f"disk = [ 'backend={DD},backendtype=qdisk,format=raw,vdev=xvda,access=rw,target={IMG}' ]",
            *([f'vif = [ "backend={DD},mac={GUEST_MAC},script={rt.VIF_SCRIPT}" ]'] if self.net else []),
        ]) + "\n")
        return cfg

    def on_result(self, step: str, ok: bool, detail: str) -> None:
        self.rt.judge_step(self.report, STEP_CHECK.get(step), ok, detail, self.stamp, lambda: self.verify(step),
                           self.rt.TestFailure)

    def verify(self, step: str) -> str:
        rt = self.rt
        if step == "rw":
            ok, sha = self.cmd("sha", "66", "1")
            if not ok or sha != self.kv.get("dd-wsha"):
                raise rt.TestFailure(f"the image in the driver domain has sha {sha[:16]} at [66,67) MiB, the guest "
                                     f"wrote {self.kv.get('dd-wsha', '?')[:16]}")
            return f"the driver domain read the guest's write in {IMG}"
        if step == "fs":
            ok, out = self.cmd("fsck")
            if not ok:
                raise rt.TestFailure(f"in the driver domain: {out}")
            sha, _, summary = out.partition(" ")
            if sha != self.kv.get("dd-bigsha"):
                raise rt.TestFailure(f"/big dumped by the driver domain's debugfs has sha {sha[:16]}, the guest "
                                     f"wrote {self.kv.get('dd-bigsha', '?')[:16]}")
            return f"the driver domain's e2fsck -fn of the image clean ({summary.replace('_', ' ')}), /big matches"
        if step == "net":
            got = self.net.got(self.kv.get("dd-net-up")) if self.net else None
            if got is None or got[1] != NET_MIB * rt.MiB:
                raise rt.TestFailure(f"dom0 received {self.net.received if self.net else '-'}, the guest sent "
                                     f"{NET_MIB} MiB with sha {self.kv.get('dd-net-up', '?')[:16]}")
            return f"dom0 received the guest's 2 MiB from {got[0]}, sent its 2 MiB"
        if step == "restart":
            if self.kill_detail is None:
                raise rt.TestFailure("dom0 never had pvback killed in the driver domain")
            if not self.kill_detail.startswith("ok"):
                raise rt.TestFailure(f"kill+restart in the driver domain: {self.kill_detail}")
            return f"in the driver domain: SIGKILL + restart {self.kill_detail[3:]}"
        if step == "reboot":
            if len(self.domids) < 2:
                raise rt.TestFailure("no second domain id seen after the reboot")
            ok, sha = self.cmd("sha", "68", "1")
            if not ok or sha != self.kv.get("dd-reboot-wsha"):
                raise rt.TestFailure(f"the image has sha {sha[:16]} at [68,69) MiB, the rebooted guest wrote "
                                     f"{self.kv.get('dd-reboot-wsha', '?')[:16]}")
            left = self.stale_backends(self.domids[0])
            if left:
                raise rt.TestFailure(f"the old domain's backend directories are still in the driver domain "
                                     f"after {STALE_WAIT_S} s: {', '.join(left)}")
            return (f"domain {self.domids[0]} -> {self.domids[-1]}, the driver domain read the new domain's write; "
                    f"the old domain's backend directories are gone")
        return "ok"

    def stale_backends(self, domid: int) -> list[str]:
        """The driver domain's backend directories still kept for `domid`, after waiting for them to go: libxl
        in dom0 gives the driver domain 10 s (then logs an error and goes on without them), and `xl devd` there
        removes them once the backend says Closed with online=0."""
        deadline = time.monotonic() + STALE_WAIT_S
        while True:
            left = [f"{kind}/{domid}" for kind in ("qdisk", "vif")
                    if self.rt.xs_read(f"/local/domain/{self.dd_domid}/backend/{kind}/{domid}") is not None]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(1)

    def dump_backends(self) -> None:
        """The driver domain's backend tree with permissions, into the serial log (what went wrong, if it did)."""
        cp = self.rt.run(["xenstore-ls", "-fp", f"/local/domain/{self.dd_domid}/backend"], timeout=20, check=False)
        for ln in (cp.stdout + cp.stderr).splitlines()[:80]:
            if re.search(r"/(state|online|error) = |= \"\"", ln):  # directories and the keys that tell
                self.say(f"  dd xenstore: {ln[:200]}")

    def on_phase(self, phase: str) -> None:
        rt = self.rt
        if phase == "dd-kill":
            rt.say("STAGE dd:restart")
            ok, detail = self.cmd("kill")
            self.kill_detail = ("ok " if ok else "") + detail
            self.say(f"  dd kill: {self.kill_detail}")
        elif phase == "dd-net-addr":
            ok, detail = self.cmd("tap", str(self.domids[-1]))
            self.say(f"  dd tap: {'ok' if ok else 'FAILED'} {detail}")
        elif phase == "rebooting":
            rt.say("STAGE dd:reboot")

    def run_guest(self) -> None:
        rt = self.rt
        rt.console_log(GUEST).unlink(missing_ok=True)
        rt.run(["xl", "create", str(self.write_guest_cfg())], timeout=180)
        domid = self.domid(GUEST)
        if domid is None:
            raise rt.TestFailure(f"xl create {GUEST} succeeded but the domain is not listed")
        self.domids.append(domid)
        rt.say("STAGE dd:guest")
        results = re.compile(r"DOMU-RESULT (\S+) (PASS|FAIL) ?(.*)")
        deadline = time.monotonic() + GUEST_TIMEOUT_S
        gone_since: float | None = None
        next_poll = 0.0
        while True:
            text = rt.console_text(GUEST)
            for k, v in re.findall(r"DOMU-KV (\S+) (\S+)", text):
                self.kv[k] = v  # the reboot's values replace the first boot's
            for phase in re.findall(r"DOMU-PHASE (\S+)", text):
                if phase not in self.handled:
                    self.handled.add(phase)
                    self.on_phase(phase)
            for m in results.finditer(text):
                if m.group(1) not in self.seen:
                    self.seen.add(m.group(1))
                    self.on_result(m.group(1), m.group(2) == "PASS", m.group(3).strip())
            fatal = rt.FATAL_GUEST.search(text)
            if fatal:
                raise rt.TestFailure(f"guest kernel: {fatal.group(0).strip()}")
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + (1 if "DOMU-DONE" in text or "DOMU-PHASE rebooting" in text else 5)
                cur = self.domid(GUEST)
                if cur is not None and cur not in self.domids:
                    self.domids.append(cur)
                if cur is None:
                    gone_since = gone_since or now
                    if "reboot" not in self.steps or "reboot" in self.seen or now - gone_since > 60:
                        break
                else:
                    gone_since = None
            if now > deadline:
                raise rt.TestFailure(f"the guest did not finish within {GUEST_TIMEOUT_S} s; console: "
                                     f"{' | '.join(text.strip().splitlines()[-4:])}")
            time.sleep(0.25)
        for s in self.steps:
            if s not in self.seen:
                self.report(STEP_CHECK[s], False, f"the guest never reported '{s}'; console: "
                                                  f"{' | '.join(rt.console_text(GUEST).strip().splitlines()[-4:])}")


def diagnose(rt: ModuleType) -> None:
    """What dom0 is doing when a toolstack command hangs: its processes and where they sleep, the kernel's tail."""
    import subprocess
    if not rt.run(["pidof", "xenstored"], check=False).stdout.strip():
        rt.say("  diag: xenstored is not running (its exit, if it said anything, is on the console above)")
        for ln in rt.tail_lines(rt.XENSTORED_TRACE, 25):
            rt.say(f"  diag xenstored trace: {ln.decode(errors='replace')[:200]}")
    for cmd in (["ps", "-eo", "pid,stat,wchan:24,etime,args"], ["dmesg"], ["xl", "list"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            out = f"{exc}"
        lines = out.splitlines()
        if cmd[0] == "ps":
            lines = [ln for ln in lines if re.search(r"xl|xenstore|pvback|python|  D ", ln)]
        for ln in lines[-40:]:
            rt.say(f"  diag {cmd[0]}: {ln[:200]}")


def run(rt: ModuleType, report: Any, daemon: Any, selected: list[str]) -> None:
    """Every selected driver-domain check gets its RESULT line, whatever breaks."""
    dd = DriverDomain(rt, report, daemon, selected)
    if not dd.selected:
        return
    rt.say("STAGE dd:create")
    try:
        daemon.check()
        dd.start()
        try:
            report("dd-boot", True, f"{dd.check_boot()} {dd.stamp()}")
        except rt.TestFailure as exc:
            report("dd-boot", False, str(exc))
        if dd.steps:
            if "net" in dd.steps:
                dd.net = rt.NetServers()
            try:
                dd.run_guest()
            finally:
                try:
                    dd.dump_backends()
                except rt.TestFailure as exc:  # must not hide what ended run_guest
                    rt.say(f"  dd xenstore: {exc}")
                if dd.net is not None:
                    dd.net.stop()
                try:
                    rt.run(["xl", "destroy", GUEST], timeout=120, check=False)  # fails harmlessly once it is gone
                except rt.TestFailure as exc:
                    rt.say(f"  {exc}")
                    diagnose(rt)
    except Exception as exc:  # whatever broke, every check still gets its RESULT line
        why = str(exc) if isinstance(exc, rt.TestFailure) else f"{type(exc).__name__}: {exc}"
        rt.say(f"  driver-domain scenario failed: {why}")
        diagnose(rt)
        for c in dd.selected:
            if c != "dd-serve":  # judged by the stop below, if the driver domain is up
                report(c, False, why)
    finally:
        rt.say("STAGE dd:teardown")
        logs = (rt.console_log(DD), rt.console_log(GUEST), Path(f"/var/log/xen/xl-{DD}.log"),
                Path(f"/var/log/xen/xl-{GUEST}.log"), Path(f"/var/log/xen/qemu-dm-{DD}.log"))
        rt.keep_logs(*logs)  # now, should the teardown hang
        try:
            dd.stop()
        except Exception as exc:  # the logs below matter more
            report("dd-serve", False, f"stopping the driver domain: {type(exc).__name__}: {exc}")
        rt.keep_logs(*logs)
