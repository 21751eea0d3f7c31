"""netif wire bytes for tests, written from Xen's io/netif.h (not from csrc/netif.h): a hostile or honest
frontend's slots, field by field."""

from __future__ import annotations

import struct
from dataclasses import dataclass

# io/netif.h
NETTXF_CSUM_BLANK = 1
NETTXF_DATA_VALIDATED = 2
NETTXF_MORE_DATA = 4
NETTXF_EXTRA_INFO = 8
EXTRA_GSO = 1
EXTRA_MCAST_ADD = 2
EXTRA_MCAST_DEL = 3
EXTRA_HASH = 4
EXTRA_FLAG_MORE = 1
GSO_TCPV4 = 1
GSO_TCPV6 = 2
RSP_DROPPED = -2
RSP_ERROR = -1
RSP_OKAY = 0
RSP_NULL = 1
TX_SLOT = 12  # sizeof(union netif_tx_sring_entry)


@dataclass(frozen=True)
class Tx:
    """struct netif_tx_request: gref u32, offset u16, flags u16, id u16, size u16."""

    gref: int = 8
    offset: int = 0
    flags: int = 0
    id: int = 0
    size: int = 60

    def pack(self) -> bytes:
        return struct.pack("<IHHHH", self.gref, self.offset, self.flags, self.id, self.size)


def extra(type_: int, flags: int = 0, payload: bytes = b"\0" * 6) -> bytes:
    """struct netif_extra_info (type u8, flags u8, union of 6 bytes) in a 12-byte TX slot."""
    assert len(payload) == 6
    return struct.pack("<BB", type_, flags) + payload + b"\0" * 4


def gso(size: int, gtype: int = GSO_TCPV4, flags: int = 0) -> bytes:
    return extra(EXTRA_GSO, flags, struct.pack("<HBBH", size, gtype, 0, 0))


def mcast(add: bool, addr: bytes, flags: int = 0) -> bytes:
    return extra(EXTRA_MCAST_ADD if add else EXTRA_MCAST_DEL, flags, addr)


def slots(*items: Tx | bytes) -> bytes:
    return b"".join(i.pack() if isinstance(i, Tx) else i for i in items)


def packet(total: int, frag_sizes: list[int], *, id0: int = 0, flags: int = 0, extras: list[bytes] = (),  # type: ignore[assignment]
           offset: int = 0) -> list[Tx | bytes]:
    """A packet as a frontend builds it: the first slot carries the total size, later slots their own."""
    more = NETTXF_MORE_DATA if frag_sizes else 0
    first = Tx(gref=100, offset=offset, flags=flags | more | (NETTXF_EXTRA_INFO if extras else 0), id=id0,
               size=total)
    out: list[Tx | bytes] = [first, *extras]
    for i, sz in enumerate(frag_sizes):
        last = i == len(frag_sizes) - 1
        out.append(Tx(gref=101 + i, offset=0, flags=0 if last else NETTXF_MORE_DATA, id=id0 + 1 + i, size=sz))
    return out
