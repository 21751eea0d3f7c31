"""The broker protocol: registration, validation of every field, domain lifetime, xenstore hooks."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backends.guests.guest import Guest
from backends.platform.base import CopySegment, PlatformError
from backends.platform.broker_client import BrokerClient, BrokerError, close_fds, recv_packet
from backends.platform.emulated import EmulatedPlatform
from backends.sim.broker import BrokerThread

PAGE = 4096


def memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def expect_refusal(client: BrokerClient, error: str, op: str, fds: list[int] | None = None, **args: object) -> None:
    with pytest.raises(BrokerError) as ei:
        client.request(op, fds, **args)
    assert ei.value.name == error, ei.value


def test_register_validation(broker: BrokerThread, sim_dir: Path) -> None:
    c = BrokerClient(str(sim_dir / "broker.sock"))
    mem, gtab, unsealed, short = memfd(4 * PAGE), memfd(PAGE), memfd(4 * PAGE, seal=False), memfd(PAGE)
    try:
        expect_refusal(c, "EINVAL", "register", None, mem_pages=4, gnt_entries=16)
        expect_refusal(c, "EINVAL", "register", [mem], mem_pages=4, gnt_entries=16)
        expect_refusal(c, "EPERM", "register", [unsealed, gtab], mem_pages=4, gnt_entries=16)
        expect_refusal(c, "EINVAL", "register", [short, gtab], mem_pages=4, gnt_entries=16)
        expect_refusal(c, "EINVAL", "register", [mem, gtab], mem_pages=4, gnt_entries=4096)
        for bad in (0, -1, "4", 4.0, True, None, 1 << 40):
            expect_refusal(c, "EINVAL", "register", [mem, gtab], mem_pages=bad, gnt_entries=16)
        expect_refusal(c, "EINVAL", "register", [mem, gtab], name=["x"], mem_pages=4, gnt_entries=16)
        expect_refusal(c, "EPERM", "alloc_unbound", remote_domid=0)
        expect_refusal(c, "EPERM", "map_domain", domid=1)
        expect_refusal(c, "EINVAL", "no_such_op")
        expect_refusal(c, "EINVAL", "hello", [mem], domid=0)  # fds where none belong are refused (and closed)
        reply, fds = c.request("register", [mem, gtab], name="ok", mem_pages=4, gnt_entries=16)
        assert reply["domid"] >= 1 and fds == []  # no xenstore hooks in this broker
        expect_refusal(c, "EEXIST", "register", [mem, gtab], mem_pages=4, gnt_entries=16)
        expect_refusal(c, "EEXIST", "hello", domid=0)
        expect_refusal(c, "EPERM", "map_domain", domid=reply["domid"])  # guests cannot read memory
        expect_refusal(c, "EPERM", "bind_interdomain", domid=reply["domid"], remote_port=1)
        expect_refusal(c, "EINVAL", "unbind", port=3)
        expect_refusal(c, "EINVAL", "alloc_unbound", remote_domid=-1)
    finally:
        close_fds([mem, gtab, unsealed, short])
        c.close()


def test_garbage_packets_get_errors_and_the_connection_survives(broker: BrokerThread, sim_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(sim_dir / "broker.sock"))
        for junk in (b"not json", b"[1,2]", b"\xff\xfe", json.dumps({"op": "hello", "domid": "0"}).encode()):
            s.send(junk)
            data, fds = recv_packet(s)
            assert not fds and json.loads(data)["error"] == "EINVAL"
        s.send(json.dumps({"op": "hello", "domid": 0}).encode())
        data, _ = recv_packet(s)
        assert json.loads(data) == {}


def test_received_fds_are_close_on_exec() -> None:
    """Every fd that comes with a broker packet is close-on-exec (a daemon's children, swtpm among them, are
    spawned by uvloop, which closes no fd: an inheritable event channel or memory fd would outlive the daemon)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    with a, b:
        try:
            socket.send_fds(a, [b'{"port":1}'], [efd, efd])
            data, fds = recv_packet(b)
        finally:
            os.close(efd)
        try:
            assert json.loads(data) == {"port": 1} and len(fds) == 2
            assert not any(os.get_inheritable(fd) for fd in fds)
        finally:
            close_fds(fds)


def test_map_domain_and_lifetime(platform: EmulatedPlatform, make_guest: Callable[..., Guest]) -> None:
    g = make_guest(name="life", mem_pages=4, gnt_entries=64)
    g2 = make_guest(name="other", mem_pages=4)
    assert g2.domid != g.domid
    page = g.alloc_page()
    g.page_view(page)[:4] = b"live"
    ref = g.grant(page, 0)
    platform.open_domain(g.domid)
    m = platform.map_grants(g.domid, [ref], False)
    domid = g.domid
    g.close()
    # The domain is gone from the broker (noticed asynchronously), but pages the backend still maps stay
    # valid: no SIGBUS, like a dying domain's pages on Xen.
    probe = BrokerClient(str(platform.sim_dir / "broker.sock"))
    probe.request("hello", domid=5)
    deadline = time.monotonic() + 5
    try:
        while True:
            try:
                _, fds = probe.request("map_domain", domid=domid)
            except BrokerError as exc:
                assert exc.errno == errno.ESRCH
                break
            close_fds(fds)
            assert time.monotonic() < deadline, "domain survived its guest"
            time.sleep(0.01)
    finally:
        probe.close()
    assert bytes(m.buffer()[:4]) == b"live"
    buf = bytearray(4)
    assert platform.grant_copy([CopySegment(domid, ref, 0, 4, buf)]) == [0] and buf == b"live"
    m.unmap()
    platform.close_domain(domid)


def test_platform_without_sim_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PlatformError, match="not running"):
        EmulatedPlatform(str(tmp_path))


class FakeXenstore:
    """The three hooks the broker needs from backends.xenstore.server.XenStoreServer."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.server_ends: dict[int, socket.socket] = {}

    async def introduce_domain(self, domid: int) -> None:
        self.events.append(("introduce", domid))

    def release_domain(self, domid: int) -> None:  # sync on purpose: both kinds are accepted
        self.events.append(("release", domid))

    def connect_domain(self, domid: int) -> socket.socket:
        ours, theirs = socket.socketpair()
        self.server_ends[domid] = ours
        return theirs


def test_xenstore_hooks(sim_dir: Path) -> None:
    hooks = FakeXenstore()
    with BrokerThread(str(sim_dir / "broker.sock"), hooks) as bt:
        g = Guest.in_sim(sim_dir, name="xs")
        assert hooks.events == [("introduce", g.domid)]
        assert g.xenstore_sock is not None
        g.xenstore_sock.sendall(b"ping")
        assert hooks.server_ends[g.domid].recv(4) == b"ping"
        domid = g.domid
        g.close()
        deadline = time.monotonic() + 5
        while ("release", domid) not in hooks.events:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert bt.call(lambda: len(bt.broker.domains) if bt.broker else -1) == 0
    for s in hooks.server_ends.values():
        s.close()


def test_broker_keeps_no_fds_after_guests_leave(broker: BrokerThread, sim_dir: Path) -> None:
    base = len(os.listdir("/proc/self/fd"))
    for i in range(3):
        g = Guest.in_sim(sim_dir, name=f"g{i}", mem_pages=2)
        ports = [g.alloc_unbound(0) for _ in range(3)]
        ports[0].close()
        g.close()
    deadline = time.monotonic() + 5
    while len(os.listdir("/proc/self/fd")) != base:
        assert time.monotonic() < deadline, "broker or guest leaked fds"
        time.sleep(0.01)


def test_guest_on_the_brokers_own_event_loop(sim_dir: Path) -> None:
    """A coroutine sharing the broker's loop must not deadlock: async set-up, closes that never wait."""
    from backends.sim.broker import Broker

    path = str(sim_dir / "broker.sock")

    async def main() -> None:
        b = Broker()
        await b.listen(path)
        try:
            g = await Guest.create(path, name="same-loop", mem_pages=2)
            first = await g.alloc_unbound_async(0)
            first.close()  # unbind goes out without waiting for the reply
            second = await g.alloc_unbound_async(0)  # the dropped reply is drained first
            assert set(b.domains[g.domid].ports) == {second.port}
            g.close()
            for _ in range(500):
                if not b.domains:
                    break
                await asyncio.sleep(0.01)
            assert not b.domains
        finally:
            await b.close()

    asyncio.run(main())
