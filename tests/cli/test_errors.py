"""Every bad input an operator can give: one line that says what and how to fix, non-zero exit, nothing
half-created (no xenstore nodes, no sockets, no processes)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.cli.conftest import Bed, FakeServer, one_line_error, run, wait_until

NO_XEN = not os.path.exists("/dev/xen/gntdev")


def _no_device_nodes(bed: Bed, domid: int) -> None:
    assert bed.xs("directory", "/local/domain/0/backend/qdisk") in (None, [])
    assert bed.xs("directory", f"/local/domain/{domid}/device/vbd") in (None, [])
    assert bed.xs("directory", "/local/domain/0/backend/vbd") in (None, [])


def test_attach_bad_inputs_create_nothing(bed: Bed, tmp_path: Path) -> None:
    """One sim and one guest domain; each bad attach is refused before any node is written."""
    bed.start_sim()
    _guest, domid = bed.start_guest("--workload", "hold", "--seconds", "0")
    img = bed.image()
    (bed.root / "adir").mkdir()
    garbage_nbd = FakeServer(bed.root / "nbd.sock", "garbage")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # bound, never listening: refused
    cases: list[tuple[list[str], tuple[str, ...]]] = [
        ([str(bed.root / "missing.img")], ("does not exist", "truncate -s")),
        (["bogus:/x/y"], ("unsupported format 'bogus'",)),
        (["aio:relative/path"], ("not an absolute path",)),
        (["null:12"], ("not a positive multiple of 512",)),
        ([str(bed.root / "adir")], ("is a directory",)),
        (["nbd:unix:" + str(bed.root / "nobody.sock")], ("unreachable", "No such file")),
        ([f"nbd:127.0.0.1:{closed_port}"], ("unreachable", "refused")),
        (["nbd:unix:" + str(bed.root / "nbd.sock")], ("NBD server at unix:", "unusable")),
        (["nbd+unix:///?socket=" + str(bed.root / "nobody.sock")], ("unreachable", "No such file")),
        (["nbd://127.0.0.1:0/x"], ("bad target", "bad port '0'")),
        ([str(img), "--vdev", "sda"], ("not a virtual disk name",)),
        ([str(img), "--timeout", "0"], ("--timeout",)),
    ]
    try:
        for extra, needles in cases:
            res = run("attach", "disk", str(domid), *extra, *bed.sim_args())
            one_line_error(res, "attach", *needles)
        # A domain that does not exist.
        one_line_error(run("attach", "disk", "77", str(img), *bed.sim_args()), "attach", "domain 77 does not exist")
    finally:
        garbage_nbd.close()
    _no_device_nodes(bed, domid)


def test_attach_nobody_serves_then_backend_refuses(bed: Bed) -> None:
    """No backend for the type: removed after --timeout.  A backend that refuses the image: its error is the
    message.  Both leave no node behind, and the backend's error report is gone too."""
    bed.start_sim()
    _guest, domid = bed.start_guest("--workload", "hold", "--seconds", "0")
    img = bed.image()
    res = run("attach", "disk", str(domid), str(img), "--timeout", "1", *bed.sim_args())
    one_line_error(res, "attach", "no backend took", "within 1 s", "pvback serve", "removed again")
    _no_device_nodes(bed, domid)

    bed.start_serve()
    odd = bed.root / "odd.img"
    odd.write_bytes(b"\0" * 1000)  # not a whole number of sectors: the file driver refuses it in realize
    res = run("attach", "disk", str(domid), str(odd), *bed.sim_args())
    one_line_error(res, "attach", "the backend refused", "not a multiple of 512", "removed again")
    _no_device_nodes(bed, domid)
    wait_until(lambda: not bed.xs("directory", f"/local/domain/0/error/backend/qdisk/{domid}"), 5,
               "the backend to drop its error report")

    # The same vdev attached twice: refused, and the first one is untouched.
    assert run("attach", "disk", str(domid), str(img), *bed.sim_args()).returncode == 0
    res = run("attach", "disk", str(domid), str(img), *bed.sim_args())
    one_line_error(res, "attach", "already exists", "detach it first")
    assert bed.xs("read_str", f"/local/domain/0/backend/qdisk/{domid}/51712/params") == f"aio:{img}"
    # detach of something that is not there
    one_line_error(run("detach", "disk", str(domid), "xvdb", *bed.sim_args()), "detach", "has no qdisk disk xvdb")
    assert run("detach", "disk", str(domid), "xvda", *bed.sim_args()).returncode == 0
    # Like libxl, detach leaves the (now empty) per-domain directory until the domain goes.
    assert bed.xs("directory", f"/local/domain/0/backend/qdisk/{domid}") == []
    assert bed.xs("directory", f"/local/domain/{domid}/device/vbd") == []


def test_no_platform_and_wrong_sockets(bed: Bed) -> None:
    """No sim; a xenstored socket answering garbage; one that never answers (bounded by the 3 s probe)."""
    for cmd in (["status"], ["attach", "disk", "1", "null:1M"], ["serve"]):
        res = run(*cmd, *bed.sim_args())
        one_line_error(res, cmd[0], "no emulated platform", "pvback sim")
    one_line_error(run("guest", "--sim-dir", str(bed.sim_dir)), "guest", "no emulated platform")

    bed.start_sim()
    fake = bed.root / "fake"
    fake.mkdir()
    # A directory whose broker is real but whose xenstored is not one.
    os.symlink(bed.sim_dir / "broker.sock", fake / "broker.sock")
    garbage = FakeServer(fake / "xenstored.sock", "garbage")
    silent = FakeServer(bed.root / "silent.sock", "silent")
    try:
        args = ["--platform", "emulated", "--sim-dir", str(fake)]
        one_line_error(run("status", *args), "status", "is not a xenstored", "bad reply")
        one_line_error(run("attach", "disk", "1", "null:1M", *args), "attach", "is not a xenstored")
        res = run("serve", "--metrics", "", *args)
        assert res.returncode == 1
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("pvback serve: ") and "is not a xenstored" in last, res.stderr
        assert "Traceback" not in res.stderr
        # XENSTORED_PATH is how an operator points the Xen-side tools at a socket.
        res = run("status", "--platform", "xen", extra_env={"XENSTORED_PATH": str(silent.path)})
        one_line_error(res, "status", "is not a xenstored", "no reply within 3 s")
    finally:
        garbage.close()
        silent.close()


@pytest.mark.skipif(not NO_XEN, reason="this machine runs on Xen: --platform xen is legitimate here")
def test_platform_xen_forced_without_xen(bed: Bed) -> None:
    one_line_error(run("serve", "--platform", "xen"), "serve", "/dev/xen/gntdev is missing", "--platform emulated")
    one_line_error(run("status", "--platform", "xen"), "status", "no xenstore", "XENSTORED_PATH")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed to drop root's override")
def test_no_permission_on_xenstore(bed: Bed) -> None:
    """The socket is root's and mode 0: an operator without access (here: root without CAP_DAC_OVERRIDE, which
    is what permission checks see for an unprivileged user) is told to run as root."""
    bed.start_sim()
    os.chmod(bed.xs_sock, 0)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    res = run("status", *bed.sim_args(), prefix=drop)
    one_line_error(res, "status", "permission denied", "run pvback as root")
    res = run("status", "--platform", "xen", prefix=drop, extra_env={"XENSTORED_PATH": str(bed.xs_sock)})
    one_line_error(res, "status", "permission denied")


def test_bad_config_and_options(bed: Bed) -> None:
    bad_toml = bed.root / "bad.toml"
    bad_toml.write_text("[serve\nlog_level = 'info'\n")
    typo = bed.root / "typo.toml"
    typo.write_text("[serve]\nlog_levle = 'debug'\n")
    badtype = bed.root / "types.toml"
    badtype.write_text("[serve]\nbackend_types = ['qdisk', 'vif9']\n")
    cases = [
        (["--config", str(bed.root / "nope.toml")], ("cannot read config", "No such file")),
        (["--config", str(bad_toml)], ("not valid TOML",)),
        (["--config", str(typo)], ("unknown key [serve] log_levle", "known:")),
        (["--config", str(badtype)], ("unknown backend type 'vif9'",)),
        (["--metrics", "nonsense"], ("not HOST:PORT",)),
        (["--types", "qdisk,foo"], ("unknown backend type 'foo'",)),
    ]
    for extra, needles in cases:
        one_line_error(run("serve", *bed.sim_args(), *extra), "serve", *needles)
    # A metrics port someone else holds: the daemon starts, says which port, exits 1 and leaves the sim clean.
    bed.start_sim()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        res = run("serve", *bed.sim_args(), "--metrics", busy)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("pvback serve: metrics endpoint " + busy) and "--metrics" in last, res.stderr
    assert bed.xs("directory", "/local/domain/0/backend") is None


def test_sim_dir_in_use(bed: Bed) -> None:
    sim = bed.start_sim()
    one_line_error(run("sim", "--sim-dir", str(bed.sim_dir)), "sim", f"(pid {sim.pid}) already runs",
                   "another --sim-dir")
    one_line_error(run("sim", "--daemon", "--sim-dir", str(bed.sim_dir)), "sim", "already runs")
    # The running sim is untouched by the refused starts.
    assert bed.xs("get_domain_path", "0") == "/local/domain/0"
    a_file = bed.root / "file"
    a_file.write_text("")
    one_line_error(run("sim", "--sim-dir", str(a_file)), "sim", "cannot start the emulated platform")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed to drop root's override")
def test_no_permission_on_xen_nodes(bed: Bed) -> None:
    """The check `serve --platform xen` runs before the C layer opens /dev/xen/*, on stand-in nodes (this
    machine has no Xen, and tests must not create /dev/xen)."""
    import subprocess
    import sys

    from tests.cli.conftest import ROOT, env

    xen = bed.root / "xen"
    xen.mkdir()
    code = ("import sys; from pathlib import Path; from backends.daemon.connect import check_xen_nodes\n"
            "try:\n    check_xen_nodes(Path(sys.argv[1]))\nexcept Exception as e:\n    print(e)\n")
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]

    def check() -> str:
        return subprocess.run([*drop, sys.executable, "-c", code, str(xen)], capture_output=True, text=True,
                              timeout=30, env=env(), cwd=ROOT).stdout.strip()

    assert "gntdev is missing" in check() and "--platform emulated" in check()
    for name in ("gntdev", "evtchn"):
        (xen / name).touch(mode=0o600)
    assert check() == ""
    os.chmod(xen / "evtchn", 0)
    assert check() == f"no permission on {xen}/evtchn: run pvback as root (or give its user access to /dev/xen/*)"


def test_serve_exits_when_xenstore_goes_away(bed: Bed) -> None:
    """Without xenstore nothing can be served: exit non-zero (systemd's Restart=on-failure brings it back)."""
    sim = bed.start_sim()
    serve, _addr = bed.start_serve()
    assert sim.stop() == 0
    rc = serve.popen.wait(10)
    assert rc == 1, serve.text()
    assert "level=error logger=pvback.serve msg=\"lost the xenstore connection\"" in serve.text()


@pytest.mark.parametrize("argv,command,needles", [
    (["attach", "disk", "abc", "x.img"], "attach", ("disk", "argument domid", "'abc'", "--help")),
    (["attach", "floppy", "1", "x.img"], "attach", ("invalid choice", "'floppy'")),
    (["detach", "disk"], "detach", ("required", "domid")),
    (["serve", "--platform", "kvm"], "serve", ("--platform", "'kvm'")),
    (["frobnicate"], "", ("invalid choice",)),
])
def test_usage_errors_are_one_line(argv: list[str], command: str, needles: tuple[str, ...]) -> None:
    res = run(*argv)
    assert res.returncode == 2
    if command:
        one_line_error(res, command, *needles)
    else:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("pvback: ") and all(n in lines[0] for n in needles), lines
