"""Host-side checks of the real-Xen platform (the real thing runs in the e2e dom0: test_real_xen.py).

On a machine without Xen, opening it must fail with one clear PlatformError line and no crash; the pieces
that do not need a hypervisor (finding xenstore, reading our own domid over the wire protocol) are checked
against a fake store.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from backends.native import ffi, lib
from backends.platform.base import PlatformError
from backends.platform.xen import XenPlatform, find_xenstore, read_own_domid, xen_available
from backends.xenstore import wire

HAVE_XEN = Path("/dev/xen/gntdev").exists()


def test_open_without_xen_is_a_clear_platform_error() -> None:
    if HAVE_XEN:
        p = XenPlatform(backend_domid=0)
        try:
            assert p.name == "xen" and p.live_mappings == 0
        finally:
            p.close()
        return
    with pytest.raises(PlatformError) as exc:
        XenPlatform()
    msg = str(exc.value)
    assert "/dev/xen/gntdev" in msg
    assert "not running in a Xen domain" in msg or "cannot load" in msg
    assert not xen_available()


def test_evtchn_bind_without_xen_reports_the_node() -> None:
    if HAVE_XEN:
        return
    err = ffi.new("char[]", 256)
    c = lib.pv_evtchn_xen_bind(1, 5, err, 256)
    assert c == ffi.NULL
    assert b"/dev/xen/evtchn" in ffi.string(err)


def test_evtchn_bind_refuses_reserved_domids() -> None:
    err = ffi.new("char[]", 256)
    assert lib.pv_evtchn_xen_bind(0x7FF0, 1, err, 256) == ffi.NULL
    assert b"reserved" in ffi.string(err)


def test_has_copy_rejects_foreign_handles() -> None:
    assert lib.pv_gnt_xen_has_copy(ffi.NULL) == -1


def test_find_xenstore_prefers_explicit_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "a.sock"
    b = tmp_path / "b.sock"
    a.touch()
    b.touch()
    monkeypatch.setenv("XENSTORED_PATH", str(b))
    assert find_xenstore(str(a)) == str(a)
    assert find_xenstore(None) == str(b)
    assert find_xenstore(str(tmp_path / "missing")) == str(b)


def _fake_store(path: str, reply_type: int, payload: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            hdr = conn.recv(wire.HEADER_SIZE)
            t, req_id, tx, n = wire.unpack_header(hdr)
            body = conn.recv(n)
            assert t == wire.XsType.READ and body == b"domid\0"
            conn.sendall(wire.pack(reply_type, req_id, tx, payload))

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return th


def test_read_own_domid_over_the_wire(tmp_path: Path) -> None:
    path = str(tmp_path / "xs.sock")
    th = _fake_store(path, wire.XsType.READ, b"7")
    assert read_own_domid(path) == 7
    th.join(5)


def test_read_own_domid_error_reply(tmp_path: Path) -> None:
    path = str(tmp_path / "xs.sock")
    th = _fake_store(path, wire.XsType.ERROR, b"ENOENT\0")
    with pytest.raises(OSError) as exc:
        read_own_domid(path)
    assert exc.value.errno == 2
    th.join(5)


def test_read_own_domid_rejects_garbage(tmp_path: Path) -> None:
    path = str(tmp_path / "xs.sock")
    th = _fake_store(path, wire.XsType.READ, b"32752")  # DOMID_FIRST_RESERVED
    with pytest.raises(ValueError):
        read_own_domid(path)
    th.join(5)
