"""`pvback bench tpm` end to end with tiny counts: the guest path, the direct swtpm paths, the eventfd ping-pong
and the scale section all ran, and the JSON and markdown have the promised cells and derived ratios.  No timing
goals asserted (CI machines are shared): only that every number is there and internally consistent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backends.daemon.cli import UsageError, build_parser
from perf import tpm_cells

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
                                 reason="swtpm is not installed")]


def test_cli_parses_bench_what() -> None:
    p = build_parser()
    assert p.parse_args(["bench"]).what == "blk"
    a = p.parse_args(["bench", "tpm", "--quick", "--out", "x"])
    assert (a.what, a.quick, a.out) == ("tpm", True, "x")
    with pytest.raises(UsageError, match="invalid choice: 'nope'"):
        p.parse_args(["bench", "nope"])


def test_raw_commands_are_well_formed() -> None:
    for cmd in (tpm_cells.get_random(32), tpm_cells.pcr_extend(bytes(32)), tpm_cells.create_primary_ecc(),
                tpm_cells.sign(0x80000000, bytes(32)), tpm_cells.flush_context(0x80000000)):
        assert int.from_bytes(cmd[2:6], "big") == len(cmd)
    assert tpm_cells.get_random(32).hex() == "80010000000c0000017b0020"


def test_bench_tpm_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tpm_cells.Plan(quick=True, reps=1, rounds=30, warmup=3, scale_n=2, pingpong_rounds=2000)
    out = tmp_path / "out"
    assert tpm_cells.main(True, str(out), plan=plan, argv=["pvback", "bench", "tpm", "(tiny)"]) == 0
    assert "added p50 / ping-pong p50" in capsys.readouterr().out
    data = json.loads((out / "bench-tpm.json").read_text())
    assert data["failures"] == []
    assert (out / "bench-tpm.md").read_text().startswith("Command: `pvback bench tpm (tiny)`")
    ref = data["pingpong"][data["pingpong_ref"]]["p50_us"]
    assert ref > 0 and data["pingpong_after"][data["pingpong_ref"]]["p50_us"] > 0
    assert set(data["loadavg_1min"]) == {"before", "after_latency", "after_scale"}
    refs = {tpm_cells.STORE: ref, tpm_cells.STORE_1CPU: data["pingpong"]["same-cpu"]["p50_us"]}
    cells = {(c["store"], c["workload"], c["system"]): c for c in data["cells"]}
    assert set(cells) == ({(tpm_cells.STORE, w, s) for w in tpm_cells.COMMANDS for s in tpm_cells.SYSTEMS}
                          | {(tpm_cells.STORE_1CPU, w, s) for w in tpm_cells.COMMANDS for s in tpm_cells.SYSTEMS_1CPU})
    for (store, wl, system), c in cells.items():
        assert c["n"] == 1 and c["errors"] == 0 and c["iops"] > 0
        assert 0 < c["p50_us"] <= c["p99_us"]
        if system == "direct":
            assert "added_p50_us" not in c
            continue
        peer = cells[(store, wl, tpm_cells.PEER[system])]
        assert c["peer"] == tpm_cells.PEER[system]
        assert c["added_p50_us"] == pytest.approx(c["p50_us"] - peer["p50_us"])
        assert c["ratio_added_p50_to_pingpong"] == pytest.approx(c["added_p50_us"] / refs[store])
    for store in refs:
        assert cells[(store, "getrandom32", "guest")]["backend_cpu_us_per_op"] is not None
    assert cells[(tpm_cells.STORE, "getrandom32", "guest-asyncio")]["backend_cpu_us_per_op"] is not None
    targets = {t["target"]: t for t in data["targets"]}
    assert len(targets) == 2 * len(tpm_cells.COMMANDS)
    assert all(t["held"] in (True, False) and t["goal"] == 1.5 for t in targets.values())
    sc = data["scale"]
    assert sc["n"] == 2 and "error" not in sc and len(sc["startup_s"]) == 2
    assert all(s > 0 for s in sc["startup_s"]) and sc["swtpm_rss_per_vtpm_kib"] > 1000
    assert sc["memory_per_vtpm_kib"] == pytest.approx(sc["swtpm_rss_per_vtpm_kib"]
                                                      + sc["daemon_rss_growth_per_vtpm_kib"])
