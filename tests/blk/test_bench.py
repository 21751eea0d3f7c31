"""The bench helper runs (briefly) and every request in it completes OK; the numbers are printed, not judged."""

from __future__ import annotations

from . import bench


def test_bench_smoke(capsys: object) -> None:
    res = bench.main(30)
    assert set(res) == {"null/copy", "null/persistent", "tmpfs-inline/copy", "tmpfs-inline/persistent"}
    assert all(v > 0 for v in res.values())
