"""What dom0's test driver (run_tests.py) and the cases it imports share: stopping what they started, by PID,
and judging a step the guest reported."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from typing import Any


def stop_process(proc: subprocess.Popen[Any] | None, wait: float = 30.0) -> int | None:
    """SIGTERM, `wait` seconds to exit, then SIGKILL; the exit status, or None when it had to be killed (or
    never ran)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return None
    return proc.returncode


def judge_step(report: Callable[[str, bool, str], None], check: str | None, ok: bool, detail: str,
               stamp: Callable[[], str], verify: Callable[[], str | None],
               failure: type[Exception]) -> None:
    """One guest step's verdict: the guest's failure as it said it, or its pass confirmed by dom0's own look
    (`verify`, raising `failure` or OSError when dom0 disagrees or cannot look; None when the verdict must wait
    for later events)."""
    if check is None:
        return
    if not ok:
        report(check, False, f"domU: {detail} {stamp()}")
        return
    try:
        extra = verify()
    except failure as exc:
        report(check, False, f"domU passed ({detail}) but dom0: {exc} {stamp()}")
        return
    except OSError as exc:
        report(check, False, f"domU passed ({detail}) but dom0 could not check: {exc} {stamp()}")
        return
    if extra is not None:
        report(check, True, f"{detail}; {extra} {stamp()}")
