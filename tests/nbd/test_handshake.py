"""Target parsing and the handshake: the negotiation paths and a clear error for each way it can fail."""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.drivers.storage.base import StorageError
from backends.drivers.storage.nbd import NbdDriver, NbdError, NbdTarget, parse_target
from tests.nbd.conftest import Harness, needs_nbdkit, read_op, write_op


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("nbd:unix:/run/x.sock", NbdTarget(socket_path="/run/x.sock")),
        ("nbd:unix:/run/x.sock:exportname=disk0", NbdTarget(socket_path="/run/x.sock", export="disk0")),
        ("nbd:127.0.0.1:10810", NbdTarget(host="127.0.0.1", port=10810)),
        ("nbd:localhost:10809:exportname=a/b", NbdTarget(host="localhost", export="a/b")),
        ("nbd://127.0.0.1:10811/vol%201", NbdTarget(host="127.0.0.1", port=10811, export="vol 1")),
        ("nbd://[::1]/", NbdTarget(host="::1", export="")),
        ("nbd://host", NbdTarget(host="host")),
        ("nbd+unix:///exp?socket=/tmp/s.sock", NbdTarget(socket_path="/tmp/s.sock", export="exp")),
        ("nbd+unix://?socket=/tmp/s.sock", NbdTarget(socket_path="/tmp/s.sock")),
    ],
)
def test_parse_target(text: str, want: NbdTarget) -> None:
    assert parse_target(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "nbd:unix:",
        "nbd:unix:/s:export=x",
        "nbd:host",
        "nbd:host:99999",
        "nbd:host:abc",
        "nbd://",
        "nbd://h:notaport/x",
        "nbd+unix:///x",
        "nbd+unix://host/x?socket=/s",
        "file:/x",
        "nbd:unix:/s:exportname=" + "x" * 5000,
    ],
)
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(StorageError):
        parse_target(text)


def test_unreachable_socket(workdir: Path) -> None:
    with pytest.raises(NbdError, match="cannot connect") as ei:
        NbdDriver(f"nbd:unix:{workdir}/nothing.sock").open()
    assert ei.value.errno == errno.ENOENT


class _Server:
    """A unix socket server thread that greets every client with `banner`, then echoes what it receives."""

    def __init__(self, path: Path, banner: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.banner = banner
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.banner)
                while data := conn.recv(4096):
                    conn.sendall(data)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def foreign(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = workdir / "foreign.sock"
    srv = _Server(path, request.param)
    yield path
    srv.close()


@pytest.mark.parametrize("foreign", [b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n"], indirect=True)
def test_not_an_nbd_server(foreign: Path) -> None:
    with pytest.raises(NbdError, match="not an NBD server") as ei:
        NbdDriver(f"nbd:unix:{foreign}", connect_timeout=2).open()
    assert ei.value.errno == errno.EPROTO


@pytest.mark.parametrize("foreign", [b""], indirect=True)
def test_silent_server_times_out(foreign: Path) -> None:
    """A plain echo server says nothing until spoken to: the handshake must time out, not hang."""
    with pytest.raises(NbdError, match="timed out") as ei:
        NbdDriver(f"nbd:unix:{foreign}", connect_timeout=0.3).open()
    assert ei.value.errno == errno.ETIMEDOUT


@needs_nbdkit
def test_unknown_export(nbdkit_factory: Any) -> None:
    srv = nbdkit_factory(["--filter=exportname", "memory", "size=1M", "exportname=disk0", "exportname-strict=true"])
    with pytest.raises(NbdError, match="no such export") as ei:
        NbdDriver(f"nbd:unix:{srv.sock}:exportname=disk9").open()
    assert ei.value.errno == errno.ENOENT
    drv = NbdDriver(f"nbd+unix:///disk0?socket={srv.sock}")
    drv.open()
    assert drv.capabilities().size_bytes == 1 << 20
    drv.close()


@needs_nbdkit
def test_readonly_export_opened_for_write(nbdkit_factory: Any) -> None:
    srv = nbdkit_factory(["-r", "memory", "size=1M"])
    with pytest.raises(NbdError, match="read-only") as ei:
        NbdDriver(srv.uri).open()
    assert ei.value.errno == errno.EROFS


@needs_nbdkit
@pytest.mark.parametrize(
    ("flags", "how"),
    [([], "OPT_GO"), (["--mask-handshake=0"], "EXPORT_NAME"), (["--oldstyle"], "oldstyle")],
)
def test_negotiation_paths(nbdkit_factory: Any, flags: list[str], how: str) -> None:
    """OPT_GO on current servers; EXPORT_NAME when the server is not fixed-newstyle; oldstyle too."""
    srv = nbdkit_factory([*flags, "memory", "size=2M"])
    drv = NbdDriver(srv.uri)
    drv.open()
    try:
        assert drv.export.negotiated_with == how
        assert drv.capabilities().size_bytes == 2 << 20
        h = Harness(drv.engine().c)
        data = bytes(range(256)) * 16
        rd = read_op(8192, 4096)
        assert h.run([write_op(8192, data)]) == [0]
        assert h.run([rd]) == [0]
        assert bytes(rd.buf or b"") == data
        h.close()
    finally:
        drv.close()


@needs_nbdkit
def test_block_size_hints(nbdkit_factory: Any) -> None:
    """NBD_INFO_BLOCK_SIZE becomes the logical/physical sector size hints."""
    srv = nbdkit_factory(
        [
            "--filter=blocksize-policy",
            "memory",
            "size=4M",
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=1M",
        ]
    )
    drv = NbdDriver(srv.uri)
    drv.open()
    try:
        info = drv.export
        assert (info.min_block, info.preferred_block, info.max_block) == (4096, 65536, 1 << 20)
        caps = drv.capabilities()
        assert caps.logical_sector_size == 4096 and caps.physical_sector_size == 4096
    finally:
        drv.close()
