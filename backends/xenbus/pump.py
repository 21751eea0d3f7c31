"""A data path's pump thread: one blocking C call (the queue's poll loop, csrc/pump.h) in a thread of its own,
one per queue, so queues use as many cores as there are and the control loop's work never sits between a guest
and its response.  The C call returns when its stop eventfd is readable; a failure it raises is reported once,
on the event loop, to whoever owns the queue (the device fails).  Used by every device type's data path."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from backends.platform.base import EventChannel, GrantMapping

log = logging.getLogger(__name__)


class PumpThread:
    """`run(stop_fd)` blocks until `stop_fd` is readable; an exception of `errors` it raises goes to `on_dead`."""

    def __init__(self, name: str, run: Callable[[int], None], *, on_dead: Callable[[str], None] | None = None,
                 errors: tuple[type[BaseException], ...] = (OSError,)) -> None:
        self.name = name
        self._run = run
        self._on_dead = on_dead
        self._errors = errors
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_fd = -1
        self._stopped = False
        self._failed = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._thread is not None or self._stopped:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._main, name=f"pump {self.name}", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._run(self._stop_fd)
        except self._errors as exc:
            self._report(str(exc))

    def _report(self, message: str) -> None:
        loop = self._loop
        if loop is None or self._stopped:
            return
        try:
            loop.call_soon_threadsafe(self.fail, message)
        except RuntimeError:
            pass  # the loop is closed: the daemon is going away anyway

    def silence(self) -> None:
        """From now on a death is not news (the owner is stopping the queue)."""
        self._failed = True

    def fail(self, message: str) -> None:
        """On the event loop: report the queue's death once (log, `on_dead`), unless stopping or silenced.  Also
        what runs a queue elsewhere (blk's shared pumps) reports through."""
        if self._failed or self._stopped:
            return
        self._failed = True
        log.error("%s: %s", self.name, message)
        if self._on_dead is not None:
            self._on_dead(message)

    def _signal_stop(self) -> threading.Thread | None:
        self._stopped = True
        thread, self._thread = self._thread, None
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
        return thread

    async def stop(self) -> None:
        """Stop and wait for the pump off the loop (it finishes the batch it is in).  Idempotent."""
        thread = self._signal_stop()
        if thread is not None:
            await asyncio.to_thread(thread.join)
        self._close_fd()

    def join(self) -> None:
        """Synchronous stop (blocks the caller).  Idempotent."""
        thread = self._signal_stop()
        if thread is not None:
            thread.join()
        self._close_fd()

    def _close_fd(self) -> None:
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        self._loop = None


class PumpedQueue(Protocol):
    """What QueueDataplane needs from a data path's C queue wrapper."""

    @property
    def closed(self) -> bool: ...

    def run(self, stop_fd: int) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class QueueDataplane:
    """One queue of a connected device: owns its C queue, the ring mappings and event channels it runs on, and
    its pump thread.  Teardown order: the pump stops, `_quiesce` lets in-flight work finish (blk answers its
    I/O), the C queue is freed, then the rings are unmapped and the channels unbound.  `on_dead` is called
    once, on the event loop, when the pump fails with one of `errors` (the device fails)."""

    def __init__(self, name: str, queue: PumpedQueue, rings: list[GrantMapping], events: list[EventChannel], *,
                 on_dead: Callable[[str], None] | None, errors: tuple[type[BaseException], ...]) -> None:
        self.name = name
        self._queue_obj = queue
        self._rings = rings
        self._events = events
        self._pump = PumpThread(name, queue.run, on_dead=on_dead, errors=errors)
        self._stopped = False

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the pump thread; it first serves what is already queued."""
        if not self._stopped:
            self._pump.start(loop)

    def stats(self) -> dict[str, int]:
        return {} if self._queue_obj.closed else self._queue_obj.stats()

    async def _quiesce(self, timeout: float) -> None:
        """After the pump stopped, before the queue is freed: let in-flight work finish (default: none)."""

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the pump, quiesce, free, unmap and unbind.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self._pump.stop()
        await self._quiesce(timeout)
        self.close()

    def close(self) -> None:
        """Synchronous teardown (joins the pump).  Idempotent."""
        self._stopped = True
        self._pump.join()
        self._queue_obj.close()
        for ring in self._rings:
            ring.unmap()
        for ev in self._events:
            ev.close()
        self._rings, self._events = [], []
