"""BlkDataplane under asyncio: event channel in, completion fd, unmask after drain, stop(), ring death."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from backends.blk.dataplane import BlkDataplane, QueueConfig
from backends.blk.proto import RSP_OKAY, Abi
from backends.drivers.storage import FileDriver
from backends.native.events import NativeEventChannel, open_emulated
from backends.native.ring import FrontRing

from . import wire
from .harness import GUEST, MiniGuest

DISK = 1 << 20


def evtchn_pair() -> tuple[NativeEventChannel, int, int]:
    """Backend channel + the guest's (notify_fd, wake_fd)."""
    to_backend = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    to_guest = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    guest_notify, guest_wake = os.dup(to_backend), os.dup(to_guest)
    ch = open_emulated(to_backend, to_guest, 5, GUEST, 6)
    return ch, guest_notify, guest_wake


@pytest.mark.parametrize("mode", ["inline", "threaded"])
def test_event_driven_io_and_stop(tmp_path: Path, mode: str) -> None:
    img = tmp_path / "disk.img"
    content = os.urandom(DISK)
    img.write_bytes(content)
    drv = FileDriver(img, mode=mode)  # type: ignore[arg-type]
    drv.open()
    g = MiniGuest(pages=64)
    ch, gnotify, gwake = evtchn_pair()
    ring_page = g.alloc()[0]
    front = FrontRing(g.page(ring_page), 1, Abi.X86_64.slot_size)
    ring = g.table.map(GUEST, [g.grant(ring_page)], True)
    pages = g.alloc(8)
    refs = [g.grant(p) for p in pages]
    dead: list[str] = []
    cfg = QueueConfig(abi=Abi.X86_64, frontend_domid=GUEST, nr_ring_pages=1, sectors=DISK // 512)
    dp = BlkDataplane(ring, ch, g.table.c, drv.engine(), cfg, on_dead=dead.append)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        dp.start(loop)
        got: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()

        def on_guest_event() -> None:
            os.eventfd_read(gwake)
            while True:
                for raw in front.consume(16):
                    got.put_nowait(wire.response(2, raw))
                if not front.final_check():
                    break

        loop.add_reader(gwake, on_guest_event)
        try:
            for rnd in range(3):
                slots = [wire.rw(2, 0, 1000 * rnd + i, 8 * (i + rnd), [(refs[i], 0, 7)]) for i in range(8)]
                front.put(slots, 112)
                if front.push():
                    os.eventfd_write(gnotify, 1)
                res = [await asyncio.wait_for(got.get(), 5) for _ in range(8)]
                assert sorted(res) == [(1000 * rnd + i, 0, RSP_OKAY) for i in range(8)]
                for i in range(8):
                    off = 8 * (i + rnd) * 512
                    assert bytes(g.page(pages[i])) == content[off : off + 4096]
            st = dp.stats()
            assert st["req_read"] == 24 and st["responses"] == 24 and st["notifies"] >= 3
            if mode == "threaded":
                assert st["completes"] >= 1
            # the hostile frontend: req_prod far ahead -> the dataplane reports, does not spin
            ringv = g.page(ring_page)
            ringv[0:4] = struct.pack("<I", (struct.unpack("<I", ringv[0:4])[0] + 5000) & 0xFFFFFFFF)
            os.eventfd_write(gnotify, 1)
            for _ in range(100):
                if dead:
                    break
                await asyncio.sleep(0.01)
            assert dead and "bogus" in dead[0]
        finally:
            loop.remove_reader(gwake)
            await dp.stop()
            await dp.stop()  # idempotent

    try:
        asyncio.run(main())
        assert ch.closed and not ring.mapped
        assert g.table.live_mappings == 0 and g.table.pinned(GUEST) == 0
    finally:
        dp.close()
        os.close(gnotify)
        os.close(gwake)

        g.close()
        drv.close()
