"""Fixtures for the emulated platform's core tests: a broker in a private directory.  (Leaks of fds, ports,
grant mappings and watches are checked for every test by the root conftest.py.)"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.guests.guest import Guest
from backends.platform.emulated import EmulatedPlatform
from backends.sim.broker import BrokerThread


@pytest.fixture
def sim_dir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths are limited to 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="pvb-core-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def broker(sim_dir: Path) -> Iterator[BrokerThread]:
    with BrokerThread(str(sim_dir / "broker.sock")) as bt:
        yield bt
        # Guests close their connection; the broker notices on its own thread.
        deadline = time.monotonic() + 5
        while bt.call(lambda: len(bt.broker.domains) if bt.broker else -1) != 0:
            assert time.monotonic() < deadline, "guest domains left registered"
            time.sleep(0.01)


@pytest.fixture
def platform(broker: BrokerThread, sim_dir: Path) -> Iterator[EmulatedPlatform]:
    p = EmulatedPlatform(str(sim_dir))
    yield p
    try:
        assert p.live_mappings == 0, "grant mappings leaked"
        assert p.bound_ports == 0, "event channels left bound"
    finally:
        p.close()


@pytest.fixture
def make_guest(broker: BrokerThread, sim_dir: Path) -> Iterator[Callable[..., Guest]]:
    guests: list[Guest] = []

    def make(**kwargs: Any) -> Guest:
        g = Guest.in_sim(sim_dir, **kwargs)
        guests.append(g)
        return g

    yield make
    for g in guests:
        g.close()
