"""A xenstored-compatible server for the emulated platform.

It speaks the real wire protocol, so Debian's xenstore-utils and libxenstore work against it
(`XENSTORED_PATH=<socket>`), and it is built to be what a hostile guest cannot break: every guest request is
bounded (payload, path, value size, nodes, watches, transactions, nodes per transaction), a guest that stops
reading its replies is stopped being read (cxenstored's "outstanding requests" quota) and its pending watch
events are capped, and nothing a guest sends costs more than the nodes it names.

Connections: `listen(path)` accepts privileged dom0 connections; `connect_domain(domid)` hands out the client
end of a socket pair bound to a guest domain (what the broker gives an emulated guest).

Run by hand: `python -m backends.xenstore.server --socket /tmp/xs.sock [--introduce DOMID ...]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from typing import cast

from backends.xenstore.tree import Caller, Change, Node, Perms, Quotas, Store, Transaction, XsError, perm_for
from backends.xenstore.wire import (
    DOMAIN_PATH_PREFIX,
    DOMID_MAX,
    HEADER_SIZE,
    PAYLOAD_MAX,
    PERM_NONE,
    PERM_READ,
    SPECIAL_INTRODUCE,
    SPECIAL_RELEASE,
    TYPE_COUNT,
    Perm,
    XsType,
    domain_path,
    pack,
    parent_path,
    split_strings,
    strings,
    unpack_header,
    valid_abs_path,
    valid_chars,
    valid_special_path,
)

__all__ = ["Quotas", "XenStoreServer"]

log = logging.getLogger("pvback.xenstore.server")

OK = b"OK\0"
# Transport buffer marks: above HIGH the transport pauses us and replies queue in our own (quota-limited)
# list; FLUSH bounds how much one batch of input can produce before it is handed to the transport.
WRITE_HIGH = 64 * 1024
WRITE_LOW = 16 * 1024
FLUSH_BYTES = 64 * 1024

_NOTID = 1  # ignores the transaction id
_PRIV = 2  # privileged connections only

Handler = Callable[["_Connection", Transaction | None, bytes], bytes]


class _Watch:
    __slots__ = ("conn", "path", "relative_prefix", "token")

    def __init__(self, conn: _Connection, path: str, token: bytes, relative_prefix: str | None) -> None:
        self.conn = conn
        self.path = path
        self.token = token
        self.relative_prefix = relative_prefix

    def event_path(self, path: str) -> str:
        pre = self.relative_prefix
        if pre is None or not path.startswith(pre):
            return path
        return path[len(pre) + 1 :] if len(path) > len(pre) else ""


class _Domain:
    __slots__ = ("conns", "domid", "introduced", "transactions", "watches")

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.introduced = False
        self.conns: set[_Connection] = set()
        self.watches = 0
        self.transactions = 0


class _Connection(asyncio.Protocol):
    def __init__(self, server: XenStoreServer, domid: int, privileged: bool) -> None:
        self.server = server
        self.domain = server._domain(domid)
        self.caller = Caller(domid, privileged)
        self.privileged = privileged
        self.implicit = domain_path(domid)
        self.transport: asyncio.Transport | None = None
        self.inbuf = bytearray()
        self.txs: dict[int, Transaction] = {}
        self.next_tx = 1
        self.watches: dict[tuple[str, bytes], _Watch] = {}
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.out_replies = 0
        self.out_events: set[bytes] = set()
        self.write_paused = False
        self.read_paused = False
        self.closed = False
        self.events_dropped = 0
        self.requests = 0

    def __repr__(self) -> str:
        return f"<xenstore connection dom{self.caller.domid}{' priv' if self.privileged else ''}>"

    # --- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.domain.conns.add(self)
        self.server._conns.add(self)
        if self.server._closing:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._drop_connection(self)

    def data_received(self, data: bytes) -> None:
        self.inbuf += data
        self._process()
        self.server._flush()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.flush()
        if self.read_paused and not self.closed and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
            self._process()
            self.server._flush()

    # --- input --------------------------------------------------------------------------------------------

    def _stalled(self) -> bool:
        return not self.privileged and self.write_paused and self.out_replies >= self.server.quotas.outstanding

    def _process(self) -> None:
        buf = self.inbuf
        off = 0
        end = len(buf)
        while not self.closed:
            if self._stalled():
                # The guest is not reading its replies: stop reading its requests until it does, so it
                # cannot make us queue without bound (cxenstored's outstanding-requests quota).
                if not self.read_paused and self.transport is not None:
                    self.read_paused = True
                    self.transport.pause_reading()
                break
            if end - off < HEADER_SIZE:
                break
            type_, req_id, tx_id, length = unpack_header(buf, off)
            if length > PAYLOAD_MAX:
                log.warning("%r sent a %d-byte payload (max %d): closing it", self, length, PAYLOAD_MAX)
                self.kill()
                return
            if end - off - HEADER_SIZE < length:
                break
            payload = bytes(buf[off + HEADER_SIZE : off + HEADER_SIZE + length])
            off += HEADER_SIZE + length
            self.requests += 1
            self.server._handle(self, type_, req_id, tx_id, payload)
        del buf[:off]

    def kill(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- output -------------------------------------------------------------------------------------------

    def reply(self, type_: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if len(payload) > PAYLOAD_MAX:
            type_, payload = XsType.ERROR, strings("E2BIG")
        msg = pack(type_, req_id, tx_id, payload)
        self.out.append(msg)
        self.out_bytes += len(msg)
        self.out_replies += 1
        self._queued()

    def event(self, path: str, token: bytes) -> None:
        payload = path.encode() + b"\0" + token + b"\0"
        if len(payload) > PAYLOAD_MAX or self.closed:
            return
        if not self.privileged:
            # An identical event still queued says the same thing (cxenstored drops those too); past the cap
            # a guest that does not read its events loses new ones rather than growing our memory.
            if payload in self.out_events and not path.startswith("@"):
                return
            if self.write_paused and len(self.out_events) >= self.server.quotas.pending_watch_events:
                self.events_dropped += 1
                if self.events_dropped == 1 or self.events_dropped % 1000 == 0:
                    log.warning("%r: dropped %d watch events it did not read", self, self.events_dropped)
                return
            self.out_events.add(payload)
        msg = pack(XsType.WATCH_EVENT, 0, 0, payload)
        self.out.append(msg)
        self.out_bytes += len(msg)
        self._queued()

    def _queued(self) -> None:
        if self.out_bytes >= FLUSH_BYTES:
            self.flush()
        else:
            self.server._dirty.add(self)

    def flush(self) -> None:
        if not self.out or self.write_paused or self.closed or self.transport is None:
            return
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        self.out.clear()
        self.out_bytes = 0
        self.out_replies = 0
        self.out_events.clear()
        self.transport.write(data)

    # --- paths --------------------------------------------------------------------------------------------

    def canonical(self, raw: bytes, *, special: bool = False) -> tuple[str, bool]:
        """(absolute path, was relative).  Relative paths are below the connection's /local/domain/<id>."""
        try:
            path = raw.decode("ascii")
        except UnicodeDecodeError:
            raise XsError("EINVAL", "path is not ASCII") from None
        if not path:
            raise XsError("EINVAL", "empty path")
        if path[0] == "@":
            if special and valid_special_path(path):
                return path, False
            raise XsError("EINVAL", "special path not allowed here")
        relative = path[0] != "/"
        if relative:
            if not valid_chars(path):
                raise XsError("EINVAL", "invalid path")
            path = self.implicit + "/" + path
        if not valid_abs_path(path):
            raise XsError("EINVAL", "invalid path")
        if not self.privileged and _local_length(path) > self.server.quotas.path_max:
            raise XsError("EINVAL", "path too long")
        return path, relative


def _local_length(path: str) -> int:
    """Length of the part of `path` below /local/domain/<id>/ (the whole path elsewhere)."""
    if path.startswith(DOMAIN_PATH_PREFIX):
        rest = path[len(DOMAIN_PATH_PREFIX) :]
        slash = rest.find("/")
        if slash > 0 and rest[:slash].isdigit():
            return len(rest) - slash - 1
    return len(path)


def _one_arg(payload: bytes) -> bytes:
    """The single NUL-terminated string a payload must be (cxenstored's onearg)."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XsError("EINVAL", "expected one string")
    return payload[:-1]


def _domid(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or int(raw) > DOMID_MAX:
        raise XsError("EINVAL", "bad domain id")
    return int(raw)


def _perms_wire(perms: Perms) -> bytes:
    return strings(*(str(Perm.from_mask(d, m)) for d, m in perms))


class XenStoreServer:
    """An in-memory xenstored.  Everything runs on one asyncio loop; all request handling is synchronous, so
    requests of one connection are answered in order and each is atomic."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.store = Store(self.quotas)
        self._domains: dict[int, _Domain] = {}
        self._conns: set[_Connection] = set()
        self._dirty: set[_Connection] = set()
        self._watch_index: dict[str, list[_Watch]] = {}
        self._special_perms: dict[str, Perms] = {
            SPECIAL_INTRODUCE: ((0, PERM_NONE),),
            SPECIAL_RELEASE: ((0, PERM_NONE),),
        }
        self._servers: list[tuple[asyncio.AbstractServer, str]] = []
        self._tasks: set[asyncio.Task[object]] = set()
        self._closing = False
        self._handlers: dict[int, tuple[Handler, int]] = {
            XsType.CONTROL: (self._do_control, _PRIV),
            XsType.DIRECTORY: (self._do_directory, 0),
            XsType.READ: (self._do_read, 0),
            XsType.GET_PERMS: (self._do_get_perms, 0),
            XsType.WATCH: (self._do_watch, _NOTID),
            XsType.UNWATCH: (self._do_unwatch, _NOTID),
            XsType.TRANSACTION_START: (self._do_transaction_start, 0),
            XsType.TRANSACTION_END: (self._do_transaction_end, 0),
            XsType.INTRODUCE: (self._do_introduce, _PRIV),
            XsType.RELEASE: (self._do_release, _PRIV),
            XsType.GET_DOMAIN_PATH: (self._do_get_domain_path, 0),
            XsType.WRITE: (self._do_write, 0),
            XsType.MKDIR: (self._do_mkdir, 0),
            XsType.RM: (self._do_rm, 0),
            XsType.SET_PERMS: (self._do_set_perms, 0),
            XsType.IS_DOMAIN_INTRODUCED: (self._do_is_domain_introduced, _PRIV),
            XsType.RESUME: (self._do_resume, _PRIV),
            XsType.RESET_WATCHES: (self._do_reset_watches, 0),
            XsType.DIRECTORY_PART: (self._do_directory_part, 0),
        }

    # --- public API ---------------------------------------------------------------------------------------

    async def listen(self, path: str) -> None:
        """Accept privileged (dom0) connections on a unix socket at `path` (a stale socket is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        loop = asyncio.get_running_loop()
        srv = await loop.create_unix_server(lambda: _Connection(self, 0, True), path)
        self._servers.append((srv, path))

    def connect_domain(self, domid: int) -> socket.socket:
        """The client end of a new connection bound to guest `domid` (privileged only for domid 0).  Must be
        called on the server's loop; the caller owns the returned socket."""
        if self._closing:
            raise RuntimeError("xenstore server is closed")
        if not 0 <= domid <= DOMID_MAX:
            raise ValueError(f"domid out of range: {domid}")
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        task: asyncio.Task[object] = loop.create_task(
            loop.connect_accepted_socket(lambda: _Connection(self, domid, domid == 0), ours)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return theirs

    async def introduce_domain(self, domid: int) -> None:
        """Mark `domid` introduced, create /local/domain/<domid> owned by it (if absent), fire
        @introduceDomain."""
        self._introduce(domid)
        self._flush()

    async def release_domain(self, domid: int) -> None:
        """The domain is gone: close its connections, remove /local/domain/<domid>, hand any other node it
        owned to dom0, fire @releaseDomain.  Nothing happens for a domain that is not introduced."""
        self._release(domid)
        self._flush()

    def is_introduced(self, domid: int) -> bool:
        d = self._domains.get(domid)
        return d is not None and d.introduced

    async def close(self) -> None:
        self._closing = True
        for srv, _ in self._servers:
            srv.close()
        for conn in list(self._conns):
            conn.kill()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        for srv, path in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._servers.clear()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()
            self._drop_connection(conn)
        await asyncio.sleep(0)

    def stats(self) -> dict[str, int]:
        return {
            "nodes": len(self.store.nodes),
            "connections": len(self._conns),
            "watches": sum(len(ws) for ws in self._watch_index.values()),
            "transactions": sum(len(c.txs) for c in self._conns),
            "events_dropped": sum(c.events_dropped for c in self._conns),
        }

    # --- connections --------------------------------------------------------------------------------------

    def _domain(self, domid: int) -> _Domain:
        d = self._domains.get(domid)
        if d is None:
            d = self._domains[domid] = _Domain(domid)
        return d

    def _drop_connection(self, conn: _Connection) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        self._dirty.discard(conn)
        conn.domain.conns.discard(conn)
        self._clear_conn_state(conn)
        conn.out.clear()

    def _clear_conn_state(self, conn: _Connection) -> None:
        for w in conn.watches.values():
            self._unindex(w)
        conn.domain.watches -= len(conn.watches)
        conn.watches.clear()
        conn.domain.transactions -= len(conn.txs)
        conn.txs.clear()

    def _unindex(self, w: _Watch) -> None:
        lst = self._watch_index.get(w.path)
        if lst is not None:
            with contextlib.suppress(ValueError):
                lst.remove(w)
            if not lst:
                del self._watch_index[w.path]

    def _flush(self) -> None:
        dirty = self._dirty
        while dirty:
            dirty.pop().flush()

    # --- dispatch -----------------------------------------------------------------------------------------

    def _handle(self, conn: _Connection, type_: int, req_id: int, tx_id: int, payload: bytes) -> None:
        try:
            entry = self._handlers.get(type_) if type_ < TYPE_COUNT else None
            if entry is None:
                raise XsError("ENOSYS", f"message type {type_}")
            handler, flags = entry
            if flags & _PRIV and not conn.privileged:
                raise XsError("EACCES", "privileged operation")
            tx: Transaction | None = None
            if not flags & _NOTID and tx_id != 0:
                tx = conn.txs.get(tx_id)
                if tx is None:
                    raise XsError("ENOENT", f"no transaction {tx_id}")
            result = handler(conn, tx, payload)
        except XsError as e:
            conn.reply(XsType.ERROR, req_id, tx_id, strings(e.name))
            return
        except Exception:
            # A bug here must cost one request, never the server.
            log.exception("%r: internal error on message type %d", conn, type_)
            conn.reply(XsType.ERROR, req_id, tx_id, strings("EIO"))
            return
        conn.reply(type_, req_id, tx_id, result)
        if type_ == XsType.WATCH:
            # The initial event (docs/misc/xenstore.txt): after the reply, as cxenstored sends it.
            path, token = split_strings(payload)[:2]
            conn.event(path.decode("ascii"), token)

    def _changed(self, conn: _Connection | None, tx: Transaction | None, changes: list[Change]) -> None:
        if tx is not None:
            tx.events.extend(changes)
            return
        for change in changes:
            self._fire(*change)

    def _fire(self, path: str, exact: bool, perms: tuple[Perms, ...]) -> None:
        index = self._watch_index
        if not index:
            return
        if exact:
            found = index.get(path)
            candidates = list(found) if found else []
        else:
            candidates = []
            p = path
            while True:
                found = index.get(p)
                if found:
                    candidates.extend(found)
                if p == "/":
                    break
                p = parent_path(p)
        visible: dict[_Connection, bool] = {}
        for w in candidates:
            conn = w.conn
            if not conn.privileged:
                ok = visible.get(conn)
                if ok is None:
                    ok = visible[conn] = self.store.watch_visible(conn.caller, path, perms)
                if not ok:
                    continue
            conn.event(w.event_path(path), w.token)

    def _fire_special(self, name: str) -> None:
        perms = self._special_perms[name]
        for w in list(self._watch_index.get(name, ())):
            conn = w.conn
            if conn.privileged or perm_for(conn.caller, perms) & PERM_READ:
                conn.event(name, w.token)

    # --- domains ------------------------------------------------------------------------------------------

    def _introduce(self, domid: int) -> None:
        d = self._domain(domid)
        if d.introduced:
            return
        d.introduced = True
        path = domain_path(domid)
        root = Caller(0, True)
        if self.store.get(path, None) is None:
            changes = self.store.mkdir(root, path, None)
            changes += self.store.set_perms(root, path, ((domid, PERM_NONE),), None)
            self._changed(None, None, changes)
        self._fire_special(SPECIAL_INTRODUCE)

    def _release(self, domid: int) -> None:
        d = self._domains.get(domid)
        if d is None or not d.introduced:
            return
        d.introduced = False
        for conn in list(d.conns):
            conn.kill()
            self._drop_connection(conn)
        root = Caller(0, True)
        path = domain_path(domid)
        if self.store.get(path, None) is not None:
            self._changed(None, None, self.store.rm(root, path, None))
        if domid != 0:
            self.store.disown(domid)
        self._fire_special(SPECIAL_RELEASE)

    # --- handlers (each returns the reply payload or raises XsError) ---------------------------------------

    def _do_directory(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path, _ = conn.canonical(_one_arg(payload))
        node = self.store.directory(conn.caller, path, tx)
        return strings(*node.children)

    def _do_directory_part(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        args = split_strings(payload)
        if len(args) != 2:
            raise XsError("EINVAL", "expected path and offset")
        path, _ = conn.canonical(args[0])
        if not args[1].isdigit():
            raise XsError("EINVAL", "bad offset")
        off = int(args[1])
        node: Node = self.store.directory(conn.caller, path, tx)
        children = strings(*node.children)
        gen = str(node.gen).encode() + b"\0"
        if off >= len(children):
            return gen + b"\0"
        # Whole names only, at most what fits after the generation and the final NUL.
        room = PAYLOAD_MAX - len(gen) - 1
        end = off
        while end < len(children):
            nxt = children.index(b"\0", end) + 1
            if nxt - off > room:
                break
            end = nxt
        if end == off:
            raise XsError("E2BIG", "child name does not fit")
        part = children[off:end]
        return gen + part + (b"\0" if end == len(children) else b"")

    def _do_read(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path, _ = conn.canonical(_one_arg(payload))
        return self.store.read(conn.caller, path, tx)

    def _do_get_perms(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path, _ = conn.canonical(_one_arg(payload), special=True)
        if path[0] == "@":
            perms = self._special_perms.get(path)
            if perms is None:
                raise XsError("ENOENT", path)
            if not perm_for(conn.caller, perms) & PERM_READ:
                raise XsError("EACCES", path)
            return _perms_wire(perms)
        return _perms_wire(self.store.get_perms(conn.caller, path, tx))

    def _do_set_perms(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        args = split_strings(payload)
        if len(args) < 2:
            raise XsError("EINVAL", "expected path and permissions")
        path, _ = conn.canonical(args[0], special=True)
        try:
            perms: Perms = tuple((p.domid, p.mask) for p in map(Perm.parse, args[1:]))
        except ValueError as e:
            raise XsError("EINVAL", str(e)) from None
        if path[0] == "@":
            old = self._special_perms.get(path)
            if old is None:
                raise XsError("ENOENT", path)
            if not conn.privileged:
                raise XsError("EACCES", path)
            self._special_perms[path] = perms
            return OK
        self._changed(conn, tx, self.store.set_perms(conn.caller, path, perms, tx))
        return OK

    def _do_write(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        nul = payload.find(b"\0")
        if nul < 0:
            raise XsError("EINVAL", "no path")
        path, _ = conn.canonical(payload[:nul])
        self._changed(conn, tx, self.store.write(conn.caller, path, payload[nul + 1 :], tx))
        return OK

    def _do_mkdir(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path, _ = conn.canonical(_one_arg(payload))
        self._changed(conn, tx, self.store.mkdir(conn.caller, path, tx))
        return OK

    def _do_rm(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path, _ = conn.canonical(_one_arg(payload))
        self._changed(conn, tx, self.store.rm(conn.caller, path, tx))
        return OK

    def _do_watch(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        args = split_strings(payload)
        if len(args) != 2:
            raise XsError("EINVAL", "expected path and token")
        path, relative = conn.canonical(args[0], special=True)
        token = args[1]
        key = (path, token)
        if key in conn.watches:
            raise XsError("EEXIST", "watch exists")
        if not conn.privileged and conn.domain.watches >= self.quotas.watches:
            raise XsError("E2BIG", f"domain {conn.caller.domid} is at its watch quota")
        w = _Watch(conn, path, token, conn.implicit if relative else None)
        conn.watches[key] = w
        conn.domain.watches += 1
        self._watch_index.setdefault(path, []).append(w)
        return OK

    def _do_unwatch(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        args = split_strings(payload)
        if len(args) != 2:
            raise XsError("EINVAL", "expected path and token")
        path, _ = conn.canonical(args[0], special=True)
        w = conn.watches.pop((path, args[1]), None)
        if w is None:
            raise XsError("ENOENT", "no such watch")
        conn.domain.watches -= 1
        self._unindex(w)
        return OK

    def _do_reset_watches(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        self._clear_conn_state(conn)
        return OK

    def _do_transaction_start(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if tx is not None:
            raise XsError("EBUSY", "transactions do not nest")
        if not conn.privileged and conn.domain.transactions >= self.quotas.transactions:
            raise XsError("ENOSPC", f"domain {conn.caller.domid} is at its transaction quota")
        tx_id = conn.next_tx
        while tx_id == 0 or tx_id in conn.txs:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx = (tx_id + 1) & 0xFFFFFFFF
        conn.txs[tx_id] = Transaction(tx_id, conn.caller)
        conn.domain.transactions += 1
        return str(tx_id).encode() + b"\0"

    def _do_transaction_end(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if tx is None:
            raise XsError("ENOENT", "no transaction")
        arg = _one_arg(payload)
        if arg not in (b"T", b"F"):
            raise XsError("EINVAL", "expected T or F")
        del conn.txs[tx.id]
        conn.domain.transactions -= 1
        if arg == b"T":
            self.store.commit(tx)
            for change in tx.events:
                self._fire(*change)
        return OK

    def _do_get_domain_path(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        return strings(domain_path(_domid(_one_arg(payload))))

    def _do_introduce(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        args = split_strings(payload)
        if len(args) != 3:
            raise XsError("EINVAL", "expected domid, gfn and event channel")
        # The ring page and event channel mean nothing here: guests reach us through connect_domain().
        self._introduce(_domid(args[0]))
        return OK

    def _do_release(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        domid = _domid(_one_arg(payload))
        if not self.is_introduced(domid):
            raise XsError("ENOENT", f"domain {domid} not introduced")
        self._release(domid)
        return OK

    def _do_resume(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        domid = _domid(_one_arg(payload))
        if not self.is_introduced(domid):
            raise XsError("ENOENT", f"domain {domid} not introduced")
        return OK

    def _do_is_domain_introduced(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        return b"T\0" if self.is_introduced(_domid(_one_arg(payload))) else b"F\0"

    def _do_control(self, conn: _Connection, tx: Transaction | None, payload: bytes) -> bytes:
        args = split_strings(payload)
        if args[:1] == [b"quota"]:
            q = self.quotas
            lines = [f"{k}: {getattr(q, k)}" for k in q.__dataclass_fields__]
            return ("\n".join(lines) + "\n").encode() + b"\0"
        raise XsError("EINVAL", "unsupported control command")


async def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m backends.xenstore.server", description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True, help="unix socket path for dom0 (XENSTORED_PATH)")
    ap.add_argument("--introduce", type=int, action="append", default=[], metavar="DOMID")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = XenStoreServer()
    await server.listen(args.socket)
    for domid in args.introduce:
        await server.introduce_domain(domid)
    log.info("xenstored listening on %s", args.socket)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_main(argv))


if __name__ == "__main__":
    main()
