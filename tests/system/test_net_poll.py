"""netback's bounded polling (`[net] poll_us`): the pump keeps looking at its sources for a while after a busy
pass instead of sleeping at once.  Traffic must flow as without it, and an idle vif must cost no CPU (the spin
only follows a pass that moved packets, and ends)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import pingtcp
from tests.net.test_datapath import tcp
from tests.system.conftest import SimProc
from tests.system.netbeds import net_bed
from tests.system.test_net import GUEST_V4, PEER_V4, PEER_V6, NetBed, metric


@pytest.fixture
def nbed(sim: SimProc, tmp_path: Path) -> Iterator[NetBed]:
    # 1 ms: far more than the default, so a spin that never ended would show as a busy daemon below.
    with net_bed(sim, tmp_path, "poll_us = 1000") as bed:
        yield bed


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.system_timeout(120)
async def test_polling_pump_carries_traffic_and_idles(nbed: NetBed) -> None:
    nic = await nbed.nic(queues=2)
    g, p = nbed.gns, nbed.peer
    assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V4, count=3)) == 3
    assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V6, count=3)) == 3
    assert await asyncio.to_thread(p.run, lambda: pingtcp.ping(GUEST_V4, count=2, size=1472)) == 2
    await tcp(g, p, PEER_V4, 8 << 20, 5001)
    await tcp(p, g, GUEST_V4, 8 << 20, 5002)
    assert all(nf.error is None for nf in nic.fronts)
    text = await nbed.serve.metrics()
    assert metric(text, "pvback_bytes_total", nic.domid, direction="tx") > 8 << 20
    assert metric(text, "pvback_bytes_total", nic.domid, direction="rx") > 8 << 20

    # Idle: two queues that spun after every busy pass now sleep; the daemon's CPU over 2 s stays small (a pump
    # left spinning would burn ~2 s per queue).
    pid = nbed.serve.pid
    await asyncio.sleep(0.3)
    c0, t0 = cpu_s(pid), time.monotonic()
    await asyncio.sleep(2.0)
    used, wall = cpu_s(pid) - c0, time.monotonic() - t0
    assert used < 0.25 * wall, f"daemon used {used:.2f} s CPU in {wall:.2f} s idle"
