"""netback's C data path end to end on the emulated platform: an emulated guest whose netfront bridges a tap
in the guest's network namespace to its rings, the backend's queues on a vif tap owned by a peer namespace.
ping (IPv4, IPv6) and hashed TCP transfers both ways; 1 and 2 queues (taps); MTU 1500 and 9000; with and
without checksum/GSO offloads negotiated; a hostile frontend fails only its own queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.drivers.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap
from backends.guests.guest import Guest
from backends.guests.netfront import NetFront
from backends.net.dataplane import NetDataplane, NetQueueConfig, VifShared
from backends.platform.emulated import EmulatedPlatform
from backends.sim.broker import BrokerThread

from . import pingtcp
from .netns import NetNS

GUEST_MAC = "00:16:3e:00:00:02"
HOST_MAC = "fe:ff:ff:ff:ff:ff"
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100


@pytest.fixture
def bed() -> Iterator[tuple[EmulatedPlatform, str, NetNS, NetNS]]:
    d = Path(tempfile.mkdtemp(prefix="pvb-net-", dir="/tmp"))
    tag = f"{os.getpid()}"
    with BrokerThread(str(d / "broker.sock")), NetNS(f"pvbk-g-{tag}") as g, NetNS(f"pvbk-p-{tag}") as p:
        plat = EmulatedPlatform(str(d))
        try:
            yield plat, str(d / "broker.sock"), g, p
        finally:
            plat.close()
            shutil.rmtree(d, ignore_errors=True)


def guest_tap(ns: NetNS, mtu: int, queues: int) -> list[int]:
    """The guest's NIC: a multi-queue tap in its namespace (one fd per netif queue, so the guest kernel
    spreads flows over queues like a real multi-queue NIC), with the vif's MAC and the guest's addresses."""

    def make() -> list[int]:
        fds = []
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", b"eth0",
                                                    IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE))
            fds.append(fd)
        return fds

    fd = ns.run(make)
    ns.ip("link", "set", "eth0", "address", GUEST_MAC, "mtu", str(mtu), "up")
    ns.ip("addr", "add", "198.18.0.2/24", "dev", "eth0")
    ns.ip("addr", "add", "fd00::2/64", "dev", "eth0", "nodad")
    return fd


class Wire:
    """Guest + netfront + backend queues, started on the running loop."""

    def __init__(self, plat: EmulatedPlatform, broker: str, g: NetNS, p: NetNS, *, mtu: int = 1500,
                 queues: int = 1, offload: bool = False, split: bool = False, drain_ms: int = 0,
                 vif: VifShared | None = None, csum_full: bool = False, datapath: str = "c") -> None:
        self.plat = plat
        self.gfds = guest_tap(g, mtu, queues)
        self.tap = Tap("vif1.0", mac=HOST_MAC, mtu=mtu, queues=queues)
        p.run(self.tap.open)
        p.ip("addr", "add", "198.18.0.1/24", "dev", "vif1.0")
        p.ip("addr", "add", "fd00::1/64", "dev", "vif1.0", "nodad")
        self.tap.set_offload((TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) if offload else 0)
        self.guest = Guest(broker, name="netguest", mem_pages=640 * queues, gnt_entries=1024 * queues)
        plat.open_domain(self.guest.domid)
        self.fronts: list[NetFront] = []
        self.dps: list[NetDataplane] = []
        for qi in range(queues):
            nf = NetFront(self.guest, 0, self.gfds[qi], offload=offload, split=split, datapath=datapath)
            self.fronts.append(nf)
            k = nf.keys()
            tx = plat.map_grants(self.guest.domid, [int(k["tx-ring-ref"])], writable=True)
            rx = plat.map_grants(self.guest.domid, [int(k["rx-ring-ref"])], writable=True)
            if split:
                ev_tx = plat.bind_interdomain(self.guest.domid, int(k["event-channel-tx"]))
                ev_rx: Any = plat.bind_interdomain(self.guest.domid, int(k["event-channel-rx"]))
            else:
                ev_tx, ev_rx = plat.bind_interdomain(self.guest.domid, int(k["event-channel"])), None
            cfg = NetQueueConfig(frontend_domid=self.guest.domid, mac=bytes.fromhex(GUEST_MAC.replace(":", "")),
                                 rx_gso_tcpv4=offload, rx_gso_tcpv6=offload, rx_csum=offload,
                                 rx_drain_timeout_ms=drain_ms, vif=vif, tx_csum_full=csum_full)
            self.dead: list[str] = []
            self.dps.append(NetDataplane(tx, rx, ev_tx, ev_rx, plat.gnt, self.tap.fds[qi], cfg,
                                         on_dead=self.dead.append, name=f"q{qi}"))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for nf in self.fronts:
            nf.start()
        for dp in self.dps:
            dp.start(loop)

    async def close(self, p: NetNS) -> None:
        for nf in self.fronts:
            nf.close()
        for dp in self.dps:
            await dp.stop()
        self.plat.close_domain(self.guest.domid)
        self.guest.close()
        for fd in self.gfds:
            os.close(fd)
        p.run(self.tap.remove)

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for dp in self.dps:
            for k, v in dp.stats().items():
                total[k] = total.get(k, 0) + v
        return total


async def tcp(src: NetNS, dst: NetNS, addr: str, nbytes: int, port: int) -> None:
    """A hashed transfer from `src` to `dst` (listening on addr:port): the hashes at both ends agree."""
    lst = dst.run(lambda: pingtcp.listener(addr, port))
    pool = concurrent.futures.ThreadPoolExecutor(2)
    loop = asyncio.get_running_loop()
    try:
        def server() -> tuple[int, str]:
            conn, _ = lst.accept()
            with conn:
                return pingtcp.recv_hashed(conn)

        srv = loop.run_in_executor(pool, server)

        def client() -> str:
            with src.run(lambda: pingtcp.connect(addr, port)) as c:
                return pingtcp.send_hashed(c, nbytes)

        sent = await loop.run_in_executor(pool, client)
        n, got = await asyncio.wait_for(srv, 60)
        assert (n, got) == (nbytes, sent)
    finally:
        lst.close()
        pool.shutdown()


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 120))


@pytest.mark.parametrize(("mtu", "offload", "split", "queues", "datapath"), [
    (1500, False, False, 1, "c"), (1500, True, False, 2, "c"), (9000, True, True, 1, "c"), (9000, False, True, 2, "c"),
    (1500, False, False, 1, "python"), (9000, True, True, 2, "python")],
    ids=["mtu1500-plain", "mtu1500-offload-2q", "mtu9000-offload-split", "mtu9000-plain-split-2q",
         "py-mtu1500-plain", "py-mtu9000-offload-split-2q"])
def test_ping_and_tcp_both_ways(bed: Any, mtu: int, offload: bool, split: bool, queues: int, datapath: str) -> None:
    """The guest's netfront data path in C (the default) and in Python (the reference) carry the same traffic."""
    plat, broker, g, p = bed

    async def main() -> None:
        w = Wire(plat, broker, g, p, mtu=mtu, offload=offload, split=split, queues=queues, datapath=datapath)
        try:
            w.start()
            assert await asyncio.to_thread(g.run, lambda: pingtcp.ping("198.18.0.1", count=3)) == 3
            assert await asyncio.to_thread(g.run, lambda: pingtcp.ping("fd00::1", count=3)) == 3
            assert await asyncio.to_thread(p.run, lambda: pingtcp.ping("198.18.0.2", count=2, size=mtu - 28)) == 2
            await tcp(g, p, "198.18.0.1", 8 << 20, 5001)
            await tcp(p, g, "fd00::2", 8 << 20, 5002)
            s = w.stats()
            assert s["tx_bytes"] > 8 << 20 and s["rx_bytes"] > 8 << 20, s
            assert s["tx_dropped"] == 0 and not w.dead, (s, w.dead)
            if offload:
                assert s["tx_gso"] > 0 and s["rx_gso"] > 0, s
            else:
                assert s["tx_gso"] == 0 and s["rx_gso"] == 0, s
            assert all(nf.error is None for nf in w.fronts)
            fs = [nf.stats for nf in w.fronts]
            assert sum(f["tx"] for f in fs) > 0 and sum(f["rx"] for f in fs) > 0, fs
            assert all(f["tx_errors"] == 0 and f["rx_errors"] == 0 for f in fs), fs
            if datapath == "c":  # the C loop's own counters: it read and wrote the tap, batch-shaped
                assert all(f["tap_reads"] > 0 and f["tap_writes"] > 0 for f in fs), fs
                assert sum(f["tx_gso"] for f in fs) == s["tx_gso"] and sum(f["rx_gso"] for f in fs) == s["rx_gso"]
            if queues > 1:  # both directions used more than one queue: the flows were spread
                per_q = [dp.stats() for dp in w.dps]
                assert sum(1 for q in per_q if q["rx_packets"] + q["tx_packets"] > 0) == queues, per_q
        finally:
            await w.close(p)

    run(main())


def test_hostile_tx_drops_then_fatal_disables_only_that_queue(bed: Any) -> None:
    """A 19-fragment packet is answered with errors and the queue lives; a 21-fragment one (>= fatal_skb_slots)
    kills that queue (the device then disables the vif, as Linux does); the other queue's pump is untouched."""
    from backends.net.dataplane import QueueDeadError

    from . import wire

    plat, broker, g, p = bed

    async def main() -> None:
        w = Wire(plat, broker, g, p, queues=2)
        try:
            nf, q = w.fronts[1], w.dps[1].queue  # queue 1 is driven by hand; queue 0 carries real traffic
            w.fronts[0].start()
            w.dps[0].start(asyncio.get_running_loop())
            page = nf._tx_free[0]
            ref = nf._tx_ref[page]
            drop = [s.pack() if isinstance(s, wire.Tx) else s for s in wire.packet(14 + 19, [1] * 19)]
            drop = [struct.pack("<I", ref) + s[4:] for s in drop]  # every slot on a granted page
            nf.tx.put(drop, 12)
            nf.tx.push()
            assert q.tx() == 0
            rsps = nf.tx.consume(12)
            assert len(rsps) == 20 and all(struct.unpack_from("<h", r, 2)[0] == wire.RSP_ERROR for r in rsps)
            assert q.stats()["rule_slots"] == 1 and not q.stats()["rule_fatal_slots"]
            fatal = [struct.pack("<I", ref) + (s.pack() if isinstance(s, wire.Tx) else s)[4:]
                     for s in wire.packet(14 + 21, [1] * 21)]
            nf.tx.put(fatal, 12)
            nf.tx.push()
            with pytest.raises(QueueDeadError, match="fatal_slots"):
                q.tx()
            with pytest.raises(QueueDeadError):
                q.rx()
            assert not w.dps[0].queue.stats()["rule_fatal_slots"] and w.dps[0]._pump.running
        finally:
            await w.close(p)

    run(main())


def test_rx_stall_is_purged_after_the_drain_timeout(bed: Any) -> None:
    """A frontend that posts no RX buffers: the first host frame is held (a stall), and once the stall outlasts
    rx_drain_timeout_ms it and what the tap queued are dropped and counted; when the frontend starts posting,
    traffic flows again.  The TX side is unaffected meanwhile."""
    import socket
    import time

    plat, broker, g, p = bed

    async def main() -> None:
        w = Wire(plat, broker, g, p, drain_ms=150)
        try:
            for dp in w.dps:
                dp.start(asyncio.get_running_loop())  # the netfront is not started: no RX buffers posted
            p.ip("neigh", "add", "198.18.0.2", "lladdr", GUEST_MAC, "dev", "vif1.0")

            def blast(n: int) -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    for i in range(n):
                        s.sendto(i.to_bytes(4, "big") * 64, ("198.18.0.2", 9))

            await asyncio.to_thread(p.run, lambda: blast(20))
            await asyncio.sleep(0.05)
            s = w.stats()
            assert s["rx_stalls"] == 1 and s["rx_purges"] == 0 and s["rx_packets"] == 0, s
            deadline = time.monotonic() + 5
            while w.stats()["rx_purges"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            s = w.stats()
            assert s["rx_purges"] == 1 and s["rx_dropped"] >= 20 and s["rx_packets"] == 0, s
            assert not w.dead
            # The frontend comes up: the next frames are delivered.
            for nf in w.fronts:
                nf.start()
            assert await asyncio.to_thread(g.run, lambda: pingtcp.ping("198.18.0.1", count=3)) == 3
            s = w.stats()
            assert s["rx_packets"] >= 3 and s["rx_purges"] == 1, s
        finally:
            await w.close(p)

    run(main())
