"""`pvback bench net --switch SWITCH`: netback with its vif plugged into a software switch, against a plain veth
port on the same switch, in the same run.

One function per switch in SWITCHES (`ovs` here); each yields the same shape of result (samples, details, costs),
aggregated, judged and rendered here.  The workloads, the iperf3 driver, the netback guest and the cost model
are perf/net_cells.py's.

`ovs`: a private Open vSwitch (perf/ovs.py: ovsdb-server + ovs-vswitchd, netdev datapath — this kernel has no
openvswitch module — started from a private directory and stopped by PID) in a "host" namespace, with one bridge.
On it:
  - the peer: a namespace on a veth whose host end is a bridge port (the iperf3 server runs there);
  - veth:     a "guest" namespace on another veth port (no netback: the switch's own cost between two stacks);
  - netback:  the emulated guest's namespace, its tap -> the C netfront -> netif rings -> `pvback serve` (in the
              host namespace) -> the vif tap, which pvback plugs into the bridge through OVSDB (`pvback attach
              nic --bridge`).
Both paths run every workload, taking turns within each repetition, twice: with OVS as it comes
(`userspace-tso-enable` off: the netdev datapath drops frames above the MTU and loses partial checksums, so the
veth ends run with `tx off` and pvback offers the guest no GSO; ovs-userspace.md §3c/§3e) and with
`other_config:userspace-tso-enable=true` (set before vswitchd starts; default offloads, GSO offered).  Cell
store = the OVS mode (`ovs`, `ovs+tso`).

Costs measured per window, beside net_cells' own: ovs-vswitchd's CPU (from /proc, by PID) and its datapath's
packet count (`dpctl/show -s` lookups: every packet the datapath took in, from any port), so the switch's CPU per
packet on the tap port (netback) and on the veth port are compared in the same run; CPU per GB split by process
(iperf3 both ends, vswitchd, pvback serve, the netfront).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from perf import analysis, net_cells, runner
from perf.analysis import Cell, CellKey, Sample
from perf.net_cells import (
    PEER_V4,
    IperfServer,
    NetbackNic,
    NetbackTopology,
    Plan,
    Topology,
    measure_rounds,
    parse_workload,
    proc_cpu_s,
)
from perf.ovs import PrivateOvs, veth_peer  # at import: it opens libuuid's clock file once, in the main thread
from perf.runner import Progress, Serve, simulator

QUEUES = [1]  # the netdev datapath polls every non-PMD port from one thread: a second queue adds no path
WORKLOADS = [w for w in net_cells.WORKLOADS if parse_workload(w)[2] in QUEUES]
OVS_MODES = {"ovs": False, "ovs+tso": True}  # cell store -> other_config:userspace-tso-enable
BRIDGE = "pvbr0"
NETBACK_V4 = net_cells.GUEST_V4
VETH_V4 = "198.18.0.3"  # both guests sit on the one bridge: their own addresses


# ---- Open vSwitch -------------------------------------------------------------------------------------------


_LOOKUPS = re.compile(r"lookups: hit:(\d+) missed:(\d+) lost:(\d+)")
_PORT = re.compile(r"^\s*port \d+: (\S+)")
_DROPPED = re.compile(r"^\s*(RX|TX) packets:(\d+) errors:(\d+) dropped:(\d+)")


def ovs_appctl(ovs: Any, *args: str) -> str:
    # -t needs the control socket's absolute path (ovs-userspace.md §1).
    res = subprocess.run(["ovs-appctl", "-t", f"{ovs.dir}/ovs-vswitchd.ctl", *args], capture_output=True,
                         text=True, timeout=10, env=ovs.env)
    if res.returncode != 0:
        raise RuntimeError(f"ovs-appctl {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def dp_counters(ovs: Any) -> dict[str, float]:
    """The netdev datapath's packet counts: `dp_packets` = every packet it took in (lookups hit + missed: one
    per packet received on any port), `dp_lost` = upcalls lost, and per port the drops it counted."""
    text = ovs_appctl(ovs, "dpctl/show", "-s")
    out: dict[str, float] = {}
    m = _LOOKUPS.search(text)
    if m is None:
        raise RuntimeError(f"dpctl/show -s: no lookups line in {text[:300]!r}")
    out["dp_packets"] = float(int(m[1]) + int(m[2]))
    out["dp_missed"] = float(m[2])
    out["dp_lost"] = float(m[3])
    port = ""
    for line in text.splitlines():
        if pm := _PORT.match(line):
            port = pm[1]
        elif (dm := _DROPPED.match(line)) and port:
            out[f"port_{port}_{dm[1].lower()}_packets"] = float(dm[2])
            out[f"port_{port}_{dm[1].lower()}_dropped"] = float(dm[4])
    return out


def switch_counters(ovs: Any) -> dict[str, float]:
    assert ovs.vswitchd is not None
    return {"switch_cpu_s": proc_cpu_s(ovs.vswitchd.pid), **dp_counters(ovs)}


class OvsVethTopology(Topology):
    """The reference: a guest namespace on a veth port of the bridge (no netback)."""

    def __init__(self, guest: Any, peer: Any, ovs: Any) -> None:
        self.guest, self.peer, self.ovs = guest, peer, ovs

    def counters(self) -> dict[str, float]:
        return switch_counters(self.ovs)


class OvsNetbackTopology(NetbackTopology):
    def __init__(self, nic: NetbackNic, serve: Serve, peer: Any, ovs: Any) -> None:
        super().__init__(nic, serve)
        self.peer, self.ovs = peer, ovs

    def counters(self) -> dict[str, float]:
        return super().counters() | switch_counters(self.ovs)


@contextlib.contextmanager
def private_ovs(host: Any, userspace_tso: bool) -> Iterator[Any]:
    ovs = PrivateOvs(host, userspace_tso=userspace_tso).start()
    try:
        ovs.add_bridge(BRIDGE)
        yield ovs
    finally:
        ovs.stop()


def bridge_port(ovs: Any, host: Any, ns: Any, host_end: str, addr: str, tx_csum: bool) -> None:
    """A veth from the host namespace into `ns` (eth0, `addr`), its host end a port of the bridge.  Without
    userspace TSO the netdev datapath loses partial checksums: the namespace end then checksums in software."""
    veth_peer(host, ns, host_end, [f"{addr}/24"])
    if not tx_csum:
        r = subprocess.run(ns.argv("ethtool", "-K", "eth0", "tx", "off"), capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ethtool -K eth0 tx off: {r.stderr.strip()}")
    ovs.vsctl("--timeout=20", "add-port", BRIDGE, host_end)


def reach(ns: Any, what: str) -> None:
    """A few pings first: ARP resolved and the bridge's MAC table learned before anything is measured."""
    from backends.guests.netns import ping

    if not ping(ns, PEER_V4, count=3, timeout=2.0):
        raise RuntimeError(f"{what}: no ping reply from the peer {PEER_V4} through the bridge")


def run_ovs_mode(plan: Plan, work: Path, sim_dir: Path, store: str, tso: bool, samples: list[Sample],
                 details: list[dict[str, Any]], modes: dict[str, Any], progress: Progress) -> None:
    from backends.guests.netns import NetNS

    tag = f"{os.getpid()}"
    with NetNS(f"pvsw-h-{tag}") as host, NetNS(f"pvsw-p-{tag}") as peer, NetNS(f"pvsw-v-{tag}") as vguest, \
            private_ovs(host, tso) as ovs:
        bridge_port(ovs, host, peer, "pv-peer", PEER_V4, tx_csum=tso)
        bridge_port(ovs, host, vguest, "pv-vguest", VETH_V4, tx_csum=tso)
        serve = Serve(work, sim_dir, f"net-{store}", sections={"net": {"ovsdb": ovs.remote}},
                      settings={"backend_types": ["vif"], "netns": "host", "ovsdb": "private", "bridge": BRIDGE},
                      serve_keys={"backend_types": ["vif"]}, prefix=host.argv())
        server: IperfServer | None = None
        try:
            for q in QUEUES:
                nic = NetbackNic(tag, sim_dir, peer, q, progress, plan.datapath, plan.spin_us, bridge=BRIDGE,
                                 addr=NETBACK_V4, gso=tso)
                try:
                    asyncio.run(nic.connect())
                    reach(vguest, "veth port")
                    reach(nic.ns, "netback")
                    dpif = ovs_appctl(ovs, "dpif/show")
                    version = runner.run_text(["ovs-vswitchd", "--version"]).split() or ["?"]
                    modes[store] = {"userspace_tso": tso, "dpif_show": dpif, "ovs_version": version[-1]}
                    progress(f"{store}: {q} queue(s): veth port pv-vguest; netback guest {nic.guest.domid}, "
                             f"{nic.vif} plugged by pvback into {BRIDGE}")
                    server = server or IperfServer(peer, work)
                    topos: dict[str, Topology] = {"veth": OvsVethTopology(vguest, peer, ovs),
                                                  "netback": OvsNetbackTopology(nic, serve, peer, ovs)}
                    wls = [wl for wl in WORKLOADS if parse_workload(wl)[2] == q]
                    for s, d in measure_rounds(plan, wls, topos, dict.fromkeys(topos, server), progress,
                                               tag=f"{store} "):
                        samples.append(dataclasses.replace(s, store=store))
                        details.append(d | {"store": store})
                    errs = [str(nf.error) for nf in nic.fronts if nf.error is not None]
                    if errs:
                        runner.failed(progress, f"{store} netback {q}q netfront", RuntimeError("; ".join(errs)))
                except Exception as exc:
                    runner.failed(progress, f"{store} netback {q}q", exc)
                finally:
                    asyncio.run(nic.close())
            log = ovs.log("ovs-vswitchd")
            modes.setdefault(store, {})["too_big_drops_logged"] = log.count("Dropped packet: Too big")
            if serve.proc.poll() is not None:
                text = serve.log.read_text(errors="replace")[-800:]
                runner.failed(progress, f"{store} pvback serve",
                              RuntimeError(f"exited {serve.proc.returncode}: {text}"))
        finally:
            if server is not None:
                server.close()
            serve.close()


def run_ovs(plan: Plan, work: Path, progress: Progress) -> dict[str, Any]:
    from backends.guests.netns import NetNS

    samples: list[Sample] = []
    details: list[dict[str, Any]] = []
    modes: dict[str, Any] = {}
    with simulator(work) as sim_dir:
        for store, tso in OVS_MODES.items():
            try:
                run_ovs_mode(plan, work, sim_dir, store, tso, samples, details, modes, progress)
            except Exception as exc:
                runner.failed(progress, f"{store} set-up", exc)
    with NetNS(f"pvsw-c-{os.getpid()}") as ns:
        costs = net_cells.physical_costs(plan, ns, progress)
    return {"samples": [s.__dict__ for s in samples], "details": details, "costs": costs, "switch": modes}


SWITCHES: dict[str, Callable[[Plan, Path, Progress], dict[str, Any]]] = {"ovs": run_ovs}
NEEDS: dict[str, tuple[str, ...]] = {"ovs": ("ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl", "ovs-appctl",
                                             "ethtool")}


# ---- cells, targets, report ---------------------------------------------------------------------------------


def relate(c: Cell, by: Mapping[CellKey, Cell]) -> None:
    net_cells.relate(c, by)
    if "ref_system" in c:
        c["ref_system"] = "veth port"


def _switch_row(d: dict[str, Any]) -> dict[str, float]:
    """One window's switch costs: vswitchd CPU per datapath packet and per GB received, the datapath packets
    per packet received, drops."""
    dl, ip = d["deltas"], d["iperf"]
    scale = ip["seconds"] / ip["wall_s"] if ip["wall_s"] else 1.0
    cpu = dl.get("switch_cpu_s", 0.0) * scale
    gb = ip["bytes"] / 1e9
    pk = dl.get("dp_packets", 0.0)
    port_rx = sum(v for k, v in dl.items() if k.startswith("port_") and k.endswith("_rx_packets"))
    out = {"switch_cpu_s_per_gb": cpu / gb if gb else 0.0, "switch_cores": dl.get("switch_cpu_s", 0.0) / ip["wall_s"],
           "switch_us_per_dp_packet": dl.get("switch_cpu_s", 0.0) / pk * 1e6 if pk else 0.0,
           "dp_pps": pk / ip["wall_s"], "dp_lost": dl.get("dp_lost", 0.0),
           # What arrived at the switch's ports (the kernel's counters of each port's device) against what its
           # datapath took in: the rest was dropped in the kernel before vswitchd's one thread read it.
           "ports_rx_pps": port_rx / ip["wall_s"], "dp_taken_share": pk / port_rx if port_rx else 0.0,
           "port_dropped": sum(v for k, v in dl.items() if k.startswith("port_") and k.endswith("_dropped")),
           "daemon_cpu_s_per_gb_rx": (d["deltas"].get("daemon_cpu_s", 0.0) * scale) / gb if gb else 0.0}
    if "packets" in ip:
        out["dp_packets_per_rx_packet"] = pk / ip["packets"] if ip["packets"] else 0.0
    if "retransmits" in ip:
        out["retransmits"] = float(ip["retransmits"])
    return out


def aggregate(samples: list[dict[str, Any]], details: list[dict[str, Any]]) -> list[Cell]:
    cells = analysis.aggregate(samples, relate=relate, workload_order=WORKLOADS)
    net_cells.add_costs(cells, details)
    for c in cells:
        rows = [_switch_row(d) for d in details if d["workload"] == c["workload"] and d["system"] == c["system"]
                and d.get("store") == c["store"] and d["iperf"]["bytes"]]
        for k in rows[0] if rows else {}:
            c[k] = analysis.median([r[k] for r in rows])
    return cells


def evaluate_targets(cells: list[Cell]) -> list[dict[str, Any]]:
    return net_cells.evaluate_targets(cells, label=lambda c: f"{c['store']} {c['workload']}", vs="veth port")


def f2(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(result: dict[str, Any]) -> str:
    from perf.report import kpps, targets_table

    h = result["host"]
    co = result.get("costs") or {}
    sw = result.get("switch") or {}
    ver = next((m.get("ovs_version") for m in sw.values() if m.get("ovs_version")), "?")
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Host: {h['cpu_model']}, {h['cpus_online']} vCPUs ({h['virtualization']}), {h['mem_gib']} GiB, "
        f"kernel {h['kernel']}, {h['os']}; {result.get('iperf3', '')}; Open vSwitch {ver} (private, netdev "
        "datapath)  ",
        f"Plan: {result['plan']['reps']} repetition(s) x {result['plan']['seconds']:g} s of iperf3 per cell, "
        f"{'/'.join(str(q) for q in QUEUES)} queue(s); cells are medians. Paths on one bridge: `veth` = a guest "
        "namespace on a veth port (no netback), `netback` = the emulated guest's tap -> C netfront -> rings -> "
        "`pvback serve` -> vif tap, plugged by pvback through OVSDB. `ovs` = userspace TSO off (veth ends "
        "`tx off`, no GSO offered to the guest), `ovs+tso` = `other_config:userspace-tso-enable=true` (default "
        "offloads, GSO offered). UDP: 18-byte payloads (64-byte frames), unpaced, packets/s as received.",
        "",
        "| OVS | workload | path | Gbit/s | kpps | sent kpps | vs veth port | TCP retr | CPU s/GB | iperf3 s/GB | "
        "vswitchd s/GB | daemon s/GB | netfront s/GB | vswitchd cores | vswitchd us/dp pkt | port rx kpps | "
        "dp taken | dp pkts/rx pkt | daemon cores | daemon us/netif pkt |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        udp = not c["workload"].startswith("tcp")
        sent = f"{c['sent_pps'] / 1e3:.1f}" if c.get("sent_pps") else "-"
        lines.append(
            f"| {c['store']} | {c['workload']} | {c['system']} | {c['mb_s'] * 8 / 1e3:.2f} | "
            f"{kpps(c, udp)} | {sent} | {f2(c.get('ratio_to_veth'))} | "
            f"{'-' if udp else format(c.get('retransmits', 0.0), '.0f')} | {f2(c.get('cpu_s_per_gb'))} | "
            f"{f2(c.get('iperf_cpu_s_per_gb'))} | {f2(c.get('switch_cpu_s_per_gb'))} | "
            f"{f2(c.get('daemon_cpu_s_per_gb_rx')) if c['system'] == 'netback' else '-'} | "
            f"{f2(c.get('front_cpu_s_per_gb'))} | {f2(c.get('switch_cores'))} | "
            f"{f2(c.get('switch_us_per_dp_packet'))} | {c.get('ports_rx_pps', 0.0) / 1e3:.1f} | "
            f"{f2(c.get('dp_taken_share'))} | {f2(c.get('dp_packets_per_rx_packet'))} | "
            f"{f2(c.get('daemon_cores'))} | {f2(c.get('daemon_cpu_us_per_packet'))} |")
    lines += ["", "vswitchd us/dp pkt: ovs-vswitchd's CPU over the window divided by the packets its datapath took in "
              "(`dpctl/show -s` lookups, all ports, both directions); port rx kpps: packets arriving at the bridge's "
              "ports (their devices' kernel counters); dp taken: the share of those the datapath took in (the rest "
              "the kernel dropped before vswitchd's one thread read them); dp pkts/rx pkt: datapath packets per UDP "
              "datagram received (below 1: packets lost after the switch; OVS updates its lookup counters with a "
              "little lag, so one-second cells read a bit low)."]
    for store, m in sw.items():
        lines += ["", f"`{store}`: frames vswitchd logged as too big: {m.get('too_big_drops_logged', '?')}; "
                  "ports (`dpif/show`): " + " ".join(
                      ln.strip() for ln in str(m.get("dpif_show", "")).splitlines()[2:] if ln.strip())]
    if co:
        lines += ["", "Physical costs measured in the same run: "
                  f"memcpy {co['memcpy_ns_per_kib']:.1f} ns/KiB; the emulated grant copy "
                  f"{co.get('grant_copy_ns_per_kib', 0.0):.1f} ns/KiB; one write() of a 64-byte frame into a tap "
                  f"{co['tap_write_net_ns']:.0f} ns; one eventfd wake-up {co['wakeup_us']:.2f} us."]
    lines += targets_table(result, fmt=f2, failures=True)
    return "\n".join(lines) + "\n"


def main(switch: str, quick: bool, out: str, *, argv: list[str] | None = None, plan: Plan | None = None) -> int:
    from perf.report import target_lines

    plan = plan or Plan.make(quick)
    if switch not in SWITCHES:
        print(f"pvback bench net: no switch {switch!r} (known: {', '.join(SWITCHES)})", file=sys.stderr)
        return 1
    if runner.tools_missing(f"pvback bench net --switch {switch}", ("iperf3", "ip", "gcc", *NEEDS.get(switch, ()))):
        return 1
    if runner.not_root("pvback bench net"):
        return 1

    def body(out_dir: Path, work: Path, progress: Progress) -> int:
        host = runner.host_description({})
        progress(f"{runner.host_line(host)}; switch {switch}; "
                 f"{plan.reps} rep(s) x {plan.seconds:g} s per cell")
        runner.FAILURES.clear()
        raw = SWITCHES[switch](plan, work, progress)
        cells = aggregate(raw["samples"], raw["details"])
        targets = evaluate_targets(cells)
        result = {
            **runner.result_head(argv, f"pvback bench net --switch {switch}{' --quick' if quick else ''} --out {out}",
                                 host, plan),
            "iperf3": runner.first_line(["iperf3", "--version"]),
            "switch": raw["switch"],
            "failures": list(runner.FAILURES),
            "costs": raw["costs"],
            "cells": cells, "targets": targets, "samples": raw["samples"], "details": raw["details"],
        }
        runner.write_report(out_dir, f"bench-net-{switch}", result, markdown(result), target_lines(targets))
        return 0

    return runner.run_bench(out, "pvsw-", body, tmp="/tmp")



def rerender(path: str) -> str:
    """Cells, targets and markdown again from a bench-net-<switch>.json's raw samples and details."""
    from perf.report import rerender as again

    return again(path, aggregate, evaluate_targets, markdown)


if __name__ == "__main__":  # python -m perf.net_switch perf/results/net/bench-net-ovs.json
    print(rerender(sys.argv[1]))
