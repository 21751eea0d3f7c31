"""Private network namespaces for an emulated guest's network stack (the demo and the benchmark): created by
name, entered per thread (setns) to open taps and sockets there, deleted at the end.  Callers use addresses
from 198.18.0.0/15 and fd00::/8 only; a namespace made here has no route out.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100


class NetNS:
    """`ip netns add NAME` (lo up) ... `ip netns del NAME` (what lives in it goes with it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def ip(self, *args: str, check: bool = True) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=check, capture_output=True, text=True,
                              timeout=10).stdout

    def argv(self, *cmd: str) -> list[str]:
        """`cmd` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def exec(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """`cmd` run to completion inside this namespace (output captured as text, 30 s unless told)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 30)
        return subprocess.run(self.argv(*cmd), **kw)

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
        """`cmd` started inside this namespace (text mode); the caller stops it by its PID."""
        return subprocess.Popen(self.argv(*cmd), text=True, **kw)

    def run(self, fn: Callable[[], T]) -> T:
        """fn() in a thread that entered this namespace (taps, sockets and netlink it opens live here)."""
        out: list[tuple[bool, Any]] = []

        def main() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, os.strerror(e))
                finally:
                    os.close(fd)
                out.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                out.append((False, exc))

        t = threading.Thread(target=main, name=f"netns {self.name}")
        t.start()
        t.join()
        ok, value = out[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def guest_tap(ns: NetNS, *, queues: int, mtu: int, mac: str, addrs: list[str], name: str = "eth0") -> list[int]:
    """The guest's NIC: a multi-queue tap (IFF_VNET_HDR) in `ns`, one non-blocking fd per netif queue (so the
    guest kernel spreads flows over queues as on a multi-queue NIC), with the vif's MAC, `mtu` and `addrs`
    ("198.18.0.2/24", "fd00::2/64", ...), up."""

    def make() -> list[int]:
        fds: list[int] = []
        try:
            for _ in range(queues):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                fds.append(fd)
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                                       IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    fds = ns.run(make)
    try:
        ns.ip("link", "set", name, "address", mac, "mtu", str(mtu), "up")
        for a in addrs:
            ns.ip("addr", "add", a, "dev", name, *(["nodad"] if ":" in a else []))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _icmp_csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def echo(addr: str, *, count: int = 3, size: int = 56, timeout: float = 2.0) -> list[float]:
    """ICMP echo from the calling thread's namespace (a raw socket: no ping binary needed); the round-trip times
    in seconds of the replies that came back within `timeout` each."""
    import socket
    import time

    v6 = ":" in addr
    fam, proto, req, rep = ((socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129) if v6
                            else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0))
    ident = os.getpid() & 0xFFFF
    rtts: list[float] = []
    with socket.socket(fam, socket.SOCK_RAW, proto) as s:
        for seq in range(count):
            payload = os.urandom(size)
            body = struct.pack("!BBHHH", req, 0, 0, ident, seq) + payload
            if not v6:  # the kernel fills ICMPv6 checksums on raw sockets, not ICMPv4 ones
                body = struct.pack("!BBHHH", req, 0, _icmp_csum(body), ident, seq) + payload
            t0 = time.monotonic()
            s.sendto(body, (addr, 0))
            deadline = t0 + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    break
                icmp = data if v6 else data[(data[0] & 0xF) * 4:]  # IPv4 raw sockets include the IP header
                if len(icmp) >= 8 and icmp[0] == rep and struct.unpack("!HH", icmp[4:8]) == (ident, seq) \
                        and icmp[8:] == payload:
                    rtts.append(time.monotonic() - t0)
                    break
    return rtts


def ping(ns: NetNS, addr: str, *, count: int = 3, size: int = 56, timeout: float = 2.0) -> list[float]:
    """echo() from inside `ns`."""
    return ns.run(lambda: echo(addr, count=count, size=size, timeout=timeout))
