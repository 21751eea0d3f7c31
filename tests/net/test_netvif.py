"""The vif's TX credit (csrc/netvif.c) at given instants: Linux netback's credit scheduler (tx_credit_exceeded,
tx_add_credit) with its 128 KiB burst allowance, and live rate changes; and the stalled-queue count behind the
carrier."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest

from backends.native import ffi, lib
from backends.net.dataplane import VifShared
from backends.platform.emulated import EmulatedPlatform
from tests.net import test_datapath
from tests.net.netns import NetNS


@pytest.fixture
def bed() -> Iterator[tuple[EmulatedPlatform, str, NetNS, NetNS]]:
    """test_datapath's bed: namespaces, a broker, an emulated platform."""
    yield from test_datapath.bed.__wrapped__()  # type: ignore[attr-defined]

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


def test_a_packet_without_credit_stays_on_the_ring_until_the_refill(bed: Any) -> None:
    """Three 600-byte packets at 1000 bytes per 10 s: the first passes, the second waits with its slots (and
    the third's) left unconsumed on the ring, not answered, not dropped; further passes do nothing.  Lifting
    the rate and kicking the queue lets the pump send the rest."""
    import asyncio

    from tests.net import wire
    from tests.net.test_datapath import GUEST_MAC, Wire, run

    plat, broker, g, p = bed
    v = VifShared()
    v.set_rate(1000, 10_000_000)

    async def main() -> None:
        w = Wire(plat, broker, g, p, vif=v)
        try:
            nf, dp = w.fronts[0], w.dps[0]
            q = dp.queue
            mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
            page = nf._tx_free[0]
            nf.guest.page_view(page)[:600] = b"\xff" * 6 + mac + b"\x88\xb5" + bytes(586)
            reqs = [wire.Tx(nf._tx_ref[page], 0, 0, i, 600).pack() for i in range(3)]
            nf.tx.put(reqs, wire.TX_SLOT)
            nf.tx.push()
            assert q.tx() == 1
            assert len(nf.tx.consume(wire.TX_SLOT)) == 1
            assert q.tx() == 0  # waiting for the credit timer: nothing read
            s = q.stats()
            assert (s["tx_packets"], s["tx_dropped"], s["tx_credit_waits"]) == (1, 0, 1), s
            dp.start(asyncio.get_running_loop())
            await asyncio.sleep(0.2)
            assert not nf.tx.consume(wire.TX_SLOT)  # the pump too waits for the refill (10 s away)
            v.set_rate(0, 0)
            q.credit_kick()
            got: list[bytes] = []
            async with asyncio.timeout(5):
                while len(got) < 2:
                    got += nf.tx.consume(wire.TX_SLOT)
                    await asyncio.sleep(0.01)
            assert [struct.unpack_from("<Hh", r) for r in got] == [(1, 0), (2, 0)]
            s = q.stats()
            assert (s["tx_packets"], s["tx_dropped"]) == (3, 0) and s["tx_throttled_ns"] >= 200_000_000, s
        finally:
            await w.close(p)

    run(main())


def test_the_credit_is_the_vifs_not_each_queues(bed: Any) -> None:
    """Two queues of one vif draw on one credit (Linux gives each queue the whole rate; `rate=` here limits the
    vif): what queue 0 spent, queue 1 cannot."""
    from tests.net import wire
    from tests.net.test_datapath import GUEST_MAC, Wire, run

    plat, broker, g, p = bed
    v = VifShared()
    v.set_rate(1000, 10_000_000)

    async def main() -> None:
        w = Wire(plat, broker, g, p, queues=2, vif=v)
        try:
            mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
            for nf in w.fronts:
                page = nf._tx_free[0]
                nf.guest.page_view(page)[:600] = b"\xff" * 6 + mac + b"\x88\xb5" + bytes(586)
                nf.tx.put([wire.Tx(nf._tx_ref[page], 0, 0, 0, 600).pack()], wire.TX_SLOT)
                nf.tx.push()
            q0, q1 = (dp.queue for dp in w.dps)
            assert q0.tx() == 1
            assert q1.tx() == 0
            assert (q0.stats()["tx_credit_waits"], q1.stats()["tx_credit_waits"]) == (0, 1)
        finally:
            await w.close(p)

    run(main())
