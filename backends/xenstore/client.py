"""An asyncio xenstore client speaking the wire protocol directly (no libxenstore).

Many requests may be in flight at once on one connection; replies are matched by req_id.  Watch events
arrive interleaved with replies and go to the `Watch` whose token they carry.  The connection is a unix
socket to xenstored or the /dev/xen/xenbus character device (same framing), found the way libxenstore finds
it: `$XENSTORED_PATH`, else `$XENSTORED_RUNDIR/socket` (default /var/run/xenstored/socket), else the
xenbus device.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
import random
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from typing import ClassVar, TypeVar, cast

from backends.xenstore.wire import (
    HEADER_SIZE,
    PAYLOAD_MAX,
    Perm,
    XsType,
    error_name,
    pack,
    split_strings,
    strings,
    unpack_header,
)

__all__ = ["Perm", "Transaction", "Watch", "XenStoreClient", "XenStoreError"]

log = logging.getLogger("pvback.xenstore.client")

T = TypeVar("T")

DEFAULT_RUNDIR = "/var/run/xenstored"
# A transaction that loses to conflicting commits is run again until it commits, as libxl's callers and
# xenstore-utils do (they loop on EAGAIN with no cap): N writers adding to one directory at once (64 `pvback
# attach`es under backend/vtpm) each lose up to N - 1 times, so a count cap only picks who fails.  What bounds it
# is time; the back-off doubles up to TX_BACKOFF_MAX_S and is drawn at random below that ("full jitter") so the
# losers spread out instead of colliding again in step.
TX_RETRY_S = 60.0
TX_BACKOFF_MIN_S = 0.0005
TX_BACKOFF_MAX_S = 0.05
XENBUS_DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")


class XenStoreError(OSError):
    """A xenstore request failed.  `.name` is the protocol's error name ("ENOENT", "EACCES", "EAGAIN", ...);
    `.errno` the matching errno.  Connection failures use "EPIPE" (closed by us) and "ECONNRESET" (lost)."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(getattr(errno, name, errno.EINVAL), f"{name}: {detail}" if detail else name)
        self.name = name


def _path_bytes(path: str) -> bytes:
    # A NUL would end the path early and turn the rest into another field (e.g. the value of a WRITE).
    if "\0" in path:
        raise XenStoreError("EINVAL", f"path contains NUL: {path!r}")
    try:
        return path.encode("ascii")
    except UnicodeEncodeError:
        raise XenStoreError("EINVAL", f"path is not ASCII: {path!r}") from None


class _Framer:
    """Splits a byte stream into messages."""

    def __init__(self, deliver: Callable[[int, int, int, bytes], None], fail: Callable[[str], None]) -> None:
        self._buf = bytearray()
        self._deliver = deliver
        self._fail = fail

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        off = 0
        end = len(buf)
        while end - off >= HEADER_SIZE:
            type_, req_id, tx_id, length = unpack_header(buf, off)
            if length > PAYLOAD_MAX:
                del buf[:]
                self._fail(f"reply payload of {length} bytes (max {PAYLOAD_MAX})")
                return
            if end - off - HEADER_SIZE < length:
                break
            payload = bytes(buf[off + HEADER_SIZE : off + HEADER_SIZE + length])
            off += HEADER_SIZE + length
            self._deliver(type_, req_id, tx_id, payload)
        del buf[:off]


class _SocketProtocol(asyncio.Protocol):
    def __init__(self, client: XenStoreClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client._framer.feed(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(exc)


class _DeviceChannel:
    """/dev/xen/xenbus (or any character device with the same framing), driven by add_reader/add_writer.

    One request at a time, as libxenstore does: the next is written only once the reply to the last one came.
    Linux's xenbus device takes a request's header at write() but its payload from the file's one message
    buffer later, when its xenbus thread puts the request on the ring, and the next write() refills that
    buffer: a request written behind another one in flight could go out as the first one's header with the
    second one's payload (seen on real Xen from a driver domain: a READ of one path carrying the tail of the
    previous path, which made xenstored 4.17 abort on an assertion and took every domain's xenstore down).
    The kernel takes whole messages per write and never blocks long, but EAGAIN is handled anyway."""

    def __init__(self, client: XenStoreClient, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.fd = fd
        self.loop = loop
        self.out = bytearray()
        self.waiting: collections.deque[bytes] = collections.deque()  # requests not written yet
        self.in_flight = False  # a request was written and its reply has not come yet
        self.closed = False
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        if not data:
            self._lost(None)
            return
        self.client._framer.feed(data)

    def write(self, data: bytes) -> None:
        """`data`: one whole request."""
        if self.closed:
            return
        if self.in_flight:
            self.waiting.append(data)
            return
        self.in_flight = True
        self._write_now(data)

    def reply_arrived(self) -> None:
        """A reply (not a watch event) came: the request in flight is done, the next may go."""
        self.in_flight = False
        if self.waiting and not self.closed:
            self.in_flight = True
            self._write_now(self.waiting.popleft())

    def _write_now(self, data: bytes) -> None:
        if self.out:
            self.out += data
            return
        try:
            n = os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._lost(e)
            return
        if n < len(data):
            self.out += data[n:]
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        try:
            n = os.write(self.fd, self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        del self.out[:n]
        if not self.out:
            self.loop.remove_writer(self.fd)

    def _lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.close()
            self.client._lost(exc)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        os.close(self.fd)


class Watch:
    """Changed paths under a watched path, as an async iterator; the first one is the initial event the
    server sends when the watch is set.  Events for a path already queued and not yet consumed are merged
    (consumers read current state, and a guest cannot grow the queue beyond the number of distinct paths).
    Iteration ends when the watch or the client is closed, and raises XenStoreError if the connection is
    lost."""

    live: ClassVar[int] = 0  # watches of this process not yet ended: leak checks read it

    def __init__(self, client: XenStoreClient, path: str, token: bytes) -> None:
        self.client = client
        self.path = path
        self.token = token
        Watch.live += 1
        self._queue: dict[str, None] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: XenStoreError | None = None

    def __repr__(self) -> str:
        return f"<Watch {self.path!r} token={self.token!r}{' ended' if self._ended else ''}>"

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._ended

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> str:
        while True:
            if self._queue:
                path = next(iter(self._queue))
                del self._queue[path]
                return path
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)

    async def next(self, timeout: float | None = None) -> str:
        """The next changed path (asyncio.TimeoutError after `timeout` seconds)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _push(self, path: str) -> None:
        if not self._ended:
            self._queue[path] = None
            self._wake()

    def _end(self, error: XenStoreError | None = None) -> None:
        if not self._ended:
            self._ended = True
            Watch.live -= 1
            self._error = error
            self._wake()

    async def close(self) -> None:
        """Remove the watch (UNWATCH) and end iteration.  Idempotent."""
        if self._ended:
            return
        self._end()
        self.client._watches.pop(self.token, None)
        if not self.client.closed:
            with contextlib.suppress(XenStoreError):
                await self.client._request(XsType.UNWATCH, strings(_path_bytes(self.path), self.token), 0)

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Ops:
    """The node operations shared by the client (any tx) and a Transaction (its own tx)."""

    client: XenStoreClient

    def _tx(self, tx: int) -> int:
        return tx

    async def read(self, path: str, *, tx: int = 0) -> bytes:
        """The node's value; XenStoreError(ENOENT) if it does not exist."""
        return await self.client._request(XsType.READ, _path_bytes(path) + b"\0", self._tx(tx), path)

    async def read_str(self, path: str, *, tx: int = 0) -> str | None:
        """The node's value as text, None if it does not exist."""
        try:
            raw = await self.read(path, tx=tx)
        except XenStoreError as e:
            if e.name == "ENOENT":
                return None
            raise
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise XenStoreError("EINVAL", f"{path}: value is not UTF-8") from None

    async def write(self, path: str, value: str | bytes, *, tx: int = 0) -> None:
        """Create or overwrite the node (and any missing parents)."""
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        await self.client._request(XsType.WRITE, _path_bytes(path) + b"\0" + data, self._tx(tx), path)

    async def mkdir(self, path: str, *, tx: int = 0) -> None:
        await self.client._request(XsType.MKDIR, _path_bytes(path) + b"\0", self._tx(tx), path)

    async def rm(self, path: str, *, tx: int = 0) -> None:
        """Remove the node and everything below it; no error if it is absent but its parent exists."""
        await self.client._request(XsType.RM, _path_bytes(path) + b"\0", self._tx(tx), path)

    async def directory(self, path: str, *, tx: int = 0) -> list[str]:
        """The names of the node's children (DIRECTORY_PART when the list is over one payload)."""
        p = _path_bytes(path)
        t = self._tx(tx)
        try:
            raw = await self.client._request(XsType.DIRECTORY, p + b"\0", t, path)
        except XenStoreError as e:
            if e.name != "E2BIG":
                raise
            return await self._directory_part(p, t, path)
        return [s.decode("ascii", "replace") for s in split_strings(raw)]

    async def _directory_part(self, p: bytes, t: int, path: str) -> list[str]:
        for _ in range(8):  # restart when the directory changes under us; give up if it never settles
            names: list[str] = []
            gen: bytes | None = None
            off = 0
            while True:
                raw = await self.client._request(XsType.DIRECTORY_PART, strings(p, str(off)), t, path)
                nul = raw.find(b"\0")
                if nul < 0:
                    raise XenStoreError("EIO", f"{path}: malformed DIRECTORY_PART reply")
                g, body = raw[:nul], raw[nul + 1 :]
                if gen is None:
                    gen = g
                elif g != gen:
                    break
                done = body == b"\0" or body.endswith(b"\0\0")
                if done:
                    body = body[:-1]
                if not done and not body:
                    raise XenStoreError("EIO", f"{path}: empty DIRECTORY_PART reply")
                names.extend(s.decode("ascii", "replace") for s in split_strings(body))
                off += len(body)
                if done:
                    return names
        raise XenStoreError("EAGAIN", f"{path}: directory kept changing")

    async def exists(self, path: str, *, tx: int = 0) -> bool:
        """True if the node exists (False on ENOENT; other errors, e.g. EACCES, are raised)."""
        try:
            await self.client._request(XsType.GET_PERMS, _path_bytes(path) + b"\0", self._tx(tx), path)
        except XenStoreError as e:
            if e.name == "ENOENT":
                return False
            raise
        return True

    async def get_perms(self, path: str, *, tx: int = 0) -> list[Perm]:
        raw = await self.client._request(XsType.GET_PERMS, _path_bytes(path) + b"\0", self._tx(tx), path)
        try:
            return [Perm.parse(s) for s in split_strings(raw)]
        except ValueError as e:
            raise XenStoreError("EIO", f"{path}: bad permissions from server: {e}") from None

    async def set_perms(self, path: str, perms: Iterable[Perm], *, tx: int = 0) -> None:
        """Set the node's ACL; the first entry is the owner and everyone else's default access."""
        entries = [str(p) for p in perms]
        if not entries:
            raise ValueError("set_perms needs at least the owner entry")
        await self.client._request(XsType.SET_PERMS, strings(_path_bytes(path), *entries), self._tx(tx), path)


class Transaction(_Ops):
    """One xenstore transaction: the node operations without tx=, plus commit/abort."""

    def __init__(self, client: XenStoreClient, tx_id: int) -> None:
        self.client = client
        self.id = tx_id
        self.ended = False

    def __repr__(self) -> str:
        return f"<Transaction {self.id}{' ended' if self.ended else ''}>"

    def _tx(self, tx: int) -> int:
        if self.ended:
            raise XenStoreError("EINVAL", f"transaction {self.id} has ended")
        return self.id

    async def commit(self) -> None:
        """XenStoreError(EAGAIN) if another change conflicted: run the whole transaction again."""
        t = self._tx(0)
        self.ended = True
        await self.client._request(XsType.TRANSACTION_END, b"T\0", t)

    async def abort(self) -> None:
        if self.ended:
            return
        self.ended = True
        with contextlib.suppress(XenStoreError):
            await self.client._request(XsType.TRANSACTION_END, b"F\0", self.id)

    def _abort_nowait(self) -> None:
        """Abort without waiting for the reply (usable from cancellation paths)."""
        if self.ended or self.client.closed:
            self.ended = True
            return
        self.ended = True
        self.client._send_nowait(XsType.TRANSACTION_END, b"F\0", self.id)


class XenStoreClient(_Ops):
    """One connection to xenstored.  Create with `connect()` or `from_socket()`; close with `close()`."""

    def __init__(self) -> None:
        self.client = self
        self._loop = asyncio.get_running_loop()
        self._framer = _Framer(self._on_message, self._protocol_error)
        self._pending: dict[int, tuple[int, asyncio.Future[tuple[int, bytes]]]] = {}
        self._watches: dict[bytes, Watch] = {}
        self._next_req = 0
        self._tokens = itertools.count(1)
        self._transport: asyncio.Transport | None = None
        self._device: _DeviceChannel | None = None
        self._closed = False
        self._error: XenStoreError | None = None
        self._lost_waiter: asyncio.Future[None] = self._loop.create_future()
        self.where = "?"

    def __repr__(self) -> str:
        return f"<XenStoreClient {self.where}{' closed' if self._closed else ''}>"

    # --- connecting ---------------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, path: str | None = None) -> XenStoreClient:
        """Connect to `path` (a unix socket or a xenbus-like character device), or find xenstored the way
        libxenstore does."""
        if path is not None:
            candidates = [path]
        else:
            env = os.environ.get("XENSTORED_PATH")
            rundir = os.environ.get("XENSTORED_RUNDIR", DEFAULT_RUNDIR)
            dev = env or next((d for d in XENBUS_DEVICES if os.path.exists(d)), XENBUS_DEVICES[0])
            candidates = list(dict.fromkeys([env or os.path.join(rundir, "socket"), dev]))
        failures: list[str] = []
        for cand in candidates:
            try:
                return await cls._open(cand)
            except OSError as e:
                failures.append(f"{cand}: {e.strerror or e}")
        raise XenStoreError("ENOENT", "cannot reach xenstored (" + "; ".join(failures) + ")")

    @classmethod
    async def _open(cls, path: str) -> XenStoreClient:
        st = os.stat(path)
        self = cls()
        self.where = path
        if stat.S_ISSOCK(st.st_mode):
            transport, _ = await self._loop.create_unix_connection(lambda: _SocketProtocol(self), path)
            self._transport = transport
        else:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            self._device = _DeviceChannel(self, fd, self._loop)
        return self

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> XenStoreClient:
        """Use an already connected stream socket (e.g. one from XenStoreServer.connect_domain); the client
        takes ownership of it."""
        self = cls()
        self.where = f"fd {sock.fileno()}"
        sock.setblocking(False)
        transport, _ = await self._loop.connect_accepted_socket(lambda: _SocketProtocol(self), sock)
        self._transport = transport
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    # --- requests -----------------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
        elif self._device is not None:
            self._device.write(data)

    def _dead(self) -> XenStoreError:
        return self._error or XenStoreError("EPIPE", "xenstore connection closed")

    def _register(self, type_: int, payload: bytes, tx: int, what: str) -> asyncio.Future[tuple[int, bytes]]:
        if len(payload) > PAYLOAD_MAX:
            raise XenStoreError("E2BIG", f"{XsType(type_).name} {what}: payload of {len(payload)} bytes")
        if self._closed:
            raise self._dead()
        req_id = self._next_req
        while req_id in self._pending:
            req_id = (req_id + 1) & 0xFFFFFFFF
        self._next_req = (req_id + 1) & 0xFFFFFFFF
        fut: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        self._pending[req_id] = (type_, fut)
        self._send(pack(type_, req_id, tx, payload))
        return fut

    async def _request(self, type_: int, payload: bytes, tx: int, what: str = "") -> bytes:
        fut = self._register(type_, payload, tx, what)
        # A cancelled caller leaves its entry in _pending: the reply still comes and is then dropped.
        rtype, reply = await fut
        if rtype == XsType.ERROR:
            raise XenStoreError(error_name(reply), f"{XsType(type_).name} {what}".rstrip())
        return reply

    def _send_nowait(self, type_: int, payload: bytes, tx: int) -> None:
        try:
            fut = self._register(type_, payload, tx, "")
        except XenStoreError:
            return
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _on_message(self, type_: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if type_ != XsType.WATCH_EVENT and self._device is not None:
            self._device.reply_arrived()
        if type_ == XsType.WATCH_EVENT:
            parts = payload.split(b"\0")
            if len(parts) < 3:
                log.warning("%r: malformed watch event %r", self, payload[:64])
                return
            w = self._watches.get(parts[1])
            if w is not None:
                w._push(parts[0].decode("ascii", "replace"))
            return
        entry = self._pending.pop(req_id, None)
        if entry is None:
            log.warning("%r: reply to unknown request id %d (type %d)", self, req_id, type_)
            return
        want, fut = entry
        if type_ != want and type_ != XsType.ERROR:
            # libxenstore closes the connection here too: request/reply pairing can no longer be trusted.
            self._pending[req_id] = entry  # failed with the rest by _shutdown
            self._protocol_error(f"reply type {type_} to a request of type {want}")
            return
        if not fut.done():
            fut.set_result((type_, payload))

    def _protocol_error(self, why: str) -> None:
        log.error("%r: protocol error: %s", self, why)
        self._shutdown(XenStoreError("EIO", f"xenstore protocol error: {why}"))

    def _lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._shutdown(XenStoreError("ECONNRESET", f"xenstore connection lost{f': {exc}' if exc else ''}"))
        if not self._lost_waiter.done():
            self._lost_waiter.set_result(None)

    def _shutdown(self, error: XenStoreError | None) -> None:
        """Fail every pending request, end every watch, close the channel."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        fail = self._dead()
        pending, self._pending = self._pending, {}
        for _, fut in pending.values():
            if not fut.done():
                fut.set_exception(fail)
                fut.exception()  # retrieved here so an abandoned request does not warn
        watches, self._watches = self._watches, {}
        for w in watches.values():
            w._end(error)
        if self._transport is not None:
            self._transport.close()
        if self._device is not None:
            self._device.close()
            if not self._lost_waiter.done():
                self._lost_waiter.set_result(None)

    async def close(self) -> None:
        """Close the connection: pending requests fail with XenStoreError(EPIPE), watches end."""
        if self._closed:
            return
        self._shutdown(None)
        if self._transport is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost_waiter), 1.0)

    async def __aenter__(self) -> XenStoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- watches, transactions, domains -------------------------------------------------------------------

    async def watch(self, path: str) -> Watch:
        """Watch `path` and everything below it (or a special path such as @releaseDomain)."""
        token = f"pvback:{next(self._tokens)}".encode()
        w = Watch(self, path, token)
        self._watches[token] = w  # before sending: the initial event follows the reply at once
        try:
            await self._request(XsType.WATCH, strings(_path_bytes(path), token), 0, path)
        except BaseException:
            self._watches.pop(token, None)
            w._end()
            raise
        return w

    async def transaction_start(self) -> Transaction:
        reply = await self._request(XsType.TRANSACTION_START, b"\0", 0)
        try:
            tx_id = int(reply.rstrip(b"\0"))
        except ValueError:
            raise XenStoreError("EIO", f"bad transaction id {reply[:32]!r}") from None
        return Transaction(self, tx_id)

    async def transaction(self, fn: Callable[[Transaction], Awaitable[T]], *, retries: int | None = None,
                          retry_s: float | None = TX_RETRY_S) -> T:
        """Run `fn` in a transaction and commit it; on EAGAIN (a conflicting change) run it again after a jittered
        back-off, for up to `retry_s` seconds (None: no time limit) and, if given, `retries` more times.  The last
        EAGAIN is raised past either limit.  If `fn` raises, the transaction is aborted and the exception
        propagates."""
        loop = asyncio.get_running_loop()
        deadline = None if retry_s is None else loop.time() + retry_s
        attempt = 0
        while True:
            t = await self.transaction_start()
            try:
                result = await fn(t)
            except XenStoreError as e:
                t._abort_nowait()
                if e.name != "EAGAIN":
                    raise
                err = e
            except BaseException:
                t._abort_nowait()
                raise
            else:
                try:
                    await t.commit()
                    return result
                except XenStoreError as e:
                    if e.name != "EAGAIN":
                        raise
                    err = e
            attempt += 1
            pause = random.uniform(0, min(TX_BACKOFF_MIN_S * (1 << min(attempt, 16)), TX_BACKOFF_MAX_S))
            if (retries is not None and attempt > retries) or (deadline is not None
                                                               and loop.time() + pause > deadline):
                raise err
            await asyncio.sleep(pause)

    async def get_domain_path(self, domid: int) -> str:
        reply = await self._request(XsType.GET_DOMAIN_PATH, strings(str(domid)), 0)
        return reply.rstrip(b"\0").decode("ascii")

    async def is_domain_introduced(self, domid: int) -> bool:
        return await self._request(XsType.IS_DOMAIN_INTRODUCED, strings(str(domid)), 0) == b"T\0"

    async def introduce_domain(self, domid: int, gfn: int = 0, port: int = 0) -> None:
        await self._request(XsType.INTRODUCE, strings(str(domid), str(gfn), str(port)), 0)

    async def release_domain(self, domid: int) -> None:
        await self._request(XsType.RELEASE, strings(str(domid)), 0)

    async def resume_domain(self, domid: int) -> None:
        await self._request(XsType.RESUME, strings(str(domid)), 0)

    async def reset_watches(self) -> None:
        """Drop every watch and transaction this connection has on the server (ends local watches too)."""
        await self._request(XsType.RESET_WATCHES, b"\0", 0)
        watches, self._watches = self._watches, {}
        for w in watches.values():
            w._end()

    async def control(self, *args: str) -> bytes:
        return await self._request(XsType.CONTROL, strings(*args), 0)
