"""`pvback bench --guests` end to end at the smallest size: guests in processes of their own start together on
one daemon, fio runs the same number of jobs on the same files, and the output has the promised shape (table,
JSON, targets, plots).  No timing assertions beyond what a cap means (CI machines are shared and slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perf import blk_guests

pytestmark = pytest.mark.timeout(300)


def test_jain_and_worst_share() -> None:
    assert blk_guests.jain([5, 5, 5, 5]) == pytest.approx(1.0)
    assert blk_guests.jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert blk_guests.worst_share([2, 4, 6]) == pytest.approx(0.5)


def test_bench_guests_tiny(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shm = set(Path("/dev/shm").glob("pvback-guests-*"))
    res = blk_guests.run([1, 2], True, out, print, seconds=0.5, warmup=0.2, cap_seconds=1.0, hostile_reps=1,
                         image_mib=4)
    assert set(Path("/dev/shm").glob("pvback-guests-*")) == shm  # the images are gone again
    data = json.loads((out / "guests.json").read_text())
    assert [s["n"] for s in data["scaling"]] == [1, 2]
    for s in data["scaling"]:
        assert len(s["per_guest_iops"]) == s["n"] and all(x > 0 for x in s["per_guest_iops"])
        assert s["blk_iops"] == pytest.approx(sum(s["per_guest_iops"]))
        assert s["fio_iops"] > 0 and s["ratio_to_fio"] == pytest.approx(s["blk_iops"] / s["fio_iops"])
        assert 0 < s["jain"] <= 1.0 + 1e-9 and 0 < s["worst_share"] <= 1.0 + 1e-9
        assert s["daemon_threads"] >= 1 + s["n"]  # at least the loop thread and one pump per guest
        assert s["daemon_rss_mib"] > 0
    cap = data["cap"]
    assert 0 < cap["capped_iops"] < 2 * cap["cap_iops"] < cap["neighbour_iops"], cap
    assert {h["pause_us"] for h in data["hostile_reps"]} == {0, 5000}
    for h in data["hostile_reps"]:
        assert h["healthy_with_hostile_iops"] > 0 and h["hostile_notifies"] > 0
    assert set(data["targets"]) >= {"jain_min", "cap_ratio", "hostile_share_of_fair_median"}
    table = (out / "guests.md").read_text()
    assert "| guests | blk IOPS" in table and "Cap: a guest capped" in table
    assert res["plots"] and all(Path(p).exists() for p in res["plots"])
