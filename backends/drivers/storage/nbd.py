"""NBD client storage driver: the fixed-newstyle handshake here, the transmission phase in C (csrc/io_nbd.c).

Targets: an `NbdTarget`, or text in the grammar of nbd_target.py (`nbd:unix:/sock[:exportname=NAME]`,
`nbd:HOST:PORT[:exportname=NAME]`, `nbd://HOST[:PORT][/NAME]`, `nbd+unix:///NAME?socket=/sock`).

The handshake asks for NBD_OPT_GO with NBD_INFO_BLOCK_SIZE and falls back to NBD_OPT_EXPORT_NAME for servers
that predate OPT_GO (or are not "fixed" newstyle), so block-size hints are used when the server has them.

A dropped connection does not fail the disk: the engine keeps every unanswered op and a log of the writes
acknowledged since the last flush, and `supervise()` (an asyncio task started by `open()` when it runs in an
event loop, or by `start_supervisor()`) reconnects with backoff until `reconnect_deadline`, then fails the
engine so the queued ops complete with EIO.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from backends.drivers.storage.base import IoEngine, StorageCaps, StorageDriver, StorageError
from backends.drivers.storage.nbd_target import NbdTarget as NbdTarget  # re-exported: the driver's argument
from backends.drivers.storage.nbd_target import NbdTargetError, parse_nbd_target
from backends.native import ffi, lib

log = logging.getLogger("pvback.storage.nbd")

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPT_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7

REP_ACK = 1
REP_INFO = 3
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_CAN_MULTI_CONN = 1 << 8

STATE_CONNECTED = 0
STATE_DISCONNECTED = 1
STATE_FAILED = 2

# Flags the engine acts on: a server we reconnect to must still offer each one the first server offered.
_FLAGS_RELIED_ON = FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM
MAX_OPTION_REPLY = 1 << 20  # a server's option reply larger than this is garbage, not data


class NbdError(StorageError):
    """The NBD server cannot be reached or used (the message says which and why)."""


@dataclass(frozen=True)
class NbdExport:
    size: int
    flags: int  # transmission flags
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 << 20
    negotiated_with: str = "OPT_GO"  # or "EXPORT_NAME", "oldstyle"


def parse_target(target: str) -> NbdTarget:
    """`parse_nbd_target` with the driver's error type: StorageError(EINVAL), like every other driver refusal."""
    try:
        return parse_nbd_target(target)
    except NbdTargetError as exc:
        raise StorageError(errno.EINVAL, str(exc)) from exc


# ---- handshake -------------------------------------------------------------------------------------------


def _connect(target: NbdTarget, timeout: float) -> socket.socket:
    try:
        if target.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(target.socket_path)
            except BaseException:
                sock.close()
                raise
        else:
            assert target.host is not None
            sock = socket.create_connection((target.host, target.port), timeout=timeout)
            # Requests are small and latency-bound: never let Nagle hold one back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError as exc:
        raise NbdError(errno.ETIMEDOUT, f"nbd: {target.describe()}: connect timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise NbdError(
            exc.errno or errno.ECONNREFUSED, f"nbd: {target.describe()}: cannot connect: {exc.strerror or exc}"
        ) from exc
    return sock


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, f"server closed the connection while we waited for {what}")
        buf += chunk
    return bytes(buf)


def _send_option(sock: socket.socket, opt: int, data: bytes) -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def _option_reply(sock: socket.socket, opt: int) -> tuple[int, bytes]:
    magic, ropt, rtype, length = struct.unpack(">QIII", _recv_exact(sock, 20, "an option reply"))
    if magic != OPT_REPLY_MAGIC or ropt != opt:
        raise NbdError(errno.EPROTO, f"bad option reply (magic {magic:#x}, option {ropt})")
    if length > MAX_OPTION_REPLY:
        raise NbdError(errno.EPROTO, f"option reply of {length} bytes")
    return rtype, _recv_exact(sock, length, "option reply data")


def _reply_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip() or "no message"


def _go(sock: socket.socket, target: NbdTarget) -> NbdExport | None:
    """NBD_OPT_GO; None if the server does not know OPT_GO (the caller falls back to EXPORT_NAME)."""
    name = target.export.encode()
    _send_option(sock, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
    size: int | None = None
    flags = 0
    blocks = (1, 4096, 32 << 20)
    while True:
        rtype, data = _option_reply(sock, OPT_GO)
        if rtype == REP_INFO and len(data) >= 2:
            info = struct.unpack(">H", data[:2])[0]
            if info == INFO_EXPORT and len(data) == 12:
                size, flags = struct.unpack(">QH", data[2:])
            elif info == INFO_BLOCK_SIZE and len(data) == 14:
                blocks = struct.unpack(">III", data[2:])
            continue  # other infos (name, description) are of no use to us
        if rtype == REP_ACK:
            if size is None:
                raise NbdError(errno.EPROTO, f"nbd: {target.describe()}: OPT_GO acknowledged without NBD_INFO_EXPORT")
            return NbdExport(size, flags, *blocks, negotiated_with="OPT_GO")
        if rtype == REP_ERR_UNSUP:
            return None
        if rtype == REP_ERR_UNKNOWN:
            raise NbdError(
                errno.ENOENT, f"nbd: {target.describe()}: the server has no such export ({_reply_text(data)})"
            )
        if rtype == REP_ERR_TLS_REQD:
            raise NbdError(
                errno.EACCES, f"nbd: {target.describe()}: the server requires TLS, which pvback does not speak"
            )
        if rtype in (REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_SHUTDOWN, REP_ERR_BLOCK_SIZE_REQD) or rtype & REP_ERR:
            raise NbdError(errno.EACCES, f"nbd: {target.describe()}: server refused the export: {_reply_text(data)}")
        raise NbdError(errno.EPROTO, f"nbd: {target.describe()}: unexpected reply type {rtype:#x} to OPT_GO")


def _export_name_opt(sock: socket.socket, target: NbdTarget, no_zeroes: bool) -> NbdExport:
    _send_option(sock, OPT_EXPORT_NAME, target.export.encode())
    try:
        size, flags = struct.unpack(">QH", _recv_exact(sock, 10, "the export"))
    except ConnectionResetError as exc:
        # EXPORT_NAME has no error reply: a server that does not know the name just hangs up.
        raise NbdError(
            errno.ENOENT, f"nbd: {target.describe()}: the server closed the connection (no such export?)"
        ) from exc
    if not no_zeroes:
        _recv_exact(sock, 124, "padding")
    return NbdExport(size, flags, negotiated_with="EXPORT_NAME")


def handshake(sock: socket.socket, target: NbdTarget) -> NbdExport:
    """Negotiate `target.export` on a connected socket (its timeout bounds every read)."""
    hello = _recv_exact(sock, 16, "the server greeting")
    magic, second = struct.unpack(">QQ", hello)
    if magic != NBDMAGIC:
        raise NbdError(errno.EPROTO, f"nbd: {target.describe()}: not an NBD server (greeting {hello[:8]!r})")
    if second == CLISERV_MAGIC:
        size, flags = struct.unpack(">QI", _recv_exact(sock, 12, "the oldstyle export"))
        _recv_exact(sock, 124, "padding")
        return NbdExport(size, flags & 0xFFFF, negotiated_with="oldstyle")
    if second != IHAVEOPT:
        raise NbdError(errno.EPROTO, f"nbd: {target.describe()}: not an NBD server (second magic {second:#x})")
    (hflags,) = struct.unpack(">H", _recv_exact(sock, 2, "handshake flags"))
    fixed = bool(hflags & FLAG_FIXED_NEWSTYLE)
    no_zeroes = bool(hflags & FLAG_NO_ZEROES)
    sock.sendall(struct.pack(">I", (FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (FLAG_C_NO_ZEROES if no_zeroes else 0)))
    if fixed:
        info = _go(sock, target)
        if info is not None:
            return info
    return _export_name_opt(sock, target, no_zeroes)


def open_export(target: NbdTarget, *, readonly: bool, timeout: float) -> tuple[socket.socket, NbdExport]:
    """Connect and negotiate; returns the socket in transmission phase and what the server said."""
    sock = _connect(target, timeout)
    try:
        sock.settimeout(timeout)
        try:
            info = handshake(sock, target)
        except TimeoutError as exc:
            raise NbdError(
                errno.ETIMEDOUT, f"nbd: {target.describe()}: handshake timed out after {timeout:g}s"
            ) from exc
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, NbdError):
                raise
            raise NbdError(exc.errno or errno.EIO, f"nbd: {target.describe()}: handshake failed: {exc}") from exc
        _check_export(target, info, readonly)
        sock.settimeout(None)
        return sock, info
    except BaseException:
        sock.close()
        raise


def _check_export(target: NbdTarget, info: NbdExport, readonly: bool) -> None:
    where = target.describe()
    if not info.flags & FLAG_HAS_FLAGS:
        raise NbdError(errno.EPROTO, f"nbd: {where}: transmission flags {info.flags:#x} lack HAS_FLAGS")
    if info.flags & FLAG_READ_ONLY and not readonly:
        raise NbdError(errno.EROFS, f"nbd: {where}: the export is read-only but was opened for writing")
    mn, pref, mx = info.min_block, info.preferred_block, info.max_block
    if not (mn & (mn - 1) == 0 and 1 <= mn <= 65536 and pref >= mn and mx >= mn):
        raise NbdError(errno.EPROTO, f"nbd: {where}: nonsensical block sizes {mn}/{pref}/{mx}")
    sector = max(512, mn)
    if sector > 4096:
        raise NbdError(errno.EINVAL, f"nbd: {where}: minimum block size {mn} is beyond what blkif can express")
    if info.size <= 0 or info.size % sector:
        raise NbdError(errno.EINVAL, f"nbd: {where}: export size {info.size} is not a multiple of {sector}")


# ---- driver ----------------------------------------------------------------------------------------------


class NbdDriver(StorageDriver):
    """An NBD export served through the C NBD engine.

    reconnect_deadline: how long a dropped server may stay away before the queued ops fail with EIO.
    log_limit: bytes of acknowledged-but-unflushed writes kept for replay (None = engine default, 64 MiB).
    before_reconnect: called (in a worker thread) before each reconnect attempt, e.g. to restart a server
    the caller owns.
    """

    name = "nbd"

    def __init__(
        self,
        target: str | NbdTarget,
        *,
        readonly: bool = False,
        connect_timeout: float = 10.0,
        reconnect_deadline: float = 60.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        log_limit: int | None = None,
        before_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self.target = target if isinstance(target, NbdTarget) else parse_target(target)
        if connect_timeout <= 0 or reconnect_deadline < 0 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise StorageError(errno.EINVAL, "nbd: timeouts must be positive (and backoff_max >= backoff_initial)")
        if log_limit is not None and log_limit < 0:
            raise StorageError(errno.EINVAL, "nbd: log_limit must be >= 0")
        self.readonly = readonly
        self.connect_timeout = connect_timeout
        self.reconnect_deadline = reconnect_deadline
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.log_limit = log_limit
        self.before_reconnect = before_reconnect
        self._export: NbdExport | None = None
        self._engine: IoEngine | None = None
        self._task: asyncio.Task[None] | None = None
        self.failure: NbdError | None = None  # why the engine was failed, once it is
        self.reconnects = 0

    # -- StorageDriver --

    def open(self) -> None:
        if self._engine is not None:
            return
        sock, info = open_export(self.target, readonly=self.readonly, timeout=self.connect_timeout)
        try:
            err = ffi.new("char[]", 256)
            c = lib.pv_io_engine_nbd_open(sock.fileno(), info.size, info.flags, err, 256)
            if c == ffi.NULL:
                raise NbdError(errno.EIO, f"nbd: engine: {ffi.string(err).decode(errors='replace')}")
        finally:
            sock.close()  # the engine holds its own duplicate
        self._engine = IoEngine(c, "nbd")
        self._export = info
        if self.log_limit is not None:
            lib.pv_io_engine_nbd_set_log_limit(c, self.log_limit)
        log.info(
            "nbd: %s: %d bytes, flags %#x (%s)", self.target.describe(), info.size, info.flags, info.negotiated_with
        )
        with contextlib.suppress(RuntimeError):
            self.start_supervisor()

    def capabilities(self) -> StorageCaps:
        info = self.export
        sector = max(512, info.min_block)
        can_trim = bool(info.flags & FLAG_SEND_TRIM) and not self.readonly
        return StorageCaps(
            size_bytes=info.size,
            logical_sector_size=sector,
            physical_sector_size=max(sector, min(info.preferred_block, 4096)),
            readonly=self.readonly or bool(info.flags & FLAG_READ_ONLY),
            can_discard=can_trim,
            can_secure_discard=False,
            discard_granularity=max(sector, min(info.preferred_block, 1 << 20)) if can_trim else 0,
            needs_flush=bool(info.flags & FLAG_SEND_FLUSH),
            threaded=True,  # completions arrive from the engine's reader thread
            direct_io=False,
        )

    def engine(self) -> IoEngine:
        if self._engine is None:
            raise StorageError("nbd driver not open")
        return self._engine

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._engine is not None:
            engine, self._engine = self._engine, None
            # Waits for a reconnect attempt still running in a worker thread (it holds the engine's
            # control lock), so the engine is never freed under it.
            lib.pv_io_engine_nbd_fail(engine.c)
            engine.close()

    # -- state and reconnect --

    @property
    def export(self) -> NbdExport:
        if self._export is None:
            raise StorageError("nbd driver not open")
        return self._export

    def state(self) -> int:
        """STATE_CONNECTED / STATE_DISCONNECTED / STATE_FAILED."""
        return int(lib.pv_io_engine_nbd_state(self.engine().c))

    def stats(self) -> dict[str, int]:
        st = ffi.new("struct pv_nbd_stats *")
        lib.pv_io_engine_nbd_get_stats(self.engine().c, st)
        return {name: int(getattr(st, name)) for name in dir(st)}

    def start_supervisor(self) -> asyncio.Task[None]:
        """Start the reconnect task on the running loop (RuntimeError if none is running)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self.supervise(), name=f"nbd-supervise {self.target.describe()}")
        return self._task

    async def supervise(self) -> None:
        """Watch the engine; reconnect whenever the connection drops; return once the engine has failed."""
        engine = self.engine()
        loop = asyncio.get_running_loop()
        fd = lib.pv_io_engine_nbd_state_fd(engine.c)
        wake = asyncio.Event()
        loop.add_reader(fd, wake.set)
        try:
            while not engine.closed:
                state = lib.pv_io_engine_nbd_state(engine.c)  # also drains the eventfd
                if state == STATE_FAILED:
                    return
                if state == STATE_DISCONNECTED:
                    await self._reconnect(engine)
                    continue
                await wake.wait()
                wake.clear()
        finally:
            loop.remove_reader(fd)

    async def _reconnect(self, engine: IoEngine) -> None:
        where = self.target.describe()
        log.warning("nbd: %s: connection lost; reconnecting for up to %gs", where, self.reconnect_deadline)
        start = time.monotonic()
        deadline = start + self.reconnect_deadline
        delay = self.backoff_initial
        last: NbdError | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.to_thread(self._attempt, engine, min(self.connect_timeout, remaining))
                self.reconnects += 1
                log.warning("nbd: %s: reconnected after %.2fs", where, time.monotonic() - start)
                return
            except NbdError as exc:
                last = exc
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, self.backoff_max)
        self.failure = NbdError(
            errno.EIO, f"nbd: {where}: server gone for more than {self.reconnect_deadline:g}s ({last}); failing I/O"
        )
        log.error("%s", self.failure)
        lib.pv_io_engine_nbd_fail(engine.c)

    def _attempt(self, engine: IoEngine, timeout: float) -> None:
        if self.before_reconnect is not None:
            self.before_reconnect()
        sock, info = open_export(self.target, readonly=self.readonly, timeout=timeout)
        try:
            old = self.export
            if info.size != old.size:
                raise NbdError(
                    errno.EIO, f"nbd: {self.target.describe()}: export size changed {old.size} -> {info.size}"
                )
            lost = old.flags & _FLAGS_RELIED_ON & ~info.flags
            if lost:
                raise NbdError(errno.EIO, f"nbd: {self.target.describe()}: server dropped flags {lost:#x} we rely on")
            rc = lib.pv_io_engine_nbd_reconnect(engine.c, sock.fileno())
            if rc < 0:
                raise NbdError(-rc, f"nbd: {self.target.describe()}: replay on the new connection: {os.strerror(-rc)}")
        finally:
            sock.close()
