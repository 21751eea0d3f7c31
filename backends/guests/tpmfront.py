"""A tpmif v2 frontend for emulated guests that behaves like Linux xen-tpmfront, and a socket that lets
tpm2-tools run against it unmodified.

The page layout is written out here from xen/include/public/io/tpmif.h (`struct vtpm_shared_page`), not taken
from the backend's module: the backend must meet the header, not itself.  What the frontend does follows
drivers/char/tpm/xen-tpmfront.c: setup_ring writes ring-ref, event-channel and feature-protocol-v2=1 in one
transaction and goes Initialised; backend Initialised/Connected without feature-protocol-v2 is fatal ("vTPM
protocol 2 required"); vtpm_send waits for an idle page (IDLE or FINISH), copies the command to
8 + 4 * nr_extra_pages, writes length, then state SUBMIT, notifies, and waits for IDLE/FINISH, writing CANCEL
on a timeout; vtpm_recv returns -ECANCELED on IDLE and clamps the length to the page.

`TpmSocket` serves what tpm2-tss's `swtpm` TCTI expects (`-T swtpm:path=SOCK`): raw TPM commands on SOCK and
control commands (u32 code || payload -> u32 result) on SOCK.ctrl; CMD_SET_LOCALITY picks the locality the
next commands are sent from (a guest kernel would: Linux always sends 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import select
import struct
import time
from pathlib import Path
from typing import Any

from backends.guests.guest import Guest, GuestPort
from backends.xenbus.state import XenbusState

PAGE = 4096
# struct vtpm_shared_page { uint32_t length; uint8_t state; uint8_t locality; uint8_t pad;
#                           uint8_t nr_extra_pages; uint32_t extra_pages[0]; };  sizeof == 8
SHR = struct.Struct("<IBBBB")
VTPM_STATE_IDLE, VTPM_STATE_SUBMIT, VTPM_STATE_FINISH, VTPM_STATE_CANCEL = 0, 1, 2, 3
SHR_STATE = 4
SHR_LOCALITY = 5
SHR_NR_EXTRA = 7

# Linux's chip->timeout_c default (TPM_TIMEOUT_C, 750 ms... kept generous here) and its long duration.
TIMEOUT_C = 2.0
DURATION = 120.0


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class TpmFrontError(OSError):
    pass


class TpmFront:
    """The vTPM of one emulated guest."""

    def __init__(self, guest: Guest, xs: Any, devid: int = 0, *, timeout: float = 10.0) -> None:
        self.guest = guest
        self.xs = xs
        self.devid = devid
        self.timeout = timeout
        self.fe_path = f"/local/domain/{guest.domid}/device/vtpm/{devid}"
        self.be_path = ""
        self.backend_id = 0
        self.page_no: int | None = None
        self.ref: int | None = None
        self.port: GuestPort | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._poller: select.poll | None = None
        self._shr: memoryview | None = None  # the page, viewed once (read several times per command)
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events = 0

    # -- the page --------------------------------------------------------------------------------------

    @property
    def shr(self) -> memoryview:
        if self._shr is None:
            assert self.page_no is not None
            self._shr = self.guest.page_view(self.page_no)
        return self._shr

    @property
    def state(self) -> int:
        return int(self.shr[SHR_STATE])

    def _on_event(self) -> None:
        assert self.port is not None
        self.port.pending()
        self.events += 1
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait_idle(self, timeout: float) -> bool:
        """wait_for_tpm_stat(VTPM_STATUS_IDLE): IDLE (cancelled) or FINISH (result), woken by the event channel
        (Linux sleeps on its irq's wait queue the same way), the state word checked at each wake-up.  No race
        between the check and the wait: the event's callback runs on this loop, never between the two."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.state not in (VTPM_STATE_IDLE, VTPM_STATE_FINISH):
            left = deadline - loop.time()
            if left <= 0:
                return False
            # A bare future and a timer: asyncio.wait_for costs another future, callbacks and (3.11) a task's
            # worth of work per wait.
            self._waiter = waiter = loop.create_future()
            timer = loop.call_at(deadline, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return True

    def _wait_idle_blocking(self, timeout: float) -> bool:
        """The same, blocking this thread in poll() on the event channel's fd (a kernel frontend's wait, with
        no event loop between the event and the waiter)."""
        assert self.port is not None
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.port.fileno(), select.POLLIN)
        deadline = time.monotonic() + timeout
        while self.state not in (VTPM_STATE_IDLE, VTPM_STATE_FINISH):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._poller.poll(math.ceil(left * 1000)):
                self.port.pending()
                self.events += 1
        return True

    # -- handshake -------------------------------------------------------------------------------------

    async def _read(self, path: str) -> str | None:
        v: str | None = await self.xs.read_str(path)
        return v

    async def _backend_state(self) -> int:
        v = await self._read(f"{self.be_path}/state")
        return int(v) if v is not None and v.isdigit() else 0

    async def wait_backend(self, states: set[int], timeout: float | None = None) -> int:
        watch = await self.xs.watch(f"{self.be_path}/state")
        try:
            async with asyncio.timeout(timeout or self.timeout):
                async for _ in watch:
                    st = await self._backend_state()
                    if st in states:
                        return st
        except TimeoutError:
            err = await self._read(f"{self.be_path}/error")
            raise TimeoutError(f"backend {self.be_path} is in state {await self._backend_state()}, wanted "
                               f"{sorted(states)}" + (f" (error: {err})" if err else "")) from None
        finally:
            with contextlib.suppress(Exception):
                await watch.close()
        raise ConnectionError("xenstore watch ended")

    async def connect(self) -> None:
        be = await self._read(f"{self.fe_path}/backend")
        if be is None:
            raise FileNotFoundError(f"{self.fe_path}/backend: no such device")
        self.be_path = be
        bid = await self._read(f"{self.fe_path}/backend-id")
        self.backend_id = int(bid) if bid and bid.isdigit() else 0
        await self.wait_backend({XenbusState.INIT_WAIT, XenbusState.CONNECTED})
        await self.setup_ring()
        st = await self.wait_backend({XenbusState.INITIALISED, XenbusState.CONNECTED})
        assert st
        v2 = await self._read(f"{self.be_path}/feature-protocol-v2")
        if not (v2 or "0").isdigit() or int(v2 or "0") == 0:
            raise TpmFrontError(errno.EINVAL, "vTPM protocol 2 required")
        await self.xs.write(f"{self.fe_path}/state", str(int(XenbusState.CONNECTED)))

    async def setup_ring(self) -> None:
        """setup_ring: a zeroed page granted to the backend, an unbound port, one transaction, Initialised."""
        self._loop = asyncio.get_running_loop()
        self.page_no = self.guest.alloc_page()
        self.shr[:] = bytes(PAGE)
        self.ref = self.guest.grant(self.page_no, self.backend_id)
        self.port = await self.guest.alloc_unbound_async(self.backend_id)
        self._loop.add_reader(self.port.fileno(), self._on_event)
        ref, port = self.ref, self.port.port

        async def body(tx: Any) -> None:
            await tx.write(f"{self.fe_path}/ring-ref", str(ref))
            await tx.write(f"{self.fe_path}/event-channel", str(port))
            await tx.write(f"{self.fe_path}/feature-protocol-v2", "1")

        await self.xs.transaction(body)
        await self.xs.write(f"{self.fe_path}/state", str(int(XenbusState.INITIALISED)))

    # -- commands --------------------------------------------------------------------------------------

    def notify(self) -> None:
        assert self.port is not None
        self.port.notify()

    def cancel(self) -> None:
        """vtpm_cancel: state = CANCEL, notify."""
        self.shr[SHR_STATE] = VTPM_STATE_CANCEL
        self.notify()

    def submit(self, cmd: bytes, *, locality: int = 0) -> None:
        """The store half of vtpm_send (no waits): data, length, then state SUBMIT, notify."""
        shr = self.shr
        offset = SHR.size + 4 * shr[SHR_NR_EXTRA]
        if offset > PAGE or offset + len(cmd) > PAGE:
            raise TpmFrontError(errno.EINVAL, "command does not fit the page")
        shr[offset:offset + len(cmd)] = cmd
        struct.pack_into("<I", shr, 0, len(cmd))
        shr[SHR_LOCALITY] = locality
        shr[SHR_STATE] = VTPM_STATE_SUBMIT
        self.notify()

    def response(self) -> bytes:
        """The load half of vtpm_recv."""
        shr = self.shr
        if shr[SHR_STATE] == VTPM_STATE_IDLE:
            raise TpmFrontError(errno.ECANCELED, "command cancelled")
        length = struct.unpack_from("<I", shr, 0)[0]
        offset = SHR.size + 4 * shr[SHR_NR_EXTRA]
        length = min(length, PAGE - offset)
        return bytes(shr[offset:offset + length])

    async def transmit(self, cmd: bytes, *, locality: int = 0, timeout_c: float = TIMEOUT_C,
                       duration: float = DURATION) -> bytes:
        """tpm_transmit through vtpm_send + vtpm_recv.  TimeoutError (ETIME) after a cancel on timeout;
        TpmFrontError(ECANCELED) when the backend answered the command with IDLE."""
        async with self._lock:
            if not await self._wait_idle(timeout_c):
                self.cancel()
                raise TimeoutError(errno.ETIME, "vTPM busy")
            self.submit(cmd, locality=locality)
            if not await self._wait_idle(duration):
                self.cancel()
                raise TimeoutError(errno.ETIME, "vTPM command timed out (cancelled)")
            return self.response()

    def transmit_blocking(self, cmd: bytes, *, locality: int = 0, timeout_c: float = TIMEOUT_C,
                          duration: float = DURATION) -> bytes:
        """transmit() for a caller that may block its thread (the benchmark's guest, like a kernel's
        tpm_transmit): no event loop hop between the backend's event and the answer.  Not while transmit()
        runs on the same front (the lock is the loop's)."""
        if self._lock.locked():
            raise TpmFrontError(errno.EBUSY, "a command is in flight")
        if not self._wait_idle_blocking(timeout_c):
            self.cancel()
            raise TimeoutError(errno.ETIME, "vTPM busy")
        self.submit(cmd, locality=locality)
        if not self._wait_idle_blocking(duration):
            self.cancel()
            raise TimeoutError(errno.ETIME, "vTPM command timed out (cancelled)")
        return self.response()

    # -- teardown --------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Closing -> backend Closing/Closed -> Closed; then the page and the port go."""
        with contextlib.suppress(Exception):
            await self.xs.write(f"{self.fe_path}/state", str(int(XenbusState.CLOSING)))
            await self.wait_backend({XenbusState.CLOSING, XenbusState.CLOSED}, 5.0)
            await self.xs.write(f"{self.fe_path}/state", str(int(XenbusState.CLOSED)))
            await self.wait_backend({XenbusState.CLOSED}, 5.0)
        await self.release()

    async def release(self, *, revoke_timeout: float = 5.0) -> None:
        self._poller = None
        if self.port is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self.port.fileno())
            self.port.close()
            self.port = None
        if self.ref is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(revoke_timeout):
                    while True:
                        try:
                            self.guest.revoke(self.ref)
                            break
                        except OSError:
                            await asyncio.sleep(0.01)
            self.ref = None
        if self._shr is not None:
            self._shr.release()
            self._shr = None
        if self.page_no is not None:
            self.guest.free_page(self.page_no)
            self.page_no = None


class TpmSocket:
    """swtpm-compatible sockets in front of a TpmFront, for tpm2-tss's `swtpm:path=` TCTI."""

    CMD_GET_CAPABILITY = 1
    CMD_SET_LOCALITY = 5
    CMD_CANCEL_TPM_CMD = 9

    def __init__(self, front: TpmFront, path: str | os.PathLike[str]) -> None:
        self.front = front
        self.path = Path(path)
        self.ctrl_path = Path(f"{path}.ctrl")
        self.locality = 0
        self.commands = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._servers.append(await asyncio.start_unix_server(self._data, str(self.path)))
        self._servers.append(await asyncio.start_unix_server(self._ctrl, str(self.ctrl_path)))

    async def close(self) -> None:
        for s in self._servers:
            s.close()
        for w in list(self._conns):
            w.close()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2.0)
        self._servers.clear()
        for p in (self.path, self.ctrl_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                try:
                    head = await reader.readexactly(6)
                except asyncio.IncompleteReadError:
                    return
                size = struct.unpack_from(">I", head, 2)[0]
                if not 10 <= size <= PAGE:
                    return
                cmd = head + await reader.readexactly(size - 6)
                try:
                    rsp = await self.front.transmit(cmd, locality=self.locality)
                except OSError:
                    return  # the TCTI sees the connection drop: an I/O error, as /dev/tpm0 gives EIO/ETIME
                self.commands += 1
                writer.write(rsp)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _ctrl(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await asyncio.wait_for(reader.read(64), 5.0)
            if len(req) < 4:
                return
            code = struct.unpack_from(">I", req)[0]
            if code == self.CMD_GET_CAPABILITY:
                writer.write(struct.pack(">Q", (1 << 4) | (1 << 8)))  # SET_LOCALITY, CANCEL_TPM_CMD
            elif code == self.CMD_SET_LOCALITY and len(req) >= 5:
                ok = req[4] < 5
                if ok:
                    self.locality = req[4]
                writer.write(struct.pack(">I", 0 if ok else 0x3D))
            elif code == self.CMD_CANCEL_TPM_CMD:
                if self.front.state == VTPM_STATE_SUBMIT:
                    self.front.cancel()
                writer.write(struct.pack(">I", 0))
            else:
                writer.write(struct.pack(">I", 0))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
