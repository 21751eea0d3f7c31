"""netback's `rate` (the toolstack's BYTES,USECS TX credit) through the real daemon: a guest's TCP stream to the
peer runs at the configured rate, a live change of the key changes it, removing the key lifts the limit, and
not a byte is lost (hash at both ends); the waits and the throttled time show in the metrics and
`pvback status` (whose DEV column names the vif's tap).

Functional bounds, not performance targets: the measured rate must be within 0.5x..1.3x of the configured
one over 2-2.5 s windows, and the unlimited stream several times faster.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import pingtcp
from tests.system.conftest import SimProc
from tests.system.netbeds import Stream, net_bed
from tests.system.test_net import PEER_V4, NetBed, metric

MB = 1_000_000


@pytest.fixture
def nbed(sim: SimProc, tmp_path: Path) -> Iterator[NetBed]:
    with net_bed(sim, tmp_path) as bed:
        yield bed


async def _status(bed: NetBed, domid: int, key: str) -> float:
    return metric(await bed.serve.metrics(), "pvback_device_status", domid, key=key)


async def _wait_status(bed: NetBed, domid: int, key: str, want: float, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while await _status(bed, domid, key) != want:
            await asyncio.sleep(0.05)


@pytest.mark.system_timeout(150)
async def test_rate_limits_guest_tx_and_changes_live(nbed: NetBed) -> None:
    nic = await nbed.nic(queues=2)
    dom0 = await nbed.dom0()
    d = nic.domid

    # Unlimited first: the same kind of stream, for the "much faster" comparison.
    free = Stream(nbed, 16 << 20, 5101)
    t0 = time.monotonic()
    await free.finish()
    unlimited = (16 << 20) / (time.monotonic() - t0)

    # 100 kB per 100 ms = 1 MB/s (a short window: Linux's burst allowance, max(credit, 128 KiB), stays small).
    await dom0.write(f"{nic.backend}/rate", "100000,100000")
    await _wait_status(nbed, d, "rate_bytes_per_s", 1 * MB)
    s = Stream(nbed, 48 << 20, 5102)
    await asyncio.sleep(0.5)
    slow = await s.rate(2.5)
    assert 0.5 * MB <= slow <= 1.3 * MB, f"{slow / MB:.2f} MB/s at rate 1 MB/s"

    # Live: 3 MB/s.
    await dom0.write(f"{nic.backend}/rate", "300000,100000")
    await _wait_status(nbed, d, "rate_bytes_per_s", 3 * MB)
    await asyncio.sleep(0.5)
    faster = await s.rate(2.0)
    assert 1.5 * MB <= faster <= 3.9 * MB, f"{faster / MB:.2f} MB/s at rate 3 MB/s"

    text = await nbed.serve.metrics()
    assert metric(text, "pvback_device_status", d, key="tx_credit_waits") > 0
    assert metric(text, "pvback_device_status", d, key="tx_throttled_ms") > 1000
    res = await asyncio.to_thread(nbed.cli, "status", "--metrics", f"127.0.0.1:{nbed.serve.port}", "--interval",
                                  "0", ns=nbed.peer)
    assert res.returncode == 0, res.stderr
    row = next((ln for ln in res.stdout.splitlines() if ln.startswith("vif ")), "")
    assert re.match(rf"^vif\s+{d}\s+0\s+{re.escape(nic.vif)}\s+Connected", row), res.stdout  # DEV: the tap
    assert "rate=3MB/s" in row and "credit_waits=" in row, row

    # The key removed: unlimited again, and the stream ends with every byte in order.
    await dom0.rm(f"{nic.backend}/rate")
    await _wait_status(nbed, d, "rate_bytes_per_s", 0)
    t1, b1 = time.monotonic(), s.received
    await s.finish()
    lifted = (s.sent - b1) / (time.monotonic() - t1)
    assert unlimited >= 4 * slow and lifted >= 4 * slow, (unlimited / MB, lifted / MB, slow / MB)
    text = await nbed.serve.metrics()
    assert metric(text, "pvback_drops_total", d, direction="tx") == 0
    assert all(nf.error is None for nf in nic.fronts)
    print(f"rate: unlimited {unlimited / MB:.1f} MB/s, at 1 MB/s {slow / MB:.2f}, at 3 MB/s {faster / MB:.2f}, "
          f"lifted {lifted / MB:.1f}")


async def test_rate_at_attach_and_a_bad_rate_is_ignored(nbed: NetBed) -> None:
    """`attach nic --rate` writes the key libxl writes; a rate the daemon cannot parse is a warning and traffic
    stays unlimited (Linux's xen_net_read_rate), never a failed vif."""
    nic = await nbed.nic(attach_args=("--rate", "200000,100000"))
    dom0 = await nbed.dom0()
    assert await dom0.read_str(f"{nic.backend}/rate") == "200000,100000"
    await _wait_status(nbed, nic.domid, "rate_bytes_per_s", 2 * MB)
    await dom0.write(f"{nic.backend}/rate", "lots,fast")
    await _wait_status(nbed, nic.domid, "rate_bytes_per_s", 0)
    assert await asyncio.to_thread(nbed.gns.run, lambda: pingtcp.ping(PEER_V4, count=2)) == 2
    res = await asyncio.to_thread(nbed.cli, "attach", "nic", str(nic.domid), "--devid", "1", "--rate", "1,0")
    assert res.returncode != 0 and "--rate" in res.stderr, res.stderr
