"""Traffic helpers run inside a namespace (through NetNS.run): ICMP echo (IPv4 and IPv6) over raw sockets
(no ping binary needed) and a hashed TCP transfer."""

from __future__ import annotations

import hashlib
import socket

from backends.guests.netns import echo


def ping(addr: str, *, count: int = 3, size: int = 56, timeout: float = 5.0) -> int:
    """Echo requests to `addr` from the calling thread's namespace; returns how many replies came back (each
    awaited up to `timeout`)."""
    return len(echo(addr, count=count, size=size, timeout=timeout))


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
