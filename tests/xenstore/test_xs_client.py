"""The asyncio client against pvback's server: every method, concurrency, limits, close and failure
semantics, and the character-device transport (a pty stands in for /dev/xen/xenbus)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tty
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from backends.xenstore.client import Transaction, XenStoreClient, XenStoreError
from backends.xenstore.server import XenStoreServer
from backends.xenstore.wire import HEADER_SIZE, PAYLOAD_MAX, Perm, XsType, pack, unpack_header

from .conftest import Env

EnvFactory = Callable[..., AbstractAsyncContextManager[Env]]


async def _err(coro: object) -> str:
    with pytest.raises(XenStoreError) as ei:
        await coro  # type: ignore[misc]
    return ei.value.name


async def test_connect_finds_the_daemon(xs_env: EnvFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with xs_env() as env:
        monkeypatch.setenv("XENSTORED_PATH", env.sock)
        async with await XenStoreClient.connect() as c:
            assert await c.directory("/") == ["tool"]
        # XENSTORED_RUNDIR/socket when XENSTORED_PATH is unset.
        monkeypatch.delenv("XENSTORED_PATH")
        rundir = tmp_path / "run"
        rundir.mkdir()
        os.symlink(env.sock, rundir / "socket")
        monkeypatch.setenv("XENSTORED_RUNDIR", str(rundir))
        async with await XenStoreClient.connect() as c:
            assert await c.exists("/tool/xenstored")
        monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "nothing-here"))
        with pytest.raises(XenStoreError) as ei:
            await XenStoreClient.connect()
        assert ei.value.name == "ENOENT"
        assert "nothing-here" in str(ei.value)


async def test_every_node_method(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        xs = env.dom0
        await xs.write("/m/s", "text é")
        await xs.write("/m/b", b"\x00\x01\xff")
        assert await xs.read("/m/s") == "text é".encode()
        assert await xs.read("/m/b") == b"\x00\x01\xff"
        assert await xs.read_str("/m/s") == "text é"
        assert await xs.read_str("/m/none") is None
        assert await _err(xs.read_str("/m/b")) == "EINVAL"  # not UTF-8: a clear error, not garbage
        assert await _err(xs.read("/m/none")) == "ENOENT"
        await xs.mkdir("/m/dir/sub")
        await xs.mkdir("/m/dir/sub")  # exists: fine
        assert await xs.read("/m/dir/sub") == b""
        assert await xs.directory("/m") == ["s", "b", "dir"]
        assert await xs.directory("/m/dir/sub") == []
        assert await xs.exists("/m/dir")
        assert not await xs.exists("/m/nope")
        await xs.set_perms("/m/s", [Perm(0, "n"), Perm(3, "r"), Perm(4, "w"), Perm(5, "b")])
        assert await xs.get_perms("/m/s") == [Perm(0, "n"), Perm(3, "r"), Perm(4, "w"), Perm(5, "b")]
        await xs.rm("/m/dir")
        assert await xs.directory("/m") == ["s", "b"]
        await xs.rm("/m/dir")  # absent with parent present: fine
        assert await _err(xs.rm("/m/dir/x")) == "ENOENT"
        assert await xs.get_domain_path(17) == "/local/domain/17"
        assert b"nodes: 1000" in await xs.control("quota")
        with pytest.raises(ValueError):
            await xs.set_perms("/m/s", [])
        with pytest.raises(ValueError):
            Perm(1, "x")


async def test_transaction_methods(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        xs = env.dom0

        async def body(t: Transaction) -> list[str]:
            await t.write("/t/a", "1")
            await t.mkdir("/t/d")
            await t.set_perms("/t/a", [Perm(0, "n"), Perm(2, "r")])
            assert await t.get_perms("/t/a") == [Perm(0, "n"), Perm(2, "r")]
            assert await t.read_str("/t/a") == "1"
            assert await t.exists("/t/d")
            await t.rm("/t/d")
            return await t.directory("/t")

        assert await xs.transaction(body) == ["a"]
        assert await xs.get_perms("/t/a") == [Perm(0, "n"), Perm(2, "r")]
        # tx= on the client is the same thing.
        t = await xs.transaction_start()
        await xs.write("/t/b", "2", tx=t.id)
        assert await xs.read("/t/b", tx=t.id) == b"2"
        assert not await xs.exists("/t/b")
        await t.commit()
        assert await xs.read("/t/b") == b"2"


async def test_big_directory_uses_directory_part(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        names = [f"child-with-a-long-name-{i:05d}" for i in range(400)]  # ~12 KiB of names
        await asyncio.gather(*(env.dom0.write(f"/big/{n}", "") for n in names))
        with pytest.raises(XenStoreError) as ei:
            await env.dom0._request(XsType.DIRECTORY, b"/big\0", 0)
        assert ei.value.name == "E2BIG"
        assert await env.dom0.directory("/big") == names
        # Through Debian's libxenstore too (it falls back to DIRECTORY_PART the same way).
        proc = await asyncio.create_subprocess_exec(
            "xenstore-list",
            "/big",
            env={**os.environ, "XENSTORED_PATH": env.sock},
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert out.decode().split() == names


async def test_limits_checked_before_sending(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        xs = env.dom0
        assert await _err(xs.write("/v", b"x" * PAYLOAD_MAX)) == "E2BIG"  # path + NUL + value > 4096
        await xs.write("/v", b"x" * (PAYLOAD_MAX - 3))
        assert len(await xs.read("/v")) == PAYLOAD_MAX - 3
        assert await _err(xs.write("/a\0b", "x")) == "EINVAL"
        assert await _err(xs.read("/é")) == "EINVAL"
        assert not xs.closed


async def test_many_concurrent_requests(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        xs = env.dom0
        n = 1000
        await asyncio.gather(*(xs.write(f"/cc/{i}", str(i * 7)) for i in range(n)))
        values = await asyncio.gather(*(xs.read(f"/cc/{i}") for i in range(n)))
        assert values == [str(i * 7).encode() for i in range(n)]
        mixed = await asyncio.gather(
            *(xs.read(f"/cc/{i}") if i % 2 else xs.read(f"/cc/missing{i}") for i in range(200)),
            return_exceptions=True,
        )
        for i, r in enumerate(mixed):
            if i % 2:
                assert r == str(i * 7).encode()
            else:
                assert isinstance(r, XenStoreError) and r.name == "ENOENT"
        assert len(xs._pending) == 0


async def test_cancelled_request_does_not_confuse_later_ones(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        xs = env.dom0
        await xs.write("/k", "v")
        task = asyncio.ensure_future(xs.read("/k"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await xs.read("/k") == b"v"
        assert await xs.directory("/") == ["tool", "k"]


async def test_watch_context_manager_and_close(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        xs = env.dom0
        async with await xs.watch("/wc") as w:
            assert await w.next(1) == "/wc"
            await xs.write("/wc/x", "1")
            assert await w.next(1) == "/wc/x"
        assert w.closed
        assert env.server.stats()["watches"] == 0
        w2 = await xs.watch("/wc")
        await xs.close()
        assert [p async for p in w2] == ["/wc"]  # what was queued, then the end
        assert await _err(xs.read("/wc")) == "EPIPE"


async def _fake_server() -> tuple[XenStoreClient, socket.socket]:
    a, b = socket.socketpair()
    b.setblocking(False)
    return await XenStoreClient.from_socket(a), b


def _recv_msg(sock: socket.socket) -> tuple[int, int, int, bytes]:
    sock.setblocking(True)
    hdr = sock.recv(HEADER_SIZE, socket.MSG_WAITALL)
    t, r, x, n = unpack_header(hdr)
    body = sock.recv(n, socket.MSG_WAITALL) if n else b""
    sock.setblocking(False)
    return t, r, x, body


async def test_close_fails_pending_requests() -> None:
    xs, peer = await _fake_server()
    task = asyncio.ensure_future(xs.read("/never-answered"))
    await asyncio.sleep(0.01)
    assert _recv_msg(peer)[0] == XsType.READ
    await xs.close()
    with pytest.raises(XenStoreError) as ei:
        await task
    assert ei.value.name == "EPIPE"
    peer.close()


async def test_lost_connection_fails_requests_and_watches() -> None:
    xs, peer = await _fake_server()
    loop = asyncio.get_running_loop()
    wtask = asyncio.ensure_future(xs.watch("/w"))
    await asyncio.sleep(0.01)
    _, r, _, _ = _recv_msg(peer)
    await loop.sock_sendall(peer, pack(XsType.WATCH, r, 0, b"OK\0") + pack(XsType.WATCH_EVENT, 0, 0, b"/w\0pvback:1\0"))
    w = await wtask
    assert await w.next(1) == "/w"
    pending = asyncio.ensure_future(xs.read("/x"))
    await asyncio.sleep(0.01)
    peer.close()
    with pytest.raises(XenStoreError) as ei:
        await pending
    assert ei.value.name == "ECONNRESET"
    with pytest.raises(XenStoreError):
        await w.next(1)
    assert xs.closed


async def test_protocol_errors_close_the_client() -> None:
    xs, peer = await _fake_server()
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(xs.read("/x"))
    await asyncio.sleep(0.01)
    _, r, _, _ = _recv_msg(peer)
    # A reply to an id nobody asked for is ignored; one of the wrong type ends the connection.
    await loop.sock_sendall(peer, pack(XsType.READ, r + 1000, 0, b"stray"))
    await loop.sock_sendall(peer, pack(XsType.DIRECTORY, r, 0, b"a\0"))
    with pytest.raises(XenStoreError) as ei:
        await task
    assert ei.value.name == "EIO"
    assert xs.closed
    peer.close()
    # Unknown error names read as EINVAL, as in libxenstore.
    xs, peer = await _fake_server()
    task = asyncio.ensure_future(xs.read("/x"))
    await asyncio.sleep(0.01)
    _, r, _, _ = _recv_msg(peer)
    await loop.sock_sendall(peer, pack(XsType.ERROR, r, 0, b"EQUOTA\0"))
    with pytest.raises(XenStoreError) as ei:
        await task
    assert ei.value.name == "EINVAL"
    await xs.close()
    peer.close()


@contextlib.asynccontextmanager
async def _xenbus_pty(tmp_path: Path, down: Callable[[bytes], None] | None = None,
                      up: Callable[[bytes], None] | None = None) -> AsyncIterator[str]:
    """/dev/xen/xenbus is a character device with the same framing: a raw pty relayed to a server stands in
    for it (its path is yielded).  `down`/`up` see the bytes going to the server and coming back."""
    server = XenStoreServer()
    await server.listen(str(tmp_path / "s"))
    master, slave = os.openpty()
    tty.setraw(slave)
    sock = server.connect_domain(0)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    def from_device() -> None:
        data = os.read(master, 65536)
        if down is not None:
            down(data)
        sock.sendall(data)

    def to_device() -> None:
        data = sock.recv(65536)
        if up is not None:
            up(data)
        view = memoryview(data)
        while view:
            view = view[os.write(master, view) :]

    loop.add_reader(master, from_device)
    loop.add_reader(sock.fileno(), to_device)
    try:
        yield os.ttyname(slave)
    finally:
        loop.remove_reader(master)
        loop.remove_reader(sock.fileno())
        sock.close()
        os.close(master)
        os.close(slave)
        await server.close()


async def test_character_device_transport(tmp_path: Path) -> None:
    """The O_RDWR + add_reader path, through a pty standing in for /dev/xen/xenbus."""
    async with _xenbus_pty(tmp_path) as path:
        xs = await XenStoreClient.connect(path)
        assert xs._device is not None
        await xs.write("/dev/test", "via device")
        assert await xs.read("/dev/test") == b"via device"
        results = await asyncio.gather(*(xs.read("/dev/test") for _ in range(20)))
        assert results == [b"via device"] * 20
        w = await xs.watch("/dev")
        assert await w.next(1) == "/dev"
        await xs.write("/dev/other", "1")
        assert await w.next(1) == "/dev/other"
        await xs.close()


async def test_character_device_one_request_in_flight(tmp_path: Path) -> None:
    """Linux's /dev/xen/xenbus reads a request's payload after write() returned, from the buffer the next write
    refills: the client must write a request only once the last one's reply came, however many callers wait
    (as libxenstore does).  The relay counts requests written and replies read back."""
    seen = {"requests": 0, "replies": 0, "most_in_flight": 0}
    down_buf = bytearray()  # client -> server, framed here to count whole requests
    up_buf = bytearray()  # server -> client

    def frames(buf: bytearray) -> list[int]:
        types = []
        while len(buf) >= HEADER_SIZE:
            type_, _req, _tx, length = unpack_header(bytes(buf[:HEADER_SIZE]))
            if len(buf) < HEADER_SIZE + length:
                break
            types.append(type_)
            del buf[:HEADER_SIZE + length]
        return types

    def down(data: bytes) -> None:
        down_buf.extend(data)
        seen["requests"] += len(frames(down_buf))
        seen["most_in_flight"] = max(seen["most_in_flight"], seen["requests"] - seen["replies"])

    def up(data: bytes) -> None:
        up_buf.extend(data)
        seen["replies"] += sum(1 for t in frames(up_buf) if t != XsType.WATCH_EVENT)

    async with _xenbus_pty(tmp_path, down, up) as path:
        xs = await XenStoreClient.connect(path)
        w = await xs.watch("/dev")
        writes = [xs.write(f"/dev/k{i}", f"value {i}" * (i + 1)) for i in range(16)]
        await asyncio.gather(*writes, w.next(2))
        values = await asyncio.gather(*(xs.read(f"/dev/k{i}") for i in range(16)))
        assert values == [f"value {i}".encode() * (i + 1) for i in range(16)]

        async def body(tx: Transaction) -> None:
            await asyncio.gather(*(tx.write(f"/dev/t{i}", "x") for i in range(8)))

        await xs.transaction(body)
        names = [*(f"k{i}" for i in range(16)), *(f"t{i}" for i in range(8))]
        assert sorted(await xs.directory("/dev")) == sorted(names)
        await xs.close()
        assert seen["requests"] >= 16 + 16 + 8
        assert seen["most_in_flight"] == 1, seen
