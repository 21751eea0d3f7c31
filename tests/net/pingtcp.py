"""Traffic helpers run inside a namespace (through NetNS.run): ICMP echo (IPv4 and IPv6) over raw sockets
(no ping binary needed) and a hashed TCP transfer."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ping(addr: str, *, count: int = 3, size: int = 56, timeout: float = 5.0) -> int:
    """Echo requests to `addr`; returns how many replies came back (each awaited up to `timeout`)."""
    v6 = ":" in addr
    fam, proto, req, rep = ((socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129) if v6
                            else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0))
    ident = os.getpid() & 0xFFFF
    got = 0
    with socket.socket(fam, socket.SOCK_RAW, proto) as s:
        for seq in range(count):
            payload = os.urandom(size)
            hdr = struct.pack("!BBHHH", req, 0, 0, ident, seq)
            pkt = hdr + payload
            if not v6:  # the kernel fills ICMPv6 checksums on raw sockets
                pkt = struct.pack("!BBHHH", req, 0, _csum(pkt), ident, seq) + payload
            s.sendto(pkt, (addr, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    break
                icmp = data if v6 else data[(data[0] & 0xF) * 4:]
                t, _c, _ck, rid, rseq = struct.unpack_from("!BBHHH", icmp)
                if t == rep and rid == ident and rseq == seq and icmp[8:] == payload:
                    got += 1
                    break
    return got


def listener(addr: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(1)
    s.settimeout(20)
    return s


def connect(addr: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect((addr, port))
    return s


def send_hashed(s: socket.socket, nbytes: int, seed: int = 1) -> str:
    h = hashlib.sha256()
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB, not all zeros
    sent = 0
    while sent < nbytes:
        chunk = block[: min(len(block), nbytes - sent)]
        s.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    return h.hexdigest()


def recv_hashed(s: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while data := s.recv(1 << 16):
        h.update(data)
        n += len(data)
    return n, h.hexdigest()
