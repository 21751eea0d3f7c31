"""What the real-Xen dom0 runs pvback with is Debian 12's, not the venv's: python3-uvloop 0.17 (no `uvloop.run`).
The daemon's loop runner must work with it; the e2e test proves it in dom0, this proves it here in a second."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest

from backends.daemon import loop


def test_run_with_an_old_uvloop_without_run(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[asyncio.AbstractEventLoop] = []

    def new_event_loop() -> asyncio.AbstractEventLoop:
        made.append(asyncio.new_event_loop())
        return made[-1]

    old = types.ModuleType("uvloop")
    old.new_event_loop = new_event_loop  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", old)

    async def body() -> asyncio.AbstractEventLoop:
        await asyncio.sleep(0)
        return asyncio.get_running_loop()

    assert loop.run(body()) is made[0]
    assert made[0].is_closed()


def test_run_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails: plain asyncio

    async def body() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert loop.run(body()).startswith("asyncio")
