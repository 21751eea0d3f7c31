"""Debian's xenstore-utils (libxenstore 4.17) against pvback's xenstored through XENSTORED_PATH."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends.xenstore.client import Perm, XenStoreClient, XenStoreError

from .conftest import ServerThread

# xenstore-utils is in ./dev's APT_TEST: these tests fail, rather than skip, where it is missing.


def test_write_read_single_and_multi(xs_thread: ServerThread) -> None:
    r = xs_thread.run("xenstore-write", "/vm/a", "hello")
    assert r.returncode == 0, r.stderr
    r = xs_thread.run("xenstore-read", "/vm/a")
    assert (r.returncode, r.stdout) == (0, "hello\n")
    # Several pairs / paths: the tools wrap these in TRANSACTION_START ... TRANSACTION_END("T").
    r = xs_thread.run("xenstore-write", "/vm/b", "1", "/vm/c/d", "two words")
    assert r.returncode == 0, r.stderr
    r = xs_thread.run("xenstore-read", "/vm/a", "/vm/b", "/vm/c/d")
    assert (r.returncode, r.stdout) == (0, "hello\n1\ntwo words\n")
    r = xs_thread.run("xenstore-read", "-p", "/vm/b")  # -p prefixes the path
    assert r.stdout == "/vm/b: 1\n"


def test_missing_node_exits_1(xs_thread: ServerThread) -> None:
    r = xs_thread.run("xenstore-read", "/no/such/node")
    assert r.returncode == 1
    assert "couldn't read path /no/such/node" in r.stderr
    xs_thread.run("xenstore-write", "/x", "1")
    r = xs_thread.run("xenstore-read", "/x", "/x/missing")
    assert r.returncode == 1
    assert r.stdout == "1\n"


def test_ls_list_exists_rm(xs_thread: ServerThread) -> None:
    xs_thread.run("xenstore-write", "/t/a", "1", "/t/b/c", "x y", "/t/b/d", "")
    r = xs_thread.run("xenstore-ls", "-f", "/t")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ['/t/a = "1"', '/t/b = ""', '/t/b/c = "x y"', '/t/b/d = ""']
    r = xs_thread.run("xenstore-list", "/t/b")
    assert (r.returncode, r.stdout) == (0, "c\nd\n")
    assert xs_thread.run("xenstore-exists", "/t/b/c").returncode == 0
    assert xs_thread.run("xenstore-exists", "/t/b/zz").returncode == 1
    assert xs_thread.run("xenstore-list", "/t/zz").returncode == 1
    assert xs_thread.run("xenstore-rm", "/t/b").returncode == 0
    assert xs_thread.run("xenstore-exists", "/t/b/c").returncode == 1
    assert xs_thread.run("xenstore-list", "/t").stdout == "a\n"
    # Absent node with an existing parent: fine; absent parent: ENOENT.
    assert xs_thread.run("xenstore-rm", "/t/gone").returncode == 0
    assert xs_thread.run("xenstore-rm", "/t/gone/deeper").returncode == 1


def test_chmod_and_ls_p_and_guest_access(xs_thread: ServerThread) -> None:
    xs_thread.run("xenstore-write", "/shared/k", "v", "/shared/k/sub", "s")
    r = xs_thread.run("xenstore-ls", "-p", "/shared")
    assert "(n0)" in r.stdout

    async def guest_read() -> bytes:
        c = await XenStoreClient.from_socket(xs_thread.server.connect_domain(5))
        try:
            return await c.read("/shared/k")
        finally:
            await c.close()

    with pytest.raises(XenStoreError) as ei:
        xs_thread.call(guest_read())
    assert ei.value.name == "EACCES"
    r = xs_thread.run("xenstore-chmod", "/shared/k", "n0", "r5")
    assert r.returncode == 0, r.stderr
    r = xs_thread.run("xenstore-ls", "-p", "/shared")
    assert r.stdout.splitlines()[0].endswith("(n0,r5)")
    assert xs_thread.call(guest_read()) == b"v"
    # -r recurses.
    assert xs_thread.run("xenstore-chmod", "-r", "/shared", "b7").returncode == 0
    assert xs_thread.call(_perms(xs_thread, "/shared/k/sub")) == [Perm(7, "b")]
    # Garbage permission strings are refused by the server (EINVAL), nothing changes.
    r = xs_thread.run("xenstore-chmod", "/shared/k", "z9")
    assert r.returncode != 0
    assert xs_thread.call(_perms(xs_thread, "/shared/k")) == [Perm(7, "b")]


async def _perms_async(sock: str, path: str) -> list[Perm]:
    async with await XenStoreClient.connect(sock) as c:
        return await c.get_perms(path)


def _perms(st: ServerThread, path: str):  # type: ignore[no-untyped-def]
    return _perms_async(st.sock, path)


def _read_lines(proc: subprocess.Popen[str], n: int, timeout: float = 5.0) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < n and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    return lines


def test_watch_tool(xs_thread: ServerThread) -> None:
    xs_thread.run("xenstore-write", "/w/a", "0")
    proc = subprocess.Popen(
        ["xenstore-watch", "-n", "4", "/w"], env=xs_thread.env, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert _read_lines(proc, 1) == ["/w"]  # the initial event
        assert xs_thread.run("xenstore-write", "/w/a", "1").returncode == 0
        assert _read_lines(proc, 1) == ["/w/a"]
        assert xs_thread.run("xenstore-write", "/elsewhere", "1").returncode == 0
        assert xs_thread.run("xenstore-rm", "/w/a").returncode == 0
        assert _read_lines(proc, 1) == ["/w/a"]
        assert xs_thread.run("xenstore-write", "/w/b/c", "1").returncode == 0
        assert _read_lines(proc, 1) == ["/w/b/c"]
        assert proc.wait(5) == 0  # -n 4: exits after four events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_release_domain_tool(xs_thread: ServerThread) -> None:
    xs_thread.call(xs_thread.server.introduce_domain(9))
    proc = subprocess.Popen(
        ["xenstore-watch", "-n", "2", "@releaseDomain"],
        env=xs_thread.env,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        assert _read_lines(proc, 1) == ["@releaseDomain"]
        xs_thread.call(xs_thread.server.release_domain(9))
        assert _read_lines(proc, 1) == ["@releaseDomain"]
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert xs_thread.run("xenstore-exists", "/local/domain/9").returncode == 1


def test_module_entry_point(tmp_path: Path) -> None:
    """`python -m backends.xenstore.server --socket PATH` for manual use."""
    sock = tmp_path / "xs.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends.xenstore.server", "--socket", str(sock), "--introduce", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), proc.stderr.read() if proc.poll() is not None and proc.stderr else "no socket"
        env = {**os.environ, "XENSTORED_PATH": str(sock)}
        r = subprocess.run(["xenstore-ls", "-p", "/local/domain"], env=env, capture_output=True, text=True, timeout=5)
        assert r.returncode == 0, r.stderr
        (line,) = r.stdout.splitlines()
        assert line.startswith('3 = ""') and line.endswith("(n3)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
    assert proc.returncode == 0
    assert not sock.exists()
