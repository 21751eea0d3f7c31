"""netback's control features through the real daemon (`pvback serve` in a peer namespace, emulated guests whose
netfronts bridge taps of the guest's namespace): Toeplitz RX steering set up over the ctrl ring (every frame
lands on the queue the mapping table names for its hash, and carries that hash), the multicast filter driven by
MCAST_ADD/DEL with real multicast traffic, XDP headroom through Reconfiguring, and hostile control requests
that fail only their own vif while another guest's NIC carries on.

Addresses from 198.18.0.0/15 only, in namespaces the fixtures create (no route out), deleted at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
import struct
import time

import pytest

from backends.guests import netfront as nfm
from backends.guests.netfront import NetCtrl, NetFront, reconfigure_xdp, xenbus_connect
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import read_state, wait_for_state
from tests.net import pingtcp
from tests.net.test_datapath import GUEST_MAC, guest_tap, tcp
from tests.net.toeplitz import MS_KEY, flow_hash
from tests.system import test_net
from tests.system.test_net import GUEST_V4, GUEST_V6, PEER_V4, PEER_V6, NetBed, Nic, metric, spare_tap

S = XenbusState
nbed = test_net.nbed  # the same bed: a daemon serving vif in a peer namespace, a guest namespace
V4, V4_TCP, V6, V6_TCP = nfm.HASH_IPV4, nfm.HASH_IPV4_TCP, nfm.HASH_IPV6, nfm.HASH_IPV6_TCP
GROUP, GROUP_MAC = "239.1.2.3", bytes.fromhex("01005e010203")


async def ctrl_nic(nbed: NetBed, *, queues: int, mcast: bool = False) -> tuple[Nic, NetCtrl]:
    """NetBed.nic with a ctrl ring (and request-multicast-control)."""
    g, xs = await nbed.guest(name="ctrlguest", mem_pages=640 * queues + 8, gnt_entries=1024 * queues + 8)
    res = await asyncio.to_thread(nbed.cli, "attach", "nic", str(g.domid), "--mac", GUEST_MAC, "--queues",
                                  str(queues))
    assert res.returncode == 0, res.stderr
    gfds = guest_tap(nbed.gns, 1500, queues)
    fronts = [NetFront(g, 0, fd, offload=True, split=True, multicast_control=mcast, datapath="python")
              for fd in gfds]  # mcast() and rx_log are the Python data path's
    ctrl = NetCtrl(g, 0)
    nic = Nic(g, xs, fronts, gfds, 0, backend=res.stdout.strip())
    nbed.nics.append(nic)
    nbed.peer.ip("addr", "add", f"{PEER_V4}/24", "dev", nic.vif)
    nbed.peer.ip("addr", "add", f"{PEER_V6}/64", "dev", nic.vif, "nodad")
    assert await xenbus_connect(xs, nic.fe_path, fronts, ctrl=ctrl) == nic.backend
    return nic, ctrl


@pytest.mark.system_timeout(120)
async def test_toeplitz_steering_puts_each_flow_on_its_mapped_queue(nbed: NetBed) -> None:
    nic, ctrl = await ctrl_nic(nbed, queues=2)
    g, p = nbed.gns, nbed.peer
    try:
        mapping = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1]
        flags = V4 | V4_TCP | V6 | V6_TCP
        await asyncio.to_thread(ctrl.toeplitz, MS_KEY, flags, mapping)
        assert await asyncio.to_thread(ctrl.request, nfm.CTRL_GET_HASH_FLAGS) == (nfm.CTRL_SUCCESS, flags)
        for nf in nic.fronts:
            nf.rx_log.clear()
        # 16 TCP flows per family from the peer (each its own source port), and UDP and ICMP, which hash on the
        # addresses only.
        conns = []
        for fam, addr, port in ((socket.AF_INET, GUEST_V4, 5100), (socket.AF_INET6, GUEST_V6, 5102)):
            lst = g.run(functools.partial(pingtcp.listener, addr, port))
            try:
                def connect(addr: str = addr, port: int = port) -> socket.socket:
                    return pingtcp.connect(addr, port)

                for _ in range(16):
                    conns.append(await asyncio.to_thread(p.run, connect))
                    a, _ = await asyncio.to_thread(lst.accept)
                    a.close()
                udp = p.run(functools.partial(socket.socket, fam, socket.SOCK_DGRAM))
                with udp:
                    for i in range(8):
                        udp.sendto(b"x" * 32, (addr, 6000 + i))
            finally:
                lst.close()
        try:
            await tcp(p, g, GUEST_V4, 4 << 20, 5101)  # hashed transfers through the steered path
            await tcp(p, g, GUEST_V6, 4 << 20, 5103)
            assert await asyncio.to_thread(p.run, lambda: pingtcp.ping(GUEST_V6, count=2)) == 2
        finally:
            for c in conns:
                c.close()
        await asyncio.sleep(0.3)
        seen = {0: 0, 1: 0}
        types: set[int] = set()
        for qi, nf in enumerate(nic.fronts):
            for _off, got, _xdp, head in list(nf.rx_log):
                htype, h = flow_hash(MS_KEY, flags, head)
                if htype == 0:
                    assert got is None, (qi, head[:40].hex())  # ARP: no hash; queue mapping[0] (hash 0)
                    assert qi == mapping[0]
                    continue
                assert got == (htype, h), (qi, got, htype, hex(h))
                assert qi == mapping[h % len(mapping)], (qi, hex(h))
                seen[qi] += 1
                types.add(htype)
        assert seen[0] > 10 and seen[1] > 10, seen  # both queues got flows
        assert types == {V4, V4_TCP, V6, V6_TCP}
        text = await nbed.serve.metrics()
        d = nic.domid
        steered = metric(text, "pvback_request_shapes_total", d, shape="steered_out")
        assert steered > 0 and steered == metric(text, "pvback_request_shapes_total", d, shape="steered_in")
        assert metric(text, "pvback_request_shapes_total", d, shape="rx_hash") >= sum(seen.values())
        assert metric(text, "pvback_requests_total", d, op="ctrl", queue="0") >= 6
        assert metric(text, "pvback_drops_total", d, direction="handoff") == 0
        assert all(nf.error is None for nf in nic.fronts)
    finally:
        ctrl.close()


def _receiver(port: int, group: str | None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    if group:
        mreq = socket.inet_aton(group) + socket.inet_aton(GUEST_V4)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    s.settimeout(0.3)
    return s


def _drain(s: socket.socket) -> int:
    n = 0
    with contextlib.suppress(TimeoutError, BlockingIOError):
        while True:
            s.recv(2048)
            n += 1
    return n


async def _deliveries(nbed: NetBed, rcv: socket.socket, dst: str, port: int, n: int = 5) -> int:
    def send() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(PEER_V4))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            for _ in range(n):
                s.sendto(b"hello", (dst, port))
                time.sleep(0.01)

    await asyncio.to_thread(nbed.peer.run, send)
    return await asyncio.to_thread(_drain, rcv)


async def _mcast(nf: NetFront, add: bool, mac: bytes) -> int:
    token = nf.mcast(add, mac)
    async with asyncio.timeout(5):
        while token not in nf.mcast_status:
            await asyncio.sleep(0.01)
    return nf.mcast_status[token]


@pytest.mark.system_timeout(120)
async def test_multicast_control_filters_real_multicast(nbed: NetBed) -> None:
    nic, ctrl = await ctrl_nic(nbed, queues=1, mcast=True)
    nf = nic.fronts[0]
    g = nbed.gns
    try:
        assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V4, count=2)) == 2  # ARP: broadcast
        rcv = g.run(lambda: _receiver(5200, GROUP))
        bcast = g.run(lambda: _receiver(5201, None))
        with rcv, bcast:
            # Control on, empty list: the group's frames stop at the backend, broadcast passes.
            assert await _deliveries(nbed, rcv, GROUP, 5200) == 0
            assert await _deliveries(nbed, bcast, "198.18.0.255", 5201) == 5
            assert await _mcast(nf, True, GROUP_MAC) == 0
            assert await _deliveries(nbed, rcv, GROUP, 5200) == 5
            assert await _mcast(nf, False, GROUP_MAC) == 0
            assert await _deliveries(nbed, rcv, GROUP, 5200) == 0
            # Linux's XEN_NETBK_MCAST_MAX: 64 addresses, the 65th is answered with an error.
            others = [bytes([1, 0, 0x5E, 0x7F, 0, i]) for i in range(64)]
            assert [await _mcast(nf, True, m) for m in others] == [0] * 64
            assert await _mcast(nf, True, GROUP_MAC) == -1
            assert await _deliveries(nbed, rcv, GROUP, 5200) == 0
            # feature-dynamic-multicast-control: the frontend turns control off while connected.
            await nic.xs.write(f"{nic.fe_path}/request-multicast-control", "0")
            got = 0
            async with asyncio.timeout(10):
                while got == 0:
                    got = await _deliveries(nbed, rcv, GROUP, 5200, n=2)
            await nic.xs.write(f"{nic.fe_path}/request-multicast-control", "1")
            async with asyncio.timeout(10):
                while await _deliveries(nbed, rcv, GROUP, 5200, n=2):
                    pass
        text = await nbed.serve.metrics()
        d = nic.domid
        assert metric(text, "pvback_drops_total", d, direction="mcast_filtered") >= 15
        assert metric(text, "pvback_errors_total", d, reason="mcast_full") == 1
        assert metric(text, "pvback_requests_total", d, op="mcast_add") == 65
        assert metric(text, "pvback_requests_total", d, op="mcast_del") == 1
        assert await read_state(await nbed.dom0(), nic.backend) is S.CONNECTED
        assert nf.error is None
    finally:
        ctrl.close()


@pytest.mark.system_timeout(120)
async def test_xdp_headroom_through_reconfiguring(nbed: NetBed) -> None:
    nic = await nbed.nic(queues=1, datapath="python")  # rx_log: each frame's offset and XDP extra
    nf = nic.fronts[0]
    g = nbed.gns
    d = nic.domid

    async def offsets() -> set[tuple[int, int | None]]:
        nf.rx_log.clear()
        assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V4, count=3, size=1400)) == 3
        await asyncio.sleep(0.1)
        return {(off, xdp) for off, _h, xdp, _f in list(nf.rx_log)}

    assert await offsets() == {(0, None)}
    await reconfigure_xdp(nic.xs, nic.fe_path, 256)
    assert await offsets() == {(256, 256)}  # the data after the headroom, and the XDP extra saying so
    await tcp(nbed.peer, g, GUEST_V4, 4 << 20, 5300)  # large frames: the first buffer is 256 bytes shorter
    await reconfigure_xdp(nic.xs, nic.fe_path, 0)
    assert await offsets() == {(0, None)}
    text = await nbed.serve.metrics()
    assert metric(text, "pvback_device_connects_total", d) == 1  # never reconnected
    assert metric(text, "pvback_drops_total", d, direction="rx") == 0
    # A headroom that leaves too little of the page: that vif fails, with the key named.
    await nic.xs.write(f"{nic.fe_path}/xdp-headroom", "4000")
    await nic.xs.write(f"{nic.fe_path}/state", str(int(S.RECONFIGURING)))
    dom0 = await nbed.dom0()
    await wait_for_state(dom0, nic.backend, {S.CLOSING, S.CLOSED}, timeout=10.0)
    err = await dom0.read_str(f"{nic.backend}/error")
    assert err is not None and "xdp-headroom" in err, err
    assert nf.error is None


@pytest.mark.system_timeout(120)
async def test_hostile_ctrl_requests_fail_only_their_vif(nbed: NetBed) -> None:
    healthy = await nbed.nic(queues=1)
    dom0 = await nbed.dom0()

    async def hostile(name: str, tapname: str, queues: int = 2) -> tuple[Nic, NetCtrl]:
        g, xs = await nbed.guest(name=name, mem_pages=640 * queues + 8, gnt_entries=1024 * queues + 8)
        res = await asyncio.to_thread(nbed.cli, "attach", "nic", str(g.domid), "--queues", str(queues))
        assert res.returncode == 0, res.stderr
        fds = [spare_tap(nbed.gns, f"{tapname}{i}") for i in range(queues)]
        fronts = [NetFront(g, 0, fd, split=False, datapath="python") for fd in fds]  # rx_log
        ctrl = NetCtrl(g, 0)
        nic = Nic(g, xs, fronts, fds, 0, backend=res.stdout.strip())
        nbed.nics.append(nic)
        return nic, ctrl

    async def healthy_ok() -> None:
        assert await read_state(dom0, healthy.backend) is S.CONNECTED
        assert await asyncio.to_thread(nbed.gns.run, lambda: pingtcp.ping(PEER_V4, count=2)) == 2

    bad, ctrl = await hostile("hostile", "hctl")
    try:
        await xenbus_connect(bad.xs, bad.fe_path, bad.fronts, ctrl=ctrl, start=False)
        ask = ctrl.request
        assert await asyncio.to_thread(ask, nfm.CTRL_SET_HASH_ALGORITHM, 1) == (0, 0)
        assert (await asyncio.to_thread(ask, nfm.CTRL_SET_HASH_MAPPING_SIZE, 0xFFFFFFFF))[0] == 2  # huge
        assert (await asyncio.to_thread(ask, nfm.CTRL_SET_HASH_MAPPING_SIZE, 4))[0] == 0
        assert await asyncio.to_thread(ctrl.set_mapping, [0, 7, 0, 0]) == 2  # queue 7 of 2: XSA-270
        assert await asyncio.to_thread(ctrl.set_key, bytes(41)) == 2  # longer than 40 bytes
        assert await asyncio.to_thread(ctrl.set_key, MS_KEY, 40) == 0

        def storm() -> int:  # 4096 requests as fast as the ring takes them
            n = 0
            while n < 4096:
                k = min(ctrl.ring.free_slots(), 4096 - n)
                ctrl.post([(nfm.CTRL_GET_HASH_MAPPING_SIZE, 0, 0, 0)] * k)
                assert all(r[2:] == (0, 128) for r in ctrl.collect(k))
                n += k
            return n

        storm_task = asyncio.create_task(asyncio.to_thread(storm))
        await healthy_ok()  # while the storm runs
        assert await storm_task == 4096
        assert await read_state(dom0, bad.backend) is S.CONNECTED  # answered, not punished
        # A runaway req_prod on the ctrl ring: that vif is disabled, with the reason.
        view = bad.guest.page_view(ctrl.page)
        struct.pack_into("<I", view, 0, struct.unpack_from("<I", view, 0)[0] + 1000)
        ctrl.ev.notify()
        await wait_for_state(dom0, bad.backend, {S.CLOSING, S.CLOSED}, timeout=10.0)
        err = await dom0.read_str(f"{bad.backend}/error")
        assert err is not None and "ctrl ring" in err, err
        await healthy_ok()
    finally:
        ctrl.close()

    # A ctrl-ring-ref the guest never granted: only that vif fails, at connect.
    bad2, ctrl2 = await hostile("hostile2", "hgnt", queues=1)
    try:
        keys = dict(bad2.fronts[0].vif_keys) | bad2.fronts[0].queue_keys | ctrl2.keys()
        keys["ctrl-ring-ref"] = "1000"
        for k, v in keys.items():
            await bad2.xs.write(f"{bad2.fe_path}/{k}", v)
        await wait_for_state(dom0, bad2.backend, {S.INIT_WAIT}, timeout=10.0)
        await bad2.xs.write(f"{bad2.fe_path}/state", str(int(S.CONNECTED)))
        await wait_for_state(dom0, bad2.backend, {S.CLOSING, S.CLOSED}, timeout=10.0)
        err = await dom0.read_str(f"{bad2.backend}/error")
        assert err is not None and "ring" in err, err
    finally:
        ctrl2.close()
    await healthy_ok()
    await tcp(nbed.gns, nbed.peer, PEER_V4, 2 << 20, 5400)
    assert all(f.error is None for f in healthy.fronts)
    text = await nbed.serve.metrics()
    # The failed vif keeps its last counters: 6 set-up requests and the storm, 3 answered with an error.
    assert metric(text, "pvback_requests_total", bad.domid, op="ctrl") == 6 + 4096
    assert metric(text, "pvback_errors_total", bad.domid, reason="ctrl") == 3
    assert metric(text, "pvback_drops_total", healthy.domid) == 0


@pytest.mark.system_timeout(150)
async def test_sigkill_restart_keeps_the_hash_and_multicast_list(nbed: NetBed) -> None:
    """The frontend set its Toeplitz hash and multicast list once; the daemon is SIGKILLed and restarted: the new
    daemon takes both up from the vif's state file (the frontend will not send them again)."""
    nic, ctrl = await ctrl_nic(nbed, queues=2, mcast=True)
    g, p = nbed.gns, nbed.peer
    mapping = [1, 0, 0, 1, 0, 1, 1, 0]
    try:
        await asyncio.to_thread(ctrl.toeplitz, MS_KEY, V4 | V4_TCP, mapping)
        assert await _mcast(nic.fronts[0], True, GROUP_MAC) == 0
        assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V4, count=1)) == 1
        rcv = g.run(lambda: _receiver(5500, GROUP))
        with rcv:
            assert await _deliveries(nbed, rcv, GROUP, 5500) == 5
            assert nbed.serve.kill(signal.SIGKILL) == -signal.SIGKILL
            nbed.serve.start()
            async with asyncio.timeout(20):  # the state key still says Connected: wait for the new daemon's
                while "msg=connected" not in nbed.serve.log_text().split("==== serve start #2")[-1]:
                    await asyncio.sleep(0.05)
            assert await _deliveries(nbed, rcv, GROUP, 5500) == 5  # the list survived
            assert await _deliveries(nbed, rcv, "239.9.9.9", 5500) == 0  # and the filter is on
        assert await asyncio.to_thread(ctrl.request, nfm.CTRL_GET_HASH_FLAGS) == (nfm.CTRL_SUCCESS, V4 | V4_TCP)
        for nf in nic.fronts:
            nf.rx_log.clear()
        await tcp(p, g, GUEST_V4, 1 << 20, 5501)
        await asyncio.sleep(0.2)
        hashed = 0
        for qi, nf in enumerate(nic.fronts):
            for _o, got, _x, head in list(nf.rx_log):
                htype, h = flow_hash(MS_KEY, V4 | V4_TCP, head)
                if htype:
                    assert got == (htype, h) and qi == mapping[h % len(mapping)], (qi, got, hex(h))
                    hashed += 1
        assert hashed > 10
        second = nbed.serve.log_text().split("==== serve start #2")[1]
        assert "control state taken up" in second, second[-2000:]
        assert all(nf.error is None for nf in nic.fronts)
    finally:
        ctrl.close()
