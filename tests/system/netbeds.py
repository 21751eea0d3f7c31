"""A NetBed (tests/system/test_net.py) with a daemon config of the test's choosing: the `nbed` fixture's
namespaces and daemon, plus `[net]` settings (e.g. a short rx_drain_timeout_ms for the hostile suite); and a
hashed guest-to-peer TCP stream whose progress a test can sample."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.net import pingtcp
from tests.net.netns import NetNS
from tests.system.conftest import SimProc
from tests.system.test_net import PEER_V4, NetBed, NetnsServe

SERVE_VIF = '[serve]\nbackend_types = ["vif"]\n'


@contextlib.contextmanager
def net_bed(sim: SimProc, tmp_path: Path, net: str = "") -> Iterator[NetBed]:
    tag = f"{os.getpid()}"
    with NetNS(f"pvbs-g-{tag}") as g, NetNS(f"pvbs-p-{tag}") as p:
        # run_dir: the vifs' control state files stay in the test's own directory.
        serve = NetnsServe(sim, tmp_path, p, SERVE_VIF + f'[net]\nrun_dir = "{tmp_path}/net"\n{net}\n')
        serve.start()
        bed = NetBed(sim, serve, tmp_path, g=g, p=p)
        try:
            yield bed
        finally:
            alive = serve.alive
            rc = serve.stop()
            if not serve.killed:
                assert alive and rc == 0, f"pvback serve died or failed to stop ({rc}):\n{serve.log_text()[-3000:]}"


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
