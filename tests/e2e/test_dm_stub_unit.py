"""`pvback dm-stub` (backends/daemon/dm_stub.py) without Xen: QEMU's argument parsing, the QMP session, and the
process against the project's xenstored-compatible server.  The real thing (libxl spawning it) runs in the
real-Xen e2e test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from backends.daemon.dm_stub import DmStubError, QmpSession, parse_args
from backends.xenstore.client import XenStoreClient
from backends.xenstore.server import XenStoreServer

ROOT = Path(__file__).resolve().parents[2]

# What libxl 4.17 passes the device model of a PV guest's qdisk disks (libxl__spawn_qdisk_backend).
LIBXL_ARGS = ["-xen-domid", "{domid}", "-chardev", "socket,id=libxl-cmd,path={sock},server=on,wait=off",
              "-mon", "chardev=libxl-cmd,mode=control", "-chardev",
              "socket,id=libxenstat-cmd,path={sock2},server=on,wait=off", "-mon", "chardev=libxenstat-cmd,mode=control",
              "-nodefaults", "-no-user-config", "-xen-attach", "-name", "domain-{domid}", "-vnc", "none",
              "-display", "none", "-nographic", "-machine", "xenpv", "-m", "385"]


def libxl_args(tmp: Path, domid: int = 7) -> list[str]:
    return [a.format(domid=domid, sock=tmp / f"qmp-libxl-{domid}", sock2=tmp / f"qmp-libxenstat-{domid}")
            for a in LIBXL_ARGS]


def test_parse_libxl_arguments(tmp_path: Path) -> None:
    args = parse_args(libxl_args(tmp_path))
    assert args.domid == 7
    assert args.qmp == [str(tmp_path / "qmp-libxl-7"), str(tmp_path / "qmp-libxenstat-7")]
    assert args.qmp_fds == []


def test_parse_inherited_fd_and_old_style_flags() -> None:
    args = parse_args(["-xen-domid", "3", "-chardev", "socket,id=m,fd=9,server,nowait",
                       "-mon", "chardev=m,mode=control", "-qmp", "unix:/run/q,server,nowait"])
    assert args.qmp_fds == [9] and args.qmp == ["/run/q"]


# What `xl devd` in a driver domain passes for a guest's qdisk backends there (libxl__spawn_qdisk_backend, 4.17):
# no QMP, and the domain exists already.
DEVD_ARGS = ["-xen-domid", "12", "-xen-attach", "-name", "domain-12", "-nographic", "-M", "xenpv",
             "-monitor", "/dev/null", "-serial", "/dev/null", "-parallel", "/dev/null"]


def test_parse_xl_devd_arguments() -> None:
    args = parse_args(DEVD_ARGS)
    assert (args.domid, args.attach, args.qmp, args.qmp_fds) == (12, True, [], [])
    # Without -xen-attach a device model with no QMP is one libxl would wait for in vain.
    with pytest.raises(DmStubError, match="no QMP monitor"):
        parse_args([a for a in DEVD_ARGS if a != "-xen-attach"])


@pytest.mark.parametrize("argv,why", [
    ([], "no -xen-domid"),
    (["-xen-domid", "0", "-qmp", "unix:/q,server"], "not a guest domain id"),
    (["-xen-domid", "x1", "-qmp", "unix:/q,server"], "not a guest domain id"),
    (["-xen-domid", "3"], "no QMP monitor"),
    (["-xen-domid", "3", "-mon", "chardev=nope,mode=control"], "no -chardev socket with that id"),
    (["-xen-domid", "3", "-chardev", "socket,id=m,path=/q", "-mon", "chardev=m,mode=control"], "only server"),
    (["-xen-domid", "3", "-chardev", "socket,id=m,fd=x,server=on", "-mon", "chardev=m,mode=control"], "fd="),
    (["-xen-domid"], "needs a value"),
])
def test_parse_errors_are_one_clear_line(argv: list[str], why: str) -> None:
    with pytest.raises(DmStubError, match=why):
        parse_args(argv)


def _replies(session: QmpSession, data: bytes) -> list[dict[str, Any]]:
    replies, _ = session.feed(data)
    return [json.loads(r) for r in replies]


def test_qmp_session_handshake_and_commands() -> None:
    s = QmpSession(7)
    greeting = json.loads(QmpSession.greeting())
    assert greeting["QMP"]["version"]["qemu"]["major"] >= 2
    # Before qmp_capabilities QEMU refuses everything else.
    assert _replies(s, b'{"execute": "query-status"}')[0]["error"]["class"] == "CommandNotFound"
    assert _replies(s, b'{"execute": "qmp_capabilities", "id": 1}\r\n') == [{"return": {}, "id": 1}]
    # Split across reads, two in one read, ids echoed verbatim.
    assert _replies(s, b'{"execute": "query-ch') == []
    out = _replies(s, b'ardev", "id": "a"}\r\n{"execute": "query-status", "id": [2]}')
    assert out == [{"return": [], "id": "a"},
                   {"return": {"status": "running", "singlestep": False, "running": True}, "id": [2]}]
    unknown = _replies(s, b'{"execute": "device_add", "arguments": {"driver": "x"}}')[0]
    assert unknown["error"] == {"class": "CommandNotFound", "desc": "The command device_add has not been found"}
    assert _replies(s, b'[1, 2]')[0]["error"]["class"] == "GenericError"
    assert _replies(s, b'nonsense\n{"execute": "quit"}') == [
        {"error": {"class": "GenericError", "desc": "JSON parse error"}}, {"return": {}}]
    assert s.quit


def test_qmp_session_bounds_an_endless_command() -> None:
    s = QmpSession(7)
    with pytest.raises(DmStubError):
        for _ in range(40):
            s.feed(b'{"execute": "' + b"x" * 65536)


def _qmp(path: Path, commands: list[dict[str, object]]) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(str(path))
        f = c.makefile("rwb")
        out = [json.loads(f.readline())]
        for cmd in commands:
            f.write(json.dumps(cmd).encode() + b"\r\n")
            f.flush()
            out.append(json.loads(f.readline()))
        return out


@pytest.mark.timeout(60)
def test_stub_process_against_xenstored() -> None:
    """As libxl uses it: spawned with QEMU's arguments, it writes device-model/<domid>/state=running, answers
    QMP, exits 0 on SIGHUP (libxl's kill) and when its domain is released, and leaves no socket behind."""
    # Not pytest's tmp_path: short unix socket paths, and no other pytest run's basetemp rotation under us.
    with tempfile.TemporaryDirectory(prefix="pvdm-") as d:
        asyncio.run(_stub_process_against_xenstored(Path(d)))


async def _stub_process_against_xenstored(tmp_path: Path) -> None:
    server = XenStoreServer()
    xs_path = tmp_path / "xenstored.sock"
    await server.listen(str(xs_path))
    xs = await XenStoreClient.connect(str(xs_path))
    env = dict(os.environ, XENSTORED_PATH=str(xs_path), PYTHONPATH=str(ROOT))
    procs = []
    try:
        for domid, stop in ((7, "sighup"), (8, "release")):
            await server.introduce_domain(domid)
            await xs.write(f"/local/domain/{domid}/name", f"guest{domid}")
            argv = libxl_args(tmp_path, domid)
            proc = subprocess.Popen([sys.executable, "-m", "backends.daemon.cli", "dm-stub", *argv], env=env,
                                    stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            state = f"/local/domain/0/device-model/{domid}/state"
            for _ in range(200):
                if await xs.read_str(state) == "running" or proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            assert proc.stderr is not None
            assert await xs.read_str(state) == "running", proc.stderr.read() if proc.poll() is not None else ""
            sock = tmp_path / f"qmp-libxl-{domid}"
            out = await asyncio.to_thread(_qmp, sock, [{"execute": "qmp_capabilities"},
                                                       {"execute": "query-chardev", "id": 5}])
            assert "QMP" in out[0] and out[1] == {"return": {}} and out[2] == {"return": [], "id": 5}
            if stop == "sighup":
                proc.send_signal(signal.SIGHUP)
            else:
                await server.release_domain(domid)
            rc = await asyncio.to_thread(proc.wait, 20)
            log = proc.stderr.read() if proc.stderr else ""
            assert rc == 0, log
            assert f"domid={domid} qmp qmp_capabilities" in log and "query-chardev" in log
            assert ("domain gone" in log) == (stop == "release")
            assert not sock.exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await xs.close()
        await server.close()


def test_cli_usage_and_bad_arguments() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cp = subprocess.run([sys.executable, "-m", "backends.daemon.cli", "dm-stub", "-nographic"], env=env,
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 1
    assert cp.stderr.strip().splitlines() == ["pvback dm-stub: no -xen-domid: libxl passes it to every device model "
                                              "it starts"]
    cp = subprocess.run([sys.executable, "-m", "backends.daemon.cli", "--help"], env=env, capture_output=True,
                        text=True, timeout=30)
    assert "dm-stub" in cp.stdout
