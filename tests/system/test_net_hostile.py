"""netback's hostile suite through the real daemon: a hostile guest's netfront, driven slot by slot, breaks each
netif rule Linux's xen-netback enforces, while a healthy guest's TCP stream to the peer runs alongside and must
finish with every byte (hash at both ends), no drop and no error.  A rule that drops a packet answers its slots
with errors, counts the reason and leaves the vif working (its next valid packet reaches the host); a fatal rule
fails only that vif, with the rule in its error node (Linux disables the vif: xenvif_fatal_tx_err).  Also: a
guest that posts no RX buffers (bounded, purged, carrier off and back on), event storms on both channels, and
source-MAC spoofing with the per-vif switch.

The hostile vifs' frames are UDP/IPv4 to an address of their tap in the peer namespace, so "reached the host"
means the peer's kernel accepted the frame (IP header checksum, lengths, offloaded UDP checksum) and a UDP
socket got its payload.  Addresses from 198.18.0.0/15, in namespaces this test owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends.guests.guest import Guest
from backends.guests.netfront import NetFront, xenbus_connect
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import read_state, wait_for_state
from backends.xenstore.client import XenStoreClient
from tests.net import pingtcp, wire
from tests.system.conftest import SimProc
from tests.system.netbeds import Stream, net_bed
from tests.system.test_net import PEER_V4, NetBed, Nic, metric, spare_tap

S = XenbusState
HOST_MAC = bytes.fromhex("feffffffffff")  # the vif tap's own MAC (netback's)
PAGE = 4096


@pytest.fixture
def hbed(sim: SimProc, tmp_path: Path) -> Iterator[NetBed]:
    # A short drain timeout: the no-RX-buffers case must not wait Linux's 10 s.
    with net_bed(sim, tmp_path, "rx_drain_timeout_ms = 300") as bed:
        yield bed


# -- frames and slots ------------------------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def udp_frame(src_mac: bytes, src: str, dst: str, payload: bytes, *, port: int, csum_blank: bool = False) -> bytes:
    """Ethernet + IPv4 + UDP to the tap (`dst`).  UDP checksum 0 ("none", legal over IPv4), or with csum_blank
    the pseudo-header sum a guest stack leaves for the offload to finish."""
    ulen = 8 + len(payload)
    sa, da = socket.inet_aton(src), socket.inet_aton(dst)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0, sa, da)
    ip = ip[:10] + struct.pack("!H", ~_csum(ip) & 0xFFFF) + ip[12:]
    ucs = _csum(sa + da + struct.pack("!BBH", 0, 17, ulen)) if csum_blank else 0
    udp = struct.pack("!HHHH", 40000, port, ulen, ucs)
    return HOST_MAC + src_mac + b"\x08\x00" + ip + udp + payload


@dataclass
class Hostile:
    """One vif of the hostile guest, its rings driven by hand (its netfront thread never runs)."""

    nic: Nic
    nf: NetFront
    mac: bytes
    addr: str = "198.18.9.2"  # the guest's source address; the tap has .1 of the same /24 (with a subnet)
    tap_addr: str = "198.18.9.1"
    next_id: int = 0

    @property
    def page(self) -> int:
        return self.nf._tx_free[0]

    @property
    def ref(self) -> int:
        return self.nf._tx_ref[self.page]

    def frame(self, payload: bytes, *, port: int = 6000, csum_blank: bool = False, mac: bytes | None = None) -> bytes:
        return udp_frame(mac or self.mac, self.addr, self.tap_addr, payload, port=port, csum_blank=csum_blank)

    def slots(self, frame: bytes, frags: list[int], *, flags: int = 0, extras: tuple[bytes, ...] = (),
              first_size: int | None = None, frag_offsets: dict[int, int] | None = None) -> list[bytes]:
        """The frame in one granted page, the first slot holding what the fragments leave and each fragment the
        next bytes (at their own offsets in the same page), as a frontend splits a packet."""
        view = self.nf.guest.page_view(self.page)
        view[: len(frame)] = frame
        share = len(frame) - sum(frags)
        more = wire.NETTXF_MORE_DATA if frags else 0
        out = [wire.Tx(self.ref, 0, flags | more | (wire.NETTXF_EXTRA_INFO if extras else 0), self._id(),
                       len(frame) if first_size is None else first_size).pack(), *extras]
        off = share
        for i, size in enumerate(frags):
            at = (frag_offsets or {}).get(i, off)
            out.append(wire.Tx(self.ref, at, wire.NETTXF_MORE_DATA if i + 1 < len(frags) else 0, self._id(),
                               size).pack())
            off += size
        return out

    def _id(self) -> int:
        self.next_id = (self.next_id + 1) & 0xFFFF
        return self.next_id

    def post(self, slots: list[bytes]) -> None:
        assert self.nf.tx.put(slots, wire.TX_SLOT) == len(slots)
        self.nf.tx.push()
        self.nf.ev_tx.notify()

    async def send(self, slots: list[bytes], timeout: float = 5.0) -> list[int]:
        """Post a packet's slots and wait for one response per slot; their statuses."""
        self.post(slots)
        got: list[int] = []
        async with asyncio.timeout(timeout):
            while len(got) < len(slots):
                got += [struct.unpack_from("<h", r, 2)[0] for r in self.nf.tx.consume(wire.TX_SLOT)]
                if len(got) < len(slots):
                    await asyncio.sleep(0.01)
        return got


async def hostile_vif(bed: NetBed, guest: tuple[Guest, XenStoreClient], devid: int, *, mac: bytes,
                      attach_args: tuple[str, ...] = (), subnet: int | None = None) -> Hostile:
    """`pvback attach nic` for the hostile guest (devid `devid`), a netfront connected but not started: no RX
    buffers posted, TX driven by hand.  With `subnet`, the tap gets 198.18.<subnet>.1/24 in the peer."""
    g, xs = guest
    res = await asyncio.to_thread(bed.cli, "attach", "nic", str(g.domid), "--devid", str(devid),
                                  "--mac", ":".join(f"{b:02x}" for b in mac), "--queues", "1", *attach_args)
    assert res.returncode == 0, res.stderr
    fd = spare_tap(bed.gns, f"hx{devid}")
    nf = NetFront(g, 0, fd, split=True, tx_pages=2, rx_buffers=8)
    nic = Nic(g, xs, [nf], [fd], devid, backend=res.stdout.strip())
    bed.nics.append(nic)
    await xenbus_connect(xs, nic.fe_path, [nf], start=False)
    h = Hostile(nic, nf, mac)
    if subnet is not None:
        h.addr, h.tap_addr = f"198.18.{subnet}.2", f"198.18.{subnet}.1"
        bed.peer.ip("addr", "add", f"{h.tap_addr}/24", "dev", nic.vif)
    return h


class Catcher:
    """A UDP socket on the peer's end of a hostile vif: the payloads the host accepted."""

    def __init__(self, bed: NetBed, addr: str, port: int = 6000) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((addr, port))
            return s

        self.sock = bed.peer.run(make)

    def drain(self, wait: float = 0.5) -> list[bytes]:
        out = []
        self.sock.settimeout(wait)
        with contextlib.suppress(TimeoutError):
            while True:
                out.append(self.sock.recv(65536))
                self.sock.settimeout(0.1)
        return out

    def close(self) -> None:
        self.sock.close()


@contextlib.asynccontextmanager
async def healthy_stream(bed: NetBed, port: int = 5201) -> AsyncIterator[Nic]:
    """A healthy guest's NIC with a hashed TCP stream to the peer running for the whole block; afterwards the
    stream must complete with every byte, the NIC without drops or errors, and still answer pings.  Its vif is
    rate-limited to 20 MB/s: load enough to notice a stall, without eating the machine's shared cores."""
    nic = await bed.nic(queues=1, attach_args=("--rate", "2000000,100000"))
    s = Stream(bed, None, port)
    try:
        before = s.received
        yield nic
        async with asyncio.timeout(10):  # still moving after whatever the hostile guest did
            while s.received <= before + (1 << 20):
                await asyncio.sleep(0.05)
    finally:
        await s.finish(timeout=90)
    assert await asyncio.to_thread(bed.gns.run, lambda: pingtcp.ping(PEER_V4, count=2)) == 2
    text = await bed.serve.metrics()
    assert metric(text, "pvback_device_state", nic.domid) == S.CONNECTED
    assert metric(text, "pvback_drops_total", nic.domid) == 0
    assert metric(text, "pvback_errors_total", nic.domid) == 0
    assert all(nf.error is None for nf in nic.fronts)


async def errors(bed: NetBed, h: Hostile) -> dict[str, int]:
    return await bed.serve.errors(h.nic.domid, h.nic.devid)


# -- rules that drop one packet ----------------------------------------------------------------------------------

ERR, OK, NULL = wire.RSP_ERROR, wire.RSP_OKAY, wire.RSP_NULL


@pytest.mark.system_timeout(150)
async def test_dropping_rules_fail_only_the_packet(hbed: NetBed) -> None:
    bed = hbed
    async with healthy_stream(bed):
        guest = await bed.guest(name="hostile", mem_pages=256, gnt_entries=512)
        a = await hostile_vif(bed, guest, 0, mac=bytes.fromhex("00163e000a01"), subnet=1)
        catch = Catcher(bed, a.tap_addr)
        try:
            delivered: list[bytes] = []

            async def valid(tag: str) -> None:
                """A's next valid packet works: answered OKAY and accepted by the host."""
                payload = f"valid after {tag}".encode()
                assert await a.send(a.slots(a.frame(payload), [])) == [OK]
                delivered.append(payload)

            def bad(tag: str) -> bytes:
                return a.frame(f"must not arrive: {tag}".encode())

            gso = wire.gso(1400)
            # Built when sent: each writes its frame into the one TX page.
            cases: list[tuple[str, Callable[[], list[bytes]], list[int], str]] = [
                # More slots than Linux's XEN_NETBK_LEGACY_SLOTS_MAX (18 after the first, the historical
                # MAX_SKB_FRAGS) but fewer than fatal_skb_slots (20): the packet is dropped, the vif lives.
                ("19-frags", lambda: a.slots(bad("19"), [1] * 19), [ERR] * 20, "slots"),
                ("20-frags", lambda: a.slots(bad("20"), [1] * 20), [ERR] * 21, "slots"),
                # A fragment larger than what remains of the frame (first->size overflowed for >= 64 KiB frames):
                # Linux drops ("cannot be fatal error as there are buggy frontends that do this").
                ("size-past-rest", lambda: a.slots(bad("size"), [30, 30], first_size=40), [ERR] * 3, "size"),
                # The first slot must hold at least an Ethernet header (Linux "Bad packet size"): with the copy
                # into one linear buffer, no host code ever parses a header split over tiny slots (XSA-423).
                ("short-first-slot", lambda: a.slots(bad("short"), [len(bad("short")) - 10]), [ERR] * 2, "short"),
                # The same extra-info type twice: Linux lets the second overwrite the first; we refuse to guess
                # which one the frontend meant.  Extras are answered NULL (make_tx_response for extra slots).
                ("repeated-gso-extra", lambda: a.slots(a.frame(b"x" * 3000, csum_blank=True), [],
                                                       flags=wire.NETTXF_CSUM_BLANK,
                                                       extras=(wire.gso(1400, flags=wire.EXTRA_FLAG_MORE), gso)),
                 [ERR, NULL, NULL], "extra_repeat"),
                # csum_blank on a frame with no TCP/UDP header to finish (skb_checksum_setup fails in Linux).
                ("csum-without-l4", lambda: a.slots(HOST_MAC + a.mac + b"\x88\xb5" + b"\0" * 46, [],
                                                    flags=wire.NETTXF_CSUM_BLANK), [OK], "csum"),
                # Spoofing: a source MAC that is not the vif's `mac` (what OVN port security / libxl's vif-route
                # rules enforce): consumed (OKAY, as Linux answers a packet it took), never delivered.
                ("spoofed-source-mac", lambda: a.slots(a.frame(b"spoofed", mac=bytes.fromhex("00163e0000ff")), []),
                 [OK], "spoof"),
            ]
            for name, build, statuses, reason in cases:
                assert await a.send(build()) == statuses, name
                await valid(name)
                assert (await errors(bed, a)).get(reason, 0) >= 1, (name, await errors(bed, a))

            # Legal but hostile shapes that must reach the host intact.
            # Zero-length fragments (XSA-448: Linux dereferenced a NULL page for a zero-length frag after the
            # header split): answered, never copied, the frame delivered whole.
            payload = b"zero-length fragments" * 20
            f = a.frame(payload)
            assert await a.send(a.slots(f, [0, 100, 0, 50, 0])) == [OK] * 6
            delivered.append(payload)
            # Headers split over many tiny slots (XSA-423, and XSA-432 in Linux's fix for it): the Ethernet
            # header alone in the first slot, IP and UDP headers one byte per slot (18 after the first, the
            # most a packet may use), with csum_blank so the host must find the L4 header to finish it.
            payload = b"headers in tiny slots" * 10
            f = a.frame(payload, csum_blank=True)
            tiny = [1] * 17 + [len(f) - 14 - 17]
            assert await a.send(a.slots(f, tiny, flags=wire.NETTXF_CSUM_BLANK)) == [OK] * 19
            delivered.append(payload)

            got = await asyncio.to_thread(catch.drain)
            assert sorted(got) == sorted(delivered), (sorted(got), sorted(delivered))
            assert await read_state(await bed.dom0(), a.nic.backend) is S.CONNECTED

            # Event storms on both of A's channels (another vCPU notifying in a tight loop): the daemon keeps
            # serving the healthy stream and the metrics endpoint, and A still works afterwards.
            stop = threading.Event()
            count = [0]

            def storm() -> None:
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and not stop.is_set():
                    for _ in range(500):
                        a.nf.ev_tx.notify()
                        a.nf.ev_rx.notify()
                    count[0] += 1000

            th = threading.Thread(target=storm)
            th.start()
            worst = 0.0
            try:
                while th.is_alive():
                    t0 = time.monotonic()
                    await bed.serve.metrics(timeout=5)
                    worst = max(worst, time.monotonic() - t0)
                    await asyncio.sleep(0.1)
            finally:
                stop.set()
                await asyncio.to_thread(th.join, 10)
            assert count[0] >= 20_000, count
            assert worst < 2.0, f"a metrics scrape took {worst:.2f} s during the storm"
            await valid("storm")
            assert await asyncio.to_thread(catch.drain) == [b"valid after storm"]
            assert await read_state(await bed.dom0(), a.nic.backend) is S.CONNECTED
            assert bed.serve.alive
        finally:
            catch.close()


async def test_spoofing_switch_is_per_vif(hbed: NetBed) -> None:
    """`attach nic --allow-spoof`: that vif's frames with any source MAC reach the host; the default vif next to
    it still drops them."""
    bed = hbed
    guest = await bed.guest(name="spoofer", mem_pages=128, gnt_entries=256)
    strict = await hostile_vif(bed, guest, 0, mac=bytes.fromhex("00163e000b01"), subnet=3)
    loose = await hostile_vif(bed, guest, 1, mac=bytes.fromhex("00163e000b02"), subnet=4,
                              attach_args=("--allow-spoof",))
    assert await (await bed.dom0()).read_str(f"{loose.nic.backend}/pvback-allow-spoof") == "1"
    other = bytes.fromhex("020000000001")
    c1, c2 = Catcher(bed, strict.tap_addr), Catcher(bed, loose.tap_addr)
    try:
        assert await strict.send(strict.slots(strict.frame(b"strict", mac=other), [])) == [OK]
        assert await loose.send(loose.slots(loose.frame(b"loose", mac=other), [])) == [OK]
        assert await asyncio.to_thread(c1.drain) == []
        assert await asyncio.to_thread(c2.drain) == [b"loose"]
        assert (await errors(bed, strict)).get("spoof") == 1
        assert "spoof" not in await errors(bed, loose)
    finally:
        c1.close()
        c2.close()


# -- fatal rules: only that vif fails -----------------------------------------------------------------------------


def _fatal_cases(h: Hostile) -> dict[str, list[bytes]]:
    f = h.frame(b"fatal" * 20)
    return {
        # "Cross page boundary": a fragment's offset + size past its 4 KiB page (Linux: fatal).
        "cross_page": h.slots(f, [50], frag_offsets={0: PAGE - 20}),
        # The first slot's own share past its page ("No crossing a page as the payload mustn't fragment").
        "cross_page-first": [wire.Tx(h.ref, PAGE - 30, 0, 1, len(f)).pack()],
        # An extra-info type netif.h does not define (xenvif_get_extras: "Invalid extra type": fatal).
        "extra_type": h.slots(f, [], extras=(wire.extra(9),)),
        "extra_type-0": h.slots(f, [], extras=(wire.extra(0),)),
        # xenvif_set_skb_gso: a GSO extra with size 0, or a type that is neither TCPv4 nor TCPv6: fatal.
        "gso_size": h.slots(h.frame(b"g" * 2000, csum_blank=True), [], flags=wire.NETTXF_CSUM_BLANK,
                            extras=(wire.gso(0),)),
        "gso_type": h.slots(h.frame(b"g" * 2000, csum_blank=True), [], flags=wire.NETTXF_CSUM_BLANK,
                            extras=(wire.gso(1400, gtype=7),)),
        # more_data on the last request published: a packet running past what the frontend pushed (Linux
        # "Asked for %d slots but exceeds this limit").
        "incomplete": h.slots(f, [10])[:1],
    }


FATAL = ["cross_page", "cross_page-first", "extra_type", "extra_type-0", "gso_size", "gso_type", "incomplete",
         "ring-tx", "ring-rx"]


@pytest.mark.system_timeout(180)
async def test_fatal_rules_fail_only_that_vif(hbed: NetBed) -> None:
    bed = hbed
    dom0 = await bed.dom0()
    async with healthy_stream(bed):
        guest = await bed.guest(name="hostile", mem_pages=512, gnt_entries=1024)
        for devid, case in enumerate(FATAL):
            h = await hostile_vif(bed, guest, devid, mac=bytes([0, 0x16, 0x3E, 0, 0x0C, devid]))
            rule = case.split("-")[0]
            if case == "ring-tx":
                # req_prod running away (more requests than the ring holds): "Impossible number of requests".
                struct.pack_into("<I", h.nf.guest.page_view(h.nf._pages[0]), 0, h.nf.tx.c.req_prod_pvt + 1000)
                h.nf.ev_tx.notify()
            elif case == "ring-rx":
                # The same on the RX ring, seen when the backend next needs buffers: a frame from the host.
                struct.pack_into("<I", h.nf.guest.page_view(h.nf._pages[1]), 0, (1 << 31) + 5)
                h.nf.ev_rx.notify()
                await asyncio.to_thread(bed.peer.run, lambda vif=h.nic.vif: _raw_broadcast(vif))
            else:
                h.post(_fatal_cases(h)[case])
            await wait_for_state(dom0, h.nic.backend, {S.CLOSING, S.CLOSED}, timeout=10.0)
            err = await dom0.read_str(f"{h.nic.backend}/error")
            assert err is not None and rule in err, (case, err)
            text = await bed.serve.metrics()
            assert metric(text, "pvback_errors_total", guest[0].domid, devid=str(devid), reason=rule) == 1, case
        assert bed.serve.alive


def _raw_broadcast(ifname: str) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        s.send(b"\xff" * 6 + HOST_MAC + b"\x88\xb5" + b"\0" * 46)


# -- a guest that takes nothing -------------------------------------------------------------------------------


def _carrier(bed: NetBed, vif: str) -> bool:
    return "NO-CARRIER" not in bed.peer.ip("-o", "link", "show", "dev", vif)


@pytest.mark.system_timeout(120)
async def test_guest_posting_no_rx_buffers_is_bounded_and_recovers(hbed: NetBed) -> None:
    """A frontend that posts no RX buffers: the first frame waits (ring_full), the stall outlasts
    rx_drain_timeout_ms and is purged (the held frame and what the tap queued dropped and counted), and the
    tap's carrier goes off so the host drops further frames itself (nothing buffers without bound on the host
    for this guest: Linux's rx_stall carrier-off).  Once the guest posts buffers the carrier comes back and
    frames are delivered.  The healthy stream is unaffected throughout."""
    bed = hbed
    async with healthy_stream(bed):
        guest = await bed.guest(name="deaf", mem_pages=128, gnt_entries=256)
        h = await hostile_vif(bed, guest, 0, mac=bytes.fromhex("00163e000d01"), subnet=5)
        d, vif = guest[0].domid, h.nic.vif
        bed.gns.ip("link", "set", "hx0", "up")  # where its netfront hands the frames once it runs
        bed.peer.ip("neigh", "replace", h.addr, "lladdr", "00:16:3e:00:0d:01", "dev", vif)

        def blast(n: int) -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for i in range(n):
                    with contextlib.suppress(OSError):  # ENOBUFS once the host drops
                        s.sendto(i.to_bytes(4, "big") * 300, (h.addr, 9))

        assert _carrier(bed, vif)
        await asyncio.to_thread(bed.peer.run, lambda: blast(2000))
        async with asyncio.timeout(10):
            while not await bed.serve.metrics() or \
                    metric(await bed.serve.metrics(), "pvback_device_status", d, key="rx_purges") < 1:
                await asyncio.sleep(0.05)
        text = await bed.serve.metrics()
        assert metric(text, "pvback_ring_full_total", d) >= 1
        dropped = metric(text, "pvback_drops_total", d, direction="rx")
        assert dropped >= 1
        async with asyncio.timeout(5):
            while _carrier(bed, vif):
                await asyncio.sleep(0.05)
        assert metric(await bed.serve.metrics(), "pvback_device_status", d, key="carrier_offs") == 1
        # Carrier off: the host drops for this guest; the backend sees (and buffers) none of it.
        await asyncio.to_thread(bed.peer.run, lambda: blast(2000))
        await asyncio.sleep(0.3)
        text = await bed.serve.metrics()
        assert metric(text, "pvback_drops_total", d, direction="rx") <= dropped + 1
        assert metric(text, "pvback_requests_total", d, op="rx") == 0
        assert await read_state(await bed.dom0(), h.nic.backend) is S.CONNECTED

        # The guest wakes up and posts buffers: carrier on, frames delivered to its netfront.
        h.nf.start()
        async with asyncio.timeout(5):
            while not _carrier(bed, vif):
                await asyncio.sleep(0.05)
        async with asyncio.timeout(10):
            while h.nf.stats["rx"] < 5:
                await asyncio.to_thread(bed.peer.run, lambda: blast(10))
                await asyncio.sleep(0.1)
        assert metric(await bed.serve.metrics(), "pvback_requests_total", d, op="rx") >= 5
        assert h.nf.error is None
