"""Typed wrapper over a `struct pv_evtchn *` (csrc/platform.h), shared by both platforms."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, ClassVar

from backends.native import ffi, lib


class NativeEventChannel:
    """One bound port.  `on_close` runs after the C object is freed (the emulated platform tells its broker)."""

    live: ClassVar[int] = 0  # channels of this process not yet closed: leak checks read it

    def __init__(self, c: Any, on_close: Callable[[NativeEventChannel], None] | None = None) -> None:
        if c == ffi.NULL:
            raise OSError(ffi.errno or errno.EINVAL, "cannot open event channel")
        self._c: Any = c
        self._on_close = on_close
        self.local_port = int(c.local_port)
        self.remote_domid = int(c.remote_domid)
        self.remote_port = int(c.remote_port)
        NativeEventChannel.live += 1

    @property
    def c(self) -> Any:
        if self._c is None:
            raise ValueError(f"event channel port {self.local_port} closed")
        return self._c

    @property
    def closed(self) -> bool:
        return self._c is None

    def fileno(self) -> int:
        return int(self.c.fd)

    @staticmethod
    def _check(rc: int, what: str) -> int:
        if rc < 0:
            raise OSError(-rc, f"event channel {what}: {os.strerror(-rc)}")
        return rc

    def notify(self) -> None:
        self._check(int(lib.pv_evtchn_do_notify(self.c)), "notify")

    def pending(self) -> bool:
        return self._check(int(lib.pv_evtchn_do_pending(self.c)), "pending") > 0

    def unmask(self) -> None:
        self._check(int(lib.pv_evtchn_do_unmask(self.c)), "unmask")

    def close(self) -> None:
        if self._c is None:
            return
        c, self._c = self._c, None
        NativeEventChannel.live -= 1
        lib.pv_evtchn_close(c)
        if self._on_close is not None:
            self._on_close(self)

    def __enter__(self) -> NativeEventChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_emulated(
    wake_fd: int,
    notify_fd: int,
    local_port: int,
    remote_domid: int,
    remote_port: int,
    on_close: Callable[[NativeEventChannel], None] | None = None,
) -> NativeEventChannel:
    """Wrap an eventfd pair; takes ownership of both fds (closes them on failure too)."""
    c = lib.pv_evtchn_emu_open(wake_fd, notify_fd, local_port, remote_domid, remote_port)
    if c == ffi.NULL:
        err = ffi.errno
        os.close(wake_fd)
        os.close(notify_fd)
        raise OSError(err, f"cannot open emulated event channel: {os.strerror(err)}")
    return NativeEventChannel(c, on_close)
