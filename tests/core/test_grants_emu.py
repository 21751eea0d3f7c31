"""The emulated grant table enforces Xen's v1 grant rules with Xen's GNTST statuses.

Most tests drive csrc/gnt_emu.c directly (a guest table and memory in memfds, a backend handle attached to
them, no broker) so Hypothesis can run many sequences quickly; the broker path is covered by test_broker.py
and test_process_exchange.py.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from backends.guests.guest import Guest
from backends.native import ffi
from backends.native.grants import (
    EmulatedGrantTable,
    NativeGrantMapping,
    guest_grant,
    guest_revoke,
    pin_table_size,
    release_dead_pins,
)
from backends.platform.base import CopySegment, GrantError, GrantStatus
from backends.platform.broker_client import BrokerClient, close_fds
from backends.platform.emulated import EmulatedPlatform
from backends.sim.broker import BrokerThread

PAGE = 4096
BACKEND = 0
GUEST = 1
OTHER = 7  # a domain that is not the backend
UNKNOWN = 9  # never attached

GTF_PERMIT = 1
GTF_TYPE_MASK = 3
GTF_READONLY = 1 << 2
GTF_READING = 1 << 3
GTF_WRITING = 1 << 4
GTF_SUB_PAGE = 1 << 8

OK = GrantStatus.OKAY
GENERAL = GrantStatus.GENERAL_ERROR
BAD_DOMAIN = GrantStatus.BAD_DOMAIN
BAD_GNTREF = GrantStatus.BAD_GNTREF
BAD_PAGE = GrantStatus.BAD_PAGE
BAD_COPY_ARG = GrantStatus.BAD_COPY_ARG


def sealed_memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("pvb-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class Rig:
    """A guest's memory + grant table and a backend handle attached to them, in one process."""

    def __init__(self, mem_pages: int = 8, nr_entries: int = 16) -> None:
        self.mem_pages, self.nr = mem_pages, nr_entries
        mem_fd = sealed_memfd(mem_pages * PAGE)
        gtab_fd = sealed_memfd(PAGE)
        self.mem = mmap.mmap(mem_fd, mem_pages * PAGE)
        self.gtab = mmap.mmap(gtab_fd, PAGE)
        self.gtab_ptr = ffi.from_buffer(self.gtab)
        self.table = EmulatedGrantTable(BACKEND)
        self.table.attach(GUEST, mem_fd, mem_pages, gtab_fd, nr_entries)
        os.close(mem_fd)
        os.close(gtab_fd)

    def grant(self, ref: int, frame: int, domid: int = BACKEND, readonly: bool = False) -> None:
        guest_grant(self.gtab_ptr, self.nr, ref, domid, frame, readonly)

    def revoke(self, ref: int) -> None:
        guest_revoke(self.gtab_ptr, self.nr, ref)

    def entry(self, ref: int) -> tuple[int, int, int]:
        e = ffi.cast("struct pv_grant_entry_v1 *", self.gtab_ptr)[ref]
        return int(e.flags), int(e.domid), int(e.frame)

    def set_raw(self, ref: int, flags: int, domid: int, frame: int) -> None:
        e = ffi.cast("struct pv_grant_entry_v1 *", self.gtab_ptr)[ref]
        e.domid, e.frame, e.flags = domid, frame, flags

    def copy(self, *segs: CopySegment) -> list[int]:
        return self.table.copy(list(segs))

    def close(self) -> None:
        self.table.close()
        ffi.release(self.gtab_ptr)
        self.mem.close()
        self.gtab.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    try:
        assert r.table.live_mappings == 0
        assert r.table.pinned(GUEST) in (0, -1)  # -1: the test detached the domain
    finally:
        r.close()


def seg(ref: int, offset: int, length: int, buf: bytearray, to_guest: bool = False, domid: int = GUEST) -> CopySegment:
    return CopySegment(domid=domid, ref=ref, offset=offset, length=length, local=buf, to_guest=to_guest)


# ---------------------------------------------------------------------------------------------------
# Specific refusals, each followed by a valid operation that must work (the backend stays healthy).


def valid_ops_work(r: Rig, ref: int) -> None:
    buf = bytearray(16)
    assert r.copy(seg(ref, 8, 16, buf)) == [OK]
    with r.table.map(GUEST, [ref], True) as m:
        assert m.buffer()[8:24] == buf


def test_out_of_range_ref_refused(rig: Rig) -> None:
    rig.grant(8, 1)
    buf = bytearray(8)
    for bad in (rig.nr, rig.nr + 1, 0xFFFFFFFF):
        assert rig.copy(seg(bad, 0, 8, buf)) == [BAD_GNTREF]
        assert rig.copy(seg(bad, 0, 8, buf, to_guest=True)) == [BAD_GNTREF]
        with pytest.raises(GrantError) as ei:
            rig.table.map(GUEST, [bad], False)
        assert ei.value.status == BAD_GNTREF
    valid_ops_work(rig, 8)
    rig.revoke(8)


def test_revoked_grant_refused(rig: Rig) -> None:
    rig.grant(9, 2)
    rig.revoke(9)
    buf = bytearray(8)
    assert rig.copy(seg(9, 0, 8, buf)) == [GENERAL]
    with pytest.raises(GrantError) as ei:
        rig.table.map(GUEST, [9], False)
    assert ei.value.status == GENERAL
    assert rig.entry(9)[0] == 0, "a refused op must not leave reading/writing set"
    rig.grant(9, 2)
    valid_ops_work(rig, 9)
    rig.revoke(9)


def test_never_granted_ref_refused(rig: Rig) -> None:
    assert rig.copy(seg(10, 0, 1, bytearray(1))) == [GENERAL]


def test_wrong_domain_grant_refused(rig: Rig) -> None:
    rig.grant(10, 3, domid=OTHER)
    buf = bytearray(8)
    assert rig.copy(seg(10, 0, 8, buf), seg(10, 0, 8, buf, to_guest=True)) == [GENERAL, GENERAL]
    with pytest.raises(GrantError) as ei:
        rig.table.map(GUEST, [10], False)
    assert ei.value.status == GENERAL
    assert rig.entry(10)[0] == GTF_PERMIT
    rig.revoke(10)
    rig.grant(10, 3)
    valid_ops_work(rig, 10)
    rig.revoke(10)


def test_write_through_readonly_grant_refused(rig: Rig) -> None:
    rig.mem[4 * PAGE : 4 * PAGE + 4] = b"ro!!"
    rig.grant(11, 4, readonly=True)
    buf = bytearray(b"XXXX")
    assert rig.copy(seg(11, 0, 4, buf, to_guest=True)) == [GENERAL]
    assert rig.mem[4 * PAGE : 4 * PAGE + 4] == b"ro!!"
    with pytest.raises(GrantError) as ei:
        rig.table.map(GUEST, [11], True)
    assert ei.value.status == GENERAL
    # Reading is allowed, and the read-only view cannot be written from Python either.
    assert rig.copy(seg(11, 0, 4, buf)) == [OK] and buf == b"ro!!"
    with rig.table.map(GUEST, [11], False) as m:
        view = m.buffer()
        assert view.readonly and bytes(view[:4]) == b"ro!!"
        assert rig.entry(11)[0] == GTF_PERMIT | GTF_READONLY | GTF_READING
        view.release()
    assert rig.entry(11)[0] == GTF_PERMIT | GTF_READONLY
    rig.revoke(11)
    rig.grant(11, 4)
    valid_ops_work(rig, 11)
    rig.revoke(11)


def test_readonly_grant_stays_readonly_while_pinned(rig: Rig) -> None:
    """A write user arriving while a read-only user holds the pin is still checked against GTF_readonly."""
    rig.grant(8, 0, readonly=True)
    with rig.table.map(GUEST, [8], False):
        assert rig.copy(seg(8, 0, 4, bytearray(4), to_guest=True)) == [GENERAL]
        with pytest.raises(GrantError) as ei:
            rig.table.map(GUEST, [8], True)
        assert ei.value.status == GENERAL
        assert rig.entry(8)[0] == GTF_PERMIT | GTF_READONLY | GTF_READING
    rig.revoke(8)


def test_unknown_domain_refused(rig: Rig) -> None:
    rig.grant(8, 0)
    assert rig.copy(seg(8, 0, 4, bytearray(4), domid=UNKNOWN)) == [BAD_DOMAIN]
    with pytest.raises(GrantError) as ei:
        rig.table.map(UNKNOWN, [8], True)
    assert ei.value.status == BAD_DOMAIN
    valid_ops_work(rig, 8)
    rig.revoke(8)


def test_copy_beyond_page_refused(rig: Rig) -> None:
    rig.grant(8, 0)
    buf = bytearray(PAGE + 1)
    assert rig.copy(seg(8, 4095, 2, buf), seg(8, 1, PAGE, buf, to_guest=True), seg(8, 0, PAGE, buf)) == [
        BAD_COPY_ARG,
        BAD_COPY_ARG,
        OK,
    ]
    assert rig.copy(seg(8, 4096, 0, buf)) == [OK], "Xen accepts zero-length copies without looking"
    assert rig.entry(8)[0] == GTF_PERMIT
    rig.revoke(8)


def test_frame_outside_guest_memory_refused(rig: Rig) -> None:
    rig.grant(8, rig.mem_pages)
    assert rig.copy(seg(8, 0, 1, bytearray(1))) == [BAD_PAGE]
    with pytest.raises(GrantError) as ei:
        rig.table.map(GUEST, [8], False)
    assert ei.value.status == BAD_PAGE
    assert rig.entry(8)[0] == GTF_PERMIT
    rig.revoke(8)


def test_sub_page_grant_cannot_be_mapped(rig: Rig) -> None:
    rig.set_raw(8, GTF_PERMIT | GTF_SUB_PAGE, BACKEND, 0)
    with pytest.raises(GrantError) as ei:
        rig.table.map(GUEST, [8], False)
    assert ei.value.status == GENERAL
    assert rig.copy(seg(8, 0, 4, bytearray(4))) == [OK]  # copy ignores sub_page in v1
    rig.set_raw(8, 0, 0, 0)


def test_guest_cannot_revoke_in_use_grant(rig: Rig) -> None:
    rig.grant(8, 0)
    rig.grant(9, 1)
    m = rig.table.map(GUEST, [8, 9], True)
    for ref in (8, 9):
        with pytest.raises(OSError) as ei:
            rig.revoke(ref)
        assert ei.value.errno == errno.EBUSY
        assert rig.entry(ref)[0] == GTF_PERMIT | GTF_READING | GTF_WRITING
    # A second, read-only user of the same grant keeps it pinned after the first goes.
    m2 = rig.table.map(GUEST, [8], False)
    m.unmap()
    m.unmap()  # idempotent
    assert rig.entry(8)[0] == GTF_PERMIT | GTF_READING
    assert rig.entry(9)[0] == GTF_PERMIT
    with pytest.raises(OSError):
        rig.revoke(8)
    rig.revoke(9)
    m2.unmap()
    rig.revoke(8)
    assert rig.entry(8)[0] == 0


def test_grant_over_in_use_entry_refused(rig: Rig) -> None:
    rig.grant(8, 0)
    with pytest.raises(OSError) as ei:
        rig.grant(8, 1)
    assert ei.value.errno == errno.EBUSY
    with pytest.raises(OSError) as ei:
        rig.grant(rig.nr, 1)
    assert ei.value.errno == errno.EINVAL
    rig.revoke(8)


def test_map_is_all_or_nothing_and_contiguous(rig: Rig) -> None:
    for i, frame in enumerate((5, 1, 3)):
        rig.mem[frame * PAGE : (frame + 1) * PAGE] = bytes([0x41 + i]) * PAGE
        rig.grant(8 + i, frame)
    rig.grant(11, 2, domid=OTHER)
    with pytest.raises(GrantError) as ei:
        rig.table.map(GUEST, [8, 9, 10, 11], True)
    assert ei.value.status == GENERAL
    assert rig.table.live_mappings == 0
    assert all(rig.entry(r)[0] == GTF_PERMIT for r in (8, 9, 10))
    with rig.table.map(GUEST, [8, 9, 10], True) as m:
        assert rig.table.live_mappings == 3
        buf = m.buffer()
        assert len(buf) == 3 * PAGE
        assert [buf[i * PAGE] for i in range(3)] == [0x41, 0x42, 0x43]
        buf[PAGE + 100] = 0x7A  # lands in frame 1 of the guest
        assert rig.mem[PAGE + 100] == 0x7A
        buf.release()
    for r in (8, 9, 10, 11):
        rig.revoke(r)


def test_unmap_of_unknown_range_refused(rig: Rig) -> None:
    rig.grant(8, 0)
    m = rig.table.map(GUEST, [8], False)
    with pytest.raises(OSError) as ei:
        rig.table._unmap(m.address, 2)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        rig.table._unmap(ffi.cast("void *", 0x1000), 1)
    m.unmap()
    rig.revoke(8)


def test_detach_refused_while_mapped(rig: Rig) -> None:
    rig.grant(8, 0)
    m = rig.table.map(GUEST, [8], False)
    with pytest.raises(OSError) as ei:
        rig.table.detach(GUEST)
    assert ei.value.errno == errno.EBUSY
    m.unmap()
    rig.table.detach(GUEST)
    with pytest.raises(OSError) as ei:
        rig.table.detach(GUEST)
    assert ei.value.errno == errno.ENOENT
    assert rig.copy(seg(8, 0, 1, bytearray(1))) == [BAD_DOMAIN]
    rig.revoke(8)


def test_attach_refuses_unsealed_or_short_memory() -> None:
    t = EmulatedGrantTable(BACKEND)
    unsealed, short, gtab = sealed_memfd(4 * PAGE, seal=False), sealed_memfd(PAGE), sealed_memfd(PAGE)
    try:
        with pytest.raises(OSError) as ei:
            t.attach(GUEST, unsealed, 4, gtab, 16)
        assert ei.value.errno == errno.EPERM
        with pytest.raises(OSError) as ei:
            t.attach(GUEST, short, 4, gtab, 16)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            t.attach(GUEST, short, 1, gtab, 1024)  # 8 KiB of entries in a 4 KiB table
        assert ei.value.errno == errno.EINVAL
        t.attach(GUEST, short, 1, gtab, 16)
        with pytest.raises(OSError) as ei:
            t.attach(GUEST, short, 1, gtab, 16)
        assert ei.value.errno == errno.EEXIST
    finally:
        for fd in (unsealed, short, gtab):
            os.close(fd)
        t.close()


def test_close_with_live_mapping_releases_everything() -> None:
    r = Rig()
    r.grant(8, 0)
    r.table.map(GUEST, [8], True)
    r.close()  # frees the mapping and the domain
    assert r.table.live_mappings == 0


# ---------------------------------------------------------------------------------------------------
# Read-only mappings are enforced by the MMU: a write faults (in a child, since it kills the process).

_FAULT_SCRIPT = textwrap.dedent(
    """
    import ctypes, fcntl, mmap, os, sys
    from backends.native import ffi
    from backends.native.grants import EmulatedGrantTable, guest_grant
    def memfd(size):
        fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return fd
    mem, gtab = memfd(4096 * 2), memfd(4096)
    gm = mmap.mmap(gtab, 4096)
    t = EmulatedGrantTable(0)
    t.attach(1, mem, 2, gtab, 16)
    guest_grant(ffi.from_buffer(gm), 16, 8, 0, 1, sys.argv[1] == "ro")
    m = t.map(1, [8], sys.argv[1] != "ro")
    addr = int(ffi.cast("uintptr_t", m.address))
    print("mapped", flush=True)
    ctypes.memset(addr, 0x55, 1)
    print("wrote", os.pread(mem, 1, 4096).hex(), flush=True)
    """
)


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_readonly_mapping_faults_on_write(mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _FAULT_SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert "mapped" in proc.stdout, proc.stderr
    if mode == "ro":
        assert proc.returncode == -11, (proc.returncode, proc.stdout, proc.stderr)  # SIGSEGV
        assert "wrote" not in proc.stdout
    else:
        assert proc.returncode == 0, proc.stderr
        assert "wrote 55" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# Through the platform and the guest model (broker path).


def test_platform_refusals_leave_backend_healthy(platform: EmulatedPlatform, make_guest: object) -> None:
    g: Guest = make_guest(name="victim", mem_pages=8)  # type: ignore[operator]
    page = g.alloc_page()
    g.page_view(page)[:6] = b"secret"
    ok_ref = g.grant(page, BACKEND)
    ro_ref = g.grant(page, BACKEND, readonly=True)
    other_ref = g.grant(page, OTHER)
    platform.open_domain(g.domid)
    buf = bytearray(6)
    statuses = platform.grant_copy(
        [
            CopySegment(g.domid, g.gnt_entries + 5, 0, 6, buf),
            CopySegment(g.domid, other_ref, 0, 6, buf),
            CopySegment(g.domid, ro_ref, 0, 6, buf, to_guest=True),
            CopySegment(g.domid + 100, ok_ref, 0, 6, buf),
            CopySegment(g.domid, ok_ref, 0, 6, buf),
        ]
    )
    assert statuses == [BAD_GNTREF, GENERAL, GENERAL, BAD_DOMAIN, OK]
    assert buf == b"secret"
    with platform.map_grants(g.domid, [ok_ref], True) as m:
        with pytest.raises(OSError):
            g.revoke(ok_ref)
        assert bytes(m.buffer()[:6]) == b"secret"
    for ref in (ok_ref, ro_ref, other_ref):
        g.revoke(ref)
    platform.close_domain(g.domid)


def test_platform_close_domain_refused_while_mapped(platform: EmulatedPlatform, make_guest: object) -> None:
    g: Guest = make_guest(mem_pages=4)  # type: ignore[operator]
    ref = g.grant(g.alloc_page(), BACKEND)
    platform.open_domain(g.domid)
    platform.open_domain(g.domid)
    m = platform.map_grants(g.domid, [ref], False)
    platform.close_domain(g.domid)  # one reference left
    with pytest.raises(OSError) as ei:
        platform.close_domain(g.domid)
    assert ei.value.errno == errno.EBUSY
    m.unmap()
    platform.close_domain(g.domid)
    assert platform.open_domains == {}
    g.revoke(ref)


def test_copy_speed(rig: Rig) -> None:
    """A 4 KiB copy is a memcpy and two atomics: no syscall.  Report the per-segment cost."""
    for r in range(8, 16):
        rig.grant(r, r - 8)
    n = 1024
    local = ffi.new("char[]", n * PAGE)
    segs = ffi.new("struct pv_gcopy_seg[]", n)
    for i in range(n):
        s = segs[i]
        s.source.foreign.ref = 8 + i % 8
        s.source.foreign.domid = GUEST
        s.source.foreign.offset = 0
        s.dest.virt = local + i * PAGE
        s.len = PAGE
        s.flags = 1
    from backends.native import lib

    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        assert lib.pv_gnt_do_copy(rig.table.c, segs, n) == 0
        best = min(best, time.perf_counter() - t0)
    assert all(segs[i].status == 0 for i in range(n))
    per_seg_ns = best / n * 1e9
    print(f"\ngrant copy: {per_seg_ns:.0f} ns per 4 KiB segment ({PAGE / per_seg_ns:.2f} GB/s)")
    assert per_seg_ns < 20_000  # generous: a syscall or page fault per segment would still pass; a bug would not
    for r in range(8, 16):
        rig.revoke(r)


# ---------------------------------------------------------------------------------------------------
# Property test: random grant/revoke/map/unmap/copy/scribble sequences against a model of Xen's rules.

# Small spaces, so random sequences often hit the same ref repeatedly (pins stacking, revokes racing maps).
N_REFS = 6
MEM_PAGES = 4
REFS = st.integers(0, N_REFS + 1)  # some out of range
FRAMES = st.integers(0, MEM_PAGES - 1) | st.just(MEM_PAGES + 1)  # sometimes outside guest memory
MOSTLY = st.sampled_from([True, True, True, False])  # bias towards operations that can succeed


@dataclass
class MEntry:
    flags: int = 0
    domid: int = 0
    frame: int = 0


@dataclass
class MPin:
    pin: int = 0
    wpin: int = 0
    frame: int = 0


@dataclass
class MMap:
    mapping: NativeGrantMapping
    refs: list[int]
    frames: list[int]
    writable: bool


@dataclass
class Model:
    entries: list[MEntry] = field(default_factory=lambda: [MEntry() for _ in range(N_REFS)])
    pins: list[MPin] = field(default_factory=lambda: [MPin() for _ in range(N_REFS)])
    mem: bytearray = field(default_factory=lambda: bytearray(MEM_PAGES * PAGE))

    def acquire(self, ref: int, write: bool, mapflag: bool) -> int:
        """Xen 4.17: _set_status_v1 only when the pin state changes, then get_paged_frame."""
        e, p = self.entries[ref], self.pins[ref]
        fresh = p.pin == 0
        if fresh or (write and p.wpin == 0):
            mask = GTF_TYPE_MASK | (GTF_SUB_PAGE if mapflag else 0)
            if fresh and ((e.flags & mask) != GTF_PERMIT or e.domid != BACKEND):
                return GENERAL
            if write and e.flags & GTF_READONLY:
                return GENERAL
            e.flags |= GTF_READING | (GTF_WRITING if write else 0)
            if fresh:
                if e.frame >= MEM_PAGES:
                    e.flags &= ~(GTF_READING | (GTF_WRITING if write else 0))
                    return BAD_PAGE
                p.frame = e.frame
        p.pin += 1
        p.wpin += write
        return OK

    def release(self, ref: int, write: bool) -> None:
        e, p = self.entries[ref], self.pins[ref]
        p.pin -= 1
        p.wpin -= write
        if write and p.wpin == 0:
            e.flags &= ~GTF_WRITING
        if p.pin == 0:
            e.flags &= ~GTF_READING


class GrantMachine(RuleBasedStateMachine):
    mappings = Bundle("mappings")

    def __init__(self) -> None:
        super().__init__()
        self.rig = Rig(mem_pages=MEM_PAGES, nr_entries=N_REFS)
        self.model = Model()
        self.rig.mem[:] = bytes(range(256)) * (MEM_PAGES * PAGE // 256)
        self.model.mem[:] = self.rig.mem[:]
        self.live: list[MMap] = []
        self.scribbles = 0

    def pick_ref(self, data: st.DataObject) -> int:
        """Mostly a ref that currently holds a grant (so pins stack up and revokes race uses), else any."""
        live = [r for r, e in enumerate(self.model.entries) if e.flags & GTF_TYPE_MASK]
        prefer_live: bool = data.draw(MOSTLY)
        if live and prefer_live:
            return int(data.draw(st.sampled_from(live)))
        return data.draw(REFS)

    @rule(ref=REFS, frame=FRAMES, to_backend=MOSTLY, readonly=st.booleans())
    def guest_grant(self, ref: int, frame: int, to_backend: bool, readonly: bool) -> None:
        domid = BACKEND if to_backend else OTHER
        try:
            self.rig.grant(ref, frame, domid, readonly)
            got = 0
        except OSError as exc:
            got = exc.errno or -1
        if ref >= N_REFS:
            assert got == errno.EINVAL
            return
        e = self.model.entries[ref]
        if e.flags & (GTF_TYPE_MASK | GTF_READING | GTF_WRITING):
            assert got == errno.EBUSY
            return
        assert got == 0
        e.domid, e.frame, e.flags = domid, frame, GTF_PERMIT | (GTF_READONLY if readonly else 0)

    @rule(data=st.data())
    def guest_revoke(self, data: st.DataObject) -> None:
        ref = self.pick_ref(data)
        try:
            self.rig.revoke(ref)
            got = 0
        except OSError as exc:
            got = exc.errno or -1
        if ref >= N_REFS:
            assert got == errno.EINVAL
            return
        e = self.model.entries[ref]
        if e.flags & (GTF_READING | GTF_WRITING):
            assert got == errno.EBUSY
        else:
            assert got == 0
            e.flags = 0

    @precondition(lambda self: self.scribbles < 3)
    @rule(ref=st.integers(0, N_REFS - 1), flags=st.sampled_from([0, 1, 2, 3, 1 | 4, 1 | 0x100, 1 | 8]),
          domid=st.sampled_from([BACKEND, OTHER]), frame=FRAMES)
    def guest_scribble(self, ref: int, flags: int, domid: int, frame: int) -> None:
        """A hostile guest rewrites an entry at any time, in use or not (rarely: it mostly wipes grants)."""
        self.scribbles += 1
        self.rig.set_raw(ref, flags, domid, frame)
        e = self.model.entries[ref]
        e.flags, e.domid, e.frame = flags, domid, frame

    @rule(target=mappings, data=st.data(), n=st.integers(1, 3), writable=st.booleans(), known_domain=MOSTLY)
    def backend_map(self, data: st.DataObject, n: int, writable: bool, known_domain: bool) -> MMap | None:
        refs = [self.pick_ref(data) for _ in range(n)]
        domid = GUEST if known_domain else UNKNOWN
        try:
            m = self.rig.table.map(domid, refs, writable)
            got = 0
        except GrantError as exc:
            m, got = None, exc.status
        want: int = OK
        taken: list[int] = []
        if not known_domain:
            want = BAD_DOMAIN
        else:
            for ref in refs:
                if ref >= N_REFS:
                    want = BAD_GNTREF
                    break
                want = self.model.acquire(ref, writable, True)
                if want != OK:
                    break
                taken.append(ref)
        assert got == want, (refs, writable, got, want)
        if want != OK:
            for ref in taken:
                self.model.release(ref, writable)
            return None
        assert m is not None
        mm = MMap(m, list(refs), [self.model.pins[r].frame for r in refs], writable)
        self.live.append(mm)
        # The mapping shows the pinned frames.
        buf = m.buffer()
        for i, frame in enumerate(mm.frames):
            assert buf[i * PAGE : i * PAGE + 64] == self.model.mem[frame * PAGE : frame * PAGE + 64]
        buf.release()
        return mm

    @rule(mm=consumes(mappings))
    def backend_unmap(self, mm: MMap | None) -> None:
        if mm is None or mm not in self.live:
            return
        mm.mapping.unmap()
        self.live.remove(mm)
        for ref in mm.refs:
            self.model.release(ref, mm.writable)

    @precondition(lambda self: any(m.writable for m in self.live))
    @rule(data=st.data())
    def backend_write_through_mapping(self, data: st.DataObject) -> None:
        mm = data.draw(st.sampled_from([m for m in self.live if m.writable]))
        i = data.draw(st.integers(0, len(mm.refs) - 1))
        off = data.draw(st.integers(0, PAGE - 8))
        payload = data.draw(st.binary(min_size=1, max_size=8))
        buf = mm.mapping.buffer()
        buf[i * PAGE + off : i * PAGE + off + len(payload)] = payload
        buf.release()
        base = mm.frames[i] * PAGE + off
        self.model.mem[base : base + len(payload)] = payload

    @rule(data=st.data(), offset=st.integers(0, PAGE), length=st.integers(0, 300), to_guest=st.booleans(),
          known_domain=MOSTLY, fill=st.integers(0, 255))
    def backend_copy(
        self, data: st.DataObject, offset: int, length: int, to_guest: bool, known_domain: bool, fill: int
    ) -> None:
        ref = self.pick_ref(data)
        domid = GUEST if known_domain else UNKNOWN
        buf = bytearray([fill]) * length if to_guest else bytearray(length)
        (got,) = self.rig.copy(seg(ref, offset, length, buf, to_guest=to_guest, domid=domid))
        want: int
        if length == 0:
            want = OK
        elif not known_domain:
            want = BAD_DOMAIN
        elif ref >= N_REFS:
            want = BAD_GNTREF
        else:
            want = self.model.acquire(ref, to_guest, False)
            if want == OK:
                if offset + length > PAGE:
                    want = BAD_COPY_ARG
                else:
                    base = self.model.pins[ref].frame * PAGE + offset
                    if to_guest:
                        self.model.mem[base : base + length] = buf
                    else:
                        assert buf == self.model.mem[base : base + length]
                self.model.release(ref, to_guest)
        assert got == want, (ref, offset, length, to_guest, got, want)

    @invariant()
    def shared_state_matches_model(self) -> None:
        for ref in range(N_REFS):
            e = self.model.entries[ref]
            assert self.rig.entry(ref) == (e.flags, e.domid, e.frame), ref
        assert self.rig.table.live_mappings == sum(len(m.refs) for m in self.live)
        assert self.rig.table.pinned(GUEST) == sum(p.pin for p in self.model.pins)
        assert self.rig.mem[:] == self.model.mem

    def teardown(self) -> None:
        for mm in self.live:
            mm.mapping.unmap()
        assert self.rig.table.live_mappings == 0
        self.rig.close()


GrantMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGrantRules = GrantMachine.TestCase


# ---------------------------------------------------------------------------------------------------
# Exhaustive check of every short sequence on one ref: random search rarely stacks the exact pins that
# matter (e.g. a write user arriving while a read-only user holds a read-only grant), so enumerate them.

SEQ_OPS = ("grant_rw", "grant_ro", "grant_other", "revoke", "map_ro", "map_rw", "unmap", "copy_from", "copy_to",
           "scribble_ro", "scribble_domid")


def test_every_short_sequence_on_one_ref_matches_model() -> None:
    import itertools

    ref, frame = 1, 2
    r = Rig(mem_pages=MEM_PAGES, nr_entries=N_REFS)
    try:
        for seq in itertools.product(SEQ_OPS, repeat=4):
            model = Model()
            maps: list[tuple[NativeGrantMapping, bool]] = []
            for op in seq:
                e = model.entries[ref]
                if op.startswith("grant_"):
                    try:
                        r.grant(ref, frame, OTHER if op == "grant_other" else BACKEND, op == "grant_ro")
                        got = 0
                    except OSError as exc:
                        got = exc.errno or -1
                    if e.flags & (GTF_TYPE_MASK | GTF_READING | GTF_WRITING):
                        assert got == errno.EBUSY, seq
                    else:
                        assert got == 0, seq
                        e.flags = GTF_PERMIT | (GTF_READONLY if op == "grant_ro" else 0)
                        e.domid, e.frame = (OTHER if op == "grant_other" else BACKEND), frame
                elif op == "revoke":
                    try:
                        r.revoke(ref)
                        got = 0
                    except OSError as exc:
                        got = exc.errno or -1
                    if e.flags & (GTF_READING | GTF_WRITING):
                        assert got == errno.EBUSY, seq
                    else:
                        assert got == 0, seq
                        e.flags = 0
                elif op.startswith("map_"):
                    w = op == "map_rw"
                    want = model.acquire(ref, w, True)
                    try:
                        maps.append((r.table.map(GUEST, [ref], w), w))
                        got = 0
                    except GrantError as exc:
                        got = exc.status
                    assert got == want, seq
                elif op == "unmap":
                    if maps:
                        m, w = maps.pop()
                        m.unmap()
                        model.release(ref, w)
                elif op.startswith("copy_"):
                    w = op == "copy_to"
                    want = model.acquire(ref, w, False)
                    if want == OK:
                        model.release(ref, w)
                    (got,) = r.copy(seg(ref, 0, 8, bytearray(8), to_guest=w))
                    assert got == want, seq
                elif op == "scribble_ro":
                    e.flags |= GTF_READONLY
                    r.set_raw(ref, e.flags, e.domid, e.frame)
                else:
                    e.domid = OTHER
                    r.set_raw(ref, e.flags, e.domid, e.frame)
                assert r.entry(ref) == (e.flags, e.domid, e.frame), seq
            for m, _ in maps:
                m.unmap()
            assert r.table.live_mappings == 0 and r.table.pinned(GUEST) == 0
            r.set_raw(ref, 0, 0, 0)
    finally:
        r.close()


# ---------------------------------------------------------------------------------------------------
# A dead backend's pins: the broker releases them (csrc/gnt_emu.h, pv_gnt_emu_release_pins), as Xen does when
# the kernel unmaps a dead process's grants; bits another live backend still needs stay set.

PINTAB_HEADER = 64
PIN = struct.Struct("<III")  # pin, wpin, frame


class PinRig(Rig):
    """A Rig whose handle keeps its pins in a shared pin table (as behind the broker), plus a second table
    for a backend that "died" holding pins: its counts are written by hand, as it left them."""

    def __init__(self, mem_pages: int = 8, nr_entries: int = 16) -> None:
        self.mem_pages, self.nr = mem_pages, nr_entries
        self.mem_fd = sealed_memfd(mem_pages * PAGE)
        self.gtab_fd = sealed_memfd(PAGE)
        self.live_fd = sealed_memfd(pin_table_size(nr_entries))
        self.dead_fd = sealed_memfd(pin_table_size(nr_entries))
        self.mem = mmap.mmap(self.mem_fd, mem_pages * PAGE)
        self.gtab = mmap.mmap(self.gtab_fd, PAGE)
        self.gtab_ptr = ffi.from_buffer(self.gtab)
        self.live_tab = mmap.mmap(self.live_fd, pin_table_size(nr_entries))
        self.dead_tab = mmap.mmap(self.dead_fd, pin_table_size(nr_entries))
        self.table = EmulatedGrantTable(BACKEND)
        self.table.attach(GUEST, self.mem_fd, mem_pages, self.gtab_fd, nr_entries, self.live_fd)

    @staticmethod
    def pins(tab: mmap.mmap, ref: int) -> tuple[int, int]:
        pin, wpin, _frame = PIN.unpack_from(tab, PINTAB_HEADER + ref * PIN.size)
        return pin, wpin

    def die_holding(self, ref: int, pin: int, wpin: int) -> None:
        """What a backend that pinned `ref` left behind: its counts, and the bits its pins set."""
        PIN.pack_into(self.dead_tab, PINTAB_HEADER + ref * PIN.size, pin, wpin, 0)
        flags, domid, frame = self.entry(ref)
        self.set_raw(ref, flags | GTF_READING | (GTF_WRITING if wpin else 0), domid, frame)

    def release_dead(self, *live: int) -> int:
        return release_dead_pins(self.gtab_fd, self.nr, self.dead_fd, list(live))

    def set_reaping(self, value: int) -> None:
        struct.pack_into("<I", self.live_tab, 0, value)

    def close(self) -> None:
        super().close()
        self.live_tab.close()
        self.dead_tab.close()
        for fd in (self.mem_fd, self.gtab_fd, self.live_fd, self.dead_fd):
            os.close(fd)


@pytest.fixture
def prig() -> Iterator[PinRig]:
    r = PinRig()
    yield r
    try:
        assert r.table.live_mappings == 0
        assert r.table.pinned(GUEST) in (0, -1)
    finally:
        r.close()


def test_pins_are_counted_in_the_shared_table(prig: PinRig) -> None:
    prig.grant(8, 0)
    m1 = prig.table.map(GUEST, [8], True)
    m2 = prig.table.map(GUEST, [8], False)
    assert prig.pins(prig.live_tab, 8) == (2, 1)
    m1.unmap()
    assert prig.pins(prig.live_tab, 8) == (1, 0)
    assert prig.entry(8)[0] == GTF_PERMIT | GTF_READING
    m2.unmap()
    assert prig.pins(prig.live_tab, 8) == (0, 0)
    assert prig.copy(seg(8, 0, 16, bytearray(16))) == [OK]
    assert prig.pins(prig.live_tab, 8) == (0, 0)  # a copy's pin is gone once the copy is
    prig.revoke(8)


def test_dead_backend_pins_released_unless_a_live_backend_holds_them(prig: PinRig) -> None:
    for ref, frame in ((8, 0), (9, 1), (10, 2)):
        prig.grant(ref, frame)
    # Both backends pin ref 8 (the dead one writably, the live one read-only); only the dead one pins 9.
    live = prig.table.map(GUEST, [8], False)
    prig.die_holding(8, pin=2, wpin=1)
    prig.die_holding(9, pin=1, wpin=0)
    for ref in (8, 9):
        with pytest.raises(OSError) as ei:
            prig.revoke(ref)
        assert ei.value.errno == errno.EBUSY
    assert prig.release_dead(prig.live_fd) == 2
    assert prig.entry(8)[0] == GTF_PERMIT | GTF_READING  # the live backend still reads it: the bit stays
    assert prig.entry(9)[0] == GTF_PERMIT  # nobody else: released
    assert prig.entry(10)[0] == GTF_PERMIT  # never pinned: untouched
    assert bytes(prig.dead_tab[PINTAB_HEADER:]) == bytes(len(prig.dead_tab) - PINTAB_HEADER)  # zeroed
    assert prig.pins(prig.live_tab, 8) == (1, 0)
    prig.revoke(9)
    with pytest.raises(OSError) as ei:
        prig.revoke(8)
    assert ei.value.errno == errno.EBUSY
    live.unmap()  # the second backend lets go: now the guest can revoke
    prig.revoke(8)
    prig.revoke(10)
    assert prig.release_dead(prig.live_fd) == 0  # releasing again finds nothing


def test_dead_backend_writable_pin_kept_for_a_live_writer(prig: PinRig) -> None:
    prig.grant(8, 0)
    live = prig.table.map(GUEST, [8], True)
    prig.die_holding(8, pin=1, wpin=1)
    assert prig.release_dead(prig.live_fd) == 1
    assert prig.entry(8)[0] == GTF_PERMIT | GTF_READING | GTF_WRITING
    live.unmap()
    prig.revoke(8)


def test_release_with_no_live_backend(prig: PinRig) -> None:
    prig.grant(8, 0, readonly=True)
    prig.die_holding(8, pin=3, wpin=0)
    assert prig.release_dead() == 1
    assert prig.entry(8)[0] == GTF_PERMIT | GTF_READONLY
    prig.revoke(8)


def test_claim_overlapping_a_release_is_redone(prig: PinRig) -> None:
    """A release that cannot see a live backend's fresh count (it raced the claim) may clear that backend's
    bit; the backend sees `reaping`, waits, and claims the entry again, so it never uses a grant the guest
    revoked meanwhile, and keeps the bit when the grant is still there."""
    prig.grant(8, 0)
    prig.grant(9, 1)
    results: list[object] = []

    def map_ref(ref: int) -> None:
        try:
            results.append(prig.table.map(GUEST, [ref], True))
        except GrantError as exc:
            results.append(exc.status)

    # The release cleared ref 8's bits and the guest revoked and re-granted it to another domain: refused.
    prig.set_reaping(1)
    t = threading.Thread(target=map_ref, args=(8,))
    t.start()
    deadline = time.monotonic() + 5
    while prig.entry(8)[0] != GTF_PERMIT | GTF_READING | GTF_WRITING:
        assert time.monotonic() < deadline, "the claim never happened"
        time.sleep(0.001)
    time.sleep(0.02)
    assert t.is_alive(), "the claim did not wait for the release in progress"
    prig.set_raw(8, GTF_PERMIT, BACKEND, 0)  # what the broker's cmpxchg leaves
    prig.revoke(8)
    prig.grant(8, 0, domid=OTHER)
    prig.set_reaping(0)
    t.join(10)
    assert results == [GENERAL]
    assert prig.entry(8) == (GTF_PERMIT, OTHER, 0)
    assert prig.pins(prig.live_tab, 8) == (0, 0)
    # The release saw the count and kept the bits: the claim goes through once it is over.
    prig.set_reaping(1)
    t = threading.Thread(target=map_ref, args=(9,))
    t.start()
    time.sleep(0.02)
    prig.set_reaping(0)
    t.join(10)
    m = results[-1]
    assert isinstance(m, NativeGrantMapping)
    assert prig.entry(9)[0] == GTF_PERMIT | GTF_READING | GTF_WRITING
    m.unmap()
    for ref in (8, 9):
        prig.revoke(ref)


def test_attach_checks_the_pin_table() -> None:
    t = EmulatedGrantTable(BACKEND)
    mem, gtab = sealed_memfd(PAGE), sealed_memfd(PAGE)
    short, unsealed = sealed_memfd(pin_table_size(16) - 1), sealed_memfd(pin_table_size(16), seal=False)
    try:
        with pytest.raises(OSError) as ei:
            t.attach(GUEST, mem, 1, gtab, 16, short)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            t.attach(GUEST, mem, 1, gtab, 16, unsealed)
        assert ei.value.errno == errno.EPERM
    finally:
        for fd in (mem, gtab, short, unsealed):
            os.close(fd)
        t.close()


def test_broker_hands_each_backend_its_own_pin_table(broker: object, sim_dir: Path, make_guest: object) -> None:
    g: Guest = make_guest(mem_pages=4, gnt_entries=64)  # type: ignore[operator]
    a = BrokerClient(str(sim_dir / "broker.sock"))
    b = BrokerClient(str(sim_dir / "broker.sock"))
    fds: list[int] = []
    try:
        a.request("hello", domid=0)
        b.request("hello", domid=0)
        for c in (a, a, b):
            _, got = c.request("map_domain", domid=g.domid)
            fds += got
            assert len(got) == 3
            assert os.fstat(got[2]).st_size == pin_table_size(64)
            assert fcntl.fcntl(got[2], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        ino = [os.fstat(fds[i]).st_ino for i in (2, 5, 8)]
        assert ino[0] == ino[1] != ino[2]  # the same table on every map_domain of one connection
    finally:
        close_fds(fds)
        a.close()
        b.close()


# A backend process that maps two grants writably and is stuck in the middle of a grant copy (its
# destination is a page nobody ever fills in, through userfaultfd) when it is SIGKILLed.
_HOLDER_SCRIPT = textwrap.dedent(
    """
    import ctypes, mmap, os, select, struct, sys, threading, time
    from backends.native import ffi, lib
    from backends.platform.emulated import EmulatedPlatform
    sim_dir, domid, copy_ref = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    map_refs = [int(r) for r in sys.argv[4:]]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr = {"x86_64": 323, "aarch64": 282}[os.uname().machine]
    uffd = libc.syscall(nr, os.O_CLOEXEC | 1)  # UFFD_USER_MODE_ONLY: no privilege needed
    if uffd < 0:
        uffd = libc.syscall(nr, os.O_CLOEXEC)
    assert uffd >= 0, ctypes.get_errno()
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    api = ctypes.create_string_buffer(struct.pack("<QQQ", 0xAA, 0, 0))
    assert libc.ioctl(uffd, 0xC018AA3F, api) == 0, ctypes.get_errno()  # UFFDIO_API
    hole = mmap.mmap(-1, 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(hole))
    reg = ctypes.create_string_buffer(struct.pack("<QQQQ", addr, 4096, 1, 0))  # MODE_MISSING
    assert libc.ioctl(uffd, 0xC020AA00, reg) == 0, ctypes.get_errno()  # UFFDIO_REGISTER
    p = EmulatedPlatform(sim_dir)
    p.open_domain(domid)
    m = p.map_grants(domid, map_refs, True)
    segs = ffi.new("struct pv_gcopy_seg[]", 1)
    segs[0].source.foreign.ref = copy_ref
    segs[0].source.foreign.domid = domid
    segs[0].dest.virt = ffi.cast("void *", addr)
    segs[0].len = 4096
    segs[0].flags = lib.PV_GCOPY_SOURCE_GREF
    threading.Thread(target=lib.pv_gnt_do_copy, args=(p.gnt, segs, 1), daemon=True).start()
    assert select.select([uffd], [], [], 20)[0], "the copy never reached its destination"
    print("holding", flush=True)
    time.sleep(120)
    """
)


def test_sigkilled_backend_mid_copy_lets_the_guest_revoke(platform: EmulatedPlatform, make_guest: object,
                                                          sim_dir: Path, broker: BrokerThread) -> None:
    g: Guest = make_guest(name="pinned", mem_pages=8)  # type: ignore[operator]
    pages = [g.alloc_page() for _ in range(3)]
    map_ref, copy_ref, shared_ref = (g.grant(p, BACKEND) for p in pages)
    # This process is a second backend of the same guest, reading one of the grants the other one maps.
    platform.open_domain(g.domid)
    shared = platform.map_grants(g.domid, [shared_ref], False)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER_SCRIPT, str(sim_dir), str(g.domid), str(copy_ref), str(map_ref),
         str(shared_ref)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "holding\n", (line, proc.stderr.read() if proc.stderr else "")
        assert g.grant_flags(map_ref) & (GTF_READING | GTF_WRITING) == GTF_READING | GTF_WRITING
        assert g.grant_flags(copy_ref) & (GTF_READING | GTF_WRITING) == GTF_READING  # mid-copy
        for ref in (map_ref, copy_ref, shared_ref):
            with pytest.raises(OSError) as ei:
                g.revoke(ref)
            assert ei.value.errno == errno.EBUSY
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The broker notices the closed connection on its own thread.
    deadline = time.monotonic() + 30  # a bound, not a timing: the suite runs on 2 loaded vCPUs
    while g.grant_flags(map_ref) & (GTF_READING | GTF_WRITING):
        assert time.monotonic() < deadline, "the dead backend's grants stay pinned"
        time.sleep(0.01)
    g.revoke(map_ref)
    g.revoke(copy_ref)
    # The live backend still reads the shared grant: its bit stays, the dead one's writing bit does not.
    assert g.grant_flags(shared_ref) & (GTF_READING | GTF_WRITING) == GTF_READING
    with pytest.raises(OSError) as ei:
        g.revoke(shared_ref)
    assert ei.value.errno == errno.EBUSY
    shared.unmap()
    g.revoke(shared_ref)
    platform.close_domain(g.domid)
