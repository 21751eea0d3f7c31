"""`pvback bench net --switch ovs` end to end with one-second cells: a private OVS (netdev datapath) with and
without userspace TSO, both paths (a veth port; netback's vif plugged by pvback through OVSDB) ran every workload,
the JSON and markdown hold the cells, ratios to the veth port and the switch's costs, and no namespace or OVS
process is left.  No throughput goal asserted (the machine is shared): only that every number is there and
consistent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backends.daemon.cli import UsageError, build_parser
from perf import net_cells, net_switch

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("iperf3") is None or shutil.which("ovs-vswitchd") is None,
                                 reason="iperf3 or Open vSwitch is not installed (./dev installs them)")]


def test_cli_parses_bench_net_switch() -> None:
    a = build_parser().parse_args(["bench", "net", "--switch", "ovs", "--quick", "--out", "x"])
    assert (a.what, a.switch, a.quick, a.out) == ("net", "ovs", True, "x")
    assert build_parser().parse_args(["bench", "net"]).switch is None
    with pytest.raises(UsageError, match="nope"):
        build_parser().parse_args(["bench", "net", "--switch", "nope"])


def test_bench_tpm_refuses_a_switch(capsys: pytest.CaptureFixture[str]) -> None:
    from backends.daemon.bench_cmd import cmd_bench

    assert cmd_bench(build_parser().parse_args(["bench", "tpm", "--switch", "ovs"])) == 2
    assert "--switch is for `pvback bench net`" in capsys.readouterr().err


def our_ovs_children() -> list[str]:
    """OVS daemons whose parent is this process (PrivateOvs execs them as its children); other people's OVS on
    the machine are none of our business."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,comm="], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines()
            if ln.split()[1:2] == [str(os.getpid())] and ln.split()[2:3] in (["ovs-vswitchd"], ["ovsdb-server"])]


def test_bench_net_ovs_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = net_cells.Plan(quick=True, reps=1, seconds=1.0, costs_frames=2000)
    out = tmp_path / "out"
    assert net_cells.main(True, str(out), plan=plan, switch="ovs",
                          argv=["pvback", "bench", "net", "--switch", "ovs", "(tiny)"]) == 0
    assert "vs veth port" in capsys.readouterr().out
    data = json.loads((out / "bench-net-ovs.json").read_text())
    assert data["failures"] == []
    md = (out / "bench-net-ovs.md").read_text()
    assert md.startswith("Command: `pvback bench net --switch ovs (tiny)`") and "vswitchd us/dp pkt" in md
    cells = {(c["store"], c["workload"], c["system"]): c for c in data["cells"]}
    assert set(cells) == {(m, w, s) for m in net_switch.OVS_MODES for w in net_switch.WORKLOADS
                          for s in ("veth", "netback")}
    for (mode, wl, system), c in cells.items():
        assert c["n"] == 1 and c["mb_s"] > 0 and c["cpu_s_per_gb"] > 0, c
        # ovs-vswitchd did work in every window, and its datapath counted the packets it took in.
        assert c["switch_cpu_s_per_gb"] > 0 and c["switch_us_per_dp_packet"] > 0 and c["dp_pps"] > 0, c
        if wl.startswith("udp"):
            assert c["iops"] > 1000 and c["dp_packets_per_rx_packet"] > 0, c
            # Every datagram the sender got out arrived at a bridge port (the port's kernel counter).
            assert c["ports_rx_pps"] >= c["iops"] * 0.9 and 0 < c["dp_taken_share"] <= 1.05, c
        if system == "veth":
            assert "ratio_to_veth" not in c and c["backend_cpu_us_per_op"] is None
            continue
        veth = cells[(mode, wl, "veth")]
        want = c["mb_s"] / veth["mb_s"] if wl.startswith("tcp") else c["iops"] / veth["iops"]
        assert c["ratio_to_veth"] == pytest.approx(want)
        assert c["daemon_cpu_us_per_packet"] > 0 and c["daemon_cpu_s_per_gb_rx"] > 0, c
        if wl.startswith("tcp"):  # GSO crosses the rings only when the switch can carry it
            assert (c["bytes_per_ring_packet"] > 1514) == (mode == "ovs+tso"), c
    for mode, m in data["switch"].items():
        # pvback plugged the vif into the bridge as an OVS port of its own (AF_PACKET: "system").
        assert "vif" in m["dpif_show"] and "pv-peer" in m["dpif_show"] and "pv-vguest" in m["dpif_show"], m
        assert m["userspace_tso"] == (mode == "ovs+tso") and m["too_big_drops_logged"] == 0, m
    targets = {t["target"]: t for t in data["targets"]}
    assert len(targets) == len(net_switch.OVS_MODES) * len(net_switch.WORKLOADS)
    assert all(t["held"] in (True, False) and t["goal"] in (0.8, 0.5) for t in targets.values())
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"pvsw-h-{os.getpid()}" not in left and f"pvbn-g1-{os.getpid()}" not in left, left
    assert our_ovs_children() == []  # stopped, by PID
