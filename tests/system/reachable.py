"""Run a process whose user is not root (the daemon after its privilege drop, the vTPM manager as its own
user) from a checkout it may not be able to reach.

A checkout can live anywhere: a clone under `mktemp -d` (0700), an interpreter under /root (0700, pyenv).  An
unprivileged user cannot import pvback or its dependencies from there, which the daemon rightly refuses
("install Python and pvback where the daemon's user can read them").  The test must not chmod the host's
directories, so the process runs in a private mount namespace where every non-traversable ancestor of the
checkout, the venv and the interpreter is covered by a 0755 tmpfs holding only those trees (bind-moved back
in); nothing outside that namespace changes.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def _needed() -> list[Path]:
    """The trees the unprivileged process reads: the checkout, the venv, the interpreter's prefix."""
    paths = {REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
             Path(os.path.realpath(sys.executable)).parent}
    outermost = [p for p in paths if not any(q != p and p.is_relative_to(q) for q in paths)]
    return sorted(outermost)


def _blocking_ancestor(path: Path) -> Path | None:
    """The topmost directory on the way to `path` that others cannot traverse, or None."""
    for d in [*reversed(path.parents), path]:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d if d != path else None
    return None


def wrapper_script() -> str:
    """A shell script that covers the blocking ancestors and then execs its arguments."""
    covers: dict[Path, list[Path]] = {}
    for p in _needed():
        a = _blocking_ancestor(p)
        if a is not None:
            covers.setdefault(a, []).append(p)
    # An ancestor inside another one's tree is covered after it (its tree is moved back in first).
    lines = ["#!/bin/sh", "set -e"]
    for a in sorted(covers, key=lambda d: len(d.parts)):
        held = covers[a]
        for i, p in enumerate(held):
            lines += [f'h{i}=$(mktemp -d /tmp/pvback-reach-XXXXXX)', f'mount --bind "{p}" "$h{i}"']
        lines.append(f'mount -t tmpfs -o mode=0755,size=1m pvback-test-reach "{a}"')
        for i, p in enumerate(held):
            lines += [f'mkdir -p "{p}"', f'mount --move "$h{i}" "{p}"', f'rmdir "$h{i}"']
    lines.append('exec "$@"')
    return "\n".join(lines) + "\n"


def reachable_prefix(workdir: Path) -> list[str]:
    """argv prefix: a private mount namespace in which an unprivileged user reaches pvback and Python."""
    script = workdir / "reachable.sh"
    script.write_text(wrapper_script())
    script.chmod(0o755)
    return ["unshare", "-m", "--propagation", "private", str(script)]
