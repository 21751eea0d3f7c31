"""Lost-notification recovery (backends/blk/stallwatch.py): requests left on a ring with no event get served,
responses a frontend was never told of get it notified again, and a queue that is merely busy, throttled or idle
is left alone."""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backends.blk import proto
from backends.blk.proto import Abi
from backends.blk.stallwatch import StallWatch

from . import wire
from .harness import memory_image
from .test_datapath import close, file_bytes, make_rig

LOG = logging.getLogger("test.stallwatch")


@dataclass
class _Dev:
    log: logging.Logger = LOG


@dataclass
class _Queue:
    """The two calls the watch makes, on a ring state the test sets."""

    state: dict[str, int]
    closed: bool = False
    nudges: int = 0
    notifies: int = 0

    def ring_state(self) -> dict[str, int]:
        return dict(self.state)

    def nudge(self) -> None:
        self.nudges += 1

    def notify(self) -> None:
        self.notifies += 1


@dataclass
class _Dp:
    queue: Any


IDLE = {"req_prod": 40, "req_event": 41, "rsp_prod": 40, "rsp_event": 41, "req_cons": 40, "rsp_next": 40,
        "held": 0, "inflight": 0, "free_reqs": 32, "fence": 0, "parked": 0, "listening": 1, "throttled": 0}


def looks(watch: StallWatch, dps: list[Any], n: int) -> None:
    async def go() -> None:
        for _ in range(n):
            watch.check(_Dev(), dps)  # type: ignore[arg-type]

    asyncio.run(go())


@pytest.fixture
def image() -> Iterator[Path]:
    with memory_image("stall", 1 << 20) as p:
        yield p


def test_requests_left_without_an_event_are_served(image: Path) -> None:
    """The real C queue: requests published with no kick are taken once the watch sees them sit still."""
    rig, drv = make_rig(image, Abi.X86_64, mode="threaded")
    try:
        reqs = [rig.request(0, 8 * i, 4096) for i in range(3)]
        rig.submit([s for s, _ in reqs])  # published, never notified
        watch = StallWatch(10.0)
        dps = [_Dp(rig.q)]
        looks(watch, dps, 2)
        assert watch.kicks == 0  # one second unchanged is not yet a stall
        looks(watch, dps, 1)
        assert watch.kicks == 1 and watch.notifies == 0
        got: dict[int, int] = {}
        deadline = time.monotonic() + 5
        while len(got) < 3:
            assert time.monotonic() < deadline, f"only {got} answered"
            if select.select([rig.q.completion_fd], [], [], 0.2)[0]:
                rig.q.complete()  # what the pump does when the nudge makes the fd readable
            for raw in rig.front.consume(rig.abi.rsp_size):
                rid, _op, status = wire.response(rig.abi, raw)
                got[rid] = status
        assert set(got.values()) == {proto.RSP_OKAY}
        for i, (_, p) in enumerate(reqs):
            assert rig.gather(p) == file_bytes(image, 8 * i * 512, 4096)
    finally:
        close(rig, drv)


@pytest.mark.parametrize("why", ["fence", "free_reqs", "throttled"])
def test_a_queue_that_cannot_take_requests_is_left_alone(why: str) -> None:
    st = dict(IDLE, req_prod=45, **{why: 0 if why == "free_reqs" else 1})
    q = _Queue(st)
    watch = StallWatch(10.0)
    looks(watch, [_Dp(q)], 3)
    assert q.nudges == 0 and watch.kicks == 0


def test_a_stuck_ring_is_nudged_once_per_state() -> None:
    q = _Queue(dict(IDLE, req_prod=45))
    watch = StallWatch(10.0)
    looks(watch, [_Dp(q)], 4)
    assert q.nudges == 1 and watch.kicks == 1  # the same stuck state is helped once, not every second
    q.state = dict(IDLE, req_prod=46)  # it moved, then stuck again: helped again
    looks(watch, [_Dp(q)], 3)
    assert q.nudges == 2


def test_unread_responses_the_frontend_asked_about_get_a_new_event() -> None:
    q = _Queue(dict(IDLE, rsp_prod=44, req_cons=44, req_prod=44, rsp_event=42))
    watch = StallWatch(10.0)
    looks(watch, [_Dp(q)], 3)
    assert q.notifies == 1 and watch.notifies == 1 and q.nudges == 0


@pytest.mark.parametrize("rsp_event", [41, 45, 40 + (1 << 31)], ids=["idle", "asked-for-later", "far-ahead"])
def test_a_frontend_that_is_not_waiting_is_not_notified(rsp_event: int) -> None:
    """rsp_event past rsp_prod: the frontend read everything and waits for a later response (or its index is
    so far off that it cannot be waiting for a published one)."""
    q = _Queue(dict(IDLE, rsp_event=rsp_event & 0xFFFFFFFF))
    watch = StallWatch(10.0)
    looks(watch, [_Dp(q)], 3)
    assert q.notifies == 0 and q.nudges == 0


def test_ring_indices_wrap() -> None:
    top = 0xFFFFFFFF
    q = _Queue(dict(IDLE, req_prod=2, req_cons=top - 1, rsp_prod=top - 1, rsp_event=top, req_event=top))
    watch = StallWatch(10.0)
    looks(watch, [_Dp(q)], 3)
    assert q.nudges == 1 and q.notifies == 0
