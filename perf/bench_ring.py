"""Slots per second through the shared ring: (a) a pure C loop over csrc/ring.c, (b) the same calls made from
Python through the cffi module in batches of 32, and the ratio (b)/(a) measured in the same run.

The project's target is ratio >= 0.5: Python may cost at most as much as the ring work itself, because it runs
once per batch, never per slot.  Run: `.venv/bin/python -m pytest perf/bench_ring.py -q -s`.
"""

from __future__ import annotations

import mmap
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perf._build import build

SLOT = 112  # blkif x86_64 request
RSP = 16  # blkif x86_64 response
BATCH = 32
PAGES = 1  # 32 slots: one batch fills the ring


@dataclass(frozen=True)
class RingRates:
    c_slots_per_s: float
    cffi_slots_per_s: float

    @property
    def ratio(self) -> float:
        return self.cffi_slots_per_s / self.c_slots_per_s


CHUNK = 8_192  # slots per timed part: a few ms, short enough to often run undisturbed on a shared machine


def c_loop_rate(slots: int, *, batch: int = BATCH, out_dir: Path | None = None) -> float:
    """(a): slots/s of the fastest CHUNK-sized part, by perf/ring_loop.c's own clock."""
    exe = build("ring_loop", with_ring=True, out_dir=out_dir)
    chunks = max(1, slots // CHUNK)
    proc = subprocess.run(
        [str(exe), str(slots), str(batch), str(SLOT), str(RSP), str(PAGES), str(chunks)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    fields = dict(kv.split("=", 1) for kv in proc.stdout.split())
    if int(fields["slots"]) < slots // chunks * chunks:
        raise RuntimeError(f"ring_loop moved {fields['slots']} of {slots} slots")
    return float(fields["best_slots_per_s"])


class CffiRingLoop:
    """(b): the same per-batch calls as ring_loop.c, through the raw cffi functions on preallocated buffers."""

    def __init__(self, batch: int = BATCH) -> None:
        from backends.native import ffi, lib
        from backends.native.ring import BackRing, FrontRing

        self.lib: Any = lib
        self.batch = batch
        self.mm = mmap.mmap(-1, PAGES * mmap.PAGESIZE)
        self.front = FrontRing(self.mm, PAGES, SLOT)
        self.back = BackRing(self.mm, PAGES, SLOT)
        if self.front.size < batch:
            raise ValueError(f"batch {batch} does not fit a {self.front.size}-slot ring")
        self.reqs = ffi.new("uint8_t[]", bytes((i * 7) & 0xFF for i in range(batch * SLOT)))
        self.bout = ffi.new("uint8_t[]", batch * SLOT)
        self.rsps = ffi.new("uint8_t[]", b"\x01" * (batch * RSP))
        self.fout = ffi.new("uint8_t[]", batch * RSP)

    def run(self, slots: int) -> int:
        """Move at least `slots` requests and their responses; returns how many."""
        lib, f, b = self.lib, self.front.c, self.back.c
        put, fpush, consume = lib.pv_front_ring_put_requests, lib.pv_front_ring_push, lib.pv_back_ring_consume
        respond, fconsume = lib.pv_back_ring_respond, lib.pv_front_ring_consume
        reqs, bout, rsps, fout, batch = self.reqs, self.bout, self.rsps, self.fout, self.batch
        done = 0
        while done < slots:
            put(f, reqs, batch, SLOT)
            fpush(f)
            got = consume(b, bout, batch)
            if got <= 0:
                raise RuntimeError(f"consume returned {got}")
            respond(b, rsps, got, RSP)
            fconsume(f, fout, batch, RSP)
            done += got
        return done

    def rate(self, slots: int) -> float:
        """Slots/s of the fastest CHUNK-sized part, as c_loop_rate measures."""
        self.run(slots // 10 + self.batch)  # warm up
        best = 0.0
        for _ in range(max(1, slots // CHUNK)):
            t0 = time.perf_counter()
            done = self.run(min(slots, CHUNK))
            best = max(best, done / (time.perf_counter() - t0))
        return best

    def close(self) -> None:
        del self.front, self.back
        self.mm.close()


def measure(slots: int, *, rounds: int = 3, out_dir: Path | None = None) -> RingRates:
    """Best-of-`rounds` for both paths, interleaved so that both see the same machine load."""
    loop = CffiRingLoop()
    try:
        c_rates, py_rates = [], []
        for _ in range(rounds):
            c_rates.append(c_loop_rate(slots, out_dir=out_dir))
            py_rates.append(loop.rate(slots))
    finally:
        loop.close()
    return RingRates(max(c_rates), max(py_rates))


# ---- pytest-benchmark entry points --------------------------------------------------------------------------

N_SLOTS = 2_000_000


def test_ring_c_loop(benchmark: Any) -> None:
    rates: list[float] = []
    benchmark.pedantic(lambda: rates.append(c_loop_rate(N_SLOTS)), rounds=3, iterations=1)
    benchmark.extra_info["slots_per_s"] = max(rates)
    print(f"\nring C loop: {max(rates) / 1e6:.2f} M slots/s (median {statistics.median(rates) / 1e6:.2f})")


def test_ring_cffi_batch(benchmark: Any) -> None:
    loop = CffiRingLoop()
    try:
        benchmark(loop.run, BATCH)  # one batch per call: the figure is time per 32 slots
        per_batch = benchmark.stats.stats.min
        benchmark.extra_info["slots_per_s"] = BATCH / per_batch
        print(f"\nring cffi batch {BATCH}: {BATCH / per_batch / 1e6:.2f} M slots/s ({per_batch * 1e6:.2f} us/batch)")
    finally:
        loop.close()


def test_ring_cffi_vs_c_ratio(benchmark: Any) -> None:
    result: list[RingRates] = []
    benchmark.pedantic(lambda: result.append(measure(N_SLOTS // 4)), rounds=1, iterations=1)
    r = result[0]
    benchmark.extra_info.update(c=r.c_slots_per_s, cffi=r.cffi_slots_per_s, ratio=r.ratio)
    verdict = "meets" if r.ratio >= 0.5 else "BELOW"
    print(
        f"\nring slots/s: C {r.c_slots_per_s / 1e6:.2f} M, cffi batch {BATCH} {r.cffi_slots_per_s / 1e6:.2f} M,"
        f" ratio {r.ratio:.2f} ({verdict} the 0.5 target)"
    )
