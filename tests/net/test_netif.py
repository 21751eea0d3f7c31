"""The C netif TX parser (csrc/netif.c) over raw slot bytes: every Linux netback rule, the responses, the
Toeplitz reference, and a hypothesis fuzz target against a model of Linux's xenvif_tx_build_gops."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.native import ffi, lib

from . import wire
from .toeplitz import MS_KEY, MS_V4
from .wire import Tx, packet, slots

E = {str(ffi.string(lib.pv_netif_reason_name(i)).decode()): i for i in range(lib.PV_NETIF_NR_REASONS)}


def parse(raw: bytes, avail: int | None = None) -> tuple[str, Any]:
    assert len(raw) % wire.TX_SLOT == 0
    n = len(raw) // wire.TX_SLOT if avail is None else avail
    pkt = ffi.new("struct pv_netif_tx_pkt *")
    rc = int(lib.pv_netif_tx_parse(raw or b"\0", n, pkt))
    return ffi.string(lib.pv_netif_reason_name(rc)).decode(), pkt


def test_reason_names_are_unique_and_fatal_split() -> None:
    assert len(E) == lib.PV_NETIF_NR_REASONS
    assert [n for n, i in E.items() if lib.pv_netif_reason_fatal(i)] == [
        "fatal_slots", "incomplete", "cross_page", "extra_type", "gso_size", "gso_type", "ring"]


def test_single_slot_packet() -> None:
    why, p = parse(slots(Tx(gref=7, offset=100, flags=wire.NETTXF_CSUM_BLANK, id=3, size=60)))
    assert why == "ok"
    assert (p.nr_slots, p.nr_frags, p.len, p.first_id, p.flags) == (1, 1, 60, 3, wire.NETTXF_CSUM_BLANK)
    assert (p.frags[0].gref, p.frags[0].offset, p.frags[0].size, p.frags[0].id) == (7, 100, 60, 3)


def test_fragments_sum_to_the_total_and_first_gets_the_rest() -> None:
    why, p = parse(slots(*packet(9000, [4096, 4096], id0=10)))
    assert why == "ok" and p.nr_slots == 3 and p.nr_frags == 3 and p.len == 9000
    assert [p.frags[i].size for i in range(3)] == [9000 - 8192, 4096, 4096]
    assert [p.frags[i].id for i in range(3)] == [10, 11, 12]


def test_parse_stops_at_the_packet_end() -> None:
    raw = slots(*packet(200, [100]), *packet(70, [], id0=5))
    why, p = parse(raw)
    assert why == "ok" and p.nr_slots == 2
    why, p = parse(raw[2 * wire.TX_SLOT:])
    assert why == "ok" and p.nr_slots == 1 and p.first_id == 5


def test_18_fragments_pass_19_are_dropped_21_are_fatal() -> None:
    # Linux counts the slots after the first: 18 more pass (XEN_NETBK_LEGACY_SLOTS_MAX), 19 and 20 drop the
    # packet, and a 21st (slots >= fatal_skb_slots) disables the vif.
    ok = parse(slots(*packet(14 + 18, [1] * 18)))
    assert ok[0] == "ok" and ok[1].nr_frags == 19
    for n in (19, 20):
        why, p = parse(slots(*packet(14 + n, [1] * n)))
        assert why == "slots" and p.nr_slots == 1 + n, n
    why, _ = parse(slots(*packet(14 + 21, [1] * 21)))
    assert why == "fatal_slots"


def test_cross_page_is_fatal_in_first_and_fragment() -> None:
    assert parse(slots(Tx(offset=4000, size=100)))[0] == "cross_page"
    assert parse(slots(Tx(offset=4036, size=60)))[0] == "ok"  # ends exactly at 4096
    assert parse(slots(*packet(200, [100])[:1], Tx(offset=4090, size=100)))[0] == "cross_page"


def test_fragment_larger_than_the_rest_is_dropped_not_fatal() -> None:
    # A >= 64 KiB frame overflowed first->size: "there are buggy frontends that do this".
    why, p = parse(slots(*packet(100, [4096, 100])))
    assert why == "size" and p.nr_slots == 3


def test_short_first_slot_is_dropped() -> None:
    # The header may not be split into tiny slots: the first must hold an Ethernet header (XSA-423/432).
    assert parse(slots(*packet(100, [90])))[0] == "short"  # first keeps 10 bytes
    assert parse(slots(*packet(104, [90])))[0] == "ok"  # 14


def test_zero_length_fragments_are_counted_not_copied() -> None:
    # XSA-448: zero-length slots are legal, answered, and never turned into a copy.
    why, p = parse(slots(*packet(100, [0, 40, 0])))
    assert why == "ok" and p.zero_frags == 2 and p.nr_frags == 4
    assert [p.frags[i].size for i in range(4)] == [60, 0, 40, 0]


def test_packet_past_published_requests_is_fatal() -> None:
    raw = slots(*packet(200, [100, 50]))
    assert parse(raw, avail=2)[0] == "incomplete"
    assert parse(slots(Tx(flags=wire.NETTXF_EXTRA_INFO)))[0] == "incomplete"  # "Missing extra info"
    assert parse(b"", avail=0)[0] == "incomplete"


def test_extra_info_gso() -> None:
    why, p = parse(slots(*packet(3000, [1500], extras=[wire.gso(1448, wire.GSO_TCPV6)])))
    assert why == "ok" and p.nr_slots == 3 and p.extra_count == 1
    assert (p.gso_type, p.gso_size) == (wire.GSO_TCPV6, 1448)
    assert p.frags[1].gref == 101  # the extra slot is not data


def test_gso_size_zero_and_bad_type_are_fatal() -> None:
    assert parse(slots(*packet(100, [], extras=[wire.gso(0)])))[0] == "gso_size"
    assert parse(slots(*packet(100, [], extras=[wire.gso(1000, 3)])))[0] == "gso_type"


def test_unknown_extra_type_is_fatal_and_repeated_is_dropped() -> None:
    for t in (0, 5, 255):
        assert parse(slots(*packet(100, [], extras=[wire.extra(t)])))[0] == "extra_type", t
    why, p = parse(slots(*packet(100, [40], extras=[wire.gso(1000, flags=wire.EXTRA_FLAG_MORE), wire.gso(900)])))
    assert why == "extra_repeat" and p.nr_slots == 4


def test_chained_extras() -> None:
    why, p = parse(slots(*packet(100, [], extras=[
        wire.gso(1000, flags=wire.EXTRA_FLAG_MORE), wire.extra(wire.EXTRA_HASH, 0, bytes([1, 1, 4, 3, 2, 1]))])))
    assert why == "ok" and p.extra_count == 2 and p.hash_type == 1 and p.hash_value == 0x01020304


def test_multicast_control_uses_only_first_and_extras() -> None:
    addr = bytes.fromhex("01005e000001")
    why, p = parse(slots(Tx(flags=wire.NETTXF_EXTRA_INFO | wire.NETTXF_MORE_DATA, size=0),
                         wire.mcast(True, addr)))
    assert why == "ok" and p.nr_slots == 2 and bytes(p.mcast_addr) == addr
    assert p.extra_types == 1 << wire.EXTRA_MCAST_ADD


def test_responses_are_zeroed_and_field_by_field() -> None:
    buf = ffi.new("uint8_t[16]", b"\xff" * 16)
    assert lib.pv_netif_make_tx_response(buf, 0x1234, -1) == 4
    assert bytes(buf[0:4]) == struct.pack("<Hh", 0x1234, -1)
    assert lib.pv_netif_make_rx_response(buf, 7, 256, 5, 1500) == 8
    assert bytes(buf[0:8]) == struct.pack("<HHHh", 7, 256, 5, 1500)
    assert lib.pv_netif_make_rx_gso_extra(buf, 2, 1448) == 8
    assert bytes(buf[0:8]) == struct.pack("<BBHBBH", 1, 0, 1448, 2, 0, 0)
    assert lib.pv_netif_make_ctrl_response(buf, 3, 6, 2, 0) == 12
    assert bytes(buf[0:12]) == struct.pack("<HHII", 3, 6, 2, 0)


# Microsoft's published RSS verification suite: the default key and IPv4 (addresses) / IPv4+TCP (addresses +
# ports) hashes, from tests/net/toeplitz.py.
def test_toeplitz_matches_microsoft_vectors() -> None:
    import socket

    for src, sport, dst, dport, h_ip, h_tcp in MS_V4:
        ip = socket.inet_aton(src) + socket.inet_aton(dst)
        assert lib.pv_netif_toeplitz(ffi.new("uint8_t[]", MS_KEY), len(MS_KEY), ffi.new("uint8_t[]", ip), 8) == h_ip
        tcp = ip + struct.pack(">HH", sport, dport)
        assert lib.pv_netif_toeplitz(ffi.new("uint8_t[]", MS_KEY), len(MS_KEY), ffi.new("uint8_t[]", tcp), 12) == h_tcp


# -- fuzz: the C parser against a model of Linux netback's checks ------------------------------------------


@dataclass
class Model:
    verdict: str
    nr_slots: int


def linux_model(sl: list[bytes]) -> Model:
    """xenvif_tx_build_gops + get_extras + count_requests + set_skb_gso for the first packet of `sl`, with our
    one deliberate difference (a repeated extra type drops the packet instead of overwriting)."""
    avail = len(sl)
    if not avail:
        return Model("incomplete", 0)
    _gref, off0, flags, _id, size = struct.unpack("<IHHHH", sl[0])
    i: int = 1
    drop: str | None = None
    seen: set[int] = set()
    gso = None
    if flags & wire.NETTXF_EXTRA_INFO:
        while True:
            if i >= avail:
                return Model("incomplete", i)
            t, ef = sl[i][0], sl[i][1]
            payload = sl[i][2:8]
            i += 1
            if t == 0 or t >= 5:
                return Model("extra_type", i)
            if t in seen:
                drop = drop or "extra_repeat"
            else:
                seen.add(t)
                if t == wire.EXTRA_GSO:
                    gso = struct.unpack("<HB", payload[:3])
            if not ef & wire.EXTRA_FLAG_MORE:
                break
    if not drop and seen & {wire.EXTRA_MCAST_ADD, wire.EXTRA_MCAST_DEL}:
        return Model("ok", i)
    remaining, n = size, 0
    if flags & wire.NETTXF_MORE_DATA:
        while True:
            if i + n >= avail:
                return Model("incomplete", i + n)
            if n >= 20:
                return Model("fatal_slots", i + n)
            if not drop and n >= 18:
                drop = "slots"
            _g, off, fl, _i, sz = struct.unpack("<IHHHH", sl[i + n])
            if not drop and sz > remaining:
                drop = "size"
            remaining = (remaining - sz) & 0xFFFF
            n += 1
            if off + sz > 4096:
                return Model("cross_page", i + n)
            if not fl & wire.NETTXF_MORE_DATA:
                break
    if drop:
        return Model(drop, i + n)
    if remaining < 14:
        return Model("short", i + n)
    if off0 + remaining > 4096:
        return Model("cross_page", i + n)
    if gso is not None:
        if gso[0] == 0:
            return Model("gso_size", i + n)
        if gso[1] not in (1, 2):
            return Model("gso_type", i + n)
    return Model("ok", i + n)


FLAG = st.sampled_from([0, 0, wire.NETTXF_MORE_DATA, wire.NETTXF_MORE_DATA, wire.NETTXF_EXTRA_INFO,
                        wire.NETTXF_MORE_DATA | wire.NETTXF_EXTRA_INFO, wire.NETTXF_CSUM_BLANK])
SIZE = st.one_of(st.integers(0, 64), st.integers(0, 4096), st.integers(0, 0xFFFF))
OFFSET = st.one_of(st.just(0), st.integers(0, 4096), st.integers(0, 0xFFFF))
DATA_SLOT = st.builds(lambda g, o, f, i, s: Tx(g, o, f, i, s).pack(), st.integers(0, 2**32 - 1), OFFSET, FLAG,
                      st.integers(0, 0xFFFF), SIZE)
EXTRA_SLOT = st.builds(lambda t, f, p: bytes([t, f]) + p + b"\0" * 4, st.sampled_from([0, 1, 1, 2, 3, 4, 5, 200]),
                       st.sampled_from([0, 1, 1, 3]), st.binary(min_size=6, max_size=6))
SLOT_LISTS = st.lists(st.one_of(DATA_SLOT, DATA_SLOT, EXTRA_SLOT, st.binary(min_size=12, max_size=12)),
                      min_size=0, max_size=48)


@settings(max_examples=1500, deadline=None)
@given(SLOT_LISTS)
def test_fuzz_parser_matches_linux_model(sl: list[bytes]) -> None:
    raw = b"".join(sl)
    why, p = parse(raw, len(sl))
    want = linux_model(sl)
    assert (why, int(p.nr_slots)) == (want.verdict, want.nr_slots)
    assert p.nr_slots <= len(sl)
    if why == "ok" and not p.extra_types & 0b1100:
        sizes = [int(p.frags[i].size) for i in range(p.nr_frags)]
        assert sum(sizes) == p.len
        assert all(int(p.frags[i].offset) + sizes[i] <= 4096 for i in range(p.nr_frags))
        assert p.nr_frags <= 19


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4096), min_size=0, max_size=25), st.integers(14, 4096))
def test_fuzz_honest_packets_pass_or_drop_by_slot_count(frags: list[int], first: int) -> None:
    total = first + sum(frags)
    if total > 0xFFFF:
        return
    why, p = parse(slots(*packet(total, frags)))
    n = len(frags)
    assert why == ("ok" if n <= 18 else "slots" if n <= 20 else "fatal_slots")
    if why == "ok":
        assert p.len == total and p.frags[0].size == first
