"""The callback-driven swtpm data link (backends/drivers/tpm/link.py) against a scripted fake swtpm: answers
whole or in pieces, late (the one lazily re-armed deadline timer), never (timeout, then a fresh connection),
broken framing, a peer that hangs up, data nobody asked for, close() with a command in flight."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from backends.drivers.tpm.link import MAX_RESPONSE, LinkError, SwtpmLink

CMD = bytes.fromhex("80010000000c0000017b0008")  # TPM2_GetRandom(8)


def answer(n: int = 8, fill: int = 0xAB) -> bytes:
    body = struct.pack(">H", n) + bytes([fill]) * n
    return struct.pack(">HII", 0x8001, 10 + len(body), 0) + body


Step = Callable[[asyncio.StreamWriter], Awaitable[None]]


def reply(*parts: bytes, delay: float = 0.0, gap: float = 0.02) -> Step:
    async def step(w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay)
        for i, p in enumerate(parts):
            if i:
                await asyncio.sleep(gap)
            w.write(p)
            await w.drain()
    return step


async def hang_up(w: asyncio.StreamWriter) -> None:
    w.close()


async def silent(w: asyncio.StreamWriter) -> None:
    pass


class FakeSwtpm:
    """Reads one 12-byte command at a time and plays the next step of the script; counts connections."""

    def __init__(self, path: Path, script: list[Step]) -> None:
        self.path = path
        self.script = script
        self.connections = 0
        self.commands: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeSwtpm:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    self.commands.append(await r.readexactly(len(CMD)))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if not self.script:
                    return
                await self.script.pop(0)(w)
        finally:
            w.close()


@pytest.fixture
def sock_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="link-", dir="/tmp") as d:
        yield Path(d) / "swtpm.sock"


Outcome = tuple[bytes | None, BaseException | None]


async def transmit(link: SwtpmLink, timeout: float = 2.0) -> Outcome:
    fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    link.send(CMD, timeout, lambda rsp, exc: fut.set_result((rsp, exc)))
    return await asyncio.wait_for(fut, 10.0)


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, 20.0)

    asyncio.run(bounded())


def test_whole_and_split_answers_on_one_connection(sock_path: Path) -> None:
    a = answer()

    async def main() -> None:
        script = [reply(a), reply(a[:3], a[3:9], a[9:]), reply(a[:6], a[6:])]
        async with FakeSwtpm(sock_path, script) as fake:
            link = SwtpmLink(sock_path)
            try:
                for _ in range(3):
                    assert await transmit(link) == (a, None)
                    assert not link.busy
            finally:
                link.close()
            assert fake.connections == 1 and fake.commands == [CMD] * 3

    run(main())


def test_late_answers_within_the_timeout_rearm_the_one_timer(sock_path: Path) -> None:
    """The deadline timer of the first command fires while the second runs: it must re-arm, not time out."""
    a = answer()

    async def main() -> None:
        async with FakeSwtpm(sock_path, [reply(a, delay=0.2), reply(a, delay=0.2)]):
            link = SwtpmLink(sock_path)
            try:
                assert await transmit(link, timeout=0.3) == (a, None)
                assert await transmit(link, timeout=0.3) == (a, None)
            finally:
                link.close()

    run(main())


def test_timeout_drops_the_connection_and_the_late_answer(sock_path: Path) -> None:
    a, b = answer(fill=1), answer(fill=2)

    async def main() -> None:
        async with FakeSwtpm(sock_path, [reply(a, delay=0.5), reply(b)]) as fake:
            link = SwtpmLink(sock_path)
            try:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                rsp, exc = await transmit(link, timeout=0.1)
                assert rsp is None and isinstance(exc, TimeoutError)
                assert 0.09 <= loop.time() - t0 < 0.4
                await asyncio.sleep(0.6)  # the late answer to the first command went to the dropped connection
                assert await transmit(link) == (b, None)
                assert fake.connections == 2
            finally:
                link.close()

    run(main())


@pytest.mark.parametrize(("step", "why"), [
    (hang_up, errno.ECONNRESET),
    (reply(struct.pack(">HII", 0x8001, 5, 0)), errno.EPROTO),  # size below a header
    (reply(struct.pack(">HII", 0x8001, MAX_RESPONSE + 1, 0)), errno.EPROTO),
    (reply(answer() + b"extra"), errno.EPROTO),  # more than the size says
])
def test_broken_answers_fail_the_command_and_reconnect(sock_path: Path, step: Step, why: int) -> None:
    a = answer()

    async def main() -> None:
        async with FakeSwtpm(sock_path, [step, reply(a)]) as fake:
            link = SwtpmLink(sock_path)
            try:
                rsp, exc = await transmit(link)
                assert rsp is None and isinstance(exc, LinkError) and exc.errno == why
                assert await transmit(link) == (a, None)
                assert fake.connections == 2
            finally:
                link.close()

    run(main())


def test_unsolicited_data_drops_the_connection(sock_path: Path) -> None:
    a = answer()

    async def main() -> None:
        async with FakeSwtpm(sock_path, [reply(a, a), reply(a)]) as fake:  # one answer too many
            link = SwtpmLink(sock_path)
            try:
                assert await transmit(link) == (a, None)
                await asyncio.sleep(0.2)
                assert await transmit(link) == (a, None)
                assert fake.connections == 2
            finally:
                link.close()

    run(main())


def test_no_swtpm_is_reported_through_the_callback(sock_path: Path) -> None:
    async def main() -> None:
        link = SwtpmLink(sock_path)
        rsp, exc = await transmit(link)
        assert rsp is None and isinstance(exc, FileNotFoundError)
        assert not link.busy
        link.close()

    run(main())


def test_a_full_backlog_is_reported_through_the_callback(sock_path: Path) -> None:
    """A non-blocking connect to a listener that accepts nothing fails with EAGAIN once its backlog is full."""

    async def main() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(sock_path))
            server.listen(0)
            fillers: list[socket.socket] = []
            try:
                while True:
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                    fillers.append(c)
                    try:
                        c.connect(str(sock_path))
                    except BlockingIOError:
                        break
                    assert len(fillers) < 64
                link = SwtpmLink(sock_path)
                rsp, exc = await transmit(link)
                assert rsp is None and isinstance(exc, BlockingIOError)
                assert not link.busy
                link.close()
            finally:
                for c in fillers:
                    c.close()

    run(main())


def test_close_forgets_the_command_in_flight(sock_path: Path) -> None:
    async def main() -> None:
        async with FakeSwtpm(sock_path, [silent]):
            link = SwtpmLink(sock_path)
            called: list[Outcome] = []
            link.send(CMD, 0.1, lambda rsp, exc: called.append((rsp, exc)))
            assert link.busy
            with pytest.raises(RuntimeError):
                link.send(CMD, 0.1, lambda rsp, exc: None)
            link.close()
            await asyncio.sleep(0.3)  # past the timeout: nothing fires
            assert called == [] and not link.busy

    run(main())
