"""Private network namespaces for tests: created by name, entered per thread (setns), deleted at teardown.
Addresses come from 198.18.0.0/15 and fd00::/8 only; a namespace has no route out."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class NetNS:
    """`ip netns add NAME` (lo up) ... `ip netns del NAME`."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str, check: bool = True) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=check, capture_output=True, text=True,
                              timeout=10).stdout

    def exec(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 30)
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], **kw)

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], text=True, **kw)

    def run(self, fn: Callable[[], T]) -> T:
        """Call fn in a thread that has entered this namespace (sockets, taps and netlink it opens live here)."""
        out: list[Any] = []

        def main() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
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
