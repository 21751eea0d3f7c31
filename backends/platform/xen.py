"""The real-Xen platform: libxengnttab / libxenevtchn (loaded at run time by csrc/xen_dl.c), the system
xenstored.

Grant references of every domain are reachable through one gntdev handle, so open_domain/close_domain have
nothing to do.  Each bound port gets its own evtchn handle (own fd), so one asyncio reader per port never
sees another port's events.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

from backends.native import ffi, lib, struct_pv_gnt
from backends.native.events import NativeEventChannel
from backends.native.grants import GrantTable
from backends.platform.base import (
    CopySegment,
    EventChannel,
    GrantMapping,
    Platform,
    PlatformError,
    PlatformFeatures,
)
from backends.xenstore import wire

_ERRLEN = 512
XENSTORE_CANDIDATES = ("/var/run/xenstored/socket", "/dev/xen/xenbus")
DOMID_FIRST_RESERVED = 0x7FF0


def find_xenstore(explicit: str | None = None) -> str:
    """XENSTORED_PATH, then the daemon's unix socket, then the kernel's xenbus device (driver domains)."""
    for cand in (explicit, os.environ.get("XENSTORED_PATH"), *XENSTORE_CANDIDATES):
        if cand and os.path.exists(cand):
            return cand
    raise PlatformError(
        "no xenstore: set XENSTORED_PATH or start xenstored "
        f"(looked for {', '.join(XENSTORE_CANDIDATES)})"
    )


def read_own_domid(path: str, timeout: float = 5.0) -> int:
    """The `domid` key relative to our own domain path (xenstored resolves it), read synchronously.

    Start-up code needs the backend domid before any event loop exists; one XS_READ is all it takes.
    Raises OSError/ValueError if the store does not answer sensibly.
    """
    req = wire.pack(wire.XsType.READ, 1, 0, wire.strings("domid"))
    if stat.S_ISSOCK(os.stat(path).st_mode):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(req)
            reply = _recv_reply(s.recv)
    else:
        # /dev/xen/xenbus: one whole message per write, replies read back from the same fd.
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.write(fd, req)
            reply = _recv_reply(lambda n: os.read(fd, n))
        finally:
            os.close(fd)
    type_, payload = reply
    if type_ == wire.XsType.ERROR:
        raise OSError(wire.error_errno(wire.error_name(payload)), f"xenstore read domid: {payload!r}")
    if type_ != wire.XsType.READ:
        raise ValueError(f"xenstore answered a READ with message type {type_}")
    value = payload.rstrip(b"\0").decode("ascii", "replace").strip()
    domid = int(value)
    if not 0 <= domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"xenstore says our domid is {value!r}")
    return domid


def _recv_reply(recv: Any) -> tuple[int, bytes]:
    buf = b""
    while len(buf) < wire.HEADER_SIZE:
        chunk = recv(wire.HEADER_SIZE - len(buf))
        if not chunk:
            raise EOFError("xenstore closed the connection")
        buf += chunk
    type_, _req, _tx, n = wire.unpack_header(buf)
    if n > wire.PAYLOAD_MAX:
        raise ValueError(f"xenstore reply of {n} bytes")
    payload = b""
    while len(payload) < n:
        chunk = recv(n - len(payload))
        if not chunk:
            raise EOFError("xenstore closed the connection")
        payload += chunk
    return type_, payload


class XenPlatform(Platform):
    """Grant tables and event channels of the domain this process runs in (dom0 or a driver domain)."""

    name = "xen"
    # Each bound port opens its own evtchn handle (see above); gntdev and the xenstore are opened once.
    reopened_nodes = ("/dev/xen/evtchn",)

    def __init__(self, *, backend_domid: int | None = None, xenstore_path: str | None = None) -> None:
        err = ffi.new("char[]", _ERRLEN)
        c = lib.pv_gnt_xen_open(err, _ERRLEN)
        if c == ffi.NULL:
            raise PlatformError(f"real Xen platform unavailable: {ffi.string(err).decode(errors='replace')}")
        self._gnt: GrantTable | None = GrantTable(c)
        self._xs_explicit = xenstore_path
        self.features = PlatformFeatures(grant_copy=int(lib.pv_gnt_xen_has_copy(c)) == 1, map_multiple=True)
        self._channels: set[NativeEventChannel] = set()
        if backend_domid is None:
            backend_domid = self._discover_domid()
        self.backend_domid = backend_domid

    def _discover_domid(self) -> int:
        # xen-init-dom0 / libxl write /local/domain/<id>/domid; without a reachable store we can only be dom0.
        try:
            return read_own_domid(find_xenstore(self._xs_explicit))
        except (OSError, ValueError, EOFError, PlatformError):
            return 0

    @property
    def _table(self) -> GrantTable:
        if self._gnt is None:
            raise PlatformError("the Xen platform is closed")
        return self._gnt

    @property
    def gnt(self) -> struct_pv_gnt:
        return self._table.c

    def open_domain(self, domid: int) -> None:
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid} is not a guest")

    def close_domain(self, domid: int) -> None:
        pass

    def map_grants(self, domid: int, refs: list[int], writable: bool) -> GrantMapping:
        return self._table.map(domid, refs, writable)

    def grant_copy(self, segments: list[CopySegment]) -> list[int]:
        return self._table.copy(segments)

    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        if not 0 <= remote_port <= 0xFFFFFFFF:
            raise ValueError(f"event channel port {remote_port} out of range")
        err = ffi.new("char[]", _ERRLEN)
        c = lib.pv_evtchn_xen_bind(domid, remote_port, err, _ERRLEN)
        if c == ffi.NULL:
            raise OSError(ffi.errno, ffi.string(err).decode(errors="replace"))
        ch = NativeEventChannel(c, on_close=self._channels.discard)
        self._channels.add(ch)
        return ch

    def xenstore_path(self) -> str:
        return find_xenstore(self._xs_explicit)

    @property
    def live_mappings(self) -> int:
        return 0 if self._gnt is None else self._gnt.live_mappings

    @property
    def bound_ports(self) -> int:
        return len(self._channels)

    def close(self) -> None:
        for ch in list(self._channels):
            ch.close()
        if self._gnt is not None:
            self._gnt.close()
            self._gnt = None


def xen_available() -> bool:
    """Cheap check for start-up code choosing a platform: are the gntdev and evtchn nodes there?"""
    return Path("/dev/xen/gntdev").exists() and Path("/dev/xen/evtchn").exists()
