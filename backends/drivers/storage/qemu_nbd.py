"""Image formats QEMU knows (qcow2, vmdk, ...) served by a private qemu-nbd child and read through NbdDriver.

Target: `FORMAT:/path/to/image`, e.g. `qcow2:/var/lib/images/vm1.qcow2`.  qemu-nbd listens on a unix socket in
a private 0700 directory; the driver owns the child (started at open, stopped by PID at close) and restarts it
if it dies, before the NBD driver's reconnect attempts (the replay log covers what its cache lost).

Cache mode: `--cache=none --aio=native` (O_DIRECT: the guest's flushes reach the disk, no double caching),
and on file systems that refuse O_DIRECT (tmpfs) `--cache=writeback --aio=threads`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from backends.drivers.storage.base import IoEngine, StorageCaps, StorageDriver, StorageError
from backends.drivers.storage.nbd import NbdDriver
from backends.drivers.storage.nbd_target import NbdTarget

log = logging.getLogger("pvback.storage.qemu_nbd")

# Formats qemu-img can serve read-write or read-only; others ("file", "nbd") belong to other drivers.
FORMATS = frozenset({"qcow2", "qcow", "raw", "vmdk", "vdi", "vhdx", "vpc", "qed", "parallels", "dmg", "bochs", "cloop"})
Cache = Literal["auto", "none", "writeback"]


def parse_image_target(target: str) -> tuple[str, str]:
    fmt, sep, path = target.partition(":")
    if not sep or fmt not in FORMATS or not path:
        raise StorageError(
            errno.EINVAL, f"qemu-nbd: {target!r}: expected FORMAT:/path with FORMAT in {sorted(FORMATS)}"
        )
    return fmt, path


def o_direct_works(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise StorageError(exc.errno or errno.EIO, f"qemu-nbd: {path}: {exc.strerror}") from exc
    os.close(fd)
    return True


class QemuNbdDriver(StorageDriver):
    name = "qemu-nbd"

    def __init__(
        self,
        target: str,
        *,
        readonly: bool = False,
        cache: Cache = "auto",
        start_timeout: float = 10.0,
        qemu_nbd: str | None = None,
        **nbd_options: Any,
    ) -> None:
        self.format, self.path = parse_image_target(target)
        if cache not in ("auto", "none", "writeback"):
            raise StorageError(errno.EINVAL, f"qemu-nbd: unknown cache mode {cache!r}")
        self.readonly = readonly
        self.cache: Cache = cache
        self.start_timeout = start_timeout
        self.binary = qemu_nbd or shutil.which("qemu-nbd") or "qemu-nbd"
        self.nbd_options = nbd_options
        self.direct = False
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._nbd: NbdDriver | None = None
        self._lock = threading.Lock()  # the reconnect hook runs in a worker thread

    @property
    def socket_path(self) -> Path:
        if self._dir is None:
            raise StorageError("qemu-nbd driver not open")
        return self._dir / "nbd.sock"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _command(self, direct: bool) -> list[str]:
        cmd = [
            self.binary,
            "--persistent",
            "--shared=8",
            f"--socket={self.socket_path}",
            f"--format={self.format}",
            "--discard=unmap",
            *(["--cache=none", "--aio=native"] if direct else ["--cache=writeback", "--aio=threads"]),
        ]
        if self.readonly:
            cmd.append("--read-only")
        return [*cmd, self.path]

    def _start(self) -> None:
        sock = self.socket_path
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        logfile = sock.with_name("qemu-nbd.log")
        with open(logfile, "wb") as logf:
            proc = subprocess.Popen(
                self._command(self.direct), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
            )
        self._proc = proc
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                self._proc = None
                msg = logfile.read_text(errors="replace").strip() or f"exit status {proc.returncode}"
                raise StorageError(errno.EIO, f"qemu-nbd: {self.format}:{self.path}: {msg}")
            if sock.exists() and _accepts(sock):
                return
            if time.monotonic() > deadline:
                self._stop()
                raise StorageError(errno.ETIMEDOUT, f"qemu-nbd: {self.path}: no socket after {self.start_timeout:g}s")
            time.sleep(0.01)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def _restart_if_dead(self) -> None:
        with self._lock:
            if self._dir is not None and (self._proc is None or self._proc.poll() is not None):
                log.warning("qemu-nbd for %s died; restarting it", self.path)
                self._proc = None
                self._start()

    def open(self) -> None:
        if self._nbd is not None:
            return
        if not os.path.exists(self.path):
            raise StorageError(errno.ENOENT, f"qemu-nbd: {self.path}: no such file")
        self.direct = self.cache == "none" or (self.cache == "auto" and o_direct_works(self.path))
        self._dir = Path(tempfile.mkdtemp(prefix="pvback-qemu-nbd-"))
        try:
            with self._lock:
                try:
                    self._start()
                except StorageError as exc:
                    if not (self.direct and self.cache == "auto"):
                        raise
                    # O_DIRECT opened, yet qemu-nbd refused it (no linux-aio, odd alignment): go buffered.
                    log.warning("qemu-nbd: %s: --cache=none failed (%s); using --cache=writeback", self.path, exc)
                    self.direct = False
                    self._start()
            nbd = NbdDriver(
                NbdTarget(socket_path=str(self.socket_path)),
                readonly=self.readonly,
                before_reconnect=self._restart_if_dead,
                **self.nbd_options,
            )
            nbd.open()
            self._nbd = nbd
        except BaseException:
            self.close()
            raise

    def capabilities(self) -> StorageCaps:
        return self.nbd.capabilities()

    def engine(self) -> IoEngine:
        return self.nbd.engine()

    @property
    def nbd(self) -> NbdDriver:
        if self._nbd is None:
            raise StorageError("qemu-nbd driver not open")
        return self._nbd

    def close(self) -> None:
        if self._nbd is not None:
            self._nbd.close()
            self._nbd = None
        with self._lock:
            self._stop()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None


def _accepts(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
