"""A swtpm's data socket driven by event-loop callbacks: one TPM command at a time, its answer handed to a
callback.  Knows no tpmif.

Why not the driver's asyncio streams (Swtpm.command): per command they cost a task, a timeout context, a
drain, two readexactly futures and their wake-ups — measured ~50 us of daemon CPU per command on this
machine's kind, more than the event channel round trip the vTPM's added latency is held to.  Here a command
is one non-blocking send; the answer is read by a reader callback that stays registered while the connection
is up, so the loop never waits on swtpm and no coroutine is resumed per command.

swtpm serves one client at a time on its data socket: while a link is connected, nothing else may use that
socket (Swtpm.reset opens its own connection: close the link first).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections.abc import Callable
from pathlib import Path

MAX_RESPONSE = 64 * 1024
_HEAD = 6  # tag u16, size u32

Done = Callable[[bytes | None, BaseException | None], None]


class LinkError(OSError):
    """swtpm broke the framing or went away under a command."""


class SwtpmLink:
    def __init__(self, path: Path | str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.path = str(path)
        self.loop = loop or asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._rbuf = bytearray(MAX_RESPONSE)
        self._rview = memoryview(self._rbuf)
        self._done: Done | None = None
        # One timer, re-armed lazily: per command only the deadline is set (a TimerHandle made and cancelled
        # per command costs more than the rest of the send).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._out = b""  # what a full socket buffer left unsent (a command is at most a page: never, in practice)

    @property
    def busy(self) -> bool:
        return self._done is not None

    def send(self, data: bytes, timeout: float, done: Done) -> None:
        """Send one command; `done(answer, None)` or `done(None, error)` is called later, on the loop, exactly
        once (unless close() comes first).  Errors of the send itself are also reported through `done`, never
        raised: the caller has one path for every outcome."""
        if self._done is not None:
            raise RuntimeError("swtpm link: a command is already in flight")
        self._done = done
        self._buf.clear()
        try:
            if self._sock is None:
                self._connect()  # EAGAIN here (swtpm's backlog is full) is a failure like any other
        except OSError as exc:
            self._finish(None, exc)
            return
        assert self._sock is not None
        try:
            n = self._sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._finish(None, exc)
            return
        if n < len(data):
            self._out = data[n:]
            assert self._sock is not None
            self.loop.add_writer(self._sock.fileno(), self._writable)
        self._deadline = self.loop.time() + timeout
        if self._timer is None or self._timer_at > self._deadline:
            self._arm()

    def close(self) -> None:
        """Drop the connection; a command in flight is forgotten (its callback is not called)."""
        self._done = None
        self._drop()

    # -- internals --------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.path)  # a unix socket connects at once or fails (EAGAIN: backlog full)
        except BaseException:
            s.close()
            raise
        self._sock = s
        self.loop.add_reader(s.fileno(), self._readable)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._deadline
        self._timer = self.loop.call_at(self._deadline, self._check_deadline)

    def _drop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        s, self._sock = self._sock, None
        if s is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(s.fileno())
            if self._out:
                with contextlib.suppress(Exception):
                    self.loop.remove_writer(s.fileno())
            s.close()
        self._out = b""
        self._buf.clear()

    def _finish(self, rsp: bytes | None, exc: BaseException | None) -> None:
        done, self._done = self._done, None
        if exc is not None:
            self._drop()  # swtpm may still answer: that late answer must never meet the next command
        if done is not None:
            done(rsp, exc)

    def _writable(self) -> None:
        if self._sock is None:
            return
        try:
            n = self._sock.send(self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(None, exc)
            return
        self._out = self._out[n:]
        if not self._out:
            self.loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        if self._sock is None:
            return
        try:
            n = self._sock.recv_into(self._rbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not n:
            self._fail(LinkError(errno.ECONNRESET, "swtpm closed its data socket"))
            return
        if self._done is None:
            # Bytes nobody asked for (a late answer to a command that timed out is impossible: the connection
            # was dropped then): swtpm is not speaking its protocol.
            self._fail(LinkError(errno.EPROTO, "swtpm sent data with no command in flight"))
            return
        if not self._buf and n >= _HEAD and struct.unpack_from(">I", self._rbuf, 2)[0] == n:
            self._finish(bytes(self._rview[:n]), None)  # the whole answer in one read: the common case
            return
        self._buf += self._rview[:n]
        if len(self._buf) < _HEAD:
            return
        size = struct.unpack_from(">I", self._buf, 2)[0]
        if not 10 <= size <= MAX_RESPONSE or len(self._buf) > size:
            self._fail(LinkError(errno.EPROTO, f"swtpm answered a size of {size} with {len(self._buf)} bytes"))
            return
        if len(self._buf) == size:
            rsp = bytes(self._buf)
            self._buf.clear()
            self._finish(rsp, None)

    def _fail(self, exc: BaseException) -> None:
        if self._done is None:
            self._drop()
        else:
            self._finish(None, exc)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._done is None:
            return  # idle: the next send arms it again
        if self.loop.time() < self._deadline:
            self._arm()
            return
        self._finish(None, TimeoutError("swtpm did not answer in time"))
