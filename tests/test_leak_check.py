"""The root conftest.py's leak check, run on planted leaks in a scratch project: it fails the test and names
what leaked; what a session fixture opens is not counted against the test that first used it."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PLANTED = '''
import os, socket, threading, time
import pytest

kept = []

def test_fd():
    kept.append(socket.socketpair())

def test_thread():
    ev = threading.Event()
    kept.append(ev)
    threading.Thread(target=ev.wait, name="left-running", daemon=True).start()

def test_event_channel():
    from backends.native.events import open_emulated
    a, b = os.eventfd(0), os.eventfd(0)
    kept.append(open_emulated(a, b, 5, 1, 6))

@pytest.fixture(scope="session")
def shared():
    s = socket.socketpair()
    yield s
    for x in s:
        x.close()

def test_session_fixture_is_not_a_leak(shared):
    pass

def test_clean():
    with open(os.devnull) as f:
        f.read()

@pytest.mark.leaks_allowed
def test_allowed():
    kept.append(socket.socketpair())
'''


def test_planted_leaks_are_named(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((ROOT / "conftest.py").read_text())
    pytester.makepyfile(test_planted=PLANTED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=6, errors=3)
    result.stdout.re_match_lines([
        r".*test_fd leaked: fds \d+ -> socket:\[\d+\], \d+ -> socket:\[\d+\].*",
        r".*test_thread leaked: threads 'left-running' \(daemon\).*",
        r".*test_event_channel leaked: 1 bound event channels; fds .*anon_inode:\[eventfd\].*",
    ], consecutive=False)
