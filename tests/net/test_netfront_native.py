"""The emulated netfront's C data path (csrc/netfront_io.c) against a backend played by the test: the slots it
publishes for frames of the guest's stack, what it does with a frame its pool cannot hold, and a backend that
answers a slot it never got (the loop stops with the reason, the rest of the process carries on)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from typing import Any

from backends.guests.guest import Guest
from backends.guests.netfront import NetFront
from backends.native.ring import BackRing

from .test_datapath import GUEST_MAC, bed, guest_tap  # noqa: F401  (bed: the fixture)

HOST_MAC = "fe:ff:ff:ff:ff:ff"


def wait_for(cond: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_slots_small_pool_and_a_lying_backend(bed: Any) -> None:  # noqa: F811
    plat, broker, g, _p = bed
    fds = guest_tap(g, 9000, 1)
    guest = Guest(broker, name="nfc", mem_pages=64, gnt_entries=64)
    plat.open_domain(guest.domid)
    nf = NetFront(guest, 0, fds[0], tx_pages=1, rx_buffers=4)  # a one-page TX pool
    tx_map = plat.map_grants(guest.domid, [nf.tx_ref], writable=True)
    ev = plat.bind_interdomain(guest.domid, nf.ev_tx.port)
    try:
        ring = BackRing(tx_map.address, 1, 12)
        nf.start()
        g.ip("neigh", "add", "198.18.0.1", "lladdr", HOST_MAC, "dev", "eth0")

        def send(n: int) -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x" * n, ("198.18.0.1", 9))

        page, ref = nf._tx_free[0], nf._tx_ref[nf._tx_free[0]]

        def next_slot() -> tuple[int, int, int, int, int]:
            got: list[bytes] = []

            def one() -> bool:
                got.extend(ring.consume(1))
                return bool(got)

            wait_for(one, "no TX slot published")
            gref, offset, flags, rid, size = struct.unpack("<IHHHH", got[0])
            return gref, offset, flags, rid, size

        def answer(rid: int) -> None:
            ring.respond([struct.pack("<Hh", rid, 0)], 4)
            ev.notify()

        # A frame that fits one page: one slot, on the pool's page, sized as the frame, no flags.  (The guest's
        # stack sends IPv6 neighbour/MLD frames of its own meanwhile: answered and passed over.)
        asyncio.run(asyncio.to_thread(g.run, lambda: send(100)))
        while True:
            gref, offset, flags, rid, size = next_slot()
            assert (gref, offset, flags, rid) == (ref, 0, 0, 0)  # the only page, so always id 0
            if size == 14 + 20 + 8 + 100:
                frame = bytes(guest.page_view(page)[:size])
                assert frame[:6] == bytes.fromhex(HOST_MAC.replace(":", "")) and frame[-100:] == b"x" * 100
                answer(rid)
                break
            answer(rid)
        sent = nf.stats["tx"]
        # A 5 KiB frame cannot fit the one page: it is read, found truncated and dropped, never published.
        asyncio.run(asyncio.to_thread(g.run, lambda: send(5000)))

        def dropped() -> bool:
            for raw in ring.consume():  # the stack's own small frames meanwhile: answered, so the page comes back
                answer(struct.unpack("<IHHHH", raw)[3])
            return nf.stats["tx_dropped"] == 1

        wait_for(dropped, f"the big frame was not dropped: {nf.stats}")
        assert nf.error is None and nf.stats["tx"] >= sent
        # A backend answering a slot with id 7, which it was never given: the loop stops and says why.
        asyncio.run(asyncio.to_thread(g.run, lambda: send(100)))
        while True:
            gref, offset, flags, rid, size = next_slot()
            if size == 14 + 20 + 8 + 100:
                answer(7)
                break
            answer(rid)
        wait_for(lambda: nf.error is not None, "a bogus TX response went unnoticed")
        assert "id 7, which is not in flight" in str(nf.error)
        assert nf._native is not None and not nf._native.running
    finally:
        nf.close()
        ev.close()
        tx_map.unmap()
        plat.close_domain(guest.domid)
        guest.close()
        for fd in fds:
            os.close(fd)


def test_bad_configuration_is_an_error_not_a_crash(bed: Any) -> None:  # noqa: F811
    _plat, broker, g, _p = bed
    fds = guest_tap(g, 1500, 1)
    guest = Guest(broker, name="nfbad", mem_pages=16, gnt_entries=32)
    try:
        nf = NetFront(guest, 0, fds[0], tx_pages=0, rx_buffers=4)
        nf.start()
        wait_for(lambda: nf.error is not None, "an empty TX pool was accepted")
        assert "TX pool needs 1 to 65536 pages" in str(nf.error)
        nf.close()
    finally:
        guest.close()
        for fd in fds:
            os.close(fd)
