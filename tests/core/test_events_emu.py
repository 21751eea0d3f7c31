"""Emulated event channels: eventfd pairs behind struct pv_evtchn, bound through the broker."""

from __future__ import annotations

import asyncio
import errno
import os
import select
from collections.abc import Callable

import pytest

from backends.guests.guest import Guest
from backends.native.events import NativeEventChannel, open_emulated
from backends.platform.broker_client import BrokerError
from backends.platform.emulated import EmulatedPlatform


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_raw_pair_semantics() -> None:
    a_wake, b_wake = os.eventfd(0), os.eventfd(0)
    a = open_emulated(a_wake, os.dup(b_wake), 5, 1, 6)
    b = open_emulated(b_wake, os.dup(a_wake), 6, 0, 5)
    assert (a.local_port, a.remote_domid, a.remote_port) == (5, 1, 6)
    assert NativeEventChannel.live >= 2
    assert not a.pending() and not readable(a.fileno())
    for _ in range(3):  # coalesced, like a single pending bit
        b.notify()
    assert readable(a.fileno())
    assert a.pending()
    assert not a.pending()
    a.unmask()
    a.notify()
    assert b.pending() and not a.pending()
    a.close()
    a.close()  # idempotent
    with pytest.raises(ValueError):
        a.notify()
    b.close()


def test_open_with_bad_fd_fails_cleanly() -> None:
    fd = os.eventfd(0)
    with pytest.raises(OSError):
        open_emulated(fd, -1, 1, 0, 1)  # closes fd as documented (the leak check proves it)


def test_bind_delivers_initial_event_and_both_directions(
    platform: EmulatedPlatform, make_guest: Callable[..., Guest]
) -> None:
    g = make_guest(name="ev")
    port = g.alloc_unbound(platform.backend_domid)
    ch = platform.bind_interdomain(g.domid, port.port)
    assert ch.remote_domid == g.domid and ch.remote_port == port.port
    assert platform.bound_ports == 1
    assert readable(ch.fileno()) and ch.pending(), "Xen sets the binder's port pending on bind"
    assert not ch.pending()
    port.notify()
    assert ch.pending()
    ch.notify()
    assert readable(port.fileno()) and port.pending() and not port.pending()
    ch.close()
    assert platform.bound_ports == 0
    port.close()


def test_bind_errors(platform: EmulatedPlatform, make_guest: Callable[..., Guest]) -> None:
    g = make_guest(name="ev")
    for_other = g.alloc_unbound(42)
    port = g.alloc_unbound(0)
    with pytest.raises(BrokerError) as ei:
        platform.bind_interdomain(g.domid, for_other.port)
    assert ei.value.errno == errno.EINVAL  # reserved for d42, as Xen checks
    with pytest.raises(BrokerError) as ei:
        platform.bind_interdomain(g.domid, 999)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(BrokerError) as ei:
        platform.bind_interdomain(g.domid + 50, port.port)
    assert ei.value.errno == errno.ESRCH
    ch = platform.bind_interdomain(g.domid, port.port)
    with pytest.raises(BrokerError) as ei:
        platform.bind_interdomain(g.domid, port.port)
    assert ei.value.errno == errno.EINVAL  # already bound
    ch.close()
    # Unbinding returns the guest's port to unbound: a new backend instance can bind it again.
    ch2 = platform.bind_interdomain(g.domid, port.port)
    port.notify()
    assert ch2.pending()
    ch2.close()
    port.close()
    for_other.close()


def test_guest_death_leaves_backend_channel_harmless(
    platform: EmulatedPlatform, make_guest: Callable[..., Guest]
) -> None:
    g = make_guest(name="dies")
    port = g.alloc_unbound(0)
    ch = platform.bind_interdomain(g.domid, port.port)
    assert ch.pending()
    g.close()
    ch.notify()  # nobody listens any more; must not fail or block
    assert not ch.pending()
    ch.close()


def test_asyncio_reader_wakes_on_notify(platform: EmulatedPlatform, make_guest: Callable[..., Guest]) -> None:
    g = make_guest(name="aio")
    port = g.alloc_unbound(0)
    ch = platform.bind_interdomain(g.domid, port.port)
    assert ch.pending()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        got = 0
        woke = asyncio.Event()

        def on_event() -> None:
            nonlocal got
            while ch.pending():
                got += 1
            ch.unmask()
            woke.set()

        loop.add_reader(ch.fileno(), on_event)
        try:
            for _ in range(5):
                woke.clear()
                loop.call_soon(port.notify)
                await asyncio.wait_for(woke.wait(), 5)
        finally:
            loop.remove_reader(ch.fileno())
        return got

    assert asyncio.run(main()) == 5
    ch.close()
    port.close()
