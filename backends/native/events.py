"""Typed wrapper over a `struct pv_evtchn *` (csrc/platform.h), shared by both platforms."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import ClassVar

from backends.native import ffi, lib, struct_pv_evtchn
from backends.native.handle import CHandle


class NativeEventChannel(CHandle[struct_pv_evtchn]):
    """One bound port.  `on_close` runs after the C object is freed (the emulated platform tells its broker)."""

    live: ClassVar[int] = 0  # channels of this process not yet closed: leak checks read it

    def __init__(
        self, c: struct_pv_evtchn, on_close: Callable[[NativeEventChannel], None] | None = None
    ) -> None:
        if c == ffi.NULL:
            raise OSError(ffi.errno or errno.EINVAL, "cannot open event channel")
        super().__init__(c)
        self._on_close = on_close
        self.local_port = int(c.local_port)
        self.remote_domid = int(c.remote_domid)
        self.remote_port = int(c.remote_port)
        NativeEventChannel.live += 1

    def _closed_message(self) -> str:
        return f"event channel port {self.local_port} closed"

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

    def _free(self, c: struct_pv_evtchn) -> None:
        NativeEventChannel.live -= 1
        lib.pv_evtchn_close(c)
        if self._on_close is not None:
            self._on_close(self)


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
