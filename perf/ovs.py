"""A private Open vSwitch for tests and benchmarks (`pvback bench net --switch ovs`): ovsdb-server and ovs-vswitchd
(netdev datapath: this kernel has no openvswitch module) with their database, sockets, pid files and logs in a
private directory, both run inside a network namespace the test owns (their bridge-internal taps and `ovs-netdev`
live there), started as our own children and stopped by PID — never by name, never the system's service
(ovs-userspace.md §1, §5).

Tests and benchmarks may use `ovs-vsctl` to build bridges and to inspect; the product talks OVSDB itself. It lives
under perf/ because the benchmark needs it and perf/ imports nothing from tests/ (tests/net/ovsbed.py re-exports it
for the tests).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

# The IDL names itself with uuid.uuid1(); libuuid then keeps /var/lib/libuuid/clock.txt open in the calling
# thread for the life of the process.  Opened here, once (the main thread builds the IDLs), so that the
# per-test fd leak check does not charge it to the first OVS test.
uuid.uuid1()


class Namespace(Protocol):
    """What the switch needs of a namespace (tests.net.netns.NetNS and backends.guests.netns.NetNS both are)."""

    name: str

    def ip(self, *args: str, check: bool = True) -> str: ...


SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
NEEDED = ("ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl")


def missing() -> list[str]:
    return [b for b in NEEDED if shutil.which(b) is None] + ([] if SCHEMA.exists() else [str(SCHEMA)])


class PrivateOvs:
    """`start()` ... `stop()`; `kill_vswitchd()` / `start_vswitchd()` and `restart_ovsdb()` for restart tests."""

    def __init__(self, ns: Namespace, *, userspace_tso: bool = False) -> None:
        # Short: the bridges' <br>.mgmt/.snoop unix sockets live here (108-byte sun_path).
        self.dir = Path(tempfile.mkdtemp(prefix="pvbovs-", dir="/tmp"))
        self.ns = ns
        self.userspace_tso = userspace_tso
        self.db_sock = self.dir / "db.sock"
        self.remote = f"unix:{self.db_sock}"
        self.ovsdb: subprocess.Popen[bytes] | None = None
        self.vswitchd: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "OVS_RUNDIR": str(self.dir), "OVS_DBDIR": str(self.dir),
                    "OVS_LOGDIR": str(self.dir), "OVS_SYSCONFDIR": str(self.dir)}

    # -- processes ------------------------------------------------------------------------------------------

    def _spawn(self, *cmd: str) -> subprocess.Popen[bytes]:
        # `ip netns exec` execs the command: the Popen's pid is the daemon's own.
        return subprocess.Popen(["ip", "netns", "exec", self.ns.name, *cmd], env=self.env, cwd=self.dir,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> PrivateOvs:
        try:
            self.create_db()
            self.start_ovsdb()
            self.vsctl("--no-wait", "init")
            if self.userspace_tso:  # read by vswitchd at start only
                self.vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:userspace-tso-enable=true")
            self.start_vswitchd()
        except BaseException:
            self.stop()
            raise
        return self

    def create_db(self) -> None:
        db = self.dir / "conf.db"
        with contextlib.suppress(FileNotFoundError):
            db.unlink()
        subprocess.run(["ovsdb-tool", "create", str(db), str(SCHEMA)], check=True, capture_output=True,
                       timeout=10)

    def start_ovsdb(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.db_sock.unlink()
        self.ovsdb = self._spawn(
            "ovsdb-server", str(self.dir / "conf.db"), f"--remote=punix:{self.db_sock}",
            f"--unixctl={self.dir}/ovsdb-server.ctl", "-vconsole:off", f"--log-file={self.dir}/ovsdb-server.log",
            "--no-chdir")
        deadline = time.monotonic() + 10
        while True:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.db_sock))
                    return
                except OSError:
                    pass
            if self.ovsdb.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ovsdb-server did not start: {self.log('ovsdb-server')[-2000:]}")
            time.sleep(0.01)

    def start_vswitchd(self) -> None:
        self.vswitchd = self._spawn(
            "ovs-vswitchd", self.remote, f"--unixctl={self.dir}/ovs-vswitchd.ctl", "-vconsole:off",
            f"--log-file={self.dir}/ovs-vswitchd.log", "--no-chdir")
        # A waited write: returns once vswitchd applied next_cfg (ovs-userspace.md §1: a wait-until on cur_cfg
        # right after init hangs).
        self.vsctl("--timeout=20", "set", "Open_vSwitch", ".", f"external_ids:pvback-test={time.monotonic_ns()}")

    def kill_vswitchd(self, sig: int = signal.SIGKILL) -> None:
        _kill(self.vswitchd, sig)
        self.vswitchd = None

    def restart_ovsdb(self, *, fresh: bool = False) -> None:
        """Stop ovsdb-server (SIGTERM, by PID) and start it again, on the same database or on a new empty one
        (`fresh`: every bridge and port is gone, as after a lost conf.db)."""
        _kill(self.ovsdb, signal.SIGTERM)
        self.ovsdb = None
        if fresh:
            self.create_db()
        self.start_ovsdb()
        if fresh:
            self.vsctl("--no-wait", "init")

    def stop(self) -> None:
        for p in (self.vswitchd, self.ovsdb):
            _kill(p, signal.SIGTERM)
        self.vswitchd = self.ovsdb = None
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- inspection -----------------------------------------------------------------------------------------

    def vsctl(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        res = subprocess.run(["ovs-vsctl", f"--db={self.remote}", *args], capture_output=True, text=True,
                             timeout=timeout, env=self.env)
        if check and res.returncode != 0:
            raise RuntimeError(f"ovs-vsctl {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout.strip()

    def add_bridge(self, name: str) -> None:
        self.vsctl("--timeout=20", "add-br", name, "--", "set", "Bridge", name, "datapath_type=netdev")

    def get(self, table: str, record: str, column: str) -> Any:
        return self.vsctl("--if-exists", "get", table, record, column)

    def ports(self, bridge: str) -> list[str]:
        return self.vsctl("list-ports", bridge).split()

    def port_rows(self, name: str) -> int:
        """How many Port rows are called `name` (a duplicate would be two)."""
        out = self.vsctl("--columns=name", "find", "Port", f"name={name}")
        return sum(1 for ln in out.splitlines() if ln.startswith("name"))

    def log(self, which: str) -> str:
        try:
            return (self.dir / f"{which}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _kill(p: subprocess.Popen[bytes] | None, sig: int) -> None:
    if p is None or p.poll() is not None:
        if p is not None and p.stderr is not None:
            p.stderr.close()
        return
    p.send_signal(sig)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
    if p.stderr is not None:
        p.stderr.close()


def veth_peer(host: Namespace, peer: Namespace, host_end: str, addrs: list[str]) -> None:
    """A veth from `host` (where the switch is) into `peer` (eth0 there, with `addrs`); the host end is up and
    ready to be a bridge port."""
    host.ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", peer.name)
    for a in addrs:
        peer.ip("addr", "add", a, "dev", "eth0", *(["nodad"] if ":" in a else []))
    peer.ip("link", "set", "eth0", "up")
    host.ip("link", "set", host_end, "up")
