#!/usr/bin/env python3
"""dom0: exercise XenPlatform against the real hypervisor without a guest.

dom0 grants two of its own pages to itself with gntalloc (libxengnttab's xengntshr_*) and maps / grant-copies
them through XenPlatform; it allocates an unbound port for itself with a second evtchn handle and binds
XenPlatform's channel to it, so both directions of notify and the initial pending event are observed.
Prints "CHECK <name> PASS|FAIL <detail>" lines; exit status 1 if any failed.
"""

from __future__ import annotations

import ctypes
import select
import sys
from collections.abc import Callable

from backends.platform.base import CopySegment, GrantError, GrantStatus

results: list[tuple[str, bool, str]] = []


def check(name: str, fn: Callable[[], str]) -> None:
    try:
        detail = fn()
        results.append((name, True, detail))
        print(f"CHECK {name} PASS {detail}", flush=True)
    except Exception as exc:
        results.append((name, False, str(exc)))
        print(f"CHECK {name} FAIL {type(exc).__name__}: {exc}", flush=True)


def main() -> int:
    import backends._native as native
    from backends.platform.xen import XenPlatform

    check("native-module", lambda: str(native.__file__))
    plat = XenPlatform()
    check("open", lambda: f"domid={plat.backend_domid} grant_copy={plat.features.grant_copy}")
    if plat.backend_domid != 0 or not plat.features.grant_copy:
        results.append(("open-expectations", False, "expected domid 0 and grant copy in a 6.1 dom0"))

    gnt = ctypes.CDLL("libxengnttab.so.1", use_errno=True)
    gnt.xengntshr_open.restype = ctypes.c_void_p
    gnt.xengntshr_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    gnt.xengntshr_share_pages.restype = ctypes.c_void_p
    gnt.xengntshr_share_pages.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                          ctypes.POINTER(ctypes.c_uint32), ctypes.c_int]
    gnt.xengntshr_unshare.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
    gnt.xengntshr_close.argtypes = [ctypes.c_void_p]
    xgs = gnt.xengntshr_open(None, 0)
    if not xgs:
        print(f"CHECK gntshr FAIL cannot open /dev/xen/gntalloc (errno {ctypes.get_errno()})")
        return 1
    refs = (ctypes.c_uint32 * 2)()
    shared = gnt.xengntshr_share_pages(xgs, 0, 2, refs, 1)
    if not shared:
        print(f"CHECK gntshr FAIL share_pages errno {ctypes.get_errno()}")
        return 1
    def peek(off: int, n: int) -> bytes:
        return ctypes.string_at(shared + off, n)

    def poke(off: int, data: bytes) -> None:
        ctypes.memmove(shared + off, data, len(data))

    poke(0, b"dom0-self-grant!")
    poke(4096, b"page-two")

    def map_rw() -> str:
        m = plat.map_grants(0, [refs[0], refs[1]], writable=True)
        try:
            buf = m.buffer()
            assert bytes(buf[0:16]) == b"dom0-self-grant!", bytes(buf[0:16])
            assert bytes(buf[4096:4104]) == b"page-two"
            assert plat.live_mappings == 2, plat.live_mappings
            buf[100:105] = b"hello"
            assert peek(100, 5) == b"hello", "write through the mapping not seen by the granting side"
        finally:
            m.unmap()
        assert plat.live_mappings == 0, plat.live_mappings
        return "2 pages mapped rw into one range, both directions seen, live_mappings back to 0"

    def map_ro() -> str:
        with plat.map_grants(0, [refs[0]], writable=False) as m:
            buf = m.buffer()
            assert buf.readonly and bytes(buf[100:105]) == b"hello"
        return "read-only mapping"

    def map_bad() -> str:
        try:
            plat.map_grants(0, [refs[0], 60000], writable=False)
        except GrantError as exc:
            assert plat.live_mappings == 0
            return f"bad ref refused ({GrantStatus(exc.status).name}), nothing left mapped"
        raise AssertionError("mapping a bogus ref succeeded")

    def copy() -> str:
        local = bytearray(64)
        st = plat.grant_copy([CopySegment(domid=0, ref=refs[0], offset=0, length=16, local=local)])
        assert st == [0] and bytes(local[:16]) == b"dom0-self-grant!", (st, bytes(local[:16]))
        out = bytearray(b"copied-to-grant!")
        st = plat.grant_copy([CopySegment(domid=0, ref=refs[1], offset=200, length=16, local=out,
                                          to_guest=True)])
        assert st == [0] and peek(4096 + 200, 16) == b"copied-to-grant!", st
        st = plat.grant_copy([
            CopySegment(domid=0, ref=refs[0], offset=0, length=4, local=local),
            CopySegment(domid=0, ref=refs[0], offset=4090, length=16, local=local),  # crosses the page
            CopySegment(domid=0, ref=60000, offset=0, length=4, local=local),
        ])
        assert st[0] == 0 and st[1] == GrantStatus.BAD_COPY_ARG and st[2] < 0, st
        return f"both directions; malformed/bad segments get their own status {st}"

    check("map-rw", map_rw)
    check("map-ro", map_ro)
    check("map-bad", map_bad)
    check("grant-copy", copy)
    gnt.xengntshr_unshare(xgs, shared, 2)
    gnt.xengntshr_close(xgs)

    evt = ctypes.CDLL("libxenevtchn.so.1", use_errno=True)
    evt.xenevtchn_open.restype = ctypes.c_void_p
    evt.xenevtchn_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    for f in ("xenevtchn_bind_unbound_port", "xenevtchn_notify", "xenevtchn_unmask", "xenevtchn_fd",
              "xenevtchn_pending", "xenevtchn_close"):
        getattr(evt, f).argtypes = [ctypes.c_void_p] + ([ctypes.c_uint32] if f not in (
            "xenevtchn_fd", "xenevtchn_pending", "xenevtchn_close") else [])
    xce = evt.xenevtchn_open(None, 0)
    peer_port = evt.xenevtchn_bind_unbound_port(xce, 0)

    def evtchn() -> str:
        assert peer_port >= 0, f"bind_unbound_port errno {ctypes.get_errno()}"
        ch = plat.bind_interdomain(0, peer_port)
        try:
            r, _, _ = select.select([ch.fileno()], [], [], 2)
            initial = bool(r) and ch.pending()
            ch.unmask()
            assert not ch.pending(), "pending twice without a notify"
            assert evt.xenevtchn_notify(xce, peer_port) == 0
            r, _, _ = select.select([ch.fileno()], [], [], 2)
            assert r and ch.pending(), "peer notify not delivered"
            ch.unmask()
            ch.notify()
            peer_fd = evt.xenevtchn_fd(xce)
            r, _, _ = select.select([peer_fd], [], [], 2)
            assert r and evt.xenevtchn_pending(xce) == peer_port, "our notify not delivered to the peer"
            evt.xenevtchn_unmask(xce, peer_port)
            assert plat.bound_ports == 1
        finally:
            ch.close()
        assert plat.bound_ports == 0
        return f"local port {ch.local_port} <-> {peer_port}; initial event after bind: {initial}; both directions"

    check("evtchn", evtchn)
    evt.xenevtchn_close(xce)
    plat.close()
    ok = all(r[1] for r in results)
    print(f"CHECK summary {'PASS' if ok else 'FAIL'} {sum(r[1] for r in results)}/{len(results)} platform checks",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
