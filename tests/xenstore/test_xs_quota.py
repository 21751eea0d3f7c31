"""Quotas and hostile input: a guest that exceeds a limit gets cxenstored's error (ENOSPC, E2BIG) or is
stopped being read, and every other connection keeps working."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from backends.xenstore.client import Transaction, XenStoreClient, XenStoreError
from backends.xenstore.server import Quotas
from backends.xenstore.wire import HEADER_SIZE, XsType, pack, unpack_header

from .conftest import Env

EnvFactory = Callable[..., AbstractAsyncContextManager[Env]]


async def _err(coro: object) -> str:
    with pytest.raises(XenStoreError) as ei:
        await coro  # type: ignore[misc]
    return ei.value.name


async def _others_work(env: Env, guest: XenStoreClient) -> None:
    await env.dom0.write("/health", "ok")
    assert await env.dom0.read("/health") == b"ok"
    assert await guest.read("ok") == b"1"


async def _conn_of(env: Env, domid: int):  # type: ignore[no-untyped-def]
    """The server side of the (single) connection of `domid`, once it is set up."""
    for _ in range(200):
        conns = [c for c in env.server._conns if c.caller.domid == domid]
        if conns:
            (conn,) = conns
            return conn
        await asyncio.sleep(0.005)
    raise AssertionError(f"no connection for domain {domid}")


async def test_node_quota(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5, g6 = await env.guest(5), await env.guest(6)
        await g6.write("ok", "1")
        results = await asyncio.gather(*(g5.write(f"n/{i}", "x") for i in range(1000)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, XenStoreError)]
        # /local/domain/5 and /local/domain/5/n count too: 1000 in all.
        assert len(results) - len(errors) == 998
        assert {e.name for e in errors} == {"ENOSPC"}
        assert env.server.store.owned_count(5) == 1000
        assert await _err(g5.mkdir("more")) == "ENOSPC"
        await _others_work(env, g6)
        await g6.write("more", "still fine")
        # dom0 is not limited, even writing below the guest's home (nodes it creates keep the guest owner
        # but are not refused).
        await env.dom0.write("/local/domain/5/by-dom0", "x")
        # Freeing nodes gives room again.
        await g5.rm("n/0")
        await g5.rm("n/1")
        await g5.write("again", "x")
        # Transactions are checked too.
        t = await g5.transaction_start()
        assert await _err(t.write("tx/a/b/c", "x")) == "ENOSPC"
        await t.abort()


async def test_entry_size_and_path_limits(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5 = await env.guest(5)
        await g5.write("big", b"x" * 2048)
        assert await _err(g5.write("big", b"x" * 2049)) == "ENOSPC"
        assert await g5.read("big") == b"x" * 2048
        await env.dom0.write("/big", b"y" * 4000)  # dom0 is not limited
        long_rel = "/".join(["abcdefghij"] * 187)  # 2056 bytes below the home directory
        assert await _err(g5.write(long_rel, "x")) == "EINVAL"
        assert await _err(g5.write("a//b", "x")) == "EINVAL"
        assert await _err(g5.write("a/b/", "x")) == "EINVAL"
        assert await _err(g5.write("a b", "x")) == "EINVAL"
        assert await _err(g5.write("@introduceDomain", "x")) == "EINVAL"
        assert await _err(env.dom0.write("/" + "a" * 3072, "x")) == "EINVAL"


async def test_watch_quota(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5, g6 = await env.guest(5), await env.guest(6)
        await g6.write("ok", "1")
        watches = [await g5.watch(f"w{i}") for i in range(128)]
        assert await _err(g5.watch("one-too-many")) == "E2BIG"
        await _others_work(env, g6)
        w6 = await g6.watch("fine")
        assert await w6.next(1) == "fine"
        await watches[0].close()
        await g5.watch("now-fits")
        assert await _err(g5.watch("not-again")) == "E2BIG"


async def test_transaction_quota(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g5, g6 = await env.guest(5), await env.guest(6)
        await g6.write("ok", "1")
        txs = [await g5.transaction_start() for _ in range(10)]
        assert await _err(g5.transaction_start()) == "ENOSPC"
        # The quota is per domain: a second connection of the same domain shares it.
        g5b = await env.guest(5, introduce=False)
        assert await _err(g5b.transaction_start()) == "ENOSPC"
        await _others_work(env, g6)
        t6 = await g6.transaction_start()
        await t6.abort()
        await txs[0].commit()
        t = await g5.transaction_start()
        await t.abort()


async def test_transaction_nodes_quota(xs_env: EnvFactory) -> None:
    async with xs_env(Quotas(transaction_nodes=16)) as env:
        g5 = await env.guest(5)
        for i in range(20):
            await g5.write(f"d/{i}", "x")

        async def touch_all(t: Transaction) -> None:
            for i in range(20):
                await t.read(f"d/{i}")

        assert await _err(g5.transaction(touch_all)) == "ENOSPC"
        # Removing a 21-node subtree in one transaction is over the limit too; outside one it is fine.
        t = await g5.transaction_start()
        assert await _err(t.rm("d")) == "ENOSPC"
        await t.abort()
        await g5.rm("d")
        assert env.server.stats()["transactions"] == 0


async def test_outstanding_replies_stall_only_that_guest(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g6 = await env.guest(6)
        await g6.write("ok", "1")
        await env.server.introduce_domain(5)
        raw = env.server.connect_domain(5)
        raw.setblocking(False)
        loop = asyncio.get_running_loop()
        # A 2000-byte value, then many READs of it without reading a single reply.
        await loop.sock_sendall(raw, pack(XsType.WRITE, 1, 0, b"/local/domain/5/v\0" + b"v" * 2000))
        n = 3000
        requests = b"".join(pack(XsType.READ, 100 + i, 0, b"/local/domain/5/v\0") for i in range(n))
        sent = 0
        while sent < len(requests):  # the server stops reading us, so send what fits and move on
            try:
                sent += raw.send(requests[sent : sent + 65536])
            except BlockingIOError:
                break
            await asyncio.sleep(0.01)
        conn = await _conn_of(env, 5)
        for _ in range(100):
            if conn.read_paused:
                break
            await asyncio.sleep(0.01)
        assert conn.read_paused, "server kept reading a guest that does not read its replies"
        assert conn.out_replies <= env.server.quotas.outstanding
        assert conn.requests < n + 1
        # Everyone else is served promptly.
        await asyncio.wait_for(_others_work(env, g6), 1)
        # Once the guest reads, it gets every reply, in order, and the rest of its requests are served.
        raw.setblocking(True)
        raw.settimeout(5)
        if sent < len(requests):
            rest = requests[sent:]

            def pump() -> None:
                raw.sendall(rest)

            sender = loop.run_in_executor(None, pump)
        else:
            sender = None
        got = await loop.run_in_executor(None, _read_replies, raw, n + 1)
        if sender is not None:
            await sender
        assert got[0] == (XsType.WRITE, 1, b"OK\0")
        assert [r[1] for r in got[1:]] == [100 + i for i in range(n)]
        assert all(r[0] == XsType.READ and r[2] == b"v" * 2000 for r in got[1:])
        raw.close()


def _read_replies(sock: socket.socket, count: int) -> list[tuple[int, int, bytes]]:
    buf = b""
    out: list[tuple[int, int, bytes]] = []
    while len(out) < count:
        chunk = sock.recv(1 << 16)
        assert chunk, "connection closed"
        buf += chunk
        while len(buf) >= HEADER_SIZE:
            t, r, _, n = unpack_header(buf)
            if len(buf) < HEADER_SIZE + n:
                break
            out.append((t, r, buf[HEADER_SIZE : HEADER_SIZE + n]))
            buf = buf[HEADER_SIZE + n :]
    return out


async def test_pending_watch_events_capped(xs_env: EnvFactory) -> None:
    async with xs_env(Quotas(pending_watch_events=8)) as env:
        g6 = await env.guest(6)
        await g6.write("ok", "1")
        await env.server.introduce_domain(5)
        raw = env.server.connect_domain(5)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        loop = asyncio.get_running_loop()
        raw.setblocking(False)
        await loop.sock_sendall(raw, pack(XsType.WATCH, 1, 0, b"/local/domain/5\0tok\0"))
        conn = await _conn_of(env, 5)
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        name = "x" * 200
        # dom0 makes the guest's watch fire far more often than the guest reads.
        await asyncio.gather(*(env.dom0.write(f"/local/domain/5/{name}{i}", "1") for i in range(1500)))
        await env.dom0.read("/")
        assert conn.events_dropped > 0
        assert len(conn.out_events) <= 8
        assert conn.write_paused
        await asyncio.wait_for(_others_work(env, g6), 1)
        raw.close()


async def test_oversized_payload_kills_only_that_connection(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g6 = await env.guest(6)
        await g6.write("ok", "1")
        await env.server.introduce_domain(5)
        raw = env.server.connect_domain(5)
        loop = asyncio.get_running_loop()
        raw.setblocking(False)
        await loop.sock_sendall(raw, struct.pack("<IIII", XsType.WRITE, 1, 0, 5000) + b"x" * 5000)
        assert await asyncio.wait_for(loop.sock_recv(raw, 100), 2) == b""  # closed by the server
        raw.close()
        await _others_work(env, g6)


async def test_garbage_requests_get_errors(xs_env: EnvFactory) -> None:
    async with xs_env() as env:
        g6 = await env.guest(6)
        await g6.write("ok", "1")
        await env.server.introduce_domain(5)
        raw = env.server.connect_domain(5)
        loop = asyncio.get_running_loop()
        raw.setblocking(False)
        rng = random.Random(1234)
        msgs = [
            pack(99, 1, 0, b"x\0"),  # unknown type
            pack(XsType.WATCH_EVENT, 2, 0, b"a\0b\0"),  # server-to-client only
            pack(XsType.READ, 3, 0, b"no-nul"),
            pack(XsType.READ, 4, 0, b"two\0strings\0"),
            pack(XsType.READ, 5, 0, b"/bad\xff\0"),
            pack(XsType.SET_PERMS, 6, 0, b"/local/domain/5\0q1\0"),
            pack(XsType.DIRECTORY_PART, 7, 0, b"/local/domain/5\0-1\0"),
            pack(XsType.TRANSACTION_END, 8, 0, b"T\0"),
            pack(XsType.WATCH, 9, 0, b"/local/domain/5\0"),
            pack(XsType.GET_DOMAIN_PATH, 10, 0, b"abc\0"),
            pack(XsType.WRITE, 11, 0, b""),
        ]
        for i in range(200):
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
            msgs.append(pack(rng.randrange(0, 30), 100 + i, rng.choice([0, 0, 1, 7]), body))
        await loop.sock_sendall(raw, b"".join(msgs))
        raw.setblocking(True)
        raw.settimeout(5)
        got = await loop.run_in_executor(None, _read_replies_skip_events, raw, len(msgs))
        assert [r[1] for r in got[:11]] == list(range(1, 12))
        assert all(r[0] == XsType.ERROR for r in got[:11])
        assert got[0][2] == b"ENOSYS\0"
        assert got[7][2] == b"ENOENT\0"
        assert len(got) == len(msgs)
        raw.close()
        await _others_work(env, g6)
        # The tree is intact.
        assert await env.dom0.directory("/") == ["tool", "local", "health"]


def _read_replies_skip_events(sock: socket.socket, count: int) -> list[tuple[int, int, bytes]]:
    out: list[tuple[int, int, bytes]] = []
    while len(out) < count:
        for r in _read_replies(sock, 1):
            if r[0] != XsType.WATCH_EVENT:
                out.append(r)
    return out
