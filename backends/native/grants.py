"""Typed wrappers over a `struct pv_gnt *` (csrc/platform.h): grant maps and copies.

Shared by both platforms: the emulated one builds its handle with `pv_gnt_emu_open`, the Xen one with
`pv_gnt_xen_open`; everything past construction goes through the ops table.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from backends.native import CData, ffi, lib, struct_pv_gnt
from backends.native.handle import CHandle

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from 3.12 on

PAGE_SIZE = 4096


class GrantStatus(enum.IntEnum):
    """GNTST_* from xen/include/public/grant_table.h."""

    OKAY = 0
    GENERAL_ERROR = -1
    BAD_DOMAIN = -2
    BAD_GNTREF = -3
    BAD_HANDLE = -4
    BAD_VIRT_ADDR = -5
    BAD_DEV_ADDR = -6
    NO_DEVICE_SPACE = -7
    PERMISSION_DENIED = -8
    BAD_PAGE = -9
    BAD_COPY_ARG = -10
    ADDRESS_TOO_BIG = -11
    EAGAIN = -12
    NO_SPACE = -13


def _check_grant_status() -> None:
    """GrantStatus is spelt out for readers and type checkers; the values are the header's (PV_GNTST_* in
    csrc/platform.cdef take them from csrc/platform.h), checked once at import."""
    wrong = [f"{s.name} = {s.value} (C: {getattr(lib, f'PV_GNTST_{s.name.lower()}')})" for s in GrantStatus
             if getattr(lib, f"PV_GNTST_{s.name.lower()}") != s.value]
    c_names = {n.removeprefix("PV_GNTST_").upper() for n in dir(lib) if n.startswith("PV_GNTST_")}
    missing = sorted(c_names - set(GrantStatus.__members__))
    if wrong or missing:
        raise ImportError(f"GrantStatus disagrees with csrc/platform.h: {wrong} missing {missing}")


_check_grant_status()


class GrantError(OSError):
    """A grant operation failed with a GNTST_* status."""

    def __init__(self, status: int, what: str) -> None:
        try:
            name = GrantStatus(status).name
        except ValueError:
            name = f"status {status}"
        super().__init__(f"{what}: {name}")
        self.status = status


@dataclass
class CopySegment:
    """One GNTTABOP_copy segment between a local buffer and a foreign grant.

    `to_guest` True copies local -> grant (a read served to the guest), False grant -> local.
    `local` is a writable buffer (or cdata pointer) of at least `length` bytes at `local_offset`.
    """

    domid: int
    ref: int
    offset: int
    length: int
    local: Buffer | CData
    local_offset: int = 0
    to_guest: bool = False


def _local_pointer(buf: Buffer | CData) -> tuple[CData, CData]:
    """(char * pointer, keep-alive) for a writable buffer or cdata pointer."""
    if isinstance(buf, CData):
        return ffi.cast("char *", buf), buf
    keep = ffi.from_buffer("char[]", buf, require_writable=True)
    return keep, keep


class NativeGrantMapping(CHandle[CData]):
    """A contiguous range of foreign pages mapped by `pv_gnt_do_map`; `c` is the `void *` of its start."""

    def __init__(self, table: GrantTable, addr: CData, npages: int, writable: bool) -> None:
        super().__init__(addr)
        self._table = table
        self.npages = npages
        self.writable = writable

    def _closed_message(self) -> str:
        return "grant mapping already unmapped"

    @property
    def address(self) -> CData:
        return self.c

    def buffer(self) -> memoryview:
        view = memoryview(ffi.buffer(self.address, self.npages * PAGE_SIZE))
        return view if self.writable else view.toreadonly()

    @property
    def mapped(self) -> bool:
        return not self.closed

    def unmap(self) -> None:
        self.close()

    def _free(self, c: CData) -> None:
        self._table._unmap(c, self.npages)


class GrantTable(CHandle[struct_pv_gnt]):
    """Owns one `struct pv_gnt *`; closes it once."""

    open_tables: ClassVar[set[GrantTable]] = set()  # handles of this process not yet closed: leak checks read it

    def __init__(self, c: struct_pv_gnt) -> None:
        if c == ffi.NULL:
            raise OSError(ffi.errno or errno.ENOMEM, "cannot open grant handle")
        super().__init__(c)
        GrantTable.open_tables.add(self)

    @classmethod
    def all_live_mappings(cls) -> int:
        """Pages mapped through every open handle of this process (a closed handle has unmapped its own)."""
        return sum(t.live_mappings for t in cls.open_tables)

    def _closed_message(self) -> str:
        return "grant handle closed"

    @property
    def live_mappings(self) -> int:
        return 0 if self._c is None else int(self._c.live_mappings)

    def map(self, domid: int, refs: list[int], writable: bool) -> NativeGrantMapping:
        """All or nothing; GrantError carries the GNTST status of the first failing ref."""
        if not refs:
            raise ValueError("no grant references to map")
        crefs = ffi.new("uint32_t[]", refs)
        status = ffi.new("int16_t *")
        addr = lib.pv_gnt_do_map(self.c, domid, crefs, len(refs), 1 if writable else 0, status)
        if addr == ffi.NULL:
            raise GrantError(int(status[0]), f"map of d{domid} refs {refs[:8]}{'...' if len(refs) > 8 else ''}")
        return NativeGrantMapping(self, addr, len(refs), writable)

    def _unmap(self, addr: CData, npages: int) -> None:
        rc = int(lib.pv_gnt_do_unmap(self.c, addr, npages))
        if rc < 0:
            raise OSError(-rc, f"grant unmap: {os.strerror(-rc)}")

    def copy(self, segments: list[CopySegment]) -> list[int]:
        """One GNTTABOP_copy batch; one GNTST status per segment."""
        n = len(segments)
        if n == 0:
            return []
        segs = ffi.new("struct pv_gcopy_seg[]", n)
        keep: list[CData] = []
        for i, s in enumerate(segments):
            if not 0 <= s.length <= 0xFFFF or not 0 <= s.offset <= 0xFFFF:
                raise ValueError(f"copy segment {i}: offset/length out of range")
            ptr, k = _local_pointer(s.local)
            keep.append(k)
            local = ptr + s.local_offset
            c = segs[i]
            c.len = s.length
            if s.to_guest:
                c.source.virt = local
                c.dest.foreign.ref = s.ref
                c.dest.foreign.offset = s.offset
                c.dest.foreign.domid = s.domid
                c.flags = lib.PV_GCOPY_DEST_GREF
            else:
                c.source.foreign.ref = s.ref
                c.source.foreign.offset = s.offset
                c.source.foreign.domid = s.domid
                c.dest.virt = local
                c.flags = lib.PV_GCOPY_SOURCE_GREF
        rc = int(lib.pv_gnt_do_copy(self.c, segs, n))
        if rc < 0:
            raise OSError(-rc, f"grant copy: {os.strerror(-rc)}")
        return [int(segs[i].status) for i in range(n)]

    def _free(self, c: struct_pv_gnt) -> None:
        GrantTable.open_tables.discard(self)
        lib.pv_gnt_close(c)


class EmulatedGrantTable(GrantTable):
    """The emulated platform's backend handle: guests' memfds attached per domain (csrc/gnt_emu.h)."""

    def __init__(self, self_domid: int) -> None:
        super().__init__(lib.pv_gnt_emu_open(self_domid))
        self.self_domid = self_domid

    def attach(self, domid: int, mem_fd: int, mem_pages: int, gtab_fd: int, nr_entries: int,
               pin_fd: int = -1) -> None:
        """Duplicates the fds: the caller still closes its own.  `pin_fd` is the broker's pin table for this
        backend and guest (pin_table_size bytes); without one (-1) the pins are private, and grants this
        process holds stay pinned for ever if it dies."""
        rc = int(lib.pv_gnt_emu_attach(self.c, domid, mem_fd, mem_pages, gtab_fd, nr_entries, pin_fd))
        if rc < 0:
            raise OSError(-rc, f"attach d{domid}: {os.strerror(-rc)}")

    def detach(self, domid: int) -> None:
        """OSError(EBUSY) while pages of `domid` are mapped or its grants pinned."""
        rc = int(lib.pv_gnt_emu_detach(self.c, domid))
        if rc < 0:
            raise OSError(-rc, f"detach d{domid}: {os.strerror(-rc)}")

    def pinned(self, domid: int) -> int:
        """Grant pins of `domid` held through this handle (-1 if not attached)."""
        return int(lib.pv_gnt_emu_pinned(self.c, domid))


def pin_table_size(nr_entries: int) -> int:
    """Bytes of the pin table a backend keeps its grant pins of one guest in (csrc/gnt_emu.h)."""
    return int(lib.pv_gnt_emu_pintab_size(nr_entries))


def release_dead_pins(gtab_fd: int, nr_entries: int, dead_fd: int, other_fds: list[int]) -> int:
    """Broker side: the backend owning pin table `dead_fd` is gone; clear the GTF_reading/GTF_writing bits
    its pins held in the guest's grant table, except where a live backend's table (`other_fds`, same guest)
    still pins the ref, then zero `dead_fd`.  Returns how many refs the dead backend had pinned."""
    gtab_len = nr_entries * ffi.sizeof("struct pv_grant_entry_v1")
    tab_len = pin_table_size(nr_entries)
    maps: list[mmap.mmap] = []
    ptrs: list[CData] = []
    try:
        for fd, length in [(gtab_fd, gtab_len), (dead_fd, tab_len)] + [(fd, tab_len) for fd in other_fds]:
            if os.fstat(fd).st_size < length:
                raise OSError(errno.EINVAL, f"release_dead_pins: fd {fd} is shorter than {length} bytes")
            maps.append(mmap.mmap(fd, length))
            ptrs.append(ffi.from_buffer(maps[-1]))
        others = ffi.new("void *[]", ptrs[2:]) if other_fds else ffi.NULL
        return int(lib.pv_gnt_emu_release_pins(ptrs[0], nr_entries, ptrs[1], others, len(other_fds)))
    finally:
        for ptr in ptrs:
            ffi.release(ptr)
        for m in maps:
            m.close()


def guest_grant(gtab: Buffer | CData, nr_entries: int, ref: int, domid: int, frame: int, readonly: bool) -> None:
    """Guest side: fill entry `ref` of a v1 grant table the guest maps at `gtab` (buffer or pointer)."""
    ptr, _keep = _local_pointer(gtab)
    rc = int(lib.pv_gnt_emu_grant(ptr, nr_entries, ref, domid, frame, 1 if readonly else 0))
    if rc < 0:
        raise OSError(-rc, f"grant ref {ref}: {os.strerror(-rc)}")


def guest_revoke(gtab: Buffer | CData, nr_entries: int, ref: int) -> None:
    """Guest side: end access; OSError(EBUSY) while the backend still has the grant mapped or mid-copy."""
    ptr, _keep = _local_pointer(gtab)
    rc = int(lib.pv_gnt_emu_revoke(ptr, nr_entries, ref))
    if rc < 0:
        raise OSError(-rc, f"revoke ref {ref}: {os.strerror(-rc)}")
