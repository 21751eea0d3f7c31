"""An independent Toeplitz hash and frame classifier (the tests' reference, not the C under test), with
Microsoft's published RSS verification key and vectors."""

from __future__ import annotations

import socket
import struct

MS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")
# (src, sport, dst, dport, L3 hash, L4 hash): "Verifying the RSS Hash Calculation", IPv4 and IPv6 tables.
MS_V4 = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
]
MS_V6 = [
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0F0C461C, 0xDDE51BBF),
    ("3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, "fe80::200:f8ff:fe21:67cf", 38024, 0x4B61E985, 0x02D1FEEF),
]


def toeplitz(key: bytes, data: bytes) -> int:
    k = int.from_bytes(key, "big")
    klen = len(key) * 8
    h = 0
    for i in range(len(data) * 8):
        if data[i // 8] & (0x80 >> (i % 8)):
            h ^= (k >> (klen - 32 - i)) & 0xFFFFFFFF if klen - 32 - i >= 0 else 0
    return h


def frame(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0, *, payload: bytes = b"") -> bytes:
    """An Ethernet frame carrying IPv4/IPv6 + TCP (6) or UDP (17) headers (checksums left zero)."""
    eth = b"\x00\x16\x3e\x00\x00\x02" + b"\xfe\xff\xff\xff\xff\xff"
    l4 = struct.pack(">HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 0x02, 1024, 0, 0) if proto == 6 else \
        struct.pack(">HHHH", sport, dport, 8 + len(payload), 0)
    l4 += payload
    if ":" in src:
        ip = struct.pack(">IHBB", 6 << 28, len(l4), proto, 64) + socket.inet_pton(socket.AF_INET6, src) + \
            socket.inet_pton(socket.AF_INET6, dst)
        return eth + b"\x86\xdd" + ip + l4
    ip = struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0) + socket.inet_aton(src) + \
        socket.inet_aton(dst)
    return eth + b"\x08\x00" + ip + l4


def flow_hash(key: bytes, flags: int, f: bytes) -> tuple[int, int]:
    """(hash type, hash) of a frame as netback hashes it: TCP 4-tuple if the TCP type is on and it is
    unfragmented TCP, else the addresses if the L3 type is on, else (0, 0)."""
    etype = f[12:14]
    if etype == b"\x08\x00":
        ihl = (f[14] & 0xF) * 4
        addrs, proto, l4, frag = f[26:34], f[23], 14 + ihl, int.from_bytes(f[20:22], "big") & 0x3FFF
        l3t, l4t = 1, 2
    elif etype == b"\x86\xdd":
        addrs, proto, l4, frag = f[22:54], f[20], 54, 0
        l3t, l4t = 4, 8
    else:
        return 0, 0
    if flags & l4t and proto == 6 and not frag:
        return l4t, toeplitz(key, addrs + f[l4:l4 + 4])
    if flags & l3t:
        return l3t, toeplitz(key, addrs)
    return 0, 0
