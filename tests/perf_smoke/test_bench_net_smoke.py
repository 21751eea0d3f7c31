"""`pvback bench net` end to end with one-second cells: both paths (veth, netback through `pvback serve` and the
C netfront) ran every workload, the JSON and markdown hold the promised cells, ratios and per-packet costs, and
the namespaces are gone afterwards.  No throughput goals asserted (CI machines are shared): only that every
number is there and consistent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backends.daemon.cli import build_parser
from perf import net_cells

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed (./dev installs it)")]


def test_cli_parses_bench_net() -> None:
    a = build_parser().parse_args(["bench", "net", "--quick", "--out", "x"])
    assert (a.what, a.quick, a.out) == ("net", True, "x")


def test_bench_net_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = net_cells.Plan(quick=True, reps=1, seconds=1.0, costs_frames=2000)
    out = tmp_path / "out"
    assert net_cells.main(True, str(out), plan=plan, argv=["pvback", "bench", "net", "(tiny)"]) == 0
    assert "vs veth" in capsys.readouterr().out
    data = json.loads((out / "bench-net.json").read_text())
    assert data["failures"] == []
    md = (out / "bench-net.md").read_text()
    assert md.startswith("Command: `pvback bench net (tiny)`") and "syscalls/pkt" in md
    cells = {(c["workload"], c["system"]): c for c in data["cells"]}
    assert set(cells) == {(w, s) for w in net_cells.WORKLOADS for s in net_cells.SYSTEMS}
    for (wl, system), c in cells.items():
        assert c["n"] == 1 and c["mb_s"] > 0 and c["cpu_s_per_gb"] > 0, c
        if wl.startswith("udp"):
            assert c["iops"] > 1000, c  # packets/s as the receiver counted them
        if system == "veth":
            assert "ratio_to_veth" not in c and c["backend_cpu_us_per_op"] is None
            continue
        veth = cells[(wl, "veth")]
        want = c["mb_s"] / veth["mb_s"] if wl.startswith("tcp") else c["iops"] / veth["iops"]
        assert c["ratio_to_veth"] == pytest.approx(want)
        # The daemon did the work, and each netif packet's costs were derived from its counters.
        assert c["daemon_cpu_us_per_packet"] > 0 and c["daemon_cpu_s_per_gb"] > 0 and c["ring_pps"] > 0, c
        assert c["front_tap_syscalls_per_packet"] >= 0.9, c  # at least one tap read or write per packet
        if wl.startswith("tcp"):
            assert c["bytes_per_ring_packet"] > 1514, c  # GSO: frames larger than the MTU crossed the rings
        else:
            assert c["bytes_per_ring_packet"] < 100, c
    targets = {t["target"]: t for t in data["targets"]}
    assert len(targets) == len(net_cells.WORKLOADS)
    assert all(t["held"] in (True, False) and t["goal"] in (0.8, 0.5) for t in targets.values())
    co = data["costs"]
    assert co["memcpy_ns_per_kib"] > 0 and co["tap_write_net_ns"] > 0 and co["wakeup_us"] > 0
    if shutil.which("perf"):  # the syscall probe is optional: it needs perf to attach to the daemon
        assert {p["workload"] for p in co["syscall_probes"]} == set(net_cells.WORKLOADS)
    assert all(p["syscalls_per_packet"] > 0 for p in co["syscall_probes"])
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"-{os.getpid()}" not in left, left
