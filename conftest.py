"""The leak check every suite runs (tests/, perf/): after each test's teardown, what the test opened in this
process is closed again.

Checked: grant mappings and grant handles (backends.native.grants.GrantTable), bound event channels
(NativeEventChannel.live), xenstore watches of in-process clients (Watch.live), threads the test started
that are still running (daemon ones too: a pump or server thread left behind is a leak all the same), and
this process's file descriptors (each new one named by what /proc/self/fd says it is).

What a fixture of a wider scope (module, session) opens while being set up for the test is not the test's:
it is added to the test's baseline.  Cleanup that finishes on another thread (a server noticing a closed
connection) gets a short grace period.  A test that must leave something behind on purpose is marked
`@pytest.mark.leaks_allowed`.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import pytest

GRACE_S = 2.0
# Files libraries keep open for the life of the process on purpose (caches), by where they point.
CACHED_FDS = ("/matplotlib/mpl-data/fonts/",)  # matplotlib's font cache (FT2Font objects)

pytest_plugins = ["pytester"]  # tests/test_leak_check.py runs the check on planted leaks


@dataclass
class Snapshot:
    fds: dict[int, str] = field(default_factory=dict)  # fd -> what it is
    threads: set[threading.Thread] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _counters() -> dict[str, int]:
    # Imported lazily: collecting the layer test must not need the C module.
    from backends.native.events import NativeEventChannel
    from backends.native.grants import GrantTable
    from backends.xenstore.client import Watch

    return {
        "grant mappings": GrantTable.all_live_mappings(),
        "grant handles": len(GrantTable.open_tables),
        "bound event channels": NativeEventChannel.live,
        "xenstore watches": Watch.live,
    }


def snapshot() -> Snapshot:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        target = _fd_target(fd)
        if target != "?":  # the listing's own directory fd is gone by now
            fds[fd] = target
    return Snapshot(fds, set(threading.enumerate()), _counters())


def leaks(before: Snapshot, after: Snapshot) -> list[str]:
    """What `after` holds that `before` did not (less is fine: a wider fixture went away)."""
    out = []
    for name, n in after.counters.items():
        if n > before.counters.get(name, 0):
            out.append(f"{n - before.counters.get(name, 0)} {name}")
    new_fds = {fd: t for fd, t in after.fds.items()
               if before.fds.get(fd) != t and not any(c in t for c in CACHED_FDS)}
    if new_fds:
        out.append("fds " + ", ".join(f"{fd} -> {t}" for fd, t in sorted(new_fds.items())))
    new_threads = [t for t in after.threads - before.threads if t.is_alive()]
    if new_threads:
        out.append("threads " + ", ".join(f"{t.name!r}{' (daemon)' if t.daemon else ''}" for t in new_threads))
    return out


def _merge(base: Snapshot, before: Snapshot, after: Snapshot) -> None:
    """Add what a wider-scoped fixture's set-up opened (after - before) to the test's baseline `base`."""
    base.fds.update({fd: t for fd, t in after.fds.items() if before.fds.get(fd) != t})
    base.threads |= after.threads - before.threads
    for name, n in after.counters.items():
        base.counters[name] = base.counters.get(name, 0) + max(0, n - before.counters.get(name, 0))


_baseline: Snapshot | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "leaks_allowed: the test leaves resources behind on purpose")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    global _baseline
    _baseline = None if item.get_closest_marker("leaks_allowed") else snapshot()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[object]) -> Generator[None, object, object]:
    if _baseline is None or fixturedef.scope == "function":
        return (yield)
    before = snapshot()
    try:
        return (yield)
    finally:
        if _baseline is not None:
            _merge(_baseline, before, snapshot())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    global _baseline
    try:
        yield
    finally:
        base, _baseline = _baseline, None
    if base is None:
        return
    deadline = time.monotonic() + GRACE_S
    found = leaks(base, snapshot())
    while found and time.monotonic() < deadline:
        gc.collect()  # cdata, sockets and mmaps that only a cycle still holds
        time.sleep(0.02)
        found = leaks(base, snapshot())
    if found:
        raise AssertionError(f"{item.nodeid} leaked: " + "; ".join(found))
