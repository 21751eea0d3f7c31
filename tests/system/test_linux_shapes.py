"""The emulated blkfront is only as good as its likeness to Linux's: every request shape the real-Xen run
recorded from Linux xen-blkfront (tests/blk/fixtures/linux-blkfront-shapes.json, written from the e2e's
recording) must be among what the emulated frontend's standard workload sends, counted by the daemon itself.

Also: the empty flush Linux sends (no segments, sector (sector_t)-1) is answered OKAY and never counted as an
error, and a rejected request is reported once, rate-limited, with its reason, op and sector."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from backends.guests.blkfront import LINUX_FLUSH_SECTOR, OP_FLUSH_DISKCACHE, OP_WRITE_BARRIER, RSP_ERROR, RSP_OKAY
from backends.guests.workload import Shadow, full_compare, random_verified
from tests.system.conftest import XVDA, Bed, make_image

FIXTURE = Path(__file__).resolve().parent.parent / "blk" / "fixtures" / "linux-blkfront-shapes.json"
IMAGE_SIZE = 8 << 20


def linux_shapes() -> set[str]:
    data = json.loads(FIXTURE.read_text())
    shapes = set(data["shapes"])
    assert shapes and all(re.fullmatch(r"[a-z-]+/(0|1|2-11|12\+)/(zero|inside|max|beyond)/(-|full|sub)", s)
                          for s in shapes), shapes
    return shapes


async def device_shapes(bed: Bed, domid: int, devid: int = XVDA) -> dict[str, int]:
    out: dict[str, int] = {}
    pat = re.compile(r'^pvback_request_shapes_total\{(?P<labels>[^}]*)\} (?P<v>[0-9.e+]+)$')
    for line in (await bed.serve.metrics()).splitlines():
        m = pat.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            if labels.get("domid") == str(domid) and labels.get("devid") == str(devid):
                out[labels["shape"]] = out.get(labels["shape"], 0) + int(float(m["v"]))
    return out


async def log_lines(bed: Bed, needle: str, timeout: float = 10.0) -> list[str]:
    """The daemon's log lines holding `needle`, once there is at least one (bounded wait)."""
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while not lines:
            lines = [ln for ln in bed.serve.log_text().splitlines() if needle in ln]
            if not lines:
                await asyncio.sleep(0.1)
    return lines


@pytest.mark.parametrize("abi", ["x86_64", "x86_32"])
async def test_emulated_frontend_sends_every_shape_linux_sends(bed: Bed, tmp_path: Path, abi: str) -> None:
    image = make_image(tmp_path / "disk.img", IMAGE_SIZE)
    d = await bed.disk(image, abi=abi)
    shadow = Shadow(image.read_bytes())
    res = await random_verified(d.front, shadow, seconds=10.0, max_ops=200, depth=4, seed=3)
    assert not res.mismatches, res.mismatches[:5]
    assert not await full_compare(d.front, shadow)
    sent = await device_shapes(bed, d.domid)
    missing = sorted(linux_shapes() - set(sent))
    assert not missing, (f"Linux xen-blkfront sends {missing}, the emulated blkfront's workload does not "
                         f"(it sent {sorted(sent)}): make backends/guests/workload.py:linux_mix send them")
    assert await bed.serve.errors(d.domid) == {}
    # The recording also ends up in the daemon's log when the disk disconnects.
    await d.front.close()
    logged = await log_lines(bed, 'msg="request shapes"')
    assert len(logged) == 1 and f"domid={d.domid}" in logged[0], logged
    assert f"flush/0/max/-={sent['flush/0/max/-']}" in logged[0], logged


@pytest.mark.parametrize("op", [OP_FLUSH_DISKCACHE, OP_WRITE_BARRIER], ids=["flush", "barrier"])
async def test_linux_empty_flush_is_answered_okay(bed: Bed, tmp_path: Path, op: int) -> None:
    """The exact slot Linux sends on the first fsync; before the fix it failed with `range` and blkfront turned
    flushes off for good ("empty flush op failed")."""
    d = await bed.disk(make_image(tmp_path / "disk.img", IMAGE_SIZE))
    status = await d.front.submit_raw_op(
        lambda rid: d.front.abi.pack_rw(op, 0, d.front.handle, rid, LINUX_FLUSH_SECTOR, []), check=False)
    assert status == RSP_OKAY
    assert await bed.serve.errors(d.domid) == {}
    shapes = await device_shapes(bed, d.domid)
    assert shapes.get(f"{'flush' if op == OP_FLUSH_DISKCACHE else 'barrier'}/0/max/-") == 1, shapes


async def test_rejected_requests_are_reported_rate_limited(bed: Bed, tmp_path: Path) -> None:
    """A storm of bad requests: every one answered with an error and counted, one warning naming the reason,
    the operation and the sector (not one line per request)."""
    d = await bed.disk(make_image(tmp_path / "disk.img", IMAGE_SIZE))
    beyond = IMAGE_SIZE // 512
    pages = await d.front.take_pages(1)
    try:
        for _ in range(50):
            status = await d.front.submit_raw_op(
                lambda rid: d.front.abi.pack_rw(0, 1, d.front.handle, rid, beyond, [(pages[0][1], 0, 7)]),
                check=False)
            assert status == RSP_ERROR
    finally:
        await d.front.give_pages(pages)
    assert (await bed.serve.errors(d.domid)).get("range") == 50

    warnings = await log_lines(bed, "with an error")  # the monitor looks once a second
    assert len(warnings) == 1 and "level=warning" in warnings[0], warnings
    assert "reason=range" in warnings[0] and "op=read" in warnings[0] and f"sector={beyond}" in warnings[0]
    assert "failed=50" in warnings[0] and f"domid={d.domid}" in warnings[0], warnings[0]
