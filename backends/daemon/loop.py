"""uvloop is the default event loop; plain asyncio when it is not importable."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(coro)
    if not hasattr(uvloop, "run"):
        # uvloop < 0.18 (Debian 12's python3-uvloop 0.17, e.g. a real dom0) has no run(): same loop, by hand.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    result: T = uvloop.run(coro)
    return result
