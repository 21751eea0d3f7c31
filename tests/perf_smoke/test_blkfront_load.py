"""The C load generator's pieces that need no backend: the latency histogram and the refusal of bad
configurations (a benchmark must fail loudly, not measure something else)."""

from __future__ import annotations

import ctypes
import mmap

import pytest

import backends._native
from backends._guest_native import ffi, lib
from backends.native.ring import FrontRing


@pytest.mark.parametrize("ns", [0, 1, 31, 32, 33, 63, 64, 100, 999, 4096, 12_345, 1_000_000, 7_654_321_000])
def test_bucket_value_is_within_three_percent(ns: int) -> None:
    v = int(lib.pv_load_bucket_value(lib.pv_load_bucket(ns)))
    assert abs(v - ns) <= max(1, ns * 0.032)


def test_buckets_are_monotonic() -> None:
    prev = -1
    for b in range(int(lib.PV_LOAD_HIST_BUCKETS) - 1):
        v = int(lib.pv_load_bucket_value(b))
        assert v > prev
        assert int(lib.pv_load_bucket(v)) == b
        prev = v


def test_percentiles_nearest_rank() -> None:
    res = ffi.new("struct pv_load_result *")
    for ns, n in ((1000, 90), (2000, 9), (50_000, 1)):
        res.hist[lib.pv_load_bucket(ns)] += n
    p50, p99, p100 = (int(lib.pv_load_percentile(res, p)) for p in (50.0, 99.0, 100.0))
    assert abs(p50 - 1000) < 40 and abs(p99 - 2000) < 70 and abs(p100 - 50_000) < 1600
    assert int(lib.pv_load_percentile(ffi.new("struct pv_load_result *"), 50.0)) == 0


def test_the_backend_module_has_no_load_generator() -> None:
    """The load generator is a guest's code: it lives in backends._guest_native, not linked into the backend."""
    for name in ("pv_load_run", "pv_load_bucket", "pv_load_percentile"):
        assert not hasattr(backends._native.lib, name)
        assert not hasattr(ctypes.CDLL(backends._native.__file__), name)
        assert hasattr(lib, name)


def _run(**over: int) -> tuple[int, str]:
    mm = mmap.mmap(-1, 4096)
    ring = FrontRing(mm, 1, 112)
    cfg = ffi.new("struct pv_load_config *")
    cfg.abi, cfg.nqueues, cfg.qd, cfg.bs, cfg.read_pct, cfg.random = 2, 1, 4, 4096, 100, 1
    cfg.region_bytes, cfg.max_ops = 1 << 20, 10
    for k, v in over.items():
        setattr(cfg, k, v)
    q = ffi.new("struct pv_load_queue[]", 1)
    q[0].ring = ffi.cast("struct pv_front_ring *", ring.c)
    q[0].evtchn = ffi.cast("struct pv_evtchn *", 1)  # never used: every case is refused before any I/O
    refs = ffi.new("uint32_t[]", 64)
    pages = ffi.new("struct pv_load_pages *")
    pages.data_refs, pages.segs_per_req = refs, 1
    res = ffi.new("struct pv_load_result *")
    err = ffi.new("char[]", 256)
    rc = int(lib.pv_load_run(cfg, q, pages, res, err, 256))
    del ring
    return rc, ffi.string(err).decode()


@pytest.mark.parametrize(("over", "msg"), [
    ({"qd": 64}, "free slots"),
    ({"bs": 1000}, "multiple of 512"),
    ({"bs": 8192}, "pages per request"),
    ({"abi": 9}, "unknown ABI"),
    ({"max_ops": 0}, "neither a duration"),
    ({"read_pct": 101}, "read_pct"),
    ({"region_bytes": 512}, "smaller than one request"),
    ({"nqueues": 0}, "nqueues"),
])
def test_bad_configurations_are_refused(over: dict[str, int], msg: str) -> None:
    rc, err = _run(**over)
    assert rc == -int(lib.PV_LOAD_EINVAL)
    assert msg in err
