"""`pvback bench --guests` end to end at the smallest size: guests in processes of their own start together on
one daemon, fio runs the same number of jobs on the same files, and the output has the promised shape (table,
JSON, targets, plots).  No timing assertions beyond what a cap means (CI machines are shared and slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from perf import blk_guests, guests_ab

pytestmark = pytest.mark.timeout(300)


def test_jain_and_worst_share() -> None:
    assert blk_guests.jain([5, 5, 5, 5]) == pytest.approx(1.0)
    assert blk_guests.jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert blk_guests.worst_share([2, 4, 6]) == pytest.approx(0.5)


def test_guests_ab_variants_and_disks() -> None:
    """An A/B variant's `store` picks the disks (null: no data), every other key is an integer [blk] key."""
    assert guests_ab.parse_variant("nodata:store=null,pumps=2") == ("nodata", {"pumps": 2}, "null")
    assert guests_ab.parse_variant("data:") == ("data", {}, "tmpfs")
    with pytest.raises(ValueError, match="store 'nvme' is not tmpfs or null"):
        guests_ab.parse_variant("x:store=nvme")
    assert blk_guests.disk_params(Path("/dev/shm/g0.img")) == "aio:/dev/shm/g0.img"
    assert blk_guests.disk_params("null:16777216") == "null:16777216"


def step(n: int, per: list[float]) -> blk_guests.Step:
    return blk_guests.Step(n=n, blk_iops=sum(per), blk_mb_s=0.0, fio_iops=1.0, fio_mb_s=0.0, ratio_to_fio=sum(per),
                           jain=blk_guests.jain(per), worst_share=blk_guests.worst_share(per), fio_jain=1.0,
                           fio_engine="psync", daemon_threads=2.0, daemon_rss_mib=1.0, daemon_cpu_per_guest=0.1,
                           per_guest_iops=per)


def test_summary_takes_medians_and_judges_collapse_per_round() -> None:
    """Round 2 is slow everywhere (a busy minute): its raw IOPS are half the others', yet its 32-guest step
    stands at the same 0.8 of its own round's best, so the median of "over best" is 0.8."""
    rounds = [[step(1, [400.0]), step(32, [10.0] * 32)],
              [step(1, [200.0]), step(32, [5.0] * 32)],
              [step(1, [400.0]), step(32, [9.0] * 31 + [1.0])]]
    one, many = blk_guests.summarize(rounds)
    assert one["n"] == 1 and one["over_best"] == 1.0
    assert one["blk_iops"] == 400.0 and (one["blk_iops_min"], one["blk_iops_max"]) == (200.0, 400.0)
    assert many["rounds"] == 3 and many["over_best"] == pytest.approx(0.8)
    assert (many["over_best_min"], many["over_best_max"]) == (pytest.approx(0.7), pytest.approx(0.8))
    assert many["blk_iops"] == 280.0
    assert many["jain"] == pytest.approx(1.0) and many["jain_min"] < 0.99
    assert len(many["shares"]) == 96 and min(many["shares"]) == pytest.approx(1.0 / (280.0 / 32))


def test_bench_guests_tiny(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shm = set(Path("/dev/shm").glob("pvback-guests-*"))
    res = blk_guests.run([1, 2], True, out, print, seconds=0.5, warmup=0.2, cap_seconds=1.0, hostile_reps=1,
                         rounds=2, image_mib=4)
    assert set(Path("/dev/shm").glob("pvback-guests-*")) == shm  # the images are gone again
    data = json.loads((out / "guests.json").read_text())
    assert [[s["n"] for s in r] for r in data["scaling_rounds"]] == [[1, 2], [1, 2]]
    for r in data["scaling_rounds"]:
        for s in r:
            assert len(s["per_guest_iops"]) == s["n"] and all(x > 0 for x in s["per_guest_iops"])
            assert s["blk_iops"] == pytest.approx(sum(s["per_guest_iops"]))
            assert s["fio_iops"] > 0 and s["ratio_to_fio"] == pytest.approx(s["blk_iops"] / s["fio_iops"])
            assert 0 < s["jain"] <= 1.0 + 1e-9 and 0 < s["worst_share"] <= 1.0 + 1e-9
            assert s["daemon_threads"] >= 1 + s["n"]  # at least the loop thread and one pump per guest
            assert s["daemon_rss_mib"] > 0
    assert [s["n"] for s in data["scaling"]] == [1, 2]
    for s in data["scaling"]:
        assert s["rounds"] == 2 and len(s["shares"]) == 2 * s["n"]
        assert s["blk_iops_min"] <= s["blk_iops"] <= s["blk_iops_max"]
    assert set(data["targets"]["jain_holds_every_round"]) == {"1", "2"}
    assert data["targets"]["rounds"] == 2 and "median of 2 interleaved rounds" in (out / "guests.md").read_text()
    cap = data["cap"]
    assert 0 < cap["capped_iops"] < 2 * cap["cap_iops"] < cap["neighbour_iops"], cap
    assert {h["pause_us"] for h in data["hostile_reps"]} == {0, 5000}
    for h in data["hostile_reps"]:
        assert h["healthy_with_hostile_iops"] > 0 and h["hostile_notifies"] > 0
    assert set(data["targets"]) >= {"jain_min", "cap_ratio", "hostile_share_of_fair_median"}
    table = (out / "guests.md").read_text()
    assert "| guests | blk IOPS" in table and "Cap: a guest capped" in table
    assert res["plots"] and all(Path(p).exists() for p in res["plots"])


def test_split_placement_keeps_the_guests_off_the_daemons_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--placement split`: the daemon on the first CPU, every guest process (healthy, capped, hostile) on the
    others, as dom0 and guests on vCPUs of their own under Xen."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.fail("this machine kind has 2 vCPUs; the split placement needs 2")
    daemon, guests = blk_guests.split_cpus()
    assert daemon == {min(allowed)} and guests == allowed - daemon
    seen: dict[str, list[Any]] = {"serve": [], "guests": []}
    from perf.runner import Serve as real_serve
    from perf.runner import spawn as real_spawn

    def serve(*a: Any, **kw: Any) -> Any:
        seen["serve"].append(kw.get("cpus"))
        return real_serve(*a, **kw)

    def spawn(argv: list[str], log: Path, **kw: Any) -> Any:
        seen["guests"].append(kw.get("cpus"))
        return real_spawn(argv, log, **kw)

    monkeypatch.setattr(blk_guests, "Serve", serve)
    monkeypatch.setattr(blk_guests, "spawn", spawn)
    out = tmp_path / "out"
    blk_guests.run([1, 2], True, out, print, seconds=0.5, warmup=0.2, cap_seconds=1.0, hostile_reps=1, rounds=1,
                   image_mib=4, placement="split")
    assert seen["serve"] and all(c == daemon for c in seen["serve"])  # the scaling daemon and the hostile ones
    # 1 + 2 scaling guests, capped + free, and the hostile case with the pause off and on: alone, pair, poller
    # pair, hostile pair
    assert len(seen["guests"]) == 3 + 2 + 2 * 7 and all(c == guests for c in seen["guests"])
    data = json.loads((out / "guests.json").read_text())
    assert data["placement"] == "split" and data["blk"]["pumps"] == 1
    assert all(s["blk_iops"] > 0 for s in data["scaling"])
    assert f"the daemon on CPU {sorted(daemon)}" in (out / "guests.md").read_text()


def test_cli_placement_is_for_the_guests_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    from backends.daemon.bench_cmd import cmd_bench
    from backends.daemon.cli import UsageError, build_parser

    a = build_parser().parse_args(["bench", "--guests", "1", "2", "--placement", "split"])
    assert (a.guests, a.placement) == ([1, 2], "split")
    assert build_parser().parse_args(["bench", "--guests", "1"]).placement == "shared"
    with pytest.raises(UsageError, match="nope"):
        build_parser().parse_args(["bench", "--guests", "1", "--placement", "nope"])
    assert cmd_bench(build_parser().parse_args(["bench", "--placement", "split"])) == 2
    assert "--placement is for the many-guests benchmark" in capsys.readouterr().err
