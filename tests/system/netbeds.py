"""net_bed (tests/system/test_net.py: the `nbed` fixture's namespaces and daemon, plus `[net]` settings of the
test's choosing, e.g. a short rx_drain_timeout_ms for the hostile suite), and a hashed guest-to-peer TCP stream
whose progress a test can sample."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import socket
import threading
import time

from tests.net import pingtcp
from tests.system.test_net import PEER_V4, NetBed, net_bed


class Stream:
    """A hashed TCP transfer from the guest to the peer, running in threads; `received` counts the bytes the
    peer has read so far (the test samples it to measure the rate).  nbytes None: the guest sends until
    `finish` (a background load for as long as a test needs one)."""

    def __init__(self, bed: NetBed, nbytes: int | None, port: int) -> None:
        self.bed = bed
        self.nbytes = nbytes
        self.sent = 0
        self.received = 0
        self.stop = threading.Event()
        self.lst = bed.peer.run(lambda: pingtcp.listener(PEER_V4, port))
        self.port = port
        self.pool = concurrent.futures.ThreadPoolExecutor(2)
        loop = asyncio.get_running_loop()
        self.srv = loop.run_in_executor(self.pool, self._server)
        self.cli = loop.run_in_executor(self.pool, self._client)

    def _server(self) -> tuple[int, str]:
        conn, _ = self.lst.accept()
        with conn:
            conn.settimeout(60)
            h = hashlib.sha256()
            while data := conn.recv(1 << 16):
                h.update(data)
                self.received += len(data)
            return self.received, h.hexdigest()

    def _client(self) -> str:
        def connect() -> socket.socket:
            s = pingtcp.connect(PEER_V4, self.port)
            s.settimeout(60)
            return s

        with self.bed.gns.run(connect) as c:
            if self.nbytes is not None:
                self.sent = self.nbytes
                return pingtcp.send_hashed(c, self.nbytes, seed=self.port)
            h = hashlib.sha256()
            block = hashlib.sha256(str(self.port).encode()).digest() * 1024
            while not self.stop.is_set():
                c.sendall(block)
                h.update(block)
                self.sent += len(block)
            c.shutdown(socket.SHUT_WR)
            return h.hexdigest()

    async def rate(self, seconds: float) -> float:
        """Bytes per second the peer received over the next `seconds`."""
        t0, b0 = time.monotonic(), self.received
        await asyncio.sleep(seconds)
        return (self.received - b0) / (time.monotonic() - t0)

    async def finish(self, timeout: float = 60) -> None:
        """Stop an endless stream; wait for the end; every byte must have arrived, in order."""
        self.stop.set()
        try:
            sent = await asyncio.wait_for(self.cli, timeout)
            n, got = await asyncio.wait_for(self.srv, timeout)
            assert (n, got) == (self.sent, sent), "bytes lost or corrupted"
        finally:
            self.lst.close()
            self.pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["Stream", "net_bed"]
