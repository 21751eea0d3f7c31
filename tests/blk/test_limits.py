"""Per-disk limits, the pure part (backends/blk/limits.py: keys, values, defaults) and the C buckets' bounds and
counters (csrc/blklimit.h).  Enforcement through the daemon: tests/system/test_blk_limits.py."""

from __future__ import annotations

import pytest

from backends.blk.dataplane import DiskLimit
from backends.blk.limits import KEY_BPS, KEY_BURST, KEY_IOPS, IoLimits, limits_from_keys, parse_burst, parse_count
from backends.xenbus.keys import ProtocolError


@pytest.mark.parametrize("text, sizes, want", [
    ("0", False, 0), ("none", False, 0), ("Unlimited", False, 0), ("1500", False, 1500),
    ("2M", True, 2_000_000), ("2Mi", True, 2 << 20), ("10k", True, 10_000), ("1GiB", True, 1 << 30),
    ("512", True, 512), (" 7 ", False, 7),
])  # fmt: skip
def test_counts(text: str, sizes: bool, want: int) -> None:
    assert parse_count(text, "x", 10**12, sizes=sizes) == want


@pytest.mark.parametrize("text, sizes", [
    ("", False), ("-1", False), ("1.5", False), ("2M", False), ("1e6", True), ("10Q", True), ("0x10", True),
    ("1" * 16, False), ("2T", True),
])  # fmt: skip
def test_garbage_counts(text: str, sizes: bool) -> None:
    with pytest.raises(ProtocolError):
        parse_count(text, "x", 10**12 - 1, sizes=sizes)


def test_burst() -> None:
    assert parse_burst("0") == 0 and parse_burst("60000") == 60000
    for bad in ("60001", "-1", "1s", ""):
        with pytest.raises(ProtocolError):
            parse_burst(bad)


def test_keys_over_defaults() -> None:
    default = IoLimits(iops=100, bps=0, burst_ms=50)
    assert limits_from_keys({}, default) == default
    assert limits_from_keys({KEY_IOPS: "", KEY_BPS: None, KEY_BURST: " "}, default) == default
    assert limits_from_keys({KEY_IOPS: "0", KEY_BPS: "1Mi"}, default) == IoLimits(0, 1 << 20, 50)
    with pytest.raises(ProtocolError, match=KEY_IOPS):
        limits_from_keys({KEY_IOPS: "lots"}, default)
    assert IoLimits().describe() == "unlimited"
    assert IoLimits(5, 0, 10).describe() == "5 IOPS, burst 10 ms"


def test_c_buckets_refuse_out_of_range_and_report() -> None:
    lim = DiskLimit()
    assert lim.stats() | {"waits": 0} == {"iops": 0, "bps": 0, "burst_ms": 100, "waiting": 0, "waits": 0,
                                          "throttled_ns": 0, "admitted": 0}
    lim.set(1000, 5_000_000, 20)
    st = lim.stats()
    assert (st["iops"], st["bps"], st["burst_ms"]) == (1000, 5_000_000, 20)
    for bad in ((10**9, 0, 100), (0, 10**13, 100), (0, 0, 60_001)):
        with pytest.raises(ValueError):
            lim.set(*bad)
    assert lim.stats()["iops"] == 1000  # a refused change leaves the caps as they were
    lim.set(0, 0, 100)
    assert lim.stats()["iops"] == 0
