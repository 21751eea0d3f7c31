"""`pvback bench net --switch ovn`: TCP between two hosts of an OVN (Geneve between them), with netback's vifs at
both ends against the same path with veth ports in place of the vifs, in the same run.

The two hosts are perf/ovn.py's (network namespaces, each a private OVS on the netdev datapath with
ovn-controller; NB/SB and ovn-northd in host A's namespace; Geneve over a veth through `br-phy`), every daemon
started from a private directory and stopped by PID.  Two logical switches, one per path, so both can use the
same addresses (what net_cells' iperf3 driver expects):
  - veth:    ls-veth: a "guest" namespace on host A and a "peer" namespace on host B, each on a veth whose host
             end is a br-int port with the logical port's iface-id;
  - netback: ls-nb: an emulated guest on host A and one on host B (their own `pvback sim` each), each NIC a tap
             -> the C netfront -> netif rings -> that host's `pvback serve` (in the host namespace) -> the vif
             tap, which pvback plugs into br-int with the iface-id and holds until ovn-installed.
Workloads: TCP guest->peer and peer->guest, 1 queue (iperf3: server in the peer, client in the guest; -R for
the other direction), the paths taking turns within each repetition.  OVS 3.1 has no TSO through a tunnel, so
neither path has GSO: the veth ends run `tx off`, pvback offers no GSO and the guests keep checksum offload only.
Target: netback >= 0.8 of veth (Gbit/s), as net_cells' TCP target.

The fixture is imported from tests/net/ (it is the OVN tests' own, and PrivateOvs is still there on main); once
perf/ovs.py holds PrivateOvs it moves next to it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from perf import analysis, net_cells, runner
from perf.analysis import Sample
from perf.net_cells import GUEST_V4, PEER_V4, IperfServer, Plan, Topology, proc_cpu_s
from perf.runner import Progress, Serve, simulator

WORKLOADS = ["tcp-g2p-1q", "tcp-p2g-1q"]
SYSTEMS = ["veth", "netback"]
TUNSETOFFLOAD, TUN_F_CSUM = 0x400454D0, 0x01
OVN_WAIT = 30.0


class OvnNic(net_cells.EmulatedNic):
    """An emulated guest on one host, its NIC attached with `pvback attach nic --bridge br-int --iface-id`."""

    CLI_TIMEOUT = OVN_WAIT + 30

    def __init__(self, ns: Any, sim_dir: Path, lport: str, mac: str, ip: str) -> None:
        super().__init__(sim_dir)
        self.ns, self.lport, self.mac, self.ip = ns, lport, mac, ip

    async def connect(self) -> None:
        from backends.guests.guest import Guest
        from backends.guests.netfront import NetFront, xenbus_connect
        from backends.guests.netns import guest_tap
        from backends.xenstore.client import XenStoreClient

        self.guest = await asyncio.to_thread(Guest.in_sim, self.sim_dir, name=f"bench-ovn-{self.lport}",
                                             mem_pages=640, gnt_entries=1024)
        assert self.guest.xenstore_sock is not None
        self.xs = await XenStoreClient.from_socket(self.guest.xenstore_sock)
        res = await asyncio.to_thread(self.cli, "attach", "nic", str(self.guest.domid), "--mac", self.mac,
                                      "--queues", "1", "--bridge", "br-int", "--iface-id", self.lport,
                                      "--timeout", str(OVN_WAIT + 10))
        if res.returncode != 0:
            raise RuntimeError(f"pvback attach nic: {res.stderr.strip()}")
        self.backend = res.stdout.strip()
        self.fds = guest_tap(self.ns, queues=1, mtu=1500, mac=self.mac, addrs=[f"{self.ip}/24"])
        self.fronts = [NetFront(self.guest, 0, fd, offload=True, split=True, tx_pages=256, datapath="c")
                       for fd in self.fds]
        for fd in self.fds:  # no GSO through Geneve: checksum offload only (what Linux's netfront keeps)
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
        await xenbus_connect(self.xs, f"/local/domain/{self.guest.domid}/device/vif/0", self.fronts,
                             timeout=OVN_WAIT + 10)


class PairTopology(Topology):
    """guest (host A) and peer (host B); for netback, both daemons' CPU and wake-ups and the guest's netfront."""

    def __init__(self, guest: Any, peer: Any, nic: OvnNic | None = None, serves: list[Serve] | None = None) -> None:
        self.guest, self.peer, self.nic, self.serves = guest, peer, nic, serves or []
        self.daemon_pid = self.serves[0].pid if self.serves else None

    def counters(self) -> dict[str, float]:
        if self.nic is None:
            return {}
        c: dict[str, float] = {f"front_{k}": float(v) for k, v in self.nic.front_stats().items()}
        c["daemon_cpu_s"] = sum(proc_cpu_s(s.pid) for s in self.serves)
        c["daemon_ctxsw"] = float(sum(net_cells.ctx_switches(s.pid) for s in self.serves))
        return c


def run_all(plan: Plan, work: Path, progress: Progress) -> dict[str, Any]:
    from backends.guests.netns import NetNS
    from perf.ovn import TwoHostOvn

    samples: list[Sample] = []
    details: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    with TwoHostOvn(f"{os.getpid()}", netns=NetNS) as ovn, simulator(work / "a") as sim_a, \
            simulator(work / "b") as sim_b:
        t0 = time.monotonic()
        progress(f"two OVN hosts up ({ovn.a.name}, {ovn.b.name}; Geneve {ovn.a.encap_ip} <-> {ovn.b.encap_ip})")
        for ls in ("ls-veth", "ls-nb"):
            ovn.nbctl("ls-add", ls)
        # veth path
        vg, vp = ovn.space("vg"), ovn.space("vp")
        ovn.add_port("v-g", net_cells.GUEST_MAC, GUEST_V4, "ls-veth")
        ovn.add_port("v-p", "00:16:3e:00:00:0c", PEER_V4, "ls-veth")
        ovn.veth_port(ovn.a, vg, "vv-g", "v-g", net_cells.GUEST_MAC, GUEST_V4)
        ovn.veth_port(ovn.b, vp, "vv-p", "v-p", "00:16:3e:00:00:0c", PEER_V4)
        ovn.wait_bound("v-g", ovn.a)
        ovn.wait_bound("v-p", ovn.b)
        # netback path: a pvback serve per host, in the host's namespace, on the host's OVSDB
        serves: list[Serve] = []
        nics: list[OvnNic] = []
        try:
            for name, sim_dir in (("a", sim_a), ("b", sim_b)):
                host = ovn.hosts[name]
                net: dict[str, int | str] = {"ovsdb": host.ovs.remote, "ovs_timeout": 10,
                                             "ovn_installed_timeout": int(OVN_WAIT)}
                serves.append(Serve(work / name, sim_dir, f"ovn-{name}", sections={"net": net},
                                    settings={"backend_types": ["vif"], "netns": f"host {name}", **net},
                                    serve_keys={"backend_types": ["vif"]},
                                    prefix=["ip", "netns", "exec", host.ns.name]))
            settings = {s.settings["netns"]: s.settings for s in serves}
            ng, np_ = ovn.space("ng"), ovn.space("np")
            ovn.add_port("n-g", net_cells.GUEST_MAC, GUEST_V4, "ls-nb")
            ovn.add_port("n-p", "00:16:3e:00:00:0c", PEER_V4, "ls-nb")
            nics = [OvnNic(ng, sim_a, "n-g", net_cells.GUEST_MAC, GUEST_V4),
                    OvnNic(np_, sim_b, "n-p", "00:16:3e:00:00:0c", PEER_V4)]
            for nic in nics:
                asyncio.run(nic.connect())
            progress(f"veth and netback pairs bound and connected ({time.monotonic() - t0:.1f} s)")
            topos: dict[str, Topology] = {"veth": PairTopology(vg, vp),
                                          "netback": PairTopology(ng, np_, nics[0], serves)}
            servers = {k: IperfServer(t.peer, work) for k, t in topos.items()}
            try:
                for smp, d in net_cells.measure_rounds(plan, WORKLOADS, topos, servers, progress):
                    samples.append(smp)
                    details.append(d)
            finally:
                for srv in servers.values():
                    srv.close()
            errs = [str(nf.error) for nic in nics for nf in nic.fronts if nf.error is not None]
            if errs:
                runner.failed(progress, "netback netfront", RuntimeError("; ".join(errs)))
            for srv_proc in serves:
                if srv_proc.proc.poll() is not None:
                    runner.failed(progress, "pvback serve", RuntimeError(
                        f"exited {srv_proc.proc.returncode}: {srv_proc.log.read_text(errors='replace')[-800:]}"))
        finally:
            for nic in nics:
                asyncio.run(nic.close())
            for srv_proc in serves:
                srv_proc.close()
    return {"samples": [x.__dict__ for x in samples], "details": details, "serve_settings": settings}


def aggregate(samples: list[dict[str, Any]], details: list[dict[str, Any]]) -> list[analysis.Cell]:
    cells = analysis.aggregate(samples, relate=net_cells.relate, workload_order=WORKLOADS)
    net_cells.add_costs(cells, details)
    return cells


def markdown(result: dict[str, Any]) -> str:
    h = result["host"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Host: {h['cpu_model']}, {h['cpus_online']} vCPUs, kernel {h['kernel']}; {result.get('iperf3', '')}  ",
        f"Plan: {result['plan']['reps']} repetition(s) x {result['plan']['seconds']:g} s of iperf3 per cell "
        "(medians). Two OVN hosts joined by Geneve (OVS netdev datapath, no TSO); veth: veth ports on br-int at both "
        "ends; netback: pvback vifs at both ends. CPU: iperf3 + both daemons + the netfronts.",
        "",
        "| workload | path | Gbit/s | vs veth | CPU s/GB | daemons (cores) | daemon us/netif pkt |",
        "|---|---|---|---|---|---|---|",
    ]

    def f2(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, int | float) else "-"

    for c in result["cells"]:
        lines.append(f"| {c['workload']} | {c['system']} | {c['mb_s'] * 8 / 1e3:.2f} | {f2(c.get('ratio_to_veth'))} "
                     f"| {f2(c.get('cpu_s_per_gb'))} | {f2(c.get('daemon_cores'))} | "
                     f"{f2(c.get('daemon_cpu_us_per_packet'))} |")
    return "\n".join(lines) + "\n"


def main(quick: bool, out: str, *, argv: list[str] | None = None, plan: Plan | None = None) -> int:
    from perf import ovn
    from perf.report import target_lines

    plan = plan or Plan.make(quick)
    gone = ovn.missing() + [t for t in ("iperf3", "ip", "ethtool") if shutil.which(t) is None]
    if gone:
        print(f"pvback bench net --switch ovn: not installed: {', '.join(gone)} (./dev installs them)",
              file=sys.stderr)
        return 1
    if runner.not_root("pvback bench net --switch ovn"):
        return 1

    def body(out_dir: Path, work: Path, progress: Progress) -> int:
        host = runner.host_description({})
        runner.FAILURES.clear()
        raw = run_all(plan, work, progress)
        cells = aggregate(raw["samples"], raw["details"])
        targets = net_cells.evaluate_targets(cells)
        result = {
            **runner.result_head(argv, f"pvback bench net --switch ovn{' --quick' if quick else ''}", host, plan),
            "iperf3": runner.first_line(["iperf3", "--version"]),
            "ovn": runner.first_line(["ovn-controller", "--version"]),
            "serve_settings": raw["serve_settings"], "failures": list(runner.FAILURES),
            "cells": cells, "targets": targets, "samples": raw["samples"], "details": raw["details"],
        }
        runner.write_report(out_dir, "bench-net-ovn", result, markdown(result), target_lines(targets))
        return 1 if result["failures"] else 0

    return runner.run_bench(out, "pvbovn-", body, tmp="/tmp")
