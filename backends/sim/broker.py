"""The emulated platform's grant/event broker (the server): hands guest memory and event-channel eventfds to
backends.  Its wire format and client live beside the platform, in `backends.platform.broker_client`.

Protocol (docs/DESIGN.md "Emulated platform"): a unix SOCK_SEQPACKET socket, one JSON object per packet,
fds passed with SCM_RIGHTS.  Every request gets exactly one reply, `{...}` or `{"error": "ENAME", "message"}`.

  guest   register {name, mem_pages, gnt_entries} + [mem_fd, gtab_fd] -> {domid} (+ [xenstore fd] with hooks)
  guest   alloc_unbound {remote_domid}           -> {port} + [wake_fd, notify_fd]
  backend hello {domid}                          -> {}
  backend map_domain {domid}                     -> {mem_pages, gnt_entries} + [mem_fd, gtab_fd, pin_fd]
  any     bind_interdomain {domid, remote_port}  -> {port} + [wake_fd, notify_fd]
  any     unbind {port}                          -> {}

Closing a guest's connection destroys its domain (its ports become dead, @releaseDomain through the hooks).
Backends that already attached its memory keep their mappings, like a dying domain's pages on Xen.

`pin_fd` is the pin table of that backend connection and guest (one per pair, the same one on every
map_domain): the backend keeps its grant pin counts there (csrc/gnt_emu.h), and the broker holds it too.
When a backend's connection closes (it exited or died), the broker clears the GTF_reading/GTF_writing bits
its pins still held in the guest's grant table, except where another live backend of that guest pins the
same ref: what Xen does when the kernel unmaps a dead process's grants.  Without it a SIGKILLed backend
would leave the guest unable to ever revoke those grants.

The broker is trusted plumbing, not a security boundary between guests and backends: the checks that
matter (grant rules) are enforced in the backend's grant handle (csrc/gnt_emu.c).  It still validates every
field, because a buggy guest must get a clear error, not crash the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import fcntl
import inspect
import logging
import os
import socket
import stat
import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.native.grants import pin_table_size, release_dead_pins
from backends.platform.broker_client import close_fds, decode, encode, recv_packet

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
GNT_ENTRY_SIZE = 8
DOMID_FIRST_RESERVED = 0x7FF0
MAX_MEM_PAGES = 1 << 20  # 4 GiB of emulated guest memory
MAX_GNT_ENTRIES = 1 << 16  # 128 v1 grant frames, twice Xen's default gnttab_max_frames
MAX_PORTS_PER_DOMAIN = 4096  # the 2-level event channel ABI's limit on 64-bit


class _Refused(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


class BrokerHooks(Protocol):
    """What the broker needs from a xenstore server (backends.xenstore.server.XenStoreServer)."""

    def introduce_domain(self, domid: int) -> Awaitable[None] | None: ...

    def release_domain(self, domid: int) -> Awaitable[None] | None: ...

    def connect_domain(self, domid: int) -> socket.socket: ...


# ---------------------------------------------------------------------------------------------- server


@dataclass
class _Port:
    """One guest port: an eventfd per direction, held by the broker until the guest closes the port."""

    domid: int
    port: int
    remote_domid: int
    guest_wake: int  # read by the guest, written by the bound peer
    peer_wake: int  # read by the bound peer, written by the guest
    bound: tuple[_Conn, int] | None = None  # (peer connection, peer's local port)

    def close(self) -> None:
        if self.bound is not None:
            conn, lport = self.bound
            conn.bound.pop(lport, None)
            self.bound = None
        close_fds([self.guest_wake, self.peer_wake])


@dataclass
class _Domain:
    domid: int
    name: str
    mem_pages: int
    gnt_entries: int
    mem_fd: int
    gtab_fd: int
    conn: _Conn
    ports: dict[int, _Port] = field(default_factory=dict)
    next_port: int = 1
    pin_tables: dict[_Conn, int] = field(default_factory=dict)  # backend connection -> its pin table memfd


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    domid: int | None = None
    guest: _Domain | None = None  # set once registered as a guest
    bound: dict[int, _Port] = field(default_factory=dict)  # local port -> the guest port it is bound to
    oneshot: set[int] = field(default_factory=set)  # reply fds to close once sent


def _int(msg: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = msg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _Refused("EINVAL", f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _check_memfd(fd: int, need: int, what: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < need:
        raise _Refused("EINVAL", f"{what}: need a memfd of at least {need} bytes")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise _Refused("EPERM", f"{what}: memfd must be sealed with F_SEAL_SHRINK (backends would SIGBUS)")


def _pin_table(d: _Domain) -> int:
    """A zeroed pin table for one backend's grants of `d`, sealed so neither side can shrink it."""
    fd = os.memfd_create(f"pvback-pins-d{d.domid}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, pin_table_size(d.gnt_entries))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        raise
    return fd


_OPS = frozenset({"register", "hello", "map_domain", "alloc_unbound", "bind_interdomain", "unbind"})


class Broker:
    """Asyncio server for the broker protocol.  `hooks` integrates a xenstore server (optional)."""

    def __init__(self, hooks: BrokerHooks | None = None) -> None:
        self.hooks = hooks
        self.domains: dict[int, _Domain] = {}
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_domid = 1
        self._backend_ports: dict[int, int] = {}  # backend domid -> next local port
        self._lsock: socket.socket | None = None
        self._path: str | None = None

    async def listen(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        lsock.bind(path)
        lsock.listen(64)
        lsock.setblocking(False)
        self._lsock, self._path = lsock, path
        loop.add_reader(lsock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._lsock is not None
        while True:
            try:
                sock, _ = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("broker accept: %s", exc)
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self._conns.add(conn)
            task = asyncio.get_running_loop().create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _wait(self, sock: socket.socket, write: bool = False) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fd = sock.fileno()
        (loop.add_writer if write else loop.add_reader)(fd, ready)
        try:
            await fut
        finally:
            (loop.remove_writer if write else loop.remove_reader)(fd)

    async def _send(self, conn: _Conn, obj: dict[str, Any], fds: list[int] | None = None) -> None:
        data = encode(obj)
        while True:
            try:
                if fds:
                    socket.send_fds(conn.sock, [data], fds)
                else:
                    conn.sock.send(data)
                return
            except (BlockingIOError, InterruptedError):
                await self._wait(conn.sock, write=True)

    async def _serve(self, conn: _Conn) -> None:
        try:
            while True:
                try:
                    data, fds = recv_packet(conn.sock)
                except (BlockingIOError, InterruptedError):
                    await self._wait(conn.sock)
                    continue
                except ValueError as exc:
                    await self._send(conn, {"error": "EMSGSIZE", "message": str(exc)})
                    continue
                if not data:
                    return
                reply_fds: list[int] = []
                try:
                    try:
                        msg = decode(data)
                    except ValueError as exc:
                        raise _Refused("EINVAL", f"bad message: {exc}") from None
                    reply, reply_fds = await self._handle(conn, msg, fds)
                except _Refused as r:
                    close_fds(fds)
                    reply = {"error": r.name, "message": r.message}
                except OSError as exc:
                    close_fds(fds)
                    reply = {"error": errno_mod.errorcode.get(exc.errno or 0, "EIO"), "message": str(exc)}
                except Exception as exc:
                    log.exception("broker: request failed")
                    close_fds(fds)
                    reply = {"error": "EIO", "message": f"broker internal error: {exc}"}
                try:
                    await self._send(conn, reply, reply_fds)
                finally:
                    # The broker keeps the fds it shares (memory, eventfds); one-shot ones go with the reply.
                    close_fds([fd for fd in reply_fds if fd in conn.oneshot])
                    conn.oneshot.clear()
        except (ConnectionError, OSError) as exc:
            log.debug("broker connection lost: %s", exc)
        finally:
            await self._drop(conn)

    async def _handle(self, conn: _Conn, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        op = msg.get("op")
        if op not in _OPS:
            raise _Refused("EINVAL", f"unknown op {op!r}")
        if op != "register" and fds:
            raise _Refused("EINVAL", f"{op!r} takes no fds")
        if op == "register":
            return await self._register(conn, msg, fds)
        if op == "hello":
            if conn.domid is not None:
                raise _Refused("EEXIST", f"connection already identified as d{conn.domid}")
            domid = _int(msg, "domid", 0, DOMID_FIRST_RESERVED - 1)
            if domid in self.domains:
                raise _Refused("EEXIST", f"d{domid} is a registered guest")
            conn.domid = domid
            return {}, []
        if conn.domid is None:
            raise _Refused("EPERM", f"{op!r} before register/hello")
        if op == "map_domain":
            if conn.guest is not None:
                raise _Refused("EPERM", "guests cannot map other domains' memory")
            d = self._domain(_int(msg, "domid", 0, DOMID_FIRST_RESERVED - 1))
            pin_fd = d.pin_tables.get(conn)
            if pin_fd is None:
                pin_fd = d.pin_tables[conn] = _pin_table(d)
            return {"mem_pages": d.mem_pages, "gnt_entries": d.gnt_entries}, [d.mem_fd, d.gtab_fd, pin_fd]
        if op == "alloc_unbound":
            if conn.guest is None:
                raise _Refused("EPERM", "alloc_unbound is for registered guests")
            return self._alloc_unbound(conn.guest, _int(msg, "remote_domid", 0, DOMID_FIRST_RESERVED - 1))
        if op == "bind_interdomain":
            if conn.guest is not None:
                raise _Refused("EPERM", "guest-to-guest event channels are not emulated")
            return self._bind(conn, _int(msg, "domid", 0, DOMID_FIRST_RESERVED - 1),
                              _int(msg, "remote_port", 1, MAX_PORTS_PER_DOMAIN))
        if op == "unbind":
            self._unbind(conn, _int(msg, "port", 1, 1 << 31))
            return {}, []
        raise _Refused("EINVAL", f"unknown op {op!r}")

    def _domain(self, domid: int) -> _Domain:
        d = self.domains.get(domid)
        if d is None:
            raise _Refused("ESRCH", f"no domain d{domid}")
        return d

    async def _register(self, conn: _Conn, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        if conn.domid is not None:
            raise _Refused("EEXIST", f"connection already identified as d{conn.domid}")
        if len(fds) != 2:
            raise _Refused("EINVAL", "register needs [mem_fd, gtab_fd]")
        name = msg.get("name", "")
        if not isinstance(name, str) or len(name) > 64:
            raise _Refused("EINVAL", "name must be a string of at most 64 characters")
        mem_pages = _int(msg, "mem_pages", 1, MAX_MEM_PAGES)
        gnt_entries = _int(msg, "gnt_entries", 1, MAX_GNT_ENTRIES)
        _check_memfd(fds[0], mem_pages * PAGE_SIZE, "guest memory")
        _check_memfd(fds[1], gnt_entries * GNT_ENTRY_SIZE, "grant table")
        domid = self._alloc_domid()
        d = _Domain(domid, name, mem_pages, gnt_entries, fds[0], fds[1], conn)
        self.domains[domid] = d
        conn.domid, conn.guest = domid, d
        xs_fds: list[int] = []
        if self.hooks is not None:
            try:
                await _maybe_await(self.hooks.introduce_domain(domid))
                xs = self.hooks.connect_domain(domid)
                xs_fds = [xs.detach()]
                conn.oneshot.update(xs_fds)
            except Exception:
                del self.domains[domid]
                conn.domid, conn.guest = None, None
                raise
        log.info("broker: registered d%d %r (%d pages, %d grant entries)", domid, name, mem_pages, gnt_entries)
        return {"domid": domid}, xs_fds

    def _alloc_domid(self) -> int:
        for _ in range(DOMID_FIRST_RESERVED):
            domid = self._next_domid
            self._next_domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else 1
            if domid not in self.domains and domid not in self._backend_ports:
                return domid
        raise _Refused("ENOSPC", "no free domid")

    def _alloc_unbound(self, d: _Domain, remote_domid: int) -> tuple[dict[str, Any], list[int]]:
        if len(d.ports) >= MAX_PORTS_PER_DOMAIN:
            raise _Refused("ENOSPC", "no free event channel port")
        port = d.next_port
        while port in d.ports:
            port = port % MAX_PORTS_PER_DOMAIN + 1
        d.next_port = port % MAX_PORTS_PER_DOMAIN + 1
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        guest_wake = os.eventfd(0, flags)
        try:
            peer_wake = os.eventfd(0, flags)
        except OSError:
            os.close(guest_wake)
            raise
        d.ports[port] = _Port(d.domid, port, remote_domid, guest_wake, peer_wake)
        return {"port": port}, [guest_wake, peer_wake]

    def _bind(self, conn: _Conn, domid: int, remote_port: int) -> tuple[dict[str, Any], list[int]]:
        d = self._domain(domid)
        p = d.ports.get(remote_port)
        # Xen's evtchn_bind_interdomain: the remote port must be unbound and reserved for the caller.
        if p is None or p.bound is not None:
            raise _Refused("EINVAL", f"d{domid} port {remote_port} is not an unbound port")
        assert conn.domid is not None
        if p.remote_domid != conn.domid:
            raise _Refused("EINVAL", f"d{domid} port {remote_port} is reserved for d{p.remote_domid}")
        lport = self._backend_ports.get(conn.domid, 1)
        self._backend_ports[conn.domid] = lport + 1
        p.bound = (conn, lport)
        conn.bound[lport] = p
        # Xen sets the binder's local port pending on bind: the backend always sees one initial event.
        os.eventfd_write(p.peer_wake, 1)
        return {"port": lport}, [p.peer_wake, p.guest_wake]

    def _unbind(self, conn: _Conn, port: int) -> None:
        if conn.guest is not None and port in conn.guest.ports:
            conn.guest.ports.pop(port).close()
            return
        p = conn.bound.pop(port, None)
        if p is None:
            raise _Refused("EINVAL", f"port {port} is not bound by this connection")
        # The guest's end goes back to unbound (reserved for the same domain), as on Xen.
        p.bound = None

    def _release_pins(self, conn: _Conn) -> None:
        """The backend on `conn` is gone: what its grant pins held in each guest's entries is let go."""
        for d in self.domains.values():
            fd = d.pin_tables.pop(conn, None)
            if fd is None:
                continue
            try:
                n = release_dead_pins(d.gtab_fd, d.gnt_entries, fd, list(d.pin_tables.values()))
            except Exception:
                log.exception("broker: releasing d%s's pins of d%d failed", conn.domid, d.domid)
            else:
                if n:
                    log.info("broker: d%s went away holding %d grant(s) of d%d: released", conn.domid, n, d.domid)
            finally:
                close_fds([fd])

    async def _drop(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        for p in list(conn.bound.values()):
            p.bound = None
        conn.bound.clear()
        self._release_pins(conn)
        d = conn.guest
        conn.guest = None
        with contextlib.suppress(OSError):
            conn.sock.close()
        if d is None:
            return
        for p in d.ports.values():
            p.close()
        d.ports.clear()
        # Backends keep their own mappings of the pin tables (like the memory); nobody is left to revoke.
        close_fds([d.mem_fd, d.gtab_fd, *d.pin_tables.values()])
        d.pin_tables.clear()
        self.domains.pop(d.domid, None)
        log.info("broker: destroyed d%d %r", d.domid, d.name)
        if self.hooks is not None:
            try:
                await _maybe_await(self.hooks.release_domain(d.domid))
            except Exception:
                log.exception("broker: release_domain(%d) failed", d.domid)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._lsock is not None:
            loop.remove_reader(self._lsock.fileno())
            self._lsock.close()
            self._lsock = None
            if self._path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        # Tasks cancelled before they started never ran their cleanup.
        for conn in list(self._conns):
            await self._drop(conn)


async def _maybe_await(v: Awaitable[None] | None) -> None:
    if inspect.isawaitable(v):
        await v


class BrokerThread:
    """A Broker on its own event loop in a daemon thread: for tests and benchmarks whose guests and
    backends use the synchronous client from the main thread."""

    def __init__(self, path: str, hooks: BrokerHooks | None = None) -> None:
        self.path = path
        self.hooks = hooks
        self.broker: Broker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> BrokerThread:
        self._thread = threading.Thread(target=self._run, name="pvback-broker", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise TimeoutError("broker thread did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self.broker = Broker(self.hooks)
            loop.run_until_complete(self.broker.listen(self.path))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.broker.close())
            loop.close()

    def call(self, fn: Any) -> Any:
        """Run `fn()` on the broker's loop and return its result (inspection from tests)."""
        assert self._loop is not None
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)
        return box[0] if box else None

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


