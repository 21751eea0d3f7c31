"""`pvback bench net`: netback's throughput and cost, against a plain veth pair measured in the same run.

Two namespaces, "guest" and "peer", joined two ways:
  - veth:    a veth pair (the kernel's own shortest path between two stacks: the reference),
  - netback: the guest's tap (IFF_VNET_HDR, one fd per queue) -> the emulated netfront's C data path
             (csrc/netfront_io.c, a thread per queue in this process) -> netif rings -> `pvback serve` (its own
             process, inside the peer namespace, so its vif tap is the peer's interface) -> the vif tap.
Workloads (iperf3, a server in the peer namespace, the client in the guest's; -R for the other direction):
TCP Gbit/s (GSO/checksum offload negotiated, as Linux netfront and netback do) and UDP with 18-byte payloads
(64-byte Ethernet frames with the FCS) in packets/s received, guest->peer (g2p) and peer->guest (p2g), with 1
and 2 queues (-P 2: two flows, which the guest kernel and netback spread over the queues; veth runs the same).

Costs: the daemon's CPU time from /proc/<pid>/stat over the window, per packet (netif packets: a GSO frame is
one) and per GB; its context switches (wake-ups) per packet from /proc/<pid>/task/*/status; the netfront's
counters (wake-ups, notifies, tap syscalls per packet).  The physical costs a missed target is explained by are
measured in the same run: memcpy per byte (a grant copy on this platform is a checked memcpy), an event-channel
wake-up (the eventfd ping-pong), and a tap write per frame.

Cells are analysis.Sample rows (store "net", workload = proto-direction-queues, system = veth | netback; `iops`
= packets/s received, `mb_s` = MB/s received), aggregated by perf/analysis.py; markdown by perf/report.py.
Targets, as ratios to veth in the same run: TCP >= 0.8, UDP packets/s >= 0.5.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perf import analysis, runner
from perf.analysis import Cell, CellKey, Sample, Targets
from perf.runner import Progress, Serve, simulator

PROTOS = ["tcp", "udp64"]
DIRECTIONS = ["g2p", "p2g"]
QUEUES = [1, 2]
WORKLOADS = [f"{p}-{d}-{q}q" for q in QUEUES for p in PROTOS for d in DIRECTIONS]
SYSTEMS = ["veth", "netback"]
TARGET_TCP, TARGET_PPS = 0.8, 0.5
UDP_PAYLOAD = 18  # + 8 UDP + 20 IPv4 + 14 Ethernet = 60 bytes, 64 on the wire with the FCS
PEER_V4, GUEST_V4 = "198.18.0.1", "198.18.0.2"
GUEST_MAC = "00:16:3e:00:00:0b"
IPERF_PORT = 5201


@dataclass
class Plan:
    quick: bool
    reps: int
    seconds: float
    costs_frames: int  # tap writes timed for the per-frame cost
    datapath: str = "c"  # the emulated netfront's data path ("python": the reference, to see what C buys)
    spin_us: int = 0  # C netfront: look at the rings this long before sleeping (hand-off latency vs CPU)

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(quick=True, reps=1, seconds=2.0, costs_frames=20_000)
        return cls(quick=False, reps=3, seconds=5.0, costs_frames=200_000)


def parse_workload(w: str) -> tuple[str, str, int]:
    proto, direction, q = w.split("-")
    return proto, direction, int(q[:-1])


# ---- /proc --------------------------------------------------------------------------------------------------


def ctx_switches(pid: int) -> int:
    """Voluntary context switches of all of `pid`'s live threads: each is a sleep, so a wake-up."""
    n = 0
    with contextlib.suppress(OSError):
        for t in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/task/{t}/status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        n += int(line.split()[1])
    return n


def proc_cpu_s(pid: int) -> float:
    from perf.blkload import thread_cpu_ns

    return thread_cpu_ns(pid) / 1e9


# ---- topologies ---------------------------------------------------------------------------------------------


class Topology:
    """Two namespaces and whatever joins them; counters() is what the window is judged by."""

    guest: Any
    peer: Any
    daemon_pid: int | None = None

    def counters(self) -> dict[str, float]:
        return {}


class VethTopology(Topology):
    def __init__(self, tag: str) -> None:
        from backends.guests.netns import NetNS

        self.guest = NetNS(f"pvbn-vg-{tag}")
        try:
            self.peer = NetNS(f"pvbn-vp-{tag}")
        except BaseException:
            self.guest.delete()
            raise
        try:
            self.guest.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.peer.name)
            for ns, addr in ((self.guest, GUEST_V4), (self.peer, PEER_V4)):
                ns.ip("addr", "add", f"{addr}/24", "dev", "eth0")
                ns.ip("link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.guest.delete()
        self.peer.delete()


class EmulatedNic:
    """What every benchmark's emulated guest NIC has: the guest, its netfronts on the guest's tap fds, the
    backend path `pvback attach nic` printed; the CLI against the simulator; detach and close."""

    CLI_TIMEOUT = 60.0

    def __init__(self, sim_dir: Path) -> None:
        self.sim_dir = sim_dir
        self.fds: list[int] = []
        self.fronts: list[Any] = []
        self.guest: Any = None
        self.xs: Any = None  # the guest's XenStore connection, once connect() made it
        self.backend = ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(runner.ROOT)}
        return subprocess.run([runner.PY, "-m", "backends.daemon.cli", *args, "--platform", "emulated", "--sim-dir",
                               str(self.sim_dir)], capture_output=True, text=True, timeout=self.CLI_TIMEOUT,
                              env=env, cwd=runner.ROOT, stdin=subprocess.DEVNULL)

    def front_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for nf in self.fronts:
            for k, v in nf.stats.items():
                total[k] = total.get(k, 0) + v
        return total

    async def close(self) -> None:
        from backends.xenbus.state import XenbusState
        from backends.xenbus.toolstack import remove_device

        for nf in self.fronts:
            nf.stop()
        if self.guest is not None:
            fe = f"/local/domain/{self.guest.domid}/device/vif/0"
            with contextlib.suppress(Exception):
                await self.xs.write(f"{fe}/state", str(int(XenbusState.CLOSED)))
            if self.backend:
                with contextlib.suppress(Exception):
                    from backends.xenstore.client import XenStoreClient

                    dom0 = await XenStoreClient.connect(str(self.sim_dir / "xenstored.sock"))
                    try:
                        await remove_device(dom0, backend_domid=0, frontend_domid=self.guest.domid, type_name="vif",
                                            devid=0, frontend_type="vif", timeout=10.0)
                    finally:
                        await dom0.close()
            for nf in self.fronts:
                nf.close()
            with contextlib.suppress(Exception):
                await self.xs.close()
            self.guest.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class NetbackNic(EmulatedNic):
    """One guest with one NIC of `queues` queues attached through `pvback attach nic`, its netfront connected
    (C data path), in its own guest namespace."""

    def __init__(self, tag: str, sim_dir: Path, peer: Any, queues: int, progress: Progress,
                 datapath: str = "c", spin_us: int = 0, *, bridge: str | None = None, addr: str = GUEST_V4,
                 gso: bool = True) -> None:
        from backends.guests.netns import NetNS

        super().__init__(sim_dir)
        self.peer = peer
        self.queues = queues
        self.ns = NetNS(f"pvbn-g{queues}-{tag}")
        self.progress = progress
        self.datapath = datapath
        self.spin_us = spin_us
        # bridge: the vif is plugged by pvback into that switch (its tap stays where the daemon runs; nothing is
        # configured on it here); gso=False: the guest keeps checksum offload but not TSO, what Linux's netfront
        # does when the backend offers no GSO (a switch that cannot carry it).
        self.bridge = bridge
        self.addr = addr
        self.gso = gso

    async def connect(self) -> None:
        from backends.guests.guest import Guest
        from backends.guests.netfront import NetFront, xenbus_connect
        from backends.guests.netns import guest_tap
        from backends.xenstore.client import XenStoreClient

        q = self.queues
        # Per queue: 2 ring pages, 256 TX pool pages (16 GSO frames of 64 KiB in flight), 256 RX buffers.
        self.guest = await asyncio.to_thread(Guest.in_sim, self.sim_dir, name=f"bench-net-{q}q",
                                             mem_pages=640 * q, gnt_entries=1024 * q)
        assert self.guest.xenstore_sock is not None
        self.xs = await XenStoreClient.from_socket(self.guest.xenstore_sock)
        res = await asyncio.to_thread(self.cli, "attach", "nic", str(self.guest.domid), "--mac", GUEST_MAC,
                                      "--queues", str(q), "--mtu", "1500",
                                      *(["--bridge", self.bridge] if self.bridge else []))
        if res.returncode != 0:
            raise RuntimeError(f"pvback attach nic: {res.stderr.strip()}")
        self.backend = res.stdout.strip()
        self.vif = f"vif{self.guest.domid}.0"
        self.fds = guest_tap(self.ns, queues=q, mtu=1500, mac=GUEST_MAC, addrs=[f"{self.addr}/24"])
        self.fronts = [NetFront(self.guest, 0, fd, offload=True, split=True, tx_pages=256,
                                datapath=self.datapath, spin_us=self.spin_us)
                       for fd in self.fds]
        if not self.gso:
            from backends.guests.netfront import TUN_F_CSUM, TUNSETOFFLOAD

            for fd in self.fds:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
        if self.bridge:  # pvback plugged the vif into the switch before it said hotplug-status=connected
            await xenbus_connect(self.xs, f"/local/domain/{self.guest.domid}/device/vif/0", self.fronts)
            return
        deadline = time.monotonic() + 10
        while self.vif not in self.peer.ip("-br", "link", "show"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon made no {self.vif} in the peer namespace")
            await asyncio.sleep(0.05)
        self.peer.ip("addr", "add", f"{PEER_V4}/24", "dev", self.vif)
        await xenbus_connect(self.xs, f"/local/domain/{self.guest.domid}/device/vif/0", self.fronts)

    async def close(self) -> None:
        await super().close()
        self.ns.delete()


class NetbackTopology(Topology):
    def __init__(self, nic: NetbackNic, serve: Serve) -> None:
        self.nic = nic
        self.guest = nic.ns
        self.peer = nic.peer
        self.daemon_pid = serve.pid

    def counters(self) -> dict[str, float]:
        assert self.daemon_pid is not None
        c: dict[str, float] = {f"front_{k}": float(v) for k, v in self.nic.front_stats().items()}
        c["daemon_cpu_s"] = proc_cpu_s(self.daemon_pid)
        c["daemon_ctxsw"] = float(ctx_switches(self.daemon_pid))
        return c


# ---- iperf3 -------------------------------------------------------------------------------------------------


class IperfServer:
    """`iperf3 -s` in the peer namespace for the length of a topology; stopped by PID."""

    def __init__(self, peer: Any, work: Path) -> None:
        self.log = work / f"iperf3-server-{peer.name}.log"
        with open(self.log, "ab") as out:
            # `ip netns exec` execs iperf3: the PID is iperf3's.
            self.proc = subprocess.Popen(peer.argv("iperf3", "-s", "-B", PEER_V4, "-p", str(IPERF_PORT)),
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def ready() -> bool:
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex((PEER_V4, IPERF_PORT)) == 0

        deadline = time.monotonic() + 10
        while not peer.run(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 -s did not come up: {self.log.read_text(errors='replace')[-500:]}")
            time.sleep(0.05)
        time.sleep(0.2)  # the probe connection is an iperf3 "test" the server has to drop first

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def close(self) -> None:
        runner.stop(self.proc)


def iperf_client(topo: Topology, proto: str, direction: str, streams: int, seconds: float) -> dict[str, Any]:
    argv = ["iperf3", "-c", PEER_V4, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J", "-P", str(streams)]
    if direction == "p2g":
        argv.append("-R")
    if proto == "udp64":
        argv += ["-u", "-b", "0", "-l", str(UDP_PAYLOAD)]
    t0 = time.monotonic()
    c0 = runner.children_cpu_s()
    proc = subprocess.run(topo.guest.argv(*argv), capture_output=True, text=True, timeout=seconds * 4 + 30)
    cpu = runner.children_cpu_s() - c0
    wall = time.monotonic() - t0
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"iperf3 gave no JSON ({proc.returncode}): {proc.stderr[-500:]}") from exc
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    rcv = end["sum_received"]
    secs = float(rcv["seconds"]) or seconds
    out = {"seconds": secs, "wall_s": wall, "client_cpu_s": cpu, "bytes": int(rcv["bytes"]),
           "gbit_s": float(rcv["bits_per_second"]) / 1e9}
    if proto == "udp64":
        # The receiver's count: datagrams that arrived (sent minus lost, as the receiving side counted them).
        pk = int(end["sum"]["packets"]) - int(end["sum"]["lost_packets"])
        out |= {"packets": pk, "pps": pk / secs, "sent_pps": int(end["sum_sent"]["packets"]) / secs}
    else:
        out |= {"retransmits": int(end["sum_sent"].get("retransmits", 0))}
    return out


def measure(topo: Topology, server: IperfServer, system: str, workload: str, rep: int, seconds: float,
            progress: Progress) -> tuple[Sample, dict[str, Any]]:
    proto, direction, q = parse_workload(workload)
    self0, srv0, k0 = runner_self_cpu(), server.cpu_s(), topo.counters()
    r = iperf_client(topo, proto, direction, q, seconds)
    self1, srv1, k1 = runner_self_cpu(), server.cpu_s(), topo.counters()
    d = {k: k1[k] - k0.get(k, 0.0) for k in k1}
    # The window: iperf3's own measured seconds of the client's wall time (start-up excluded).
    scale = r["seconds"] / r["wall_s"] if r["wall_s"] else 1.0
    daemon = d.get("daemon_cpu_s")
    daemon_w = daemon * scale if daemon is not None else None
    front_w = (self1 - self0) * scale if system == "netback" else 0.0
    # switch_cpu_s: a software switch between the namespaces (ovs-vswitchd), when there is one.
    cpu = (r["client_cpu_s"] * scale + (srv1 - srv0) * scale + (daemon_w or 0.0) + front_w
           + d.get("switch_cpu_s", 0.0) * scale)
    # netif packets of the direction (a GSO frame is one); veth TCP has no packet count of its own.
    ring = "front_tx" if direction == "g2p" else "front_rx"
    ring_pk = d.get(ring)
    pps = float(r["pps"]) if proto == "udp64" else (ring_pk / r["wall_s"] if ring_pk else 0.0)
    s = Sample("net", workload, system, rep, pps, r["bytes"] / r["seconds"] / 1e6, 0.0, 0.0, 0.0, cpu, daemon_w,
               r["seconds"], 0)
    detail: dict[str, Any] = {"workload": workload, "system": system, "rep": rep, "iperf": r,
                              "server_cpu_s": (srv1 - srv0) * scale, "front_cpu_s": front_w, "deltas": d}
    if ring_pk:
        detail["ring_packets"] = ring_pk
        detail["ring_bytes"] = d.get("front_tx_bytes" if direction == "g2p" else "front_rx_bytes", 0.0)
    what = f"{r['gbit_s']:6.2f} Gbit/s" + (f" {r['pps'] / 1e3:7.1f} kpps" if proto == "udp64" else
                                           f" ({r.get('retransmits', 0)} retr)")
    extra = f" daemon {daemon_w:.2f} s CPU" if daemon_w is not None else ""
    progress(f"{workload:14s} {system:8s} rep {rep}: {what}{extra}")
    return s, detail


def measure_rounds(plan: Plan, wls: list[str], topos: Mapping[str, Topology],
                   servers: Mapping[str, IperfServer], progress: Progress, *,
                   tag: str = "") -> Iterator[tuple[Sample, dict[str, Any]]]:
    """measure() every workload on every path, plan.reps times, the paths taking turns within each repetition
    (a machine shared with other work then loads them alike); a failed cell is reported (`tag` before its name)
    and left out, the rest goes on."""
    for rep in range(plan.reps):
        for wl in wls:
            for system, topo in topos.items():
                try:
                    s, d = measure(topo, servers[system], system, wl, rep, plan.seconds, progress)
                except Exception as exc:
                    runner.failed(progress, f"{tag}{wl} {system} rep {rep}", exc)
                    continue
                yield s, d


def probe_syscalls(topo: Topology, workload: str, seconds: float, progress: Progress) -> dict[str, Any] | None:
    """One more run of `workload` with `perf stat` counting the daemon's syscalls (the raw_syscalls:sys_enter
    tracepoint) and context switches: syscalls per netif packet.  Kept out of the measured samples (the
    tracepoint costs a little per syscall).  None when perf cannot attach."""
    if topo.daemon_pid is None or shutil.which("perf") is None:
        return None
    proto, direction, q = parse_workload(workload)
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-e", "context-switches",
                             "-p", str(topo.daemon_pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        k0 = topo.counters()
        r = iperf_client(topo, proto, direction, q, seconds)
        k1 = topo.counters()
    finally:
        perf.send_signal(2)  # SIGINT: perf stat prints its counts and exits
        try:
            _, err = perf.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            perf.kill()
            _, err = perf.communicate()
    counts: dict[str, float] = {}
    for line in err.splitlines():
        f = line.split(",")
        if len(f) >= 3 and f[0].replace(".", "", 1).isdigit():
            counts[f[2]] = float(f[0])
    pk = k1.get("front_tx" if direction == "g2p" else "front_rx", 0.0) - k0.get(
        "front_tx" if direction == "g2p" else "front_rx", 0.0)
    if "raw_syscalls:sys_enter" not in counts or not pk:
        return None
    out = {"workload": workload, "packets": pk, "syscalls": counts["raw_syscalls:sys_enter"],
           "context_switches": counts.get("context-switches", 0.0), "gbit_s": r["gbit_s"],
           "syscalls_per_packet": counts["raw_syscalls:sys_enter"] / pk,
           "context_switches_per_packet": counts.get("context-switches", 0.0) / pk}
    progress(f"{workload:14s} probe: daemon {out['syscalls_per_packet']:.2f} syscalls and "
             f"{out['context_switches_per_packet']:.3f} context switches per netif packet")
    return out


def runner_self_cpu() -> float:
    from perf.blkload import self_cpu_s

    return self_cpu_s()


# ---- physical costs -----------------------------------------------------------------------------------------


def memcpy_ns_per_kib(total_mib: int = 512) -> float:
    """A grant copy on the emulated platform is a memcpy after the grant checks: its floor per KiB, on 64 KiB
    blocks (a GSO frame's size), through libc's memmove from ctypes (one call per block)."""
    n = 64 * 1024
    src = ctypes.create_string_buffer(n)
    dst = ctypes.create_string_buffer(n)
    iters = total_mib * 16
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        ctypes.memmove(dst, src, n)
    return (time.perf_counter_ns() - t0) / (iters * 64)


def grant_copy_ns_per_kib(total_mib: int = 256) -> float:
    """The emulated platform's grant copy per KiB: one pv_gnt_do_copy call of 16 segments of 4 KiB (a 64 KiB
    GSO frame's worth, what netback issues per batch) from a guest's read-only grants into local memory,
    repeated; the segment array is built once, so this is the C path's cost (grant checks + memcpy)."""
    from backends.guests.guest import Guest
    from backends.native import ffi, lib
    from backends.platform.emulated import EmulatedPlatform
    from backends.sim.broker import BrokerThread

    d = Path(tempfile.mkdtemp(prefix="pvbn-gc-", dir="/tmp"))
    try:
        with BrokerThread(str(d / "broker.sock")):
            plat = EmulatedPlatform(str(d))
            guest = Guest(str(d / "broker.sock"), name="gcopy", mem_pages=32, gnt_entries=64)
            try:
                plat.open_domain(guest.domid)
                refs = [guest.grant(guest.alloc_page(), 0, readonly=True) for _ in range(16)]
                local = ffi.new("uint8_t[]", 16 * 4096)
                segs = ffi.new("struct pv_gcopy_seg[]", 16)
                for i, ref in enumerate(refs):
                    segs[i].source.foreign.ref = ref
                    segs[i].source.foreign.offset = 0
                    segs[i].source.foreign.domid = guest.domid
                    segs[i].dest.virt = local + i * 4096
                    segs[i].len = 4096
                    segs[i].flags = lib.PV_GCOPY_SOURCE_GREF
                iters = total_mib * 16
                gnt = plat.gnt
                t0 = time.perf_counter_ns()
                for _ in range(iters):
                    lib.pv_gnt_do_copy(gnt, segs, 16)
                ns = (time.perf_counter_ns() - t0) / (iters * 64)
                if any(segs[i].status != 0 for i in range(16)):
                    raise RuntimeError(f"grant copy failed: status {[int(segs[i].status) for i in range(16)]}")
                plat.close_domain(guest.domid)
            finally:
                guest.close()
                plat.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return ns


def tap_write_ns(ns: Any, frames: int) -> dict[str, float]:
    """ns per write() of a 60-byte UDP frame (+ vnet header) into a tap, measured in C-speed terms: the loop's
    own cost (the same writes to /dev/null) is subtracted."""
    from backends.guests.netns import guest_tap

    fds = guest_tap(ns, queues=1, mtu=1500, mac="00:16:3e:00:00:0c", addrs=["198.18.1.2/24"], name="costtap")
    try:
        frame = bytes(10) + bytes.fromhex("ffffffffffff00163e00000c0800") + bytes(46)
        null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        try:
            def loop(fd: int) -> float:
                w = os.write
                t0 = time.perf_counter_ns()
                for _ in range(frames):
                    w(fd, frame)
                return (time.perf_counter_ns() - t0) / frames

            tap = loop(fds[0])
            base = loop(null)
        finally:
            os.close(null)
    finally:
        for fd in fds:
            os.close(fd)
        ns.ip("link", "del", "costtap", check=False)
    return {"tap_write_ns": tap, "loop_ns": base, "tap_write_net_ns": tap - base}


def physical_costs(plan: Plan, ns: Any, progress: Progress) -> dict[str, Any]:
    from perf.bench_event import cpu_modes, pingpong

    out: dict[str, Any] = {"memcpy_ns_per_kib": memcpy_ns_per_kib(64 if plan.quick else 512),
                           "grant_copy_ns_per_kib": grant_copy_ns_per_kib(64 if plan.quick else 512)}
    out |= tap_write_ns(ns, plan.costs_frames)
    pp = {}
    for mode in cpu_modes():
        r = pingpong(mode, 20_000 if plan.quick else 100_000)
        pp[mode] = r.__dict__
    out["pingpong"] = pp
    ref = "cross-cpu" if "cross-cpu" in pp else "same-cpu"
    out["wakeup_us"] = float(pp[ref]["p50_us"]) / 2  # a round trip is two wake-ups
    progress(f"costs: memcpy {out['memcpy_ns_per_kib']:.1f} ns/KiB, grant copy {out['grant_copy_ns_per_kib']:.1f} "
             f"ns/KiB, tap write {out['tap_write_net_ns']:.0f} ns/frame "
             f"(+{out['loop_ns']:.0f} ns of loop), eventfd wake-up {out['wakeup_us']:.2f} us ({ref})")
    return out


# ---- the run ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def namespace(name: str) -> Iterator[Any]:
    from backends.guests.netns import NetNS

    with NetNS(name) as ns:
        yield ns


def net_serve(work: Path, sim_dir: Path, peer: Any) -> Serve:
    """`pvback serve` for vifs inside the peer namespace (its taps are created there)."""
    return Serve(work, sim_dir, "net", sections={}, settings={"backend_types": ["vif"], "netns": "peer"},
                 serve_keys={"backend_types": ["vif"]}, prefix=peer.argv())


def run_queues(plan: Plan, work: Path, queues: int, topos: dict[str, Topology], samples: list[Sample],
               details: list[dict[str, Any]], probes: list[dict[str, Any]], progress: Progress) -> None:
    """Every workload of `queues` on every path, the paths taking turns within each repetition (a machine
    shared with other work then loads both alike), then the netback syscall probes."""
    servers: dict[str, IperfServer] = {}
    wls = [wl for wl in WORKLOADS if parse_workload(wl)[2] == queues]
    try:
        for system, topo in topos.items():
            servers[system] = IperfServer(topo.peer, work)
        for s, d in measure_rounds(plan, wls, topos, servers, progress):
            samples.append(s)
            details.append(d)
        for system, topo in topos.items():
            for wl in wls if topo.daemon_pid is not None else []:
                try:
                    p = probe_syscalls(topo, wl, min(plan.seconds, 2.0), progress)
                except Exception as exc:
                    runner.failed(progress, f"{wl} {system} syscall probe", exc)
                    continue
                if p is not None:
                    probes.append(p)
    finally:
        for srv in servers.values():
            srv.close()


def run_all(plan: Plan, work: Path, progress: Progress) -> dict[str, Any]:
    tag = f"{os.getpid()}"
    samples: list[Sample] = []
    details: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    veth = VethTopology(tag)
    try:
        with simulator(work) as sim_dir, namespace(f"pvbn-p-{tag}") as peer:
            serve = net_serve(work, sim_dir, peer)
            settings["net"] = serve.settings
            try:
                for q in QUEUES:
                    nic = NetbackNic(tag, sim_dir, peer, q, progress, plan.datapath, plan.spin_us)
                    try:
                        asyncio.run(nic.connect())
                        progress(f"{q} queue(s): veth pair; netback guest {nic.guest.domid} connected, {nic.vif} in "
                                 "the peer namespace")
                        run_queues(plan, work, q, {"veth": veth, "netback": NetbackTopology(nic, serve)}, samples,
                                   details, probes, progress)
                        errs = [str(nf.error) for nf in nic.fronts if nf.error is not None]
                        if errs:
                            runner.failed(progress, f"netback {q}q netfront", RuntimeError("; ".join(errs)))
                    except Exception as exc:
                        runner.failed(progress, f"netback {q}q", exc)
                    finally:
                        asyncio.run(nic.close())
                if serve.proc.poll() is not None:
                    log = serve.log.read_text(errors="replace")[-800:]
                    runner.failed(progress, "pvback serve", RuntimeError(f"exited {serve.proc.returncode}: {log}"))
            finally:
                serve.close()
        costs = physical_costs(plan, veth.guest, progress)
    finally:
        veth.close()
    costs["syscall_probes"] = probes
    return {"samples": [s.__dict__ for s in samples], "details": details, "costs": costs, "serve_settings": settings}


def relate(c: Cell, by: Mapping[CellKey, Cell]) -> None:
    if c["system"] == "veth":
        return
    peer = by.get((c["store"], c["workload"], "veth"))
    if not peer:
        return
    if c["workload"].startswith("tcp"):
        c["ratio_to_veth"] = c["mb_s"] / peer["mb_s"] if peer["mb_s"] else None
    else:
        c["ratio_to_veth"] = c["iops"] / peer["iops"] if peer["iops"] else None
    c["ref_system"] = "veth"


def _per_gb(d: dict[str, Any]) -> dict[str, float]:
    """One run's CPU per GB received, by who spent it (iperf3 both ends, the daemon, the netfront)."""
    gb = d["iperf"]["bytes"] / 1e9
    scale = d["iperf"]["seconds"] / d["iperf"]["wall_s"] if d["iperf"]["wall_s"] else 1.0
    out = {"iperf_cpu_s_per_gb": (d["iperf"]["client_cpu_s"] * scale + d["server_cpu_s"]) / gb}
    if "sent_pps" in d["iperf"]:  # UDP: what the sender managed, beside what arrived
        out["sent_pps"] = d["iperf"]["sent_pps"]
    if "daemon_cpu_s" in d["deltas"]:
        out["front_cpu_s_per_gb"] = d["front_cpu_s"] / gb
    return out


def _per_packet(d: dict[str, Any]) -> dict[str, float]:
    """One netback run's costs per netif packet (a GSO frame is one)."""
    pk, dl, wall = d["ring_packets"], d["deltas"], d["iperf"]["wall_s"]
    return {
        "ring_pps": pk / wall,
        "bytes_per_ring_packet": d["ring_bytes"] / pk,
        "daemon_cpu_us_per_packet": dl["daemon_cpu_s"] / pk * 1e6,
        "daemon_cpu_s_per_gb": dl["daemon_cpu_s"] / (d["ring_bytes"] / 1e9) if d["ring_bytes"] else 0.0,
        "daemon_cores": dl["daemon_cpu_s"] / wall,
        "daemon_wakeups_per_packet": dl["daemon_ctxsw"] / pk,
        "front_wakeups_per_packet": dl.get("front_wakeups", 0) / pk,
        "front_notifies_per_packet": (dl.get("front_tx_notifies", 0) + dl.get("front_rx_notifies", 0)) / pk,
        "front_tap_syscalls_per_packet": (dl.get("front_tap_reads", 0) + dl.get("front_tap_writes", 0)) / pk,
        "front_tx_full": dl.get("front_tx_full", 0),
    }


def add_costs(cells: list[Cell], details: list[dict[str, Any]]) -> None:
    """Per netback cell, the medians over its repetitions of what each packet cost: daemon CPU per netif packet
    and per GB, daemon wake-ups per packet, and the netfront's wake-ups, notifies and tap syscalls per packet."""
    for c in cells:
        mine = [d for d in details if d["workload"] == c["workload"] and d["system"] == c["system"]
                and d.get("store", "net") == c["store"]]
        rows = [_per_packet(d) | _per_gb(d) if d.get("ring_packets") else _per_gb(d) for d in mine
                if d["iperf"]["bytes"]]
        for k in rows[0] if rows else {}:
            c[k] = analysis.median([r[k] for r in rows if k in r])


def aggregate(samples: list[dict[str, Any]], details: list[dict[str, Any]]) -> list[Cell]:
    cells = analysis.aggregate(samples, relate=relate, workload_order=WORKLOADS)
    add_costs(cells, details)
    return cells


def evaluate_targets(cells: list[Cell], *, label: Callable[[Cell], str] = lambda c: f"net {c['workload']}",
                     vs: str = "veth") -> list[dict[str, Any]]:
    """netback against the veth path, a target per workload (named label(cell) ... vs `vs`)."""
    t = Targets()
    for c in cells:
        if c["system"] != "netback" or c.get("ratio_to_veth") is None:
            continue
        tcp = c["workload"].startswith("tcp")
        unit = (f"{c['mb_s'] * 8 / 1e3:.2f} Gbit/s" if tcp else f"{c['iops'] / 1e3:.1f} kpps")
        t.add(f"{label(c)} {'Gbit/s' if tcp else 'packets/s'} vs {vs}", c["ratio_to_veth"],
              TARGET_TCP if tcp else TARGET_PPS, f"netback {unit}")
    return t.rows


def main(quick: bool, out: str, *, argv: list[str] | None = None, plan: Plan | None = None,
         switch: str | None = None) -> int:
    from perf.report import net_markdown, target_lines

    plan = plan or Plan.make(quick)
    if switch is not None:  # netback plugged into a software switch, against a veth port on the same switch
        from perf import net_switch

        return net_switch.main(switch, quick, out, argv=argv, plan=plan)
    if runner.tools_missing("pvback bench net", ("iperf3", "ip", "gcc")):
        return 1
    if runner.not_root("pvback bench net"):
        return 1

    def body(out_dir: Path, work: Path, progress: Progress) -> int:
        host = runner.host_description({})
        progress(f"{runner.host_line(host)}; "
                 f"{plan.reps} rep(s) x {plan.seconds:g} s per cell")
        runner.FAILURES.clear()
        raw = run_all(plan, work, progress)
        cells = aggregate(raw["samples"], raw["details"])
        targets = evaluate_targets(cells)
        result = {
            **runner.result_head(argv, f"pvback bench net{' --quick' if quick else ''} --out {out}", host, plan),
            "iperf3": runner.first_line(["iperf3", "--version"]),
            "serve_settings": raw["serve_settings"],
            "failures": list(runner.FAILURES),
            "costs": raw["costs"],
            "cells": cells, "targets": targets, "samples": raw["samples"], "details": raw["details"],
        }
        runner.write_report(out_dir, "bench-net", result, net_markdown(result), target_lines(targets))
        return 0

    return runner.run_bench(out, "pvbn-", body, tmp="/tmp")



def rerender(path: str) -> str:
    """The cells, targets and markdown again from a bench-net.json's raw samples and details (after a change
    to the aggregation or the report); rewrites the JSON and the markdown next to it, returns the markdown."""
    from perf.report import net_markdown
    from perf.report import rerender as again

    return again(path, aggregate, evaluate_targets, net_markdown)


if __name__ == "__main__":  # python -m perf.net_cells perf/results/net/bench-net.json
    print(rerender(sys.argv[1]))
