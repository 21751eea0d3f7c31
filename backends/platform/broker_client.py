"""The emulated platform's broker, client side: the wire format (one JSON object per SOCK_SEQPACKET packet, fds
with SCM_RIGHTS) and the synchronous client backends and guests use.  The broker itself (the server) is
`backends.sim.broker`; the protocol is described there and in docs/DESIGN.md "Emulated platform".
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno as errno_mod
import json
import os
import socket
import threading
from typing import Any

MAX_MSG = 65536
MAX_FDS = 4


class BrokerError(OSError):
    """The broker refused a request; `.errno` and `.name` say why."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(getattr(errno_mod, name, errno_mod.EIO), message)
        self.name = name


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def encode(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_MSG:
        raise ValueError("broker message too large")
    return data


def decode(data: bytes) -> dict[str, Any]:
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("broker message is not a JSON object")
    return obj


def recv_packet(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and its fds, close-on-exec; (b"", []) at EOF.  Truncated packets are refused (and their fds
    closed)."""
    # Not socket.recv_fds: CPython's (3.11 here) never passes its `flags` on to recvmsg, so MSG_CMSG_CLOEXEC was
    # lost and every event channel eventfd came in inheritable.  uvloop's subprocess_exec does not implement
    # close_fds (it relies on every fd being close-on-exec): swtpm, a daemonized child that outlives a killed
    # daemon, kept them open.
    arr = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_MSG + 1, socket.CMSG_LEN(MAX_FDS * arr.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
    fds = arr.tolist()
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(data) > MAX_MSG:
        close_fds(fds)
        raise ValueError("broker message truncated")
    return data, fds


def probe(path: str, timeout: float) -> None:
    """One `hello` with a deadline (the client itself would wait forever on a wedged peer).  Raises OSError
    (TimeoutError, PermissionError...) when nothing answers, ValueError when something else does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.send(encode({"op": "hello", "domid": 0}))
        raw, fds = recv_packet(sock)
        close_fds(fds)
        if not raw or "error" in decode(raw):
            raise ValueError("not a broker reply")
    finally:
        sock.close()


class BrokerClient:
    """Synchronous client: one request, one reply.  Quick enough for set-up paths inside an event loop as
    long as the broker runs in another thread or process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot reach the emulated platform's broker at {path}: {exc.strerror}") from exc
        self._sock: socket.socket | None = sock
        self._unread = 0

    def request(self, op: str, fds: list[int] | None = None, **args: Any) -> tuple[dict[str, Any], list[int]]:
        """Returns (reply, fds); the caller owns the fds.  Raises BrokerError for refusals."""
        with self._lock:
            if self._sock is None:
                raise OSError(errno_mod.EBADF, "broker connection closed")
            self._drain_unread()
            data = encode({"op": op, **args})
            if fds:
                socket.send_fds(self._sock, [data], fds)
            else:
                self._sock.send(data)
            raw, rfds = recv_packet(self._sock)
        if not raw:
            close_fds(rfds)
            raise ConnectionError("broker closed the connection")
        try:
            reply = decode(raw)
        except ValueError:
            close_fds(rfds)
            raise
        if "error" in reply:
            close_fds(rfds)
            raise BrokerError(str(reply["error"]), f"broker {op}: {reply.get('message', reply['error'])}")
        return reply, rfds

    def send_nowait(self, op: str, **args: Any) -> None:
        """Send a request whose reply nobody waits for (unbind on close paths, which may run on the
        broker's own event loop); the reply is read and dropped before the next request."""
        with self._lock:
            if self._sock is None:
                return
            try:
                self._sock.send(encode({"op": op, **args}))
            except OSError:
                return
            self._unread += 1

    def _drain_unread(self) -> None:
        assert self._sock is not None
        while self._unread:
            raw, rfds = recv_packet(self._sock)
            close_fds(rfds)
            if not raw:
                raise ConnectionError("broker closed the connection")
            self._unread -= 1

    async def arequest(self, op: str, fds: list[int] | None = None, **args: Any) -> tuple[dict[str, Any], list[int]]:
        """`request` on a worker thread, so the event loop stays free (even to run the broker itself)."""
        return await asyncio.to_thread(self.request, op, fds, **args)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None
