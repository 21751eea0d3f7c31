"""A notification lost on the way (backends/blk/stallwatch.py): a request the frontend published without the
event the backend asked for is still served, within about a second, and the daemon says it happened."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from backends.guests.blkfront import RSP_OKAY
from tests.system.conftest import Bed, make_image
from tests.system.test_blk_limits import status_metric
from tests.system.test_linux_shapes import log_lines

IMAGE_SIZE = 8 << 20


async def test_a_request_whose_event_went_missing_is_served(bed: Bed, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", IMAGE_SIZE)
    d = await bed.disk(image)
    assert await d.front.read(0, 4096) == image.read_bytes()[:4096]  # idle now: the backend waits for an event
    assert status_metric(await bed.serve.metrics(), d.domid, "stall_kicks") == 0
    pages = await d.front.take_pages(1)
    try:
        t0 = time.monotonic()
        status = await asyncio.wait_for(d.front.submit_raw_op(
            lambda rid: d.front.abi.pack_rw(0, 1, d.front.handle, rid, 8, [(pages[0][1], 0, 7)]),
            notify=False), 15)
        waited = time.monotonic() - t0
    finally:
        await d.front.give_pages(pages)
    assert status == RSP_OKAY
    assert waited >= 1.5, f"answered after {waited:.2f} s: was the event really withheld?"
    warnings = await log_lines(bed, "a notification from the frontend went missing")
    assert len(warnings) == 1 and "level=warning" in warnings[0] and f"domid={d.domid}" in warnings[0], warnings
    assert status_metric(await bed.serve.metrics(), d.domid, "stall_kicks") == 1
    assert status_metric(await bed.serve.metrics(), d.domid, "stall_notifies") == 0
    # Everything after it flows as usual, with no further recovery.
    assert await d.front.read(8, 4096) == image.read_bytes()[4096:8192]
    assert status_metric(await bed.serve.metrics(), d.domid, "stall_kicks") == 1
