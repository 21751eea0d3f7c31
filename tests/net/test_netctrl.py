"""netback's control plane in C (csrc/netctrl.c) without a network: the frame hash against Microsoft's RSS
vectors, the queue pick, and the ctrl ring's requests with Linux's status codes, served from a real emulated
guest's granted ring and pages (the hostile ones included: XSA-270 mappings, overflowing ranges, a key longer
than 40 bytes, a grant that does not exist, a request storm, a runaway req_prod)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.guests import netfront as nfm
from backends.guests.guest import Guest
from backends.guests.netfront import NetCtrl, NetFront
from backends.native import ffi, lib
from backends.net.dataplane import QueueDeadError, VifControl
from backends.platform.emulated import EmulatedPlatform
from backends.sim.broker import BrokerThread

from . import test_datapath
from .test_datapath import GUEST_MAC
from .toeplitz import MS_KEY, MS_V4, MS_V6, flow_hash, frame

V4, V4_TCP, V6, V6_TCP = 1, 2, 4, 8
bed = test_datapath.bed  # the network-namespace bed


def c_hash(key: bytes, flags: int, f: bytes, size: int = 0, mapping: list[int] | None = None) -> tuple[int, int]:
    h = ffi.new("struct pv_net_hash *")
    h.alg, h.flags, h.size = 1, flags, size
    h.key[0:len(key)] = key
    for i, q in enumerate(mapping or []):
        h.mapping[i] = q
    out = ffi.new("uint32_t *")
    t = int(lib.pv_netctrl_frame_hash(h, ffi.from_buffer(f), len(f), out))
    return t, int(out[0])


def test_frame_hash_matches_microsoft_vectors() -> None:
    for table, l3, l4 in ((MS_V4, V4, V4_TCP), (MS_V6, V6, V6_TCP)):
        for src, sport, dst, dport, h3, h4 in table:
            tcp = frame(src, dst, 6, sport, dport)
            assert c_hash(MS_KEY, l3 | l4, tcp) == (l4, h4)
            assert c_hash(MS_KEY, l3, tcp) == (l3, h3)  # TCP type off: the addresses only
            udp = frame(src, dst, 17, sport, dport)
            assert c_hash(MS_KEY, l3 | l4, udp) == (l3, h3)  # not TCP: L3
            assert c_hash(MS_KEY, l4, udp) == (0, 0)  # not TCP and L3 off: no hash
            assert c_hash(MS_KEY, 0, tcp) == (0, 0)
            assert flow_hash(MS_KEY, l3 | l4, tcp) == (l4, h4)  # the tests' reference agrees


def test_frame_hash_refuses_what_linux_does_not_hash() -> None:
    tcp = bytearray(frame("66.9.149.187", "161.142.100.80", 6, 2794, 1766))
    arp = bytes(tcp[:12]) + b"\x08\x06" + bytes(28)
    assert c_hash(MS_KEY, 15, arp) == (0, 0)
    frag = bytearray(tcp)
    frag[20] |= 0x20  # More Fragments: no ports to hash, the addresses are
    assert c_hash(MS_KEY, V4 | V4_TCP, bytes(frag))[0] == V4
    assert c_hash(MS_KEY, 15, bytes(tcp[:20])) == (0, 0)  # truncated
    h = ffi.new("struct pv_net_hash *")
    h.alg = 0
    out = ffi.new("uint32_t *")
    assert lib.pv_netctrl_frame_hash(h, ffi.from_buffer(bytes(tcp)), len(tcp), out) == 0  # no algorithm selected


def test_pick_follows_the_mapping() -> None:
    h = ffi.new("struct pv_net_hash *")
    h.size = 4
    for i, q in enumerate((1, 0, 1, 1)):
        h.mapping[i] = q
    assert [lib.pv_netctrl_pick(h, x, 2) for x in range(8)] == [1, 0, 1, 1] * 2
    h.size = 0
    assert [lib.pv_netctrl_pick(h, x, 3) for x in range(6)] == [0, 1, 2, 0, 1, 2]  # no table: hash % queues


class CtrlBed:
    def __init__(self, plat: EmulatedPlatform, broker: str, queues: int = 2) -> None:
        self.plat = plat
        self.guest = Guest(broker, name="ctrlguest", mem_pages=16, gnt_entries=32)
        plat.open_domain(self.guest.domid)
        self.ctrl = NetCtrl(self.guest, 0)
        self.ring = plat.map_grants(self.guest.domid, [self.ctrl.ref], writable=True)
        self.vif = VifControl(queues, self.guest.domid, plat.gnt)
        self.vif.attach_ctrl(self.ring.address, None)

    def ask(self, *reqs: tuple[int, int, int, int]) -> list[tuple[int, int]]:
        """Post, serve once (what queue 0's pump does per event), collect (status, data) in order."""
        ids = self.ctrl.post(list(reqs))
        self.vif.ctrl_run()
        got = self.ctrl.collect(len(reqs), timeout=1.0)
        assert [g[0] for g in got] == ids and [g[1] for g in got] == [r[0] for r in reqs]
        return [(g[2], g[3]) for g in got]

    def one(self, rtype: int, d0: int = 0, d1: int = 0, d2: int = 0) -> int:
        return self.ask((rtype, d0, d1, d2))[0][0]

    def close(self) -> None:
        self.vif.close()
        self.ring.unmap()
        self.ctrl.close()
        self.plat.close_domain(self.guest.domid)
        self.guest.close()


@pytest.fixture
def cbed() -> Iterator[CtrlBed]:
    d = Path(tempfile.mkdtemp(prefix="pvb-ctrl-", dir="/tmp"))
    with BrokerThread(str(d / "broker.sock")):
        plat = EmulatedPlatform(str(d))
        b = CtrlBed(plat, str(d / "broker.sock"))
        try:
            yield b
        finally:
            b.close()
            plat.close()
            shutil.rmtree(d, ignore_errors=True)


OK, NOT_SUPPORTED, INVALID = nfm.CTRL_SUCCESS, nfm.CTRL_NOT_SUPPORTED, nfm.CTRL_INVALID_PARAMETER


def key_into(b: CtrlBed, key: bytes) -> int:
    b.guest.page_view(b.ctrl.data_page)[: len(key)] = key
    return b.ctrl.data_ref


def mapping_into(b: CtrlBed, entries: list[int]) -> int:
    raw = struct.pack(f"<{len(entries)}I", *entries)
    b.guest.page_view(b.ctrl.data_page)[: len(raw)] = raw
    return b.ctrl.data_ref


def test_ctrl_requests_answer_as_linux(cbed: CtrlBed) -> None:
    b = cbed
    # Before an algorithm is chosen: no flags to get, none may be set (hash.c).
    assert b.one(nfm.CTRL_GET_HASH_FLAGS) == NOT_SUPPORTED
    assert b.one(nfm.CTRL_SET_HASH_FLAGS, V4) == INVALID
    assert b.one(nfm.CTRL_SET_HASH_ALGORITHM, 2) == INVALID
    assert b.one(nfm.CTRL_SET_HASH_ALGORITHM, nfm.HASH_ALG_TOEPLITZ) == OK
    assert b.one(nfm.CTRL_SET_HASH_FLAGS, 0x10) == INVALID  # an unknown type bit
    assert b.one(nfm.CTRL_SET_HASH_FLAGS, V4 | V4_TCP | V6) == OK
    assert b.ask((nfm.CTRL_GET_HASH_FLAGS, 0, 0, 0)) == [(OK, V4 | V4_TCP | V6)]
    # The key: at most 40 bytes, copied from the grant; shorter keys are zero-padded.
    assert b.one(nfm.CTRL_SET_HASH_KEY, key_into(b, MS_KEY), 41) == INVALID
    assert b.one(nfm.CTRL_SET_HASH_KEY, 100000, 40) == INVALID  # a grant that does not exist: that request only
    assert b.one(nfm.CTRL_SET_HASH_KEY, key_into(b, MS_KEY), 40) == OK
    assert b.vif.hash_config()["key"] == MS_KEY
    assert b.one(nfm.CTRL_SET_HASH_KEY, key_into(b, MS_KEY), 16) == OK
    assert b.vif.hash_config()["key"] == MS_KEY[:16] + bytes(24)
    assert b.one(nfm.CTRL_SET_HASH_KEY, key_into(b, MS_KEY), 40) == OK
    # The mapping table.
    assert b.ask((nfm.CTRL_GET_HASH_MAPPING_SIZE, 0, 0, 0)) == [(OK, 128)]
    for huge in (129, 0xFFFFFFFF):
        assert b.one(nfm.CTRL_SET_HASH_MAPPING_SIZE, huge) == INVALID
    assert b.one(nfm.CTRL_SET_HASH_MAPPING_SIZE, 8) == OK
    assert b.vif.hash_config()["mapping"] == [0] * 8
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, mapping_into(b, [1, 0, 1, 1, 0, 0, 1, 0]), 8, 0) == OK
    assert b.vif.hash_config()["mapping"] == [1, 0, 1, 1, 0, 0, 1, 0]
    # XSA-270: an entry naming a queue the vif does not have is refused and changes nothing.
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, mapping_into(b, [0, 2]), 2, 0) == INVALID
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, mapping_into(b, [0xFFFFFFFF]), 1, 3) == INVALID
    assert b.vif.hash_config()["mapping"] == [1, 0, 1, 1, 0, 0, 1, 0]
    # Ranges: off + len wrapping around u32, running past the table, a grant that does not exist.
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, mapping_into(b, [0, 0]), 2, 0xFFFFFFFF) == INVALID
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, mapping_into(b, [0] * 4), 4, 6) == INVALID
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, mapping_into(b, [0] * 4), 0xFFFFFFFF, 0) == INVALID
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, 100000, 2, 0) == INVALID
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, mapping_into(b, [0, 0]), 2, 6) == OK  # the tail, exactly
    assert b.vif.hash_config()["mapping"] == [1, 0, 1, 1, 0, 0, 0, 0]
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, 100000, 0, 8) == OK  # nothing to copy: Linux succeeds
    # Everything else is not supported (the grant-mapping requests, INVALID, unknown types).
    for t in (0, 8, 9, 10, 11, 0xFFFF):
        assert b.one(t, 1, 2, 3) == NOT_SUPPORTED
    cfg = b.vif.hash_config()
    assert (cfg["alg"], cfg["flags"], cfg["size"]) == (1, V4 | V4_TCP | V6, 8)
    assert lib.pv_netctrl_ctrl_errors(b.vif.c) == 20
    # Setting the size again zeroes the table (Linux's memset).
    assert b.one(nfm.CTRL_SET_HASH_MAPPING_SIZE, 4) == OK
    assert b.vif.hash_config()["mapping"] == [0] * 4


def test_ctrl_request_storm_is_served_in_bounded_rounds(cbed: CtrlBed) -> None:
    b = cbed
    size = b.ctrl.ring.free_slots()
    assert size == 128  # (4096 - 64) / 16, rounded down to a power of two
    total = 0
    for _ in range(20):  # 2560 requests, a ring's worth at a time
        reqs = [(nfm.CTRL_GET_HASH_MAPPING_SIZE, 0, 0, 0)] * size
        ids = b.ctrl.post(reqs)
        assert b.vif.ctrl_run() == size
        got = b.ctrl.collect(size, timeout=1.0)
        assert [g[0] for g in got] == ids and all(g[2:] == (OK, 128) for g in got)
        total += size
    assert lib.pv_netctrl_ctrl_errors(b.vif.c) == 0


def test_ctrl_runaway_req_prod_kills_only_the_ctrl_ring(cbed: CtrlBed) -> None:
    b = cbed
    assert b.one(nfm.CTRL_SET_HASH_ALGORITHM, 1) == OK
    view = b.guest.page_view(b.ctrl.page)
    prod = struct.unpack_from("<I", view, 0)[0]
    struct.pack_into("<I", view, 0, prod + 1000)  # more requests than the ring holds
    with pytest.raises(QueueDeadError):
        b.vif.ctrl_run()
    with pytest.raises(QueueDeadError):  # and it stays dead
        b.vif.ctrl_run()


def test_handoff_ring_is_bounded_and_drops_are_counted(bed: Any) -> None:
    """Every frame steered to queue 1 (mapping [1]) whose frontend posts no RX buffers: queue 1 holds one frame
    and stops polling; its hand-off ring fills (32 frames) and the rest are dropped and counted by the queue
    that read them, never queued without bound.  Once the frontend posts, the held and handed-off frames reach
    the guest's kernel."""
    import asyncio

    from backends.drivers.net.tap import Tap
    from backends.net.dataplane import NetDataplane, NetQueueConfig

    from .test_datapath import HOST_MAC, guest_tap, run

    plat, broker, g, p = bed

    async def main() -> None:
        gfds = guest_tap(g, 1500, 2)
        tap = Tap("vif1.0", mac=HOST_MAC, mtu=1500, queues=2)
        p.run(tap.open)
        p.ip("addr", "add", "198.18.0.1/24", "dev", "vif1.0")
        p.ip("neigh", "add", "198.18.0.2", "lladdr", GUEST_MAC, "dev", "vif1.0")  # no ARP through queue 1
        guest = Guest(broker, name="steer", mem_pages=1400, gnt_entries=2100)
        plat.open_domain(guest.domid)
        fronts = [NetFront(guest, 0, fd, datapath="python") for fd in gfds]  # rx_log: per-frame extras
        ctrl = NetCtrl(guest, 0)
        vif = VifControl(2, guest.domid, plat.gnt)
        dps: list[NetDataplane] = []
        dead: list[str] = []
        closing = contextlib.ExitStack()
        try:
            for qi, nf in enumerate(fronts):
                k = nf.keys()
                tx = plat.map_grants(guest.domid, [int(k["tx-ring-ref"])], writable=True)
                rx = plat.map_grants(guest.domid, [int(k["rx-ring-ref"])], writable=True)
                ev = plat.bind_interdomain(guest.domid, int(k["event-channel"]))
                c = None
                if qi == 0:
                    c = (plat.map_grants(guest.domid, [ctrl.ref], writable=True),
                         plat.bind_interdomain(guest.domid, ctrl.ev.port))
                cfg = NetQueueConfig(frontend_domid=guest.domid, mac=bytes.fromhex(GUEST_MAC.replace(":", "")))
                dps.append(NetDataplane(tx, rx, ev, None, plat.gnt, tap.fds[qi], cfg, on_dead=dead.append,
                                        name=f"q{qi}", vif=vif, index=qi, ctrl=c))
            loop = asyncio.get_running_loop()
            for dp in dps:
                dp.start(loop)
            fronts[0].start()  # queue 1's frontend posts nothing yet
            await asyncio.to_thread(ctrl.toeplitz, MS_KEY, 15, [1])
            # Until the mapping arrives the algorithm already hashes over both queues (as Linux netback's
            # does), so queue 1 may hand the tap's own early frames (IPv6 link-local chatter) to queue 0.
            # Count from the moment those are delivered and nothing moves.
            last: tuple[int, ...] = ()
            for _ in range(100):
                s0, s1 = dps[0].stats(), dps[1].stats()
                now = (s0["rx_packets"], s0["rx_handoff_in"], s1["rx_steered"], s0["rx_steered"])
                if now == last and s0["rx_handoff_in"] == s1["rx_steered"]:
                    break
                last = now
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"queue 0 does not settle: {s0}, {s1}")
            base0 = s0["rx_packets"]  # what queue 0 delivered before the mapping [1] took over
            early = (s0["rx_steered"], s1["rx_steered"])
            rcv = g.run(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            closing.callback(rcv.close)
            rcv.bind(("198.18.0.2", 7000))
            rcv.settimeout(0.5)

            def flood() -> None:  # 400 flows (a source port each): the tap spreads them over both queues
                for i in range(400):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.sendto(struct.pack(">I", i), ("198.18.0.2", 7000))

            await asyncio.to_thread(p.run, flood)
            await asyncio.sleep(0.5)
            s0, s1 = dps[0].stats(), dps[1].stats()
            assert s1["rx_packets"] == 0 and s1["rx_stalls"] == 1  # holding one frame, nothing delivered
            assert s1["rx_steered"] == early[1], (s1, early)  # the mapping sends nothing from queue 1 away
            steered = s0["rx_steered"] - early[0]
            drops = s0["rx_handoff_drops"] + s1["rx_handoff_drops"]
            # The ring's bound: 32 cells, plus the frame queue 1 took out of it and holds.
            assert 0 < steered <= 33, (early, s0, s1)
            assert drops > 0 and steered + s0["rx_handoff_drops"] <= 400, (s0, s1)
            fronts[1].start()
            got = set()
            with contextlib.suppress(TimeoutError):
                while True:
                    got.add(struct.unpack(">I", rcv.recv(64))[0])
            s0, s1 = dps[0].stats(), dps[1].stats()
            assert s1["rx_handoff_in"] == s0["rx_steered"] and len(got) >= steered, (len(got), s1)
            assert s0["rx_packets"] == base0  # every frame queue 0 read since went to queue 1
            ours = [(h, head) for _o, h, _x, head in list(fronts[1].rx_log)
                    if head[23] == 17 and head[36:38] == b"\x1b\x58"]  # UDP to port 7000
            assert len(ours) == len(got) and all(h == flow_hash(MS_KEY, 15, head) for h, head in ours)
            assert not dead
            assert all(nf.error is None for nf in fronts)
        finally:
            closing.close()
            for nf in fronts:
                nf.close()
            for dp in dps:
                await dp.stop()
            vif.close()
            ctrl.close()
            plat.close_domain(guest.domid)
            guest.close()
            for fd in gfds:
                os.close(fd)
            p.run(tap.remove)

    run(main())


def test_state_file_is_taken_up_only_by_the_same_vif(cbed: CtrlBed, tmp_path: Path) -> None:
    b = cbed
    path = tmp_path / "vif1.0.ctrl"
    me, other = b"A" * 16, b"B" * 16
    b.vif.close()
    b.vif = VifControl(2, b.guest.domid, b.plat.gnt)
    b.vif.attach_ctrl(b.ring.address, None)
    assert not b.vif.use_state(path, me, load=True)  # nothing there yet
    assert path.stat().st_mode & 0o777 == 0o600
    b.ask((nfm.CTRL_SET_HASH_ALGORITHM, 1, 0, 0), (nfm.CTRL_SET_HASH_FLAGS, V4 | V6_TCP, 0, 0),
          (nfm.CTRL_SET_HASH_MAPPING_SIZE, 3, 0, 0))
    assert b.one(nfm.CTRL_SET_HASH_KEY, key_into(b, MS_KEY), 40) == OK
    assert b.one(nfm.CTRL_SET_HASH_MAPPING, mapping_into(b, [1, 1, 0]), 3, 0) == OK
    want = b.vif.hash_config()
    second = VifControl(2, b.guest.domid, b.plat.gnt)
    with pytest.raises(OSError):  # served (locked): a second daemon keeps its state in memory
        second.use_state(path, me, load=True)
    second.close()
    b.vif.close()  # a killed daemon: the file stays

    def reopen(ident: bytes, nq: int = 2) -> tuple[VifControl, bool]:
        v = VifControl(nq, b.guest.domid, b.plat.gnt)
        return v, v.use_state(path, ident, load=True)

    v, loaded = reopen(me)
    assert loaded and v.hash_config() == want
    v.close()
    v, loaded = reopen(me, nq=1)  # fewer queues: the mapping would name a missing one
    assert not loaded and v.hash_config()["alg"] == 0
    v.close()
    v, loaded = reopen(other)  # written afresh: the old state is gone for everyone
    assert not loaded and v.hash_config()["alg"] == 0
    v.close()
    v, loaded = reopen(me)
    assert not loaded
    v.close(discard=path)
    assert not path.exists()
    b.vif = VifControl(2, b.guest.domid, b.plat.gnt)
    b.vif.attach_ctrl(b.ring.address, None)


def test_handoff_ring_under_thread_sanitizer(tmp_path: Path) -> None:
    """tests/net/handoff_stress.c: three producer threads and the consumer on one hand-off ring, built with
    ThreadSanitizer: every frame arrives intact, once, in each producer's order, and TSan reports no race."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required"
    exe = tmp_path / "handoff_stress"
    srcs = [root / "tests/net/handoff_stress.c"] + [root / "csrc" / f for f in (
        "netctrl.c", "netif.c", "netback.c", "netvif.c", "ring.c", "pump.c", "platform.c")]
    build = subprocess.run([gcc, "-O1", "-g", "-fsanitize=thread", "-Wno-tsan", "-std=gnu11", f"-I{root / 'csrc'}",
                            *map(str, srcs), "-o", str(exe), "-lpthread"], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                         env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert res.returncode == 0 and "WARNING: ThreadSanitizer" not in res.stderr, res.stderr[-4000:]
    assert res.stdout.strip() == "ok 15000 frames"
