"""The bus in a driver domain (#19): xenstored refuses it other domains' homes (EACCES), which must read as
"cannot tell, alive", never as an error that stops a device from being served (seen on real Xen 4.17)."""

from __future__ import annotations

from typing import Any

import pytest

from backends.xenbus.device import XenBus
from backends.xenstore.client import XenStoreError


class _Store:
    """Just what domain_dead asks: every home but our own is forbidden, as xenstored answers a driver domain."""

    def __init__(self, error: str) -> None:
        self.error = error
        self.asked_introduced = 0

    async def exists(self, path: str) -> bool:
        raise XenStoreError(self.error, path)

    async def is_domain_introduced(self, domid: int) -> bool:
        self.asked_introduced += 1
        raise XenStoreError("EACCES", "IS_DOMAIN_INTRODUCED")


async def test_a_forbidden_home_counts_as_a_live_domain() -> None:
    xs: Any = _Store("EACCES")
    bus = XenBus(platform=None, xs=xs, classes=[], backend_domid=7)  # type: ignore[arg-type]
    assert await bus.domain_dead(12) is False
    assert await bus.domain_dead(7) is False  # ourselves
    assert xs.asked_introduced == 0


async def test_other_errors_still_raise() -> None:
    xs: Any = _Store("EIO")
    bus = XenBus(platform=None, xs=xs, classes=[], backend_domid=7)  # type: ignore[arg-type]
    with pytest.raises(XenStoreError):
        await bus.domain_dead(12)
