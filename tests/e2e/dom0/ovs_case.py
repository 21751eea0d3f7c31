"""The real-Xen case of netback on Open vSwitch (#14), for the dom0 driver (run_tests.py): the guest's third NIC,
vif 2 of its xl config (`vif = [..., "devid=2,mac=...,bridge=pvbr0.10,script=vif-pvback"]`), is an access port
(VLAN 10) that `pvback serve` adds through OVSDB to a bridge of a private Open vSwitch in dom0; a peer network
namespace hangs off the same bridge (a veth, VLAN 10) and is the guest's only peer on that NIC: ping and TCP with
a sha256 both ways reach it through OVS or not at all.  `xl network-detach` of the vif must remove the port.

The OVS is the test's own: ovsdb-server + ovs-vswitchd with their database, sockets and logs in OVS_DIR, children
of the driver stopped by PID (never the system's service: policy-rc.d keeps it down in the rootfs), on the
kernel datapath (Debian's kernel has the openvswitch module; a real Xen host with Debian's OVS uses it too).  The
bridge and the peer's port are made with ovs-vsctl here, in the test only: the vif's port is pvback's, through
OVSDB.  Started before `pvback serve`, which gives its group an ACL entry on the socket when it drops privileges.

Addresses: the peer 198.18.2.1/24 and fd00:2::1/64, the guest's eth 198.18.2.2 and fd00:2::2; the namespace has no
route out and is deleted at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # the host (mypy); dom0 runs these files as scripts from the share, side by side
    from tests.e2e.dom0.shared import stop_process
except ImportError:
    from shared import stop_process  # type: ignore[import-not-found,no-redef]

OVS_DIR = Path("/run/pvback-e2e-ovs")  # the pvback user must reach the socket: the dir is 0755
OVS_SOCK = OVS_DIR / "db.sock"
OVSDB = f"unix:{OVS_SOCK}"
BRIDGE = "pvbr0"
VLAN = 10
DEVID = 2  # after vif 0 (xl create) and vif 1 (xl network-attach, which therefore names its devid)
MAC = "00:16:3e:5e:00:03"
VIF_SPEC = f"devid={DEVID},mac={MAC},bridge={BRIDGE}.{VLAN}"  # + script= (run_tests.py's VIF_SCRIPT)
PEER_NS = "pvbovs-peer"
PEER_PORT = "pvbovs-p0"  # the veth end on the bridge; eth0 in PEER_NS
PEER_V4, PEER_V6 = "198.18.2.1", "fd00:2::1"
GUEST_V4, GUEST_V6 = "198.18.2.2", "fd00:2::2"
MIB = 2  # each way over TCP: one of the sizes run_tests.NetServers serves
START_TIMEOUT_S = 20
STATS_WAIT_S = 12  # vswitchd writes Interface statistics every 5 s
CLONE_NEWNET = 0x40000000


class OvsProblem(Exception):
    pass


def _run(cmd: list[str], timeout: float = 30, env: dict[str, str] | None = None, stdin_text: str | None = None) -> str:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=stdin_text)
    except subprocess.TimeoutExpired as exc:
        raise OvsProblem(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from exc
    if cp.returncode != 0:
        err = (cp.stderr or cp.stdout).strip().splitlines()
        raise OvsProblem(f"`{' '.join(cmd)}` exited {cp.returncode}: {' | '.join(err[-3:])}")
    return cp.stdout


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """The calling thread in network namespace `name` (`ip netns add`) for the block: a socket made inside stays
    in that namespace for good, whichever thread uses it afterwards.  (Python 3.11 has no os.setns.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(back, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to dom0's namespace: {os.strerror(err)}")
    finally:
        os.close(back)


def ovsdb_value(v: Any) -> Any:
    """ovs-vsctl's JSON cell (RFC 7047 notation) as Python: ["map", [[k, v]...]] -> dict, ["set", [...]] -> list
    (an empty set is how an optional column says "none"), ["uuid", u] -> u, atoms as they are."""
    if isinstance(v, list) and len(v) == 2 and v[0] in ("map", "set", "uuid", "named-uuid"):
        if v[0] == "map":
            return {str(k): ovsdb_value(x) for k, x in v[1]}
        if v[0] == "set":
            return [ovsdb_value(x) for x in v[1]]
        return v[1]
    return v


def parse_find(out: str) -> list[dict[str, Any]]:
    """`ovs-vsctl -f json find ...` as a list of {column: value}."""
    doc = json.loads(out)
    return [{h: ovsdb_value(c) for h, c in zip(doc["headings"], row, strict=True)} for row in doc["data"]]


def expected_ids(*, mac: str, vm_name: str, vm_uuid: str, devid: int) -> dict[str, str]:
    """What the issue lists on the Port and the Interface (pvback's defaults: iface-id `{vm_uuid}-{devid}`)."""
    return {"attached-mac": mac, "iface-id": f"{vm_uuid}-{devid}", "iface-status": "active",
            "xen-vm-name": vm_name, "xen-vm-uuid": vm_uuid, "vm-id": vm_uuid}


def ids_problems(what: str, got: dict[str, str], want: dict[str, str]) -> list[str]:
    return [f"{what} external_ids:{k}={got.get(k)!r}, want {v!r}" for k, v in want.items() if got.get(k) != v]


class DomOvs:
    """The private OVS, its bridge and the peer namespace; `stop()` undoes all of it (by PID, `ip netns del`)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.ovsdb: subprocess.Popen[bytes] | None = None
        self.vswitchd: subprocess.Popen[bytes] | None = None
        self.problem: str | None = None  # why the OVS is not there (the net-ovs check fails with it)
        self.ns_made = False
        self.env = {**os.environ, "OVS_RUNDIR": str(OVS_DIR), "OVS_DBDIR": str(OVS_DIR),
                    "OVS_LOGDIR": str(OVS_DIR), "OVS_SYSCONFDIR": str(OVS_DIR)}
        self.t_start = 0.0
        self.times: dict[str, float] = {}  # start-up's parts, seconds
        self._thread: threading.Thread | None = None
        self._db_ready = threading.Event()

    # -- start / stop ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Returns once ovsdb-server answers on OVS_SOCK (what `pvback serve` needs at start, for its ACL entry);
        vswitchd, the bridge and the peer namespace follow in a thread, overlapping pvback's start (tens of
        seconds under TCG): `wait()` for them before the guest is created."""
        self._thread = threading.Thread(target=self._run_start, name="ovs-start", daemon=True)
        self._thread.start()
        self._db_ready.wait(START_TIMEOUT_S * 3)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S * 6)
            if self._thread.is_alive() and self.problem is None:
                self.problem = "private OVS: its start-up did not finish"
            self._thread = None

    def _run_start(self) -> None:
        t0 = time.monotonic()
        try:
            self._start()
            self.t_start = time.monotonic() - t0
            pids = [p.pid if p is not None else "?" for p in (self.ovsdb, self.vswitchd)]
            self.say(f"  private OVS up in {self.t_start:.1f} s: ovsdb-server pid {pids[0]}, ovs-vswitchd pid "
                     f"{pids[1]}, bridge {BRIDGE} (kernel datapath), peer {PEER_NS} on {PEER_PORT} tag {VLAN} ("
                     + ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items()) + ")")
        except Exception as exc:  # a thread's exception would go unseen: whatever it is, the check says it
            why = str(exc) if isinstance(exc, OvsProblem | OSError) else f"{type(exc).__name__}: {exc}"
            self.problem = f"private OVS: {why}; vswitchd log: {self.log('ovs-vswitchd')[-400:]!r}"
            self.say(f"  {self.problem}")
        finally:
            self._db_ready.set()

    def _start(self) -> None:
        missing = [b for b in ("ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl", "ovs-appctl")
                   if shutil.which(b) is None]
        if missing:
            raise OvsProblem(f"not installed in dom0: {', '.join(missing)} (build.sh: openvswitch-switch)")
        t0 = time.monotonic()
        shutil.rmtree(OVS_DIR, ignore_errors=True)
        OVS_DIR.mkdir(parents=True)
        OVS_DIR.chmod(0o755)
        _run(["ovsdb-tool", "create", str(OVS_DIR / "conf.db"), "/usr/share/openvswitch/vswitch.ovsschema"])
        self.ovsdb = self._spawn("ovsdb-server", str(OVS_DIR / "conf.db"), f"--remote=punix:{OVS_SOCK}",
                                 f"--unixctl={OVS_DIR}/ovsdb-server.ctl", "-vconsole:off",
                                 f"--log-file={OVS_DIR}/ovsdb-server.log", "--no-chdir")
        self._wait("ovsdb-server's socket", self._sock_ready, self.ovsdb)
        self.vsctl("--no-wait", "init")
        self.times["ovsdb"] = time.monotonic() - t0
        self._db_ready.set()
        _run(["modprobe", "openvswitch"])  # no udev here to load it when vswitchd asks for the datapath
        self.times["modprobe"] = time.monotonic() - t0 - sum(self.times.values())
        self.vswitchd = self._spawn("ovs-vswitchd", OVSDB, f"--unixctl={OVS_DIR}/ovs-vswitchd.ctl", "-vconsole:off",
                                    f"--log-file={OVS_DIR}/ovs-vswitchd.log", "--no-chdir")
        # A waited write returns once vswitchd applied it (a wait-until on cur_cfg right after init would hang).
        self.vsctl(f"--timeout={START_TIMEOUT_S}", "set", "Open_vSwitch", ".", "external_ids:system-id=pvback-e2e")
        self.vsctl(f"--timeout={START_TIMEOUT_S}", "add-br", BRIDGE)
        self.times["vswitchd+bridge"] = time.monotonic() - t0 - sum(self.times.values())
        # Two `ip -batch` runs, not one process per step: each exec costs a fraction of a second under TCG.
        _run(["ip", "netns", "add", PEER_NS])
        self.ns_made = True
        _run(["ip", "link", "add", PEER_PORT, "type", "veth", "peer", "name", "eth0", "netns", PEER_NS])
        Path(f"/proc/sys/net/ipv6/conf/{PEER_PORT}/disable_ipv6").write_text("1\n")  # a bridge port: no address
        _run(["ip", "link", "set", PEER_PORT, "up"])
        _run(["ip", "-n", PEER_NS, "-batch", "-"], stdin_text="link set lo up\n"
             f"addr add {PEER_V4}/24 dev eth0\naddr add {PEER_V6}/64 dev eth0 nodad\nlink set eth0 up\n")
        self.vsctl(f"--timeout={START_TIMEOUT_S}", "add-port", BRIDGE, PEER_PORT, f"tag={VLAN}")
        routes = _run(["ip", "-n", PEER_NS, "-4", "route", "show", "default"]).strip()
        if routes:
            raise OvsProblem(f"the peer namespace has a default route: {routes}")
        self.times["peer"] = time.monotonic() - t0 - sum(self.times.values())

    def _spawn(self, *cmd: str) -> subprocess.Popen[bytes]:
        log = OVS_DIR / f"{cmd[0]}.stderr"
        with log.open("wb") as f:
            return subprocess.Popen(list(cmd), env=self.env, cwd=OVS_DIR, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    @staticmethod
    def _sock_ready() -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(OVS_SOCK))
                return True
            except OSError:
                return False

    @staticmethod
    def _wait(what: str, cond: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
        end = time.monotonic() + START_TIMEOUT_S
        while not cond():
            if proc.poll() is not None:
                raise OvsProblem(f"{what}: the process exited {proc.returncode}")
            if time.monotonic() > end:
                raise OvsProblem(f"timed out after {START_TIMEOUT_S} s waiting for {what}")
            time.sleep(0.1)

    def stop(self) -> list[str]:
        """vswitchd told to exit with --cleanup (the kernel datapath and the bridge's device go with it), both
        daemons waited for by PID (SIGTERM, then SIGKILL), the namespace deleted; what went wrong, if anything."""
        self.wait()
        problems = []
        if self.vswitchd is not None and self.vswitchd.poll() is None:
            with contextlib.suppress(OvsProblem):
                _run(["ovs-appctl", "-t", f"{OVS_DIR}/ovs-vswitchd.ctl", "exit", "--cleanup"], timeout=20)
        for name, proc in (("ovs-vswitchd", self.vswitchd), ("ovsdb-server", self.ovsdb)):
            if proc is not None and stop_process(proc, wait=10) is None:
                problems.append(f"{name} (pid {proc.pid}) had to be killed")
        self.vswitchd = self.ovsdb = None
        if self.ns_made:
            subprocess.run(["ip", "netns", "del", PEER_NS], capture_output=True, timeout=30, check=False)
            self.ns_made = False
        if Path(f"/sys/class/net/{PEER_PORT}").exists():
            subprocess.run(["ip", "link", "del", PEER_PORT], capture_output=True, timeout=30, check=False)
        return problems

    @property
    def running(self) -> bool:
        return (self.problem is None and self.ovsdb is not None and self.ovsdb.poll() is None
                and self.vswitchd is not None and self.vswitchd.poll() is None)

    # -- inspection (ovs-vsctl / ovs-ofctl / ovs-appctl: the test's view of the switch) ----------------------------

    def vsctl(self, *args: str, timeout: float = 30) -> str:
        return _run(["ovs-vsctl", f"--db={OVSDB}", *args], timeout=timeout, env=self.env).strip()

    def find(self, table: str, name: str, columns: str) -> list[dict[str, Any]]:
        return parse_find(self.vsctl("--format=json", "--data=json", f"--columns={columns}", "find", table,
                                     f"name={name}"))

    def port_bytes(self, tap: str) -> dict[str, int]:
        """rx/tx bytes of the interface as vswitchd reports them in its `statistics` column (refreshed every
        5 s: other_config:stats-update-interval); bytes, not packets: GSO frames count once whatever their size."""
        rows = self.find("Interface", tap, "statistics")
        stats = rows[0]["statistics"] if rows else {}
        return {d: int(stats.get(f"{d}_bytes", -1)) if isinstance(stats, dict) else -1 for d in ("rx", "tx")}

    def fdb(self) -> list[tuple[int, int, str]]:
        """(ofport, vlan, mac) the bridge has learned (NORMAL action's MAC table)."""
        out = _run(["ovs-appctl", "-t", f"{OVS_DIR}/ovs-vswitchd.ctl", "fdb/show", BRIDGE], env=self.env)
        rows = []
        for line in out.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3 and cols[0].isdigit() and cols[1].isdigit():
                rows.append((int(cols[0]), int(cols[1]), cols[2].lower()))
        return rows

    def log(self, which: str) -> str:
        try:
            return (OVS_DIR / f"{which}.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- the checks --------------------------------------------------------------------------------------------

    def check_port(self, tap: str, *, vm_name: str, vm_uuid: str) -> tuple[int, str]:
        """While the guest's NIC is up: pvback's port `tap` on BRIDGE, an access port of VLAN, a single system
        interface vswitchd opened (ofport valid, no error), the external_ids the issue lists on both rows.  The
        ofport and a summary, or OvsProblem with everything that is wrong."""
        problems = []
        want = expected_ids(mac=MAC, vm_name=vm_name, vm_uuid=vm_uuid, devid=DEVID)
        ports = self.find("Port", tap, "_uuid,name,interfaces,tag,trunks,external_ids")
        ifaces = self.find("Interface", tap, "_uuid,name,type,ofport,error,external_ids")
        if len(ports) != 1 or len(ifaces) != 1:
            raise OvsProblem(f"{len(ports)} Port and {len(ifaces)} Interface rows named {tap} (want one each); "
                             f"ports on {BRIDGE}: {self.vsctl('list-ports', BRIDGE).split()}")
        port, iface = ports[0], ifaces[0]
        on_bridge = self.vsctl("list-ports", BRIDGE).split()
        if tap not in on_bridge:
            problems.append(f"{tap} is not a port of {BRIDGE} (ports: {on_bridge})")
        if port["interfaces"] != [iface["_uuid"]] and port["interfaces"] != iface["_uuid"]:
            problems.append(f"Port {tap} has interfaces {port['interfaces']}, not just its Interface row")
        if port["tag"] != VLAN:
            problems.append(f"Port {tap} tag={port['tag']!r}, want {VLAN} (bridge={BRIDGE}.{VLAN})")
        if port["trunks"]:
            problems.append(f"Port {tap} trunks={port['trunks']!r}, want none")
        if iface["type"] != "":
            problems.append(f"Interface {tap} type={iface['type']!r}, want \"\" (a system port on pvback's tap)")
        ofport = iface["ofport"]
        if not isinstance(ofport, int) or ofport <= 0 or ofport == 65279:
            problems.append(f"Interface {tap} ofport={ofport!r}: vswitchd did not open the tap "
                            f"(error={iface['error']!r})")
        if iface["error"]:
            problems.append(f"Interface {tap} error={iface['error']!r}")
        problems += ids_problems(f"Interface {tap}", iface["external_ids"], want)
        problems += ids_problems(f"Port {tap}", port["external_ids"], want)
        if problems:
            raise OvsProblem("; ".join(problems))
        assert isinstance(ofport, int)
        return ofport, (f"port {tap} on {BRIDGE} tag {VLAN}, ofport {ofport}, external_ids on Port and Interface: "
                        + " ".join(f"{k}={v}" for k, v in sorted(want.items())))

    def check_traffic(self, tap: str, ofport: int, mac: str) -> str:
        """After the guest's ping + TCP: the interface's byte counters (from zero: the port and its tap were made
        at xl create, and nothing but the guest's ping and TCP moves bulk on it) hold at least the MIB each way
        (waited for: vswitchd refreshes them every 5 s), and the bridge learned the guest's MAC on that port in
        VLAN."""
        want = MIB << 20
        end = time.monotonic() + STATS_WAIT_S
        while True:
            moved = self.port_bytes(tap)
            if min(moved.values()) >= want or time.monotonic() > end:
                break
            time.sleep(1)
        learned = [(p, v) for p, v, m in self.fdb() if m == mac.lower()]
        problems = []
        if min(moved.values()) < want:
            problems.append(f"Interface {tap} statistics: rx {moved['rx']} / tx {moved['tx']} bytes, want >= {want} "
                            "each way")
        if (ofport, VLAN) not in learned:
            problems.append(f"{BRIDGE} learned {mac} at {learned or 'no port'}, want ofport {ofport} VLAN {VLAN}")
        if problems:
            raise OvsProblem("; ".join(problems))
        return (f"{tap} statistics rx {moved['rx']} / tx {moved['tx']} bytes, fdb: {mac} on ofport {ofport} "
                f"vlan {VLAN}")

    def check_gone(self, tap: str) -> str:
        """After `xl network-detach`: no Port or Interface row of that name, the bridge has only the peer's."""
        ports = self.find("Port", tap, "name")
        ifaces = self.find("Interface", tap, "name")
        left = self.vsctl("list-ports", BRIDGE).split()
        if ports or ifaces or left != [PEER_PORT]:
            raise OvsProblem(f"after the detach: {len(ports)} Port and {len(ifaces)} Interface rows named {tap}, "
                             f"ports on {BRIDGE}: {left}")
        return f"no Port/Interface row {tap}, {BRIDGE} has only {PEER_PORT}"

    def socket_acl(self, gid: int) -> bool:
        """pvback serve gave its group rw on the OVSDB socket when it dropped privileges (README, least
        privilege): the ACL_GROUP entry for `gid` in system.posix_acl_access."""
        try:
            raw = os.getxattr(OVS_SOCK, "system.posix_acl_access")
        except OSError:
            return False
        return any(tag == 0x08 and ident == gid and perm & 6 == 6
                   for tag, perm, ident in struct.iter_unpack("<HHI", raw[4:]))


class OvsCase:
    """The net-ovs check around the guest: the switch and the peer before `xl create`, the port's checks when the
    guest's NIC is up (DOMU-PHASE ovs-up), the detach when it is done with it (DOMU-PHASE release-vif2), the
    verdict when it reports."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.switch = DomOvs(say)
        self.peer: Any = None  # run_tests.NetServers, listening in PEER_NS
        self.notes: dict[str, str] = {}  # phase -> "ok <detail>" or what went wrong
        self.ofport = 0

    def start(self) -> None:
        self.switch.start()

    def start_peer(self, servers: Callable[[], Any]) -> None:
        """Once the switch is up: the guest's TCP peers (run_tests.NetServers, same data as dom0's), listening
        inside PEER_NS."""
        self.switch.wait()
        if self.switch.problem is None:
            try:
                with in_netns(PEER_NS):
                    self.peer = servers()
            except OSError as exc:
                self.switch.problem = f"the TCP peers in {PEER_NS}: {exc}"
                self.say(f"  {self.switch.problem}")

    def serve_config(self) -> str:
        """`pvback serve`'s [net] section: the private OVS's database (its socket is there by now, or the check
        has failed and no vif will use it)."""
        return f'[net]\novsdb = "{OVSDB}"\n'

    def on_up(self, tap: str, *, vm_name: str, vm_uuid: str,
              shown: Callable[[], tuple[dict[str, float], dict[str, str | None]]], pvback_gid: int | None) -> None:
        """The guest's NIC on vif 2 is up: pvback's port as the issue wants it; `shown()` gives what pvback says of
        the vif (its pvback_device_status values from the metrics endpoint, the columns of `pvback status`, and
        its backend keys), which must agree."""
        t0 = time.monotonic()
        try:
            if self.switch.problem:
                raise OvsProblem(self.switch.problem)
            self.ofport, detail = self.switch.check_port(tap, vm_name=vm_name, vm_uuid=vm_uuid)
            status, keys = shown()
            want_keys = {"bridge": f"{BRIDGE}.{VLAN}", "hotplug-status": "connected", "state": "4",
                         "iface-id": f"{vm_uuid}-{DEVID}"}
            problems = [f"backend {k}={keys.get(k)!r}, want {v!r}" for k, v in want_keys.items() if keys.get(k) != v]
            if status.get("ovs_ofport") != self.ofport or status.get("ovsdb_connected") != 1:
                problems.append(f"pvback's metrics for the vif: ovs_ofport={status.get('ovs_ofport')} (OVSDB says "
                                f"{self.ofport}), ovsdb_connected={status.get('ovsdb_connected')}")
            if pvback_gid is not None and not self.switch.socket_acl(pvback_gid):
                problems.append(f"no rw ACL entry for group {pvback_gid} on {OVS_SOCK} (pvback serve runs as the "
                                "pvback user: it could not have plugged the port through OVSDB)")
            if problems:
                raise OvsProblem("; ".join(problems))
            self.notes["up"] = (f"ok {detail}; backend bridge/iface-id/hotplug-status=connected and pvback's "
                                f"ovs_ofport agree [{time.monotonic() - t0:.1f} s]")
        except (OvsProblem, OSError, ValueError, KeyError) as exc:
            self.notes["up"] = str(exc)
            self.say(f"  ovs-up: {exc}")

    def on_release(self, tap: str, detach: Callable[[], str], gone: Callable[[], str]) -> None:
        """The guest is done with the NIC: the traffic went through the port; `detach` (xl network-detach) and
        `gone` (the tap, the xenstore dirs, pvback's view: "ok ..." or why not); then no OVS rows."""
        try:
            if not self.notes.get("up", "").startswith("ok"):
                raise OvsProblem("the port was not right when the NIC came up")
            self.notes["traffic"] = "ok " + self.switch.check_traffic(tap, self.ofport, MAC)
        except (OvsProblem, OSError) as exc:
            self.notes["traffic"] = str(exc)
        self.notes["detach"] = detach()
        if not self.notes["detach"].startswith("ok"):
            return
        result = gone()
        if not result.startswith("ok"):
            self.notes["gone"] = result
            return
        try:
            self.notes["gone"] = f"{result}; {self.switch.check_gone(tap)}"
        except (OvsProblem, OSError) as exc:
            self.notes["gone"] = str(exc)

    def verify(self, sha_up: str | None) -> str:
        """The guest passed: dom0's peer got its bytes with the sha it reported, every dom0 note is ok."""
        problems = [f"{k}: {v}" for k in ("up", "traffic", "detach", "gone")
                    for v in [self.notes.get(k, "never checked")] if not v.startswith("ok")]
        got = self.peer.got(sha_up) if self.peer is not None else None
        if got is None:
            problems.append(f"the peer in {PEER_NS} never received the guest's sha {sha_up}: "
                            f"{self.peer.received if self.peer is not None else 'no peer'}")
        elif got[1] != MIB * (1 << 20):
            problems.append(f"the peer received {got[1]} bytes, the guest sent {MIB} MiB")
        sent = [s for s in (self.peer.sent if self.peer is not None else []) if s[2] == ""]
        if not sent:
            problems.append(f"the peer sent the guest nothing: {self.peer.sent if self.peer is not None else []}")
        if problems:
            raise OvsProblem("; ".join(problems))
        return (f"peer {PEER_NS} ({got[0] if got else '?'}) got the guest's {MIB} MiB, sent {sent[0][1]} B; "
                + "; ".join(("xl network-detach " if k == "detach" else "") + self.notes[k][3:]
                            for k in ("up", "traffic", "detach", "gone")))

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.stop()
        for problem in self.switch.stop():
            self.say(f"  private OVS: {problem}")
