"""The one-copy data path: persistent mappings of the guest's pages, tmpfs images served through a shared
mapping of the file (a memcpy between the image and the guest's page), and O_DIRECT images read and written
by io_uring straight into the guest's page (registered with the ring while it is mapped).  What must hold
whatever the path:
the bytes (a frontend switching between grant copy and persistent mappings, and a queue mixing both), the
guest's page never written once its grant has ended, read-only grants refused for reads into them, and an
image shrunk under its mapping failing requests, not the daemon."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.blk import proto
from backends.blk.dataplane import BlkQueue
from backends.blk.proto import Abi
from backends.drivers.storage import FileDriver

from . import wire
from .harness import PAGE, Pending, Rig, memory_image

DISK = 4 << 20
OKAY, ERROR = proto.RSP_OKAY, proto.RSP_ERROR
SENTINEL = b"\x5a" * PAGE


@pytest.fixture
def image() -> Iterator[Path]:
    with memory_image("zc", DISK) as p:
        yield p


# How the image is served: a shared mapping (tmpfs), preadv/pwritev inline, or O_DIRECT through the queue's
# io_uring (a copy of the image on the root filesystem: tmpfs refuses O_DIRECT on older kernels).
STORES = ["mapped", "preadv", "direct"]


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        yield Path(d)


def open_driver(image: Path, mapped: bool) -> FileDriver:
    drv = FileDriver(image, mode="inline", mapped=mapped)
    drv.open()
    return drv


def open_store(image: Path, store: str, disk_dir: Path) -> tuple[FileDriver, Path]:
    """The driver for `store` and the path of the image it serves (a copy for "direct")."""
    if store != "direct":
        return open_driver(image, store == "mapped"), image
    path = disk_dir / image.name
    shutil.copyfile(image, path)
    drv = FileDriver(path, mode="threaded", threads=2, direct=True)
    drv.open()
    return drv, path


def requeue(rig: Rig, *, persistent: bool, persistent_min_bytes: int = 0) -> None:
    """Replace the rig's queue by one with another grant mode on the same ring and guest: what a frontend that
    reconnects with feature-persistent toggled gets (the old queue's mappings all end first)."""
    rig.q.close()
    assert rig.g.table.pinned(1) == 1  # the ring page only
    rig.cfg = dataclasses.replace(rig.cfg, persistent=persistent, persistent_min_bytes=persistent_min_bytes)
    rig.q = BlkQueue(rig.ring_map.address, rig.cfg, rig.g.table.c, None, rig.engine.c)


def file_bytes(image: Path, off: int, n: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(off)
        return f.read(n)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("pool", [256, 16], ids=["pool256", "pool16"])
def test_integrity_across_grant_mode_switches(image: Path, disk_dir: Path, store: str, pool: int) -> None:
    """Random reads and writes of 0.5-64 KiB over one pool of guest pages, the grant mode switching between
    rounds (persistent, copy, persistent with copy below 8 KiB so both modes touch the same pages in one
    queue), every read checked against a model of the disk and every write against the file.  With a pool of
    16 persistent mappings the pages keep being evicted and mapped again (for O_DIRECT: unregistered from
    the ring and registered again)."""
    drv, image = open_store(image, store, disk_dir)
    model = bytearray(image.read_bytes())
    rig = Rig(drv.engine(), abi=Abi.X86_64, sectors=DISK // 512, persistent=True, max_persistent_grants=pool)
    rnd = random.Random(11)
    modes = [(True, 0), (False, 0), (True, 8192), (True, 0), (False, 0)]
    try:
        for rnd_i, (persistent, min_bytes) in enumerate(modes):
            if rnd_i:
                requeue(rig, persistent=persistent, persistent_min_bytes=min_bytes)
            for _ in range(25):
                batch: list[tuple[bytes, Pending, int, int]] = []
                for _ in range(rnd.randrange(1, 9)):
                    size = rnd.choice([512, 4096, 8192, 12288, 45056, 65536])
                    sector = rnd.randrange(0, (DISK - size) // 512)
                    first = rnd.randrange(8) if size < 45056 else 0
                    write = rnd.random() < 0.5
                    # A write goes alone: the order of overlapping requests within a batch is the
                    # backend's to choose, as on any block device.
                    if write and batch:
                        break
                    if write:
                        data = rnd.randbytes(size)
                        slot, p = rig.request(1, sector, size, first=first, data=data)
                        model[sector * 512 : sector * 512 + size] = data
                    else:
                        slot, p = rig.request(0, sector, size, first=first)
                    batch.append((slot, p, sector, size))
                    if write:
                        break
                res = rig.run([b[0] for b in batch])
                for _slot, p, sector, size in batch:
                    assert res[p.rid] == (p.op, OKAY)
                    if p.op == 0:
                        assert rig.gather(p) == bytes(model[sector * 512 : sector * 512 + size])
            st = rig.q.stats()
            assert st["errors"] == 0
            if persistent:
                assert st["persistent_maps"] > 0
                if min_bytes:
                    assert st["grant_copy_segs"] > 0  # both modes in one queue, on the same pages
                if pool < 256:
                    assert st["persistent_evictions"] > 0
            else:
                assert st["persistent_maps"] == 0 and st["grant_copy_calls"] > 0
            # Only O_DIRECT has a ring, hence registered buffers, used by one-segment persistent requests (none
            # when only requests of 8 KiB and more are mapped).
            assert st["fixed_buffer_refusals"] == 0
            assert (st["fixed_buffer_reqs"] > 0) == (store == "direct" and persistent and not min_bytes)
        assert image.read_bytes() == bytes(model)
        assert drv.engine().map_faults == 0
    finally:
        rig.close()
        drv.close()


@pytest.mark.parametrize("store", STORES)
def test_page_never_written_after_its_grant_ends(image: Path, disk_dir: Path, store: str) -> None:
    """A persistently mapped grant cannot end while the backend holds the mapping (the guest's revoke fails
    with EBUSY, as gnttab_end_foreign_access does on Xen); once the mapping is gone (eviction, or the queue
    closed) the guest can end it, and a later READ naming that reference fails without touching the page."""
    drv, image = open_store(image, store, disk_dir)
    rig = Rig(drv.engine(), abi=Abi.X86_64, sectors=DISK // 512, persistent=True, max_persistent_grants=2)
    g = rig.g
    try:
        pages = g.alloc(3)
        refs = [g.grant(p) for p in pages]
        # Read into refs[0]: it is now mapped in the pool.
        res = rig.run([wire.rw(Abi.X86_64, 0, 1, 0, [(refs[0], 0, 7)])])
        assert res == {1: (0, OKAY)} and bytes(g.page(pages[0])) == file_bytes(image, 0, PAGE)
        with pytest.raises(OSError) as ei:
            g.revoke(refs[0])
        assert ei.value.errno == errno.EBUSY
        # Two more references push refs[0] out of the 2-entry pool (least recently used, idle): unmapped.
        res = rig.run([wire.rw(Abi.X86_64, 0, 2, 8, [(refs[1], 0, 7)]),
                       wire.rw(Abi.X86_64, 0, 3, 16, [(refs[2], 0, 7)])])
        assert res == {2: (0, OKAY), 3: (0, OKAY)}
        assert rig.q.stats()["persistent_evictions"] >= 1
        g.revoke(refs[0])  # the grant ends now
        g.page(pages[0])[:] = SENTINEL  # the guest reuses its page for something else
        other = g.alloc()[0]
        other_ref = g.grant(other)
        res = rig.run([wire.rw(Abi.X86_64, 0, 4, 24, [(refs[0], 0, 7)]),   # names the ended grant
                       wire.rw(Abi.X86_64, 0, 5, 32, [(other_ref, 0, 7)])])  # a good one beside it
        assert res == {4: (0, ERROR), 5: (0, OKAY)}
        assert bytes(g.page(pages[0])) == SENTINEL
        assert bytes(g.page(other)) == file_bytes(image, 32 * 512, PAGE)
        # Closing the queue ends every mapping: the rest can be revoked, and a new queue (either mode) never
        # writes those pages either.
        requeue(rig, persistent=True)
        for r, p in zip(refs[1:], pages[1:], strict=True):
            g.revoke(r)
            g.page(p)[:] = SENTINEL
        for persistent in (True, False):
            if not persistent:
                requeue(rig, persistent=False)
            res = rig.run([wire.rw(Abi.X86_64, 0, 10 + i, 0, [(r, 0, 7)]) for i, r in enumerate(refs)])
            assert sorted(res.values()) == [(0, ERROR)] * 3
            assert all(bytes(g.page(p)) == SENTINEL for p in pages)
        assert rig.q.stats()["err_grant"] == 3
    finally:
        rig.close()
        drv.close()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "preadv"])
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "copy"])
def test_readonly_grant_refused_for_reads(image: Path, mapped: bool, persistent: bool) -> None:
    """A READ into a read-only grant fails that request (the page keeps its bytes); in the same batch the
    other reads get their data, a WRITE from a read-only grant works (the backend only reads it), and the
    queue goes on serving."""
    drv = open_driver(image, mapped)
    rig = Rig(drv.engine(), abi=Abi.X86_64, sectors=DISK // 512, persistent=persistent)
    g = rig.g
    try:
        ro_page, src_page, ok_page = g.alloc(3)
        g.page(ro_page)[:] = SENTINEL
        ro = g.grant(ro_page, readonly=True)
        payload = random.Random(5).randbytes(PAGE)
        g.page(src_page)[:] = payload
        src_ro = g.grant(src_page, readonly=True)
        ok = g.grant(ok_page)
        a = 2 * 512 * 8
        slots = [
            wire.rw(Abi.X86_64, 0, 1, 0, [(ro, 0, 7)]),
            wire.rw(Abi.X86_64, 0, 2, 8, [(ok, 0, 7)]),
            wire.rw(Abi.X86_64, 0, 3, 16, [(rig.data_refs[0], 0, 7), (ro, 0, 7)]),  # one bad segment of two
        ]
        res = rig.run(slots)
        assert res == {1: (0, ERROR), 2: (0, OKAY), 3: (0, ERROR)}
        assert bytes(g.page(ro_page)) == SENTINEL
        assert bytes(g.page(ok_page)) == file_bytes(image, 8 * 512, PAGE)
        assert rig.q.stats()["err_grant"] == 2
        res = rig.run([wire.rw(Abi.X86_64, 1, 4, a // 512, [(src_ro, 0, 7)])])
        assert res == {4: (1, OKAY)} and file_bytes(image, a, PAGE) == payload
        slot, p = rig.request(0, a // 512, PAGE)
        assert rig.run([slot]) == {p.rid: (0, OKAY)} and rig.gather(p) == payload
    finally:
        rig.close()
        drv.close()


def test_image_shrunk_under_its_mapping(image: Path) -> None:
    """The image truncated while mapped (an operator's mistake, not the guest's): the copy from a page past
    the new end faults; that request is redone with a syscall and fails with an error, the process lives
    and the part still there is served."""
    drv = open_driver(image, True)
    rig = Rig(drv.engine(), abi=Abi.X86_64, sectors=DISK // 512, persistent=True)
    try:
        os.truncate(image, DISK // 2)
        near, np_ = rig.request(0, 0, 8192)
        far, fp = rig.request(0, (DISK * 3 // 4) // 512, 8192)
        wfar, wp = rig.request(1, (DISK * 3 // 4) // 512, 4096, data=b"w" * 4096)
        res = rig.run([near, far])
        assert res == {np_.rid: (0, OKAY), fp.rid: (0, ERROR)}
        assert rig.gather(np_) == file_bytes(image, 0, 8192)
        assert drv.engine().map_faults >= 1
        # A write past the new end faults too and goes to pwritev, which extends the file as an unmapped
        # engine would have.
        assert rig.run([wfar]) == {wp.rid: (1, OKAY)}
        assert file_bytes(image, DISK * 3 // 4, 4096) == b"w" * 4096
    finally:
        rig.close()
        drv.close()


def test_mapping_choice(tmp_path: Path, image: Path) -> None:
    """Mapped by default only for fully allocated images on a memory filesystem; a sparse one stays on preadv
    (a read of a hole through the mapping would allocate its page)."""
    sparse = image.with_suffix(".sparse")
    with open(sparse, "wb") as f:
        f.truncate(DISK)
    try:
        for path, want in ((image, True), (sparse, False)):
            d = FileDriver(path)
            d.open()
            try:
                assert d.mapped_io == want, path
            finally:
                d.close()
    finally:
        sparse.unlink()
    threaded = tmp_path / "t.img"
    threaded.write_bytes(b"\0" * DISK)
    d = FileDriver(threaded, mode="threaded", threads=1, mapped=True)
    d.open()
    try:
        assert not d.mapped_io  # only inline engines map
    finally:
        d.close()
