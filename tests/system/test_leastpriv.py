"""Least privilege (#19): `pvback serve`, started as root, drops to an unprivileged user with only the
capabilities its served types declare, and still serves a disk, a NIC and a vTPM; SIGKILLed and restarted, it
starts as root again, drops again and picks every device up.

The daemon starts as the shipped unit starts it (root, the unit's CapabilityBoundingSet, no_new_privs) and
serves qdisk, vtpm and vif with `[daemon] user = "nobody"` (a test must not create users on a
shared machine; the shipped unit uses a dedicated `pvback` user) inside the peer's network namespace, as
tests/system/test_net.py runs it.  Its workdir, image and state directories are the test's own, 0755 so that
user can reach them.  The checkout or the interpreter may sit under a 0700 directory (a clone under
`mktemp -d`, pyenv under /root): the daemon runs in a private mount namespace where such a directory is a tmpfs
holding only those trees (tests/system/reachable.py; the host is not touched).  The kernel's
view of the daemon (/proc/<pid>/status) is the oracle: uid/gid, capability sets, no_new_privs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends.daemon.privdrop import CAPABILITIES, read_status
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import wait_for_state
from tests.net import pingtcp
from tests.net.netns import NetNS
from tests.system.conftest import REPO, SimProc
from tests.system.reachable import reachable_prefix
from tests.system.test_net import GUEST_V4, PEER_V4, NetBed, NetnsServe
from tests.system.vtpmbed import TpmBed, kill_swtpms

S = XenbusState
USER_UID = USER_GID = 65534  # nobody / nogroup
NET_ADMIN = 1 << CAPABILITIES["CAP_NET_ADMIN"]
UNIT = REPO / "contrib" / "systemd" / "pvback.service"

@dataclass
class LeastPrivBed(NetBed, TpmBed):
    pass


def unit_bounding_set() -> list[str]:
    """The shipped unit's CapabilityBoundingSet, as setpriv names them."""
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [c.removeprefix("CAP_").lower() for c in line.partition("=")[2].split()]
    raise AssertionError(f"no CapabilityBoundingSet in {UNIT}")


class DroppingServe(NetnsServe):
    """Started as the unit starts it: root, with the unit's bounding set and no_new_privs (setpriv stands in
    for systemd), in the peer's namespace, where pvback and Python are reachable by its user."""

    def __init__(self, sim: SimProc, workdir: Path, ns: NetNS, config: str) -> None:
        super().__init__(sim, workdir, ns, config)
        caps = ",".join(["-all", *(f"+{c}" for c in unit_bounding_set())])
        self.prefix = [*reachable_prefix(workdir), *self.prefix,
                       "setpriv", "--bounding-set", caps, "--inh-caps", "-all", "--no-new-privs", "--"]


@pytest.fixture
def lbed(sim: SimProc) -> Iterator[LeastPrivBed]:
    work = Path(tempfile.mkdtemp(prefix="pvlp-", dir="/tmp"))
    work.chmod(0o755)
    run_dir = work / "vtpm-run"
    tag = f"{os.getpid()}"
    config = (f'[daemon]\nuser = "{USER_UID}"\n'
              f'[serve]\nbackend_types = ["qdisk", "vtpm", "vif"]\n'
              f'[vtpm]\nstate_dir = "{work}/vtpm-state"\nrun_dir = "{run_dir}"\ncommand_timeout_s = 30.0\n'
              f'[net]\nrun_dir = "{work}/net"\novsdb = "unix:{work}/ovsdb.sock"\n')
    # What a daemon that ran as root left behind: handed to the user at start (the unit grants no CAP_DAC_*).
    leftover = work / "vtpm-state" / "0-old-vtpm"
    leftover.mkdir(parents=True, mode=0o700)
    (leftover / "tpm2-00.permall").write_bytes(b"old state")
    (leftover / "tpm2-00.permall").chmod(0o600)
    # A stand-in for ovsdb-server's socket (root's, 0700 like Debian's): the daemon connects to it after the drop.
    ovsdb = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ovsdb.bind(str(work / "ovsdb.sock"))
    os.chmod(work / "ovsdb.sock", 0o700)
    ovsdb.listen(4)
    try:
        with NetNS(f"pvlp-g-{tag}") as g, NetNS(f"pvlp-p-{tag}") as p:
            serve = DroppingServe(sim, work, p, config)
            serve.start()
            bed = LeastPrivBed(sim, serve, work, g=g, p=p, run_dir=run_dir)
            try:
                yield bed
            finally:
                alive = serve.alive
                rc = serve.stop()
                assert alive and rc == 0, f"pvback serve died or failed to stop ({rc}):\n{serve.log_text()[-3000:]}"
    finally:
        ovsdb.close()
        kill_swtpms(run_dir)
        if not os.environ.get("PVBACK_TEST_KEEP"):  # set it to read the logs of a failed test
            shutil.rmtree(work, ignore_errors=True)


def assert_dropped(pid: int, want: int = NET_ADMIN) -> None:
    """The kernel's view of the daemon: nobody, `want` (CAP_NET_ADMIN) alone, nothing a child could inherit."""
    assert b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes()  # the daemon itself, not a wrapper
    st = read_status(pid)
    assert st["Uid"].split() == [str(USER_UID)] * 4, st["Uid"]
    assert st["Gid"].split() == [str(USER_GID)] * 4, st["Gid"]
    assert "0" not in st["Groups"].split(), st["Groups"]
    assert int(st["CapEff"], 16) == want, st["CapEff"]
    assert int(st["CapPrm"], 16) == want, st["CapPrm"]
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0, (st["CapInh"], st["CapAmb"])
    assert int(st["CapBnd"], 16) == 0, st["CapBnd"]
    assert st["NoNewPrivs"] == "1"


def swtpm_status(bed: LeastPrivBed, uuid: str) -> dict[str, str]:
    return read_status(bed.swtpm_pid(uuid))


@pytest.mark.system_timeout(180)
async def test_serves_disk_nic_vtpm_unprivileged_across_sigkill(lbed: LeastPrivBed) -> None:
    first = lbed.serve.pid
    assert_dropped(first)

    # Disk: the image belongs to the daemon's user; what the guest writes is on the image, hash for hash.
    image = lbed.tmp / "disk.img"
    image.write_bytes(bytes(8 << 20))
    os.chown(image, USER_UID, USER_GID)
    d = await lbed.disk(image)
    data = os.urandom(1 << 20)
    await d.front.write(2048, data)
    await d.front.flush()
    assert hashlib.sha256(await d.front.read(2048, len(data))).digest() == hashlib.sha256(data).digest()
    on_disk = await asyncio.to_thread(image.read_bytes)
    assert on_disk[2048 * 512:2048 * 512 + len(data)] == data

    # An image only root may open is refused to the dropped daemon (root would have served it).
    secret = lbed.tmp / "root-only.img"
    secret.write_bytes(bytes(1 << 20))
    secret.chmod(0o600)
    g2, _xs2 = await lbed.guest(name="denied", mem_pages=64, gnt_entries=64)
    paths = await lbed.attach(g2.domid, f"aio:{secret}", wait=False)
    await wait_for_state(await lbed.dom0(), paths.backend, {S.CLOSING, S.CLOSED}, timeout=10.0)
    err = await (await lbed.dom0()).read_str(f"{paths.backend}/error")
    assert err is not None and "ermission denied" in err, err

    # NIC: the tap is created at realize, after the drop (CAP_NET_ADMIN is what makes that possible).
    nic = await lbed.nic(queues=1)
    g, p = lbed.gns, lbed.peer
    assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V4, count=3)) == 3

    # vTPM: swtpm is the daemon's child, as the daemon's user, with no capabilities at all.
    v = await lbed.tpm()
    _rc, out, _ = await lbed.tools(v, "tpm2_getrandom", "--hex", "16")
    assert len(out.strip()) == 32
    sw = swtpm_status(lbed, v.uuid)
    assert sw["Uid"].split() == [str(USER_UID)] * 4 and int(sw["CapEff"], 16) == 0 and int(sw["CapPrm"], 16) == 0
    assert sw["NoNewPrivs"] == "1"
    for leftover in ("vtpm-state", "vtpm-state/0-old-vtpm", "vtpm-state/0-old-vtpm/tpm2-00.permall"):
        assert (lbed.tmp / leftover).stat().st_uid == USER_UID, leftover

    # The OVSDB socket was opened to the daemon's group before the drop (an ACL entry; mode and owner kept).
    sock = lbed.tmp / "ovsdb.sock"
    probe = "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"  # system python: nobody reads it
    res = subprocess.run(["/usr/bin/python3", "-c", probe, str(sock)], user=USER_UID, group=USER_GID, extra_groups=[],
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert res.returncode == 0, res.stderr
    assert sock.stat().st_uid == 0 and sock.stat().st_mode & 0o007 == 0

    # SIGKILL: the new daemon starts as root, drops again, and every device goes on.
    lbed.serve.kill(signal.SIGKILL)
    await asyncio.to_thread(lbed.serve.start)
    assert lbed.serve.pid != first
    assert_dropped(lbed.serve.pid)
    for backend in (nic.backend, v.paths.backend):
        await wait_for_state(await lbed.dom0(), backend, S.CONNECTED, timeout=20.0)
    assert await d.front.read(2048, len(data)) == data
    more = os.urandom(256 << 10)
    await d.front.write(8192, more)
    await d.front.flush()
    assert hashlib.sha256(await d.front.read(8192, len(more))).digest() == hashlib.sha256(more).digest()
    assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V4, count=3)) == 3
    assert await asyncio.to_thread(p.run, lambda: pingtcp.ping(GUEST_V4, count=3)) == 3
    _rc, out, _ = await lbed.tools(v, "tpm2_getrandom", "--hex", "16")
    assert len(out.strip()) == 32
    assert all(nf.error is None for nf in nic.fronts)
    assert "dropped privileges" in lbed.serve.log_text().split("==== serve start #2")[1]


@pytest.mark.system_timeout(90)
async def test_disk_only_keeps_no_capability_and_reload_cannot_add_one(sim: SimProc) -> None:
    """Serving disks alone the daemon keeps no capability at all; a SIGHUP that adds vif (CAP_NET_ADMIN) is
    refused with an error line while vtpm (no capability) added by the same reload starts."""
    work = Path(tempfile.mkdtemp(prefix="pvlp-", dir="/tmp"))
    work.chmod(0o755)
    base = (f'[daemon]\nuser = "nobody"\n[net]\nrun_dir = "{work}/net"\n'
            f'[vtpm]\nstate_dir = "{work}/vtpm-state"\nrun_dir = "{work}/vtpm-run"\n')
    try:
        with NetNS(f"pvlp-r-{os.getpid()}") as p:
            serve = DroppingServe(sim, work, p, base + '[serve]\nbackend_types = ["qdisk"]\n')
            serve.start()
            try:
                assert_dropped(serve.pid, want=0)
                assert "capabilities=none" in serve.log_text()
                assert serve.config_path is not None
                serve.config_path.write_text(base + '[serve]\nbackend_types = ["qdisk", "vif", "vtpm"]\n')
                assert serve.proc is not None
                serve.proc.signal(signal.SIGHUP)
                deadline = asyncio.get_running_loop().time() + 10
                while "msg=reloaded" not in serve.log_text():
                    assert asyncio.get_running_loop().time() < deadline, serve.log_text()[-2000:]
                    await asyncio.sleep(0.05)
                log = serve.log_text()
                assert "not serving a type added by reload" in log and "type=vif needs=CAP_NET_ADMIN" in log, log
                assert serve.alive
                assert_dropped(serve.pid, want=0)
                # Every type's directories were handed over at start, so a reload can add vtpm.
                assert (work / "vtpm-run").stat().st_uid == USER_UID
                assert "msg=\"not serving a type added by reload\" type=vtpm" not in log
            finally:
                rc = serve.stop()
                assert rc == 0, serve.log_text()[-2000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.system_timeout(120)
async def test_vtpm_manager_releases_keys_to_the_dropped_daemon(sim: SimProc) -> None:
    """With a vTPM manager: the dropped daemon reaches the manager's socket (0660 root's: the ACL entry) and
    the manager releases the state key to it because release_uids names the daemon's user; the guest's TPM
    answers through the encrypted state."""
    from tests.system.test_vtpm_manager import ManagerProc, MgrBed, serve_config

    work = Path(tempfile.mkdtemp(prefix="pvlp-", dir="/tmp"))
    work.chmod(0o755)
    run_dir = work / "vtpm-run"
    mgr = ManagerProc(sim, work / "m", work)
    mgr.config.write_text(mgr.config.read_text().replace("[manager]\n", f"[manager]\nrelease_uids = [{USER_UID}]\n"))
    try:
        await asyncio.to_thread(mgr.start, init=True)
        with NetNS(f"pvlp-m-{os.getpid()}") as p:
            conf = f'[daemon]\nuser = "{USER_UID}"\n' + serve_config(work / "vtpm-state", run_dir, mgr.socket)
            serve = DroppingServe(sim, work, p, conf)
            await asyncio.to_thread(serve.start)
            bed = MgrBed(sim, serve, work, run_dir=run_dir, mgr=mgr)
            try:
                assert_dropped(serve.pid, want=0)
                g, xs, dom = await bed.vm("lp")
                v = await bed.mtpm(g, xs, await bed.provision(dom))
                _rc, out, _ = await bed.tools(v, "tpm2_getrandom", "--hex", "16")
                assert len(out.strip()) == 32
                assert f"peer_uid={USER_UID}" in mgr.log_text(), mgr.log_text()[-2000:]
                assert read_status(bed.swtpm_pid(v.uuid))["Uid"].split() == [str(USER_UID)] * 4
            finally:
                await bed.aclose()
                rc = serve.stop()
                assert rc == 0, serve.log_text()[-2000:]
    finally:
        kill_swtpms(run_dir)
        if mgr.proc is not None and mgr.proc.alive:
            mgr.stop()
        if not os.environ.get("PVBACK_TEST_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
