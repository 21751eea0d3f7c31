"""A SIGKILLed and restarted daemon resumes a NIC in both directions without the guest's help: the peer reaches
the guest first, while the guest (which is not told that its backend restarted) has sent nothing since.

The daemon serves vif and vtpm, and the guest has a vTPM beside its NIC, as a Xen guest may: swtpm is the
daemon's child and outlives it (the next daemon adopts it).  A child spawned with an inheritable fd of the
daemon kept it across the kill; a tap queue held that way stays attached to the tap, the next daemon's queues
come in beside it, and the tap hashes host frames to the orphan as well, where nobody reads them: the peer could
not reach the guest until the guest's own traffic had taught the tap's flow table a live queue.  So: every fd of
the daemon is close-on-exec, the tap loses its carrier when the daemon dies (no queue is left attached), and
after the restart the peer's ping (IPv4 and IPv6) and a hashed TCP transfer peer -> guest come first, then
guest -> peer.  One and two netif queues.

Addresses from 198.18.0.0/15 and fd00::/8 only, in namespaces created here (no route out), deleted at teardown.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.net import pingtcp
from tests.net.netns import NetNS
from tests.net.test_datapath import tcp
from tests.system.conftest import SimProc
from tests.system.test_net import GUEST_V4, GUEST_V6, PEER_V4, PEER_V6, NetBed, NetnsServe, Nic
from tests.system.vtpmbed import TpmBed, kill_swtpms

O_CLOEXEC = 0o2000000  # as /proc/<pid>/fdinfo shows an fd's close-on-exec flag


@dataclass
class NetTpmBed(NetBed, TpmBed):
    pass


@pytest.fixture
def ntbed(sim: SimProc, tmp_path: Path) -> Iterator[NetTpmBed]:
    run_dir = Path(tempfile.mkdtemp(prefix="pvbt-", dir="/tmp"))
    tag = f"{os.getpid()}"
    config = (f'[serve]\nbackend_types = ["vif", "vtpm"]\n'
              f'[vtpm]\nstate_dir = "{tmp_path}/vtpm-state"\nrun_dir = "{run_dir}"\n'
              f'[net]\nrun_dir = "{tmp_path}/net"\n')
    try:
        with NetNS(f"pvbr-g-{tag}") as g, NetNS(f"pvbr-p-{tag}") as p:
            serve = NetnsServe(sim, tmp_path, p, config)
            serve.start()
            try:
                yield NetTpmBed(sim, serve, tmp_path, g=g, p=p, run_dir=run_dir)
            finally:
                alive = serve.alive
                rc = serve.stop()
                if not serve.killed:
                    assert alive and rc == 0, f"pvback serve died or failed to stop ({rc}):\n" \
                        f"{serve.log_text()[-3000:]}"
    finally:
        kill_swtpms(run_dir)  # the killed daemon's swtpm, adopted by the next one
        shutil.rmtree(run_dir, ignore_errors=True)


def inheritable_fds(pid: int) -> dict[int, str]:
    """The fds of `pid` above stderr that an exec'd child would keep."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        flags = int(info.split("flags:")[1].split()[0], 8)
        if fd > 2 and not flags & O_CLOEXEC:
            out[fd] = target
    return out


def guest_tx(nic: Nic) -> list[int]:
    """Frames the guest's netfront has put on its TX rings, per queue."""
    return [int(nf.stats["tx"]) for nf in nic.fronts]


async def guest_quiet(nic: Nic, still: float = 1.5, timeout: float = 30.0) -> list[int]:
    """Wait until the guest has sent nothing for `still` seconds (the transfers' last ACKs and FINs are out)."""
    last, since = guest_tx(nic), asyncio.get_running_loop().time()
    async with asyncio.timeout(timeout):
        while asyncio.get_running_loop().time() - since < still:
            await asyncio.sleep(0.1)
            now = guest_tx(nic)
            if now != last:
                last, since = now, asyncio.get_running_loop().time()
    return last


async def oper_up(ns: NetNS, dev: str, timeout: float = 10.0) -> None:
    """The host has taken the tap's carrier in (its link watch ran: operstate UP, the queueing discipline live)."""
    async with asyncio.timeout(timeout):
        while " state UP " not in ns.ip("link", "show", "dev", dev):
            await asyncio.sleep(0.02)


async def ping(ns: NetNS, addr: str, count: int = 3) -> int:
    return await asyncio.to_thread(ns.run, lambda: pingtcp.ping(addr, count=count, timeout=2.0))


@pytest.mark.system_timeout(180)
@pytest.mark.parametrize("queues", [1, 2])
async def test_sigkill_restart_peer_reaches_the_guest_first(ntbed: NetTpmBed, queues: int) -> None:
    nic = await ntbed.nic(queues=queues)
    g, p = ntbed.gns, ntbed.peer
    # No router solicitations from the guest while the test waits: it must send nothing on its own.
    g.exec("sysctl", "-qw", "net.ipv6.conf.eth0.router_solicitations=0", check=True)
    assert await ping(g, PEER_V4) == 3
    assert await ping(p, GUEST_V4) == 3
    await tcp(p, g, GUEST_V4, 2 << 20, 5301)
    await tcp(g, p, PEER_V4, 2 << 20, 5302)
    # The guest's vTPM: swtpm, the daemon's daemonized child, started while the NIC's queues are open.
    v = await ntbed.tpm((nic.guest, nic.xs))
    _rc, out, _ = await ntbed.tools(v, "tpm2_getrandom", "--hex", "8")
    assert len(out.strip()) == 16
    first = ntbed.serve.pid
    assert inheritable_fds(first) == {}
    assert ntbed.swtpm_pid(v.uuid) > 0

    sent = await guest_quiet(nic)
    assert ntbed.serve.kill(signal.SIGKILL) == -signal.SIGKILL
    # Nothing holds a queue of the tap any more: it has no carrier until the next daemon attaches.
    assert "NO-CARRIER" in p.ip("link", "show", "dev", nic.vif)
    ntbed.serve.start()
    async with asyncio.timeout(20):  # the state key still says Connected: wait for the new daemon's connect
        while "msg=connected" not in ntbed.serve.log_text().split("==== serve start #2")[-1]:
            await asyncio.sleep(0.05)
    assert ntbed.serve.pid != first
    assert guest_tx(nic) == sent  # the guest has not sent a frame since before the kill
    # The host's link watch takes the carrier in a few ms to 150 ms after the attach; a frame sent before that
    # meets no live queueing discipline (host behaviour on any link that comes up, not the daemon's).
    await oper_up(p, nic.vif)

    # The peer first, both families, then a hashed transfer it opens; the guest only ever answers.
    assert await ping(p, GUEST_V4) == 3
    assert await ping(p, GUEST_V6) == 3
    await tcp(p, g, GUEST_V4, 4 << 20, 5303)
    # And the guest's direction.
    assert await ping(g, PEER_V6) == 3
    await tcp(g, p, PEER_V4, 4 << 20, 5304)
    assert all(nf.error is None for nf in nic.fronts)
    assert inheritable_fds(ntbed.serve.pid) == {}
    _rc, out, _ = await ntbed.tools(v, "tpm2_getrandom", "--hex", "8")  # the adopted swtpm answers too
    assert len(out.strip()) == 16
