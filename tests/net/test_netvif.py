"""The vif's TX credit (csrc/netvif.c) at given instants: Linux netback's credit scheduler (tx_credit_exceeded,
tx_add_credit) with its 128 KiB burst allowance, and live rate changes; and the stalled-queue count behind the
carrier."""

from __future__ import annotations

from backends.native import ffi, lib
from backends.net.dataplane import VifShared

MS = 1_000_000  # ns


def take(v: VifShared, size: int, now: int) -> int | None:
    """None if the packet may go, else when the next refill is due."""
    wake = ffi.new("uint64_t *")
    return None if lib.pv_net_vif_take_credit(v.c, size, now, wake) else int(wake[0])


def test_unlimited_until_a_rate_is_set() -> None:
    v = VifShared()
    assert all(take(v, 65535, i) is None for i in range(100))


def test_credit_per_window_and_waits_for_the_refill() -> None:
    v = VifShared()
    v.set_rate(10_000, 100_000)  # 10 kB per 100 ms
    t0 = lib.pv_net_now_ns()
    assert take(v, 6000, t0) is None
    assert take(v, 4000, t0) is None
    wake = take(v, 1, t0 + 10 * MS)  # spent: wait for the end of the window
    assert wake is not None and t0 <= wake <= t0 + 100 * MS + MS
    assert take(v, 1, wake - 1) == wake
    assert take(v, 10_000, wake) is None  # the refill: one window's credit
    assert take(v, 1, wake + 1) is not None


def test_burst_allowance_lets_a_64k_frame_through_a_small_rate() -> None:
    """1000 bytes per ms: credit accumulates up to 128 KiB (not just 1000), so a GSO frame passes after enough
    windows instead of never."""
    v = VifShared()
    v.set_rate(1000, 1000)
    t = lib.pv_net_now_ns()
    waits = 0
    while take(v, 65535, t) is not None:
        waits += 1
        t += MS  # one refill per look: credit grows by 1000 each time
    assert 60 <= waits <= 70
    # Idle for a long time: the credit is capped at max(rate, 128 KiB), not rate * idle time.
    t += 10_000 * MS
    got = 0
    while take(v, 1000, t) is None:
        got += 1000
    assert got <= 128 * 1024 + 1000


def test_a_lower_rate_applies_at_once_and_zero_lifts_it() -> None:
    v = VifShared()
    v.set_rate(1_000_000, 1_000_000)
    t = lib.pv_net_now_ns()
    v.set_rate(1000, 1_000_000)  # the credit left from the old rate is cut to the new one
    assert take(v, 1000, t) is None
    assert take(v, 1, t) is not None
    v.set_rate(0, 0)
    assert take(v, 65535, t) is None


def test_stalled_queue_count_turns_the_carrier() -> None:
    v = VifShared()
    assert lib.pv_net_vif_queue_stalled(v.c) == 1  # first stalled queue: carrier off
    assert lib.pv_net_vif_queue_stalled(v.c) == 0
    assert lib.pv_net_vif_queue_ready(v.c) == 0
    assert lib.pv_net_vif_queue_ready(v.c) == 1  # last one ready: carrier on
    assert v.carrier_offs == 1
