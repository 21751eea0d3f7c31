"""`pvback bench net --switch ovn` end to end with one-second cells: both paths (veth ports, pvback vifs) crossed
the two OVN hosts for both TCP directions, the JSON and markdown hold the cells and the ratio targets, and every
namespace of the run is gone afterwards.  No throughput goal asserted (the machine is shared)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backends.daemon.cli import build_parser
from perf import net_cells, net_ovn
from tests.net import ovnbed

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(bool(ovnbed.missing()) or shutil.which("iperf3") is None,
                                 reason="OVN or iperf3 is not installed (./dev installs them)")]


def test_cli_parses_switch_ovn() -> None:
    a = build_parser().parse_args(["bench", "net", "--switch", "ovn", "--quick"])
    assert (a.what, a.switch, a.quick) == ("net", "ovn", True)


def test_bench_net_ovn_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = net_cells.Plan(quick=True, reps=1, seconds=1.0, costs_frames=0)
    out = tmp_path / "out"
    assert net_ovn.main(True, str(out), plan=plan, argv=["pvback", "bench", "net", "--switch", "ovn", "(tiny)"]) == 0
    assert "vs veth" in capsys.readouterr().out
    data = json.loads((out / "bench-net-ovn.json").read_text())
    assert data["failures"] == [] and data["ovn"].startswith("ovn-controller")
    assert (out / "bench-net-ovn.md").read_text().startswith("Command: `pvback bench net --switch ovn (tiny)`")
    cells = {(c["workload"], c["system"]): c for c in data["cells"]}
    assert set(cells) == {(w, s) for w in net_ovn.WORKLOADS for s in net_ovn.SYSTEMS}
    for (wl, system), c in cells.items():
        assert c["n"] == 1 and c["mb_s"] > 0, c
        if system == "netback":
            assert c["ratio_to_veth"] == pytest.approx(c["mb_s"] / cells[(wl, "veth")]["mb_s"])
            assert c["daemon_cpu_us_per_packet"] > 0 and c["ring_pps"] > 0, c  # the daemons carried it
            assert c["bytes_per_ring_packet"] <= 1514, c  # no GSO through Geneve on OVS 3.1
    assert {t["goal"] for t in data["targets"]} == {0.8} and len(data["targets"]) == len(net_ovn.WORKLOADS)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"pvovn-a-{os.getpid()}" not in left and f"pvovn-ng-{os.getpid()}" not in left, left
