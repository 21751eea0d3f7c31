"""The guest process model of the emulated platform, used by test frontends, the demo and the benchmarks.

A `Guest` owns its memory (a memfd of N pages) and its v1 grant table (a second memfd), both sealed against
shrinking so a backend that mapped them can never fault on a truncated file, and registers them with the
broker, which gives it a domid (and a xenstore connection bound to that domid when the broker runs with a
xenstore server).  Everything a backend may touch goes through `grant()`; `revoke()` follows Xen's rules
and fails while the backend still uses the grant.

Synchronous at heart: each broker call is one local request/reply, so the model works the same from a
benchmark process's plain loop and from asyncio code.  From a coroutine whose loop also runs the broker,
use `await Guest.create(...)` and `alloc_unbound_async`; closing never waits for the broker.
GuestPort.fileno() can be added to an event loop as a reader.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import mmap
import os
import socket
from pathlib import Path
from typing import Any

from backends.native import CData, ffi, struct_pv_evtchn
from backends.native.events import NativeEventChannel, open_emulated
from backends.native.grants import guest_grant, guest_revoke
from backends.platform.broker_client import BrokerClient, close_fds

PAGE_SIZE = 4096
GNT_ENTRY_SIZE = 8
GNTTAB_NR_RESERVED_ENTRIES = 8  # refs 0-7 are the toolstack's (console, xenstore): never handed out


class GuestPort:
    """The guest's end of an interdomain event channel, from alloc_unbound."""

    def __init__(self, guest: Guest, ch: NativeEventChannel) -> None:
        self._guest = guest
        self._ch = ch
        self.port = ch.local_port
        self.remote_domid = ch.remote_domid

    @property
    def c(self) -> struct_pv_evtchn:
        """The `struct pv_evtchn *` (frontend C code may notify through it)."""
        return self._ch.c

    def fileno(self) -> int:
        return self._ch.fileno()

    def notify(self) -> None:
        self._ch.notify()

    def pending(self) -> bool:
        return self._ch.pending()

    @property
    def closed(self) -> bool:
        return self._ch.closed

    def close(self) -> None:
        self._ch.close()

    def __enter__(self) -> GuestPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        raise
    return fd


class Guest:
    """One emulated domain: memory, grant table, event channels, broker registration."""

    def __init__(self, broker_path: str, *, name: str = "guest", mem_pages: int = 256, gnt_entries: int = 512) -> None:
        if mem_pages < 1 or gnt_entries <= GNTTAB_NR_RESERVED_ENTRIES:
            raise ValueError("a guest needs at least one page and more than 8 grant entries")
        self.name = name
        self.mem_pages = mem_pages
        self.gnt_entries = gnt_entries
        gtab_bytes = -(-gnt_entries * GNT_ENTRY_SIZE // PAGE_SIZE) * PAGE_SIZE
        mem_fd = _sealed_memfd(f"pvback-{name}-mem", mem_pages * PAGE_SIZE)
        gtab_fd = -1
        try:
            gtab_fd = _sealed_memfd(f"pvback-{name}-gnttab", gtab_bytes)
            self.memory = mmap.mmap(mem_fd, mem_pages * PAGE_SIZE)
            self.gtab = mmap.mmap(gtab_fd, gtab_bytes)
            self._broker = BrokerClient(broker_path)
            try:
                reply, fds = self._broker.request(
                    "register", [mem_fd, gtab_fd], name=name, mem_pages=mem_pages, gnt_entries=gnt_entries
                )
            except BaseException:
                self._broker.close()
                raise
        except BaseException:
            close_fds([mem_fd] + ([gtab_fd] if gtab_fd >= 0 else []))
            for attr in ("memory", "gtab"):
                m = self.__dict__.pop(attr, None)
                if m is not None:
                    m.close()
            raise
        close_fds([mem_fd, gtab_fd])  # the mappings and the broker hold the memory now
        self.domid = int(reply["domid"])
        self.xenstore_sock: socket.socket | None = socket.socket(fileno=fds[0]) if fds else None
        close_fds(fds[1:])
        self._gtab_ptr = ffi.from_buffer(self.gtab)
        self._mem_ptr = ffi.from_buffer(self.memory)
        self._mem_view = memoryview(self.memory)
        self._free_pages = list(range(mem_pages - 1, -1, -1))
        self._free_refs = list(range(gnt_entries - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        self.granted: dict[int, int] = {}  # ref -> page
        self._reserved: set[int] = set()
        self.ports: dict[int, GuestPort] = {}

    @classmethod
    def in_sim(cls, sim_dir: str | os.PathLike[str], **kwargs: Any) -> Guest:
        return cls(str(Path(sim_dir) / "broker.sock"), **kwargs)

    # -- memory ----------------------------------------------------------------------------------------

    def alloc_page(self) -> int:
        if not self._free_pages:
            raise MemoryError(f"guest {self.name}: all {self.mem_pages} pages in use")
        return self._free_pages.pop()

    def free_page(self, page: int) -> None:
        self._check_page(page)
        self._free_pages.append(page)

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.mem_pages:
            raise ValueError(f"page {page} outside guest memory ({self.mem_pages} pages)")

    def page_view(self, page: int) -> memoryview:
        self._check_page(page)
        return self._mem_view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]

    def page_address(self, page: int) -> CData:
        """`char *` to the page (for frontend C code such as ring helpers)."""
        self._check_page(page)
        return self._mem_ptr + page * PAGE_SIZE

    # -- grants ----------------------------------------------------------------------------------------

    def reserve_ref(self) -> int:
        """Take a ref out of the allocator without granting it (for frontends that manage their own refs,
        and for tests that need a ref known to be invalid); `grant(..., ref=)` uses it, revoke keeps it."""
        if not self._free_refs:
            raise OSError(errno.ENOSPC, f"guest {self.name}: grant table full")
        ref = self._free_refs.pop()
        self._reserved.add(ref)
        return ref

    def grant(self, page: int, domid: int, readonly: bool = False, *, ref: int | None = None) -> int:
        """Grant `domid` access to `page`; returns the grant reference."""
        self._check_page(page)
        if ref is not None:
            if ref not in self._reserved or ref in self.granted:
                raise ValueError(f"ref {ref} is not a reserved, ungranted ref")
        elif not self._free_refs:
            raise OSError(errno.ENOSPC, f"guest {self.name}: grant table full")
        else:
            ref = self._free_refs.pop()
        try:
            guest_grant(self._gtab_ptr, self.gnt_entries, ref, domid, page, readonly)
        except OSError:
            if ref not in self._reserved:
                self._free_refs.append(ref)
            raise
        self.granted[ref] = page
        return ref

    def revoke(self, ref: int) -> None:
        """End access to `ref`; OSError(EBUSY) while the backend has it mapped or is copying (then retry)."""
        if ref not in self.granted:
            raise ValueError(f"ref {ref} is not granted")
        guest_revoke(self._gtab_ptr, self.gnt_entries, ref)
        del self.granted[ref]
        if ref not in self._reserved:
            self._free_refs.append(ref)

    def grant_flags(self, ref: int) -> int:
        """The entry's flags word as the backend left it (GTF_reading/GTF_writing show use)."""
        if not 0 <= ref < self.gnt_entries:
            raise ValueError(f"ref {ref} out of range")
        return int(ffi.cast("struct pv_grant_entry_v1 *", self._gtab_ptr)[ref].flags)

    # -- event channels --------------------------------------------------------------------------------

    @classmethod
    async def create(cls, broker_path: str, **kwargs: Any) -> Guest:
        """Register from asyncio without blocking the loop (which may be the one running the broker)."""
        return await asyncio.to_thread(cls, broker_path, **kwargs)

    def alloc_unbound(self, remote_domid: int) -> GuestPort:
        return self._port_from(remote_domid, self._broker.request("alloc_unbound", remote_domid=remote_domid))

    async def alloc_unbound_async(self, remote_domid: int) -> GuestPort:
        return self._port_from(remote_domid, await self._broker.arequest("alloc_unbound", remote_domid=remote_domid))

    def _port_from(self, remote_domid: int, answer: tuple[dict[str, Any], list[int]]) -> GuestPort:
        reply, fds = answer
        if len(fds) != 2:
            close_fds(fds)
            raise OSError(errno.EPROTO, "broker sent no eventfds for alloc_unbound")
        port = int(reply["port"])
        ch = open_emulated(fds[0], fds[1], port, remote_domid, 0, on_close=self._port_closed)
        gp = GuestPort(self, ch)
        self.ports[port] = gp
        return gp

    def _port_closed(self, ch: NativeEventChannel) -> None:
        self.ports.pop(ch.local_port, None)
        self._broker.send_nowait("unbind", port=ch.local_port)

    # -- lifetime --------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._broker.closed

    def close(self) -> None:
        """Destroy the domain: ports, broker registration (backends see it die), memory."""
        if self._broker.closed:
            return
        for gp in list(self.ports.values()):
            gp.close()
        self._broker.close()
        if self.xenstore_sock is not None:
            self.xenstore_sock.close()
            self.xenstore_sock = None
        ffi.release(self._gtab_ptr)
        ffi.release(self._mem_ptr)
        try:
            self._mem_view.release()
        except BufferError:
            pass
        for m in (self.memory, self.gtab):
            try:
                m.close()
            except BufferError:
                pass  # a caller still holds a page view; the mapping goes when it does

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
