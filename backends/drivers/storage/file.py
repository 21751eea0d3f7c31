"""Regular files and block devices, served by the C FILE engine.

Inline vs threaded is the one decision that matters for speed (reference/baselines-storage-tpm.md): a file
in tmpfs or the page cache answers preadv in ~0.7 us, while handing an op to another thread costs a
cross-vCPU wakeup (~20 us each way), so such files run inline in the pumping thread, buffered.  Files on a
filesystem that accepts O_DIRECT, and block devices, get O_DIRECT and a worker pool: the device latency
dominates and concurrency buys IOPS.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Literal

from backends.drivers.storage.base import IoEngine, StorageCaps, StorageDriver, StorageError

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# Filesystems whose data is the page cache itself: O_DIRECT buys nothing and io_uring/threads only add wakeups.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs", "devtmpfs"})
DEFAULT_THREADS = 4

Mode = Literal["auto", "inline", "threaded"]


def filesystem_type(path: str) -> str:
    """fstype of the mount holding `path` (longest mount-point prefix in /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best, best_type = "", ""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = fields[4].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, best_type = mnt, right.split()[0]
    return best_type


def _punch_hole_works(fd: int, size: int) -> bool:
    """Probe hole punching past EOF (KEEP_SIZE: changes nothing) so discard is only offered if it works."""
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return int(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size, 4096)) == 0


def _sysfs_int(dev: int, name: str) -> int:
    try:
        return int(Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/{name}").read_text().strip())
    except (OSError, ValueError):
        return 0


class FileDriver(StorageDriver):
    """A raw image file or a block device.

    mode: "auto" (inline for memory filesystems, threaded otherwise), "inline" or "threaded".
    direct: O_DIRECT; None = when threaded and the store accepts it.
    mapped: inline only: serve reads and writes through a shared mapping of the file (one memcpy per segment,
      no syscall); None = for images on a memory filesystem whose every block is allocated (a read of a
      hole through the mapping would allocate the page, so a sparse image is left to preadv).
    """

    name = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        mode: Mode = "auto",
        direct: bool | None = None,
        threads: int = DEFAULT_THREADS,
        sector_size: int = 512,
        discard: bool = True,
        mapped: bool | None = None,
    ) -> None:
        if mode not in ("auto", "inline", "threaded"):
            raise StorageError(f"file: unknown mode {mode!r}")
        if sector_size not in (512, 1024, 2048, 4096):
            raise StorageError(f"file: sector size {sector_size} is not 512..4096")
        if not 1 <= threads <= 256:
            raise StorageError(f"file: threads {threads} not in 1..256")
        self.path = os.fspath(path)
        self.readonly = readonly
        self.mode: Mode = mode
        self.direct = direct
        self.threads = threads
        self.sector_size = sector_size
        self.discard = discard
        self.mapped = mapped
        self.mapped_io = False  # after open(): reads and writes go through the mapping
        self._fd = -1
        self._caps: StorageCaps | None = None
        self._engine: IoEngine | None = None

    def _open_fd(self, direct: bool) -> int:
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            # A guest's reads are not the host's accesses: without O_NOATIME every read of a buffered image
            # checks (and now and then writes) the image's atime (~3 % of a 4 KiB tmpfs read).  Only the
            # owner (or CAP_FOWNER) may ask for it; anybody else gets the plain open.
            return os.open(self.path, flags | os.O_NOATIME)
        except PermissionError:
            return os.open(self.path, flags)

    def open(self) -> None:
        if self._engine is not None:
            return
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise StorageError(exc.errno or errno.ENOENT, f"file: {self.path}: {exc.strerror}") from exc
        is_blk = stat.S_ISBLK(st.st_mode)
        if not is_blk and not stat.S_ISREG(st.st_mode):
            raise StorageError(errno.EINVAL, f"file: {self.path} is neither a regular file nor a block device")
        fstype = "" if is_blk else filesystem_type(self.path)
        threaded = self.mode == "threaded" or (self.mode == "auto" and fstype not in MEMORY_FILESYSTEMS)
        want_direct = threaded if self.direct is None else self.direct
        try:
            fd = self._open_fd(want_direct)
            direct = want_direct
        except OSError as exc:
            if not want_direct or self.direct is True or exc.errno != errno.EINVAL:
                raise StorageError(exc.errno or errno.EIO, f"file: {self.path}: {exc.strerror}") from exc
            fd = self._open_fd(False)  # the filesystem refuses O_DIRECT: stay buffered
            direct = False
        try:
            self._caps = self._probe(fd, st, is_blk, threaded, direct)
            self._engine = IoEngine.file(fd, self.threads if threaded else 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        allocated = not is_blk and st.st_blocks * 512 >= st.st_size
        if not threaded and (self.mapped or (self.mapped is None and fstype in MEMORY_FILESYSTEMS and allocated)):
            try:
                self._engine.map_file()
                self.mapped_io = True
            except StorageError as exc:
                log.warning("file: %s: served by preadv/pwritev, not mapped: %s", self.path, exc)

    def _probe(self, fd: int, st: os.stat_result, is_blk: bool, threaded: bool, direct: bool) -> StorageCaps:
        if is_blk:
            size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            logical = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
            physical = struct.unpack("i", fcntl.ioctl(fd, BLKPBSZGET, b"\0" * 4))[0]
            logical = max(logical, self.sector_size)
            can_discard = self.discard and not self.readonly and _sysfs_int(st.st_rdev, "discard_max_bytes") > 0
            granularity = _sysfs_int(st.st_rdev, "discard_granularity") if can_discard else 0
        else:
            size = st.st_size
            logical = self.sector_size
            physical = max(4096, logical)
            can_discard = self.discard and not self.readonly and _punch_hole_works(fd, size)
            granularity = 4096
        if size <= 0 or size % logical:
            raise StorageError(errno.EINVAL, f"file: {self.path}: size {size} is not a multiple of {logical}")
        return StorageCaps(
            size_bytes=size,
            logical_sector_size=logical,
            physical_sector_size=max(physical, logical),
            readonly=self.readonly,
            can_discard=can_discard,
            can_secure_discard=False,  # BLKSECDISCARD support is not visible in sysfs: do not promise it
            discard_granularity=granularity or logical,
            needs_flush=True,
            threaded=threaded,
            direct_io=direct,
        )

    def capabilities(self) -> StorageCaps:
        if self._caps is None:
            raise StorageError("file driver not open")
        return self._caps

    def current_size(self) -> int | None:
        """Size of the open file or device now (an operator grew the image or the LV); the sector-size multiple
        below it, so a partial last sector is never exposed."""
        if self._fd < 0 or self._caps is None:
            return None
        st = os.fstat(self._fd)
        if stat.S_ISBLK(st.st_mode):
            size = int(struct.unpack("Q", fcntl.ioctl(self._fd, BLKGETSIZE64, b"\0" * 8))[0])
        else:
            size = st.st_size
        logical = self._caps.logical_sector_size
        return size - size % logical

    def engine(self) -> IoEngine:
        if self._engine is None:
            raise StorageError("file driver not open")
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
