"""A private two-host OVN for tests and `pvback bench net --switch ovn`: two network namespaces stand for two
hypervisor hosts, each with its own ovsdb-server + ovs-vswitchd (netdev datapath; perf/ovs.py) and
`ovn-controller`; one "central" (the NB and SB ovsdb-servers and `ovn-northd`) runs in host A's namespace.  Every
daemon is our own child, started without --detach (so the Popen's pid is the daemon's), with its database,
sockets, pid files and logs in a private directory, and stopped by PID: never by name, never the system's service.

The recipe (docs/ovn.md has it for operators):
- the hosts are joined by a veth `ul0` (MTU 1600: a Geneve header on a 1500-byte guest frame must fit) whose ends
  are ports of a netdev bridge `br-phy` carrying the tunnel endpoint address (198.18.100.1 / .2).  OVS's
  userspace tunnels route and ARP through an OVS bridge port, so the address sits on `br-phy`, not on the veth.
- `br-int` (netdev, fail-mode secure) is the integration bridge ovn-controller programs; the vifs are its ports.
- each host's Open_vSwitch row says system-id (the chassis), ovn-remote (the SB's unix socket: a unix socket is
  reachable from any network namespace), ovn-encap-type=geneve and ovn-encap-ip.
- a logical switch `ls0` with one logical port per guest NIC (`ovn-nbctl` stands for the cloud's control plane).

No userspace TSO: OVS 3.1 cannot segment into a Geneve tunnel (netback-ovs-vtpm.md §2.3), so pvback offers no
GSO on these bridges.

It lives under perf/ because the benchmark needs it and perf/ imports nothing from tests/ (tests/net/ovnbed.py
re-exports it for the tests).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.guests.netns import NetNS
from perf.ovs import PrivateOvs

NB_SCHEMA = Path("/usr/share/ovn/ovn-nb.ovsschema")
SB_SCHEMA = Path("/usr/share/ovn/ovn-sb.ovsschema")
NEEDED = ("ovn-northd", "ovn-controller", "ovn-nbctl", "ovn-sbctl", "ovsdb-server", "ovs-vswitchd", "ovsdb-tool",
          "ovs-vsctl")
UNDERLAY_MTU = 1600
SWITCH = "ls0"


def missing() -> list[str]:
    return [b for b in NEEDED if shutil.which(b) is None] + [str(p) for p in (NB_SCHEMA, SB_SCHEMA)
                                                              if not p.exists()]


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.01)


def _stop(p: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM by PID, SIGKILL if it does not go."""
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


def _in(ns: NetNS, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns.name, *cmd], capture_output=True, text=True, timeout=30)


class OvnCentral:
    """NB + SB ovsdb-servers and ovn-northd, in `ns`, in a private directory."""

    def __init__(self, ns: NetNS) -> None:
        self.ns = ns
        self.dir = Path(tempfile.mkdtemp(prefix="pvbovn-", dir="/tmp"))
        self.nb = f"unix:{self.dir}/nb.sock"
        self.sb = f"unix:{self.dir}/sb.sock"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "OVN_RUNDIR": str(self.dir), "OVS_RUNDIR": str(self.dir)}

    def _spawn(self, *cmd: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns.name, *cmd], env=self.env, cwd=self.dir,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def start(self) -> OvnCentral:
        try:
            for db, schema in (("nb", NB_SCHEMA), ("sb", SB_SCHEMA)):
                subprocess.run(["ovsdb-tool", "create", str(self.dir / f"{db}.db"), str(schema)], check=True,
                               capture_output=True, timeout=10)
                p = self._spawn("ovsdb-server", str(self.dir / f"{db}.db"), f"--remote=punix:{self.dir}/{db}.sock",
                                f"--unixctl={self.dir}/{db}.ctl", "-vconsole:off",
                                f"--log-file={self.dir}/{db}.log", "--no-chdir")
                _wait_socket(self.dir / f"{db}.sock", p, f"OVN {db} ovsdb-server")
            self._spawn("ovn-northd", f"--ovnnb-db={self.nb}", f"--ovnsb-db={self.sb}",
                        f"--unixctl={self.dir}/northd.ctl", "-vconsole:off", f"--log-file={self.dir}/northd.log",
                        "--no-chdir")
            self.nbctl("init")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):  # northd first, then the databases
            _stop(p)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def nbctl(self, *args: str, timeout: float = 30) -> str:
        return _run(["ovn-nbctl", f"--db={self.nb}", "--timeout=20", *args], timeout, self.env)

    def sbctl(self, *args: str, timeout: float = 30) -> str:
        return _run(["ovn-sbctl", f"--db={self.sb}", "--timeout=20", *args], timeout, self.env)

    def binding_chassis(self, lport: str) -> str | None:
        """The name of the chassis `lport`'s Port_Binding is bound to, None while unbound (or no such port)."""
        out = json.loads(self.sbctl("--format=json", "--columns=chassis", "find", "Port_Binding",
                                    f"logical_port={lport}"))
        if not out["data"]:
            return None
        ref = out["data"][0][0]  # ["uuid", "..."] or ["set", []] when unbound
        if ref[0] != "uuid":
            return None
        return self.sbctl("get", "Chassis", ref[1], "name").strip('"')

    def log(self, which: str) -> str:
        try:
            return (self.dir / f"{which}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _run(argv: list[str], timeout: float, env: dict[str, str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:1] + argv[3:])}: {res.stderr.strip()}")
    return res.stdout.strip()


class OvnHost:
    """One hypervisor host: its namespace, a private OVS with br-phy (the tunnel endpoint) and br-int, and
    ovn-controller."""

    def __init__(self, name: str, ns: NetNS, encap_ip: str, central: OvnCentral) -> None:
        self.name = name  # the chassis name (Open_vSwitch external_ids:system-id)
        self.ns = ns
        self.encap_ip = encap_ip
        self.central = central
        self.ovs = PrivateOvs(ns, userspace_tso=False)
        self.ovs.env["OVN_RUNDIR"] = str(self.ovs.dir)  # ovn-controller's control socket
        self.controller: subprocess.Popen[bytes] | None = None

    def start(self) -> OvnHost:
        ovs = self.ovs.start()
        ovs.vsctl("--timeout=20", "set", "Open_vSwitch", ".", f"external_ids:system-id={self.name}",
                  f"external_ids:ovn-remote={self.central.sb}", "external_ids:ovn-encap-type=geneve",
                  f"external_ids:ovn-encap-ip={self.encap_ip}", "external_ids:ovn-bridge-datapath-type=netdev")
        ovs.vsctl("--timeout=20", "add-br", "br-phy", "--", "set", "Bridge", "br-phy", "datapath_type=netdev",
                  "--", "add-port", "br-phy", "ul0", "--", "set", "Interface", "br-phy",
                  f"mtu_request={UNDERLAY_MTU}")
        ovs.vsctl("--timeout=20", "add-br", "br-int", "--", "set", "Bridge", "br-int", "datapath_type=netdev",
                  "fail-mode=secure", "other-config:disable-in-band=true")
        self.ns.ip("link", "set", "ul0", "up")
        self.ns.ip("addr", "add", f"{self.encap_ip}/24", "dev", "br-phy")
        self.ns.ip("link", "set", "br-phy", "up")
        # `ip netns exec` execs it: the Popen's pid is ovn-controller's.
        self.controller = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, "ovn-controller", ovs.remote, "-vconsole:off",
             f"--log-file={ovs.dir}/ovn-controller.log", "--no-chdir"],
            env=ovs.env, cwd=ovs.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        _stop(self.controller)
        self.controller = None
        self.ovs.stop()

    def ovn_installed(self, iface: str) -> bool:
        return self.ovs.vsctl("--if-exists", "get", "Interface", iface, "external_ids:ovn-installed",
                              check=False).strip('"') == "true"

    def underlay_packets(self) -> tuple[int, int]:
        """(tx, rx) packets of the veth to the other host."""
        r = _in(self.ns, "cat", "/sys/class/net/ul0/statistics/tx_packets", "/sys/class/net/ul0/statistics/rx_packets")
        tx, rx = r.stdout.split()
        return int(tx), int(rx)

    def tunnel_port(self) -> str:
        """The Geneve port ovn-controller made on br-int (to the other host: there is one)."""
        ports = [p for p in self.ovs.ports("br-int") if p.startswith("ovn-")]
        assert len(ports) == 1, ports
        return ports[0]

    def log(self) -> str:
        return self.ovs.log("ovn-controller")


class TwoHostOvn:
    """`with TwoHostOvn(tag) as ovn:` two hosts `a` and `b` joined by Geneve, a logical switch `ls0`; everything
    stopped by PID and every namespace deleted at exit (also the guests' ones made through `space`)."""

    def __init__(self, tag: str, netns: Callable[[str], NetNS] = NetNS) -> None:
        self.tag = tag
        self.netns = netns
        self.spaces: list[NetNS] = []
        self.hosts: dict[str, OvnHost] = {}
        self.central: OvnCentral | None = None

    def space(self, role: str) -> Any:
        """A namespace of the fixture's kind (deleted at exit)."""
        ns = self.netns(f"pvovn-{role}-{self.tag}")
        self.spaces.append(ns)
        return ns

    def __enter__(self) -> TwoHostOvn:
        try:
            a, b = self.space("a"), self.space("b")
            a.ip("link", "add", "ul0", "mtu", str(UNDERLAY_MTU), "type", "veth", "peer", "name", "ul0", "mtu",
                 str(UNDERLAY_MTU), "netns", b.name)
            self.central = OvnCentral(a).start()
            for name, ns, ip in (("a", a, "198.18.100.1"), ("b", b, "198.18.100.2")):
                host = OvnHost(f"pvovn-{name}-{self.tag}", ns, ip, self.central)
                self.hosts[name] = host
                host.start()
            self.nbctl("ls-add", SWITCH)
            self.wait_chassis()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for host in self.hosts.values():
            host.stop()
        if self.central is not None:
            self.central.stop()
        for ns in reversed(self.spaces):
            ns.delete()
        self.spaces.clear()

    @property
    def a(self) -> OvnHost:
        return self.hosts["a"]

    @property
    def b(self) -> OvnHost:
        return self.hosts["b"]

    @property
    def cent(self) -> OvnCentral:
        assert self.central is not None
        return self.central

    def nbctl(self, *args: str) -> str:
        return self.cent.nbctl(*args)

    def wait_chassis(self, timeout: float = 30) -> None:
        """Both chassis registered in the SB and each host's tunnel port to the other created."""
        deadline = time.monotonic() + timeout
        while True:
            chassis = set(self.cent.sbctl("--bare", "--columns=name", "list", "Chassis").split())
            tunnels = all(any(p.startswith("ovn-") for p in h.ovs.ports("br-int")) for h in self.hosts.values())
            if chassis >= {h.name for h in self.hosts.values()} and tunnels:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"OVN chassis did not come up: {chassis}\n{self.a.log()[-2000:]}")
            time.sleep(0.05)

    def add_port(self, lport: str, mac: str, ip: str, switch: str = SWITCH) -> None:
        """A logical port on `switch` with its MAC and IPv4 address (what northd answers ARP for)."""
        self.nbctl("lsp-add", switch, lport, "--", "lsp-set-addresses", lport, f"{mac} {ip}")

    def wait_bound(self, lport: str, host: OvnHost, timeout: float = 30) -> float:
        """Seconds until `lport` is bound to `host`'s chassis."""
        t0 = time.monotonic()
        while self.cent.binding_chassis(lport) != host.name:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{lport} not bound to {host.name} in {timeout} s "
                                   f"(chassis {self.cent.binding_chassis(lport)})")
            time.sleep(0.02)
        return time.monotonic() - t0

    def veth_port(self, host: OvnHost, guest: NetNS, ifname: str, lport: str, mac: str, ip: str) -> None:
        """A plain namespace `guest` on a veth whose host end `ifname` is a br-int port bound to `lport` (the
        third guest of a test; the baseline of `pvback bench net --switch ovn`)."""
        host.ns.ip("link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", guest.name)
        guest.ip("link", "set", "eth0", "address", mac, "up")
        guest.ip("addr", "add", f"{ip}/24", "dev", "eth0")
        # netdev without userspace TSO loses partial checksums (ovs-userspace.md §3e)
        r = _in(guest, "ethtool", "-K", "eth0", "tx", "off")
        if r.returncode != 0:
            raise RuntimeError(f"ethtool: {r.stderr.strip()}")
        host.ns.ip("link", "set", ifname, "up")
        host.ovs.vsctl("--timeout=20", "add-port", "br-int", ifname, "--", "set", "Interface", ifname,
                       f"external_ids:iface-id={lport}")
