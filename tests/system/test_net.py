"""netback through the real daemon: `pvback serve` (serving `vif`) runs inside a peer network namespace the test
owns, so the persistent tap it creates, `vif<domid>.<devid>`, is that namespace's interface; an emulated guest
whose netfront bridges a tap of the guest's own namespace to its rings connects through xenstore like
xen-netfront.  ping (IPv4, IPv6) and hashed TCP both ways, `pvback attach nic` / `detach nic` / `status` and the
metrics endpoint, and a SIGKILL of the daemon in the middle of a TCP transfer that then completes.

Addresses from 198.18.0.0/15 and fd00::/8 only, in namespaces created here (no route out), deleted at teardown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends.guests.guest import Guest
from backends.guests.netfront import NetFront, xenbus_connect
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import add_device, read_state, remove_device, wait_for_state
from backends.xenstore.client import XenStoreClient
from tests.net import pingtcp
from tests.net.netns import NetNS
from tests.net.test_datapath import GUEST_MAC, guest_tap, tcp
from tests.system.conftest import PY, REPO, Bed, ServeProc, SimProc, _env, settles

S = XenbusState
PEER_V4, GUEST_V4, PEER_V6, GUEST_V6 = "198.18.0.1", "198.18.0.2", "fd00::1", "fd00::2"
VIF_SCRIPT = REPO / "contrib" / "xen" / "vif-pvback"


class NetnsServe(ServeProc):
    """`pvback serve` inside `ns`; its metrics endpoint is that namespace's 127.0.0.1."""

    def __init__(self, sim: SimProc, workdir: Path, ns: NetNS, config: str) -> None:
        super().__init__(sim, workdir, config=config)
        self.ns = ns
        self.prefix = ["ip", "netns", "exec", ns.name]

    def metrics_text(self, timeout: float = 5.0) -> str:
        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout) as r:
                body: bytes = r.read()
            return body.decode()

        return self.ns.run(get)


@dataclass
class Nic:
    guest: Guest
    xs: XenStoreClient
    fronts: list[NetFront]
    gfds: list[int]
    devid: int
    backend: str = ""

    @property
    def domid(self) -> int:
        return self.guest.domid

    @property
    def fe_path(self) -> str:
        return f"/local/domain/{self.domid}/device/vif/{self.devid}"

    @property
    def vif(self) -> str:
        return f"vif{self.domid}.{self.devid}"


@dataclass
class NetBed(Bed):
    g: NetNS | None = None
    p: NetNS | None = None
    nics: list[Nic] = field(default_factory=list)

    @property
    def peer(self) -> NetNS:
        assert self.p is not None
        return self.p

    @property
    def gns(self) -> NetNS:
        assert self.g is not None
        return self.g

    def cli(self, *args: str, ns: NetNS | None = None) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "netns", "exec", ns.name] if ns is not None else []
        return subprocess.run([*prefix, *PY, *args, "--platform", "emulated", "--sim-dir", str(self.sim.dir)],
                              capture_output=True, text=True, timeout=30, env=_env(), cwd=REPO,
                              stdin=subprocess.DEVNULL)

    async def nic(self, *, queues: int = 1, mtu: int = 1500, offload: bool = True, split: bool = True,
                  attach_args: tuple[str, ...] = (), datapath: str = "c") -> Nic:
        """A guest with one NIC attached by `pvback attach nic` (plus `attach_args`) and its netfront
        connected (its data path `datapath`); the vif tap gets the peer's addresses."""
        g, xs = await self.guest(name="netguest", mem_pages=640 * queues, gnt_entries=1024 * queues)
        res = await asyncio.to_thread(self.cli, "attach", "nic", str(g.domid), "--mac", GUEST_MAC, "--queues",
                                      str(queues), "--mtu", str(mtu), *attach_args)
        assert res.returncode == 0, res.stderr
        gfds = guest_tap(self.gns, mtu, queues)
        fronts = [NetFront(g, 0, fd, offload=offload, split=split, datapath=datapath) for fd in gfds]
        nic = Nic(g, xs, fronts, gfds, 0, backend=res.stdout.strip())
        self.nics.append(nic)
        assert nic.vif in self.peer.ip("-br", "link", "show", "dev", nic.vif)  # made at realize
        self.peer.ip("addr", "add", f"{PEER_V4}/24", "dev", nic.vif)
        self.peer.ip("addr", "add", f"{PEER_V6}/64", "dev", nic.vif, "nodad")
        assert await xenbus_connect(xs, nic.fe_path, fronts) == nic.backend
        return nic

    async def unplug(self, nic: Nic) -> None:
        """The guest's side of a detach: its netfront stops and closes; the CLI's `detach nic` runs meanwhile."""
        for nf in nic.fronts:
            nf.stop()
        await nic.xs.write(f"{nic.fe_path}/state", str(int(S.CLOSED)))

    async def aclose(self) -> None:
        live = self.serve.alive
        for nic in self.nics:
            for nf in nic.fronts:
                nf.close()
            with contextlib.suppress(Exception):
                await nic.xs.write(f"{nic.fe_path}/state", str(int(S.CLOSED)))
            with contextlib.suppress(Exception):
                await remove_device(await self.dom0(), backend_domid=0, frontend_domid=nic.domid, type_name="vif",
                                    devid=nic.devid, frontend_type="vif", timeout=5.0 if live else 0.2)
            for fd in nic.gfds:
                os.close(fd)
        self.nics.clear()
        await super().aclose()


SERVE_VIF = '[serve]\nbackend_types = ["vif"]\n'


@contextlib.contextmanager
def net_bed(sim: SimProc, tmp_path: Path, net: str = "") -> Iterator[NetBed]:
    """A NetBed whose daemon serves `vif` with `net` added to its `[net]` settings."""
    tag = f"{os.getpid()}"
    with NetNS(f"pvbs-g-{tag}") as g, NetNS(f"pvbs-p-{tag}") as p:
        # run_dir: the vifs' control state files stay in the test's own directory.
        serve = NetnsServe(sim, tmp_path, p, SERVE_VIF + f'[net]\nrun_dir = "{tmp_path}/net"\n{net}\n')
        serve.start()
        bed = NetBed(sim, serve, tmp_path, g=g, p=p)
        try:
            yield bed
        finally:
            alive = serve.alive
            rc = serve.stop()
            if not serve.killed:
                assert alive and rc == 0, f"pvback serve died or failed to stop ({rc}):\n{serve.log_text()[-3000:]}"
            # A killed daemon leaves its persistent taps: they go with the namespace.


@pytest.fixture
def nbed(sim: SimProc, tmp_path: Path) -> Iterator[NetBed]:
    with net_bed(sim, tmp_path) as bed:
        yield bed


def metric(text: str, name: str, domid: int, **labels: str) -> float:
    pat = re.compile(rf'^{name}\{{(?P<labels>[^}}]*)\}} (?P<v>[0-9.e+-]+)$')
    total = 0.0
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            got = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            if got.get("type") == "vif" and got.get("domid") == str(domid) and \
                    all(got.get(k) == v for k, v in labels.items()):
                total += float(m["v"])
    return total


@pytest.mark.system_timeout(120)
@pytest.mark.parametrize("datapath", ["c", "python"])
async def test_ping_tcp_attach_status_metrics_detach(nbed: NetBed, datapath: str) -> None:
    """With the guest's netfront data path in C (the default) and in Python (the reference)."""
    nic = await nbed.nic(queues=2, datapath=datapath)
    g, p = nbed.gns, nbed.peer
    assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V4, count=3)) == 3
    assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V6, count=3)) == 3
    assert await asyncio.to_thread(p.run, lambda: pingtcp.ping(GUEST_V4, count=2, size=1472)) == 2
    await tcp(g, p, PEER_V4, 8 << 20, 5001)
    await tcp(p, g, GUEST_V6, 8 << 20, 5002)
    assert all(nf.error is None for nf in nic.fronts)

    text = await nbed.serve.metrics()
    d = nic.domid
    assert metric(text, "pvback_device_state", d, devid="0") == 4
    assert metric(text, "pvback_bytes_total", d, direction="tx") > 8 << 20
    assert metric(text, "pvback_bytes_total", d, direction="rx") > 8 << 20
    assert metric(text, "pvback_requests_total", d, op="tx") >= 128  # GSO: up to 64 KiB per packet
    per_queue = [metric(text, "pvback_requests_total", d, queue=str(q)) for q in (0, 1)]
    assert all(n > 0 for n in per_queue), per_queue  # the flows were spread over both queues
    assert metric(text, "pvback_drops_total", d, direction="tx") == 0
    assert 'pvback_drops_total{' in text

    res = await asyncio.to_thread(nbed.cli, "status", "--metrics", f"127.0.0.1:{nbed.serve.port}", ns=p)
    assert res.returncode == 0, res.stderr
    row = next((ln for ln in res.stdout.splitlines() if ln.startswith("vif ") and f" {d} " in ln), None)
    assert row is not None, res.stdout
    assert "Connected" in row and GUEST_MAC in row and "multi-queue-max-queues=2" in row, row
    assert "fe:multi-queue-num-queues=2" in row and "fe:feature-gso-tcpv4=1" in row, row
    assert "hotplug-status=connected" in row, row
    assert re.search(rf"^{d}\s+\S+\s+0\s+1\s+0\s*$", res.stdout, re.M), res.stdout  # DISKS NICS TPMS

    # Detach through the CLI: the guest closes, the backend lets go and the tap disappears.
    await nbed.unplug(nic)
    res = await asyncio.to_thread(nbed.cli, "detach", "nic", str(d), "0")
    assert res.returncode == 0, res.stderr
    assert not await (await nbed.dom0()).exists(nic.backend)
    await settles(lambda: nic.vif not in p.ip("-br", "link", "show"), f"{nic.vif} deleted")


@pytest.mark.system_timeout(120)
async def test_libxl_vif_waits_for_its_hotplug_script(nbed: NetBed) -> None:
    """What libxl 4.17 does for `vif = ["mac=...,script=vif-pvback"]` (as the real-Xen e2e runs it): the backend
    dir comes with `script`, `bridge=xenbr0` (libxl's default) and an empty `hotplug-status`; libxl waits for
    InitWait, then runs the script `online` with XENBUS_PATH and vif set, and judges it by its exit status.  A
    running netfront (`xl network-attach`) connects the moment it sees InitWait: pvback must hold the backend in
    InitWait until the script has said hotplug-status=connected, or libxl never sees the InitWait it waits for.
    The script is the one shipped for operators (contrib/xen/vif-pvback), run against the emulated xenstore with
    Debian's xenstore-read/-write, in the namespace of the daemon's tap."""
    g, xs = await nbed.guest(name="xlnet", mem_pages=640, gnt_entries=1024)
    dom0 = await nbed.dom0()
    keys = {"mac": GUEST_MAC, "mtu": "1500", "handle": "0"}
    paths = await add_device(dom0, backend_domid=0, frontend_domid=g.domid, type_name="vif", devid=0,
                             backend={**keys, "bridge": "xenbr0", "script": "/etc/xen/scripts/vif-pvback",
                                      "hotplug-status": "", "type": "vif"},
                             frontend=keys)
    gfds = guest_tap(nbed.gns, 1500, 1)
    nic = Nic(g, xs, [NetFront(g, 0, fd) for fd in gfds], gfds, 0, backend=paths.backend)
    nbed.nics.append(nic)
    connecting = asyncio.create_task(xenbus_connect(xs, nic.fe_path, nic.fronts))
    await wait_for_state(dom0, paths.backend, S.INIT_WAIT, timeout=10)
    await wait_for_state(dom0, nic.fe_path, S.CONNECTED, timeout=10)
    await asyncio.sleep(0.5)
    assert await read_state(dom0, paths.backend) is S.INIT_WAIT  # held for the script
    assert await dom0.read_str(f"{paths.backend}/hotplug-status") == ""
    assert not connecting.done()

    env = {**_env(), "XENSTORED_PATH": str(nbed.sim.xenstored), "XENBUS_PATH": paths.backend, "vif": nic.vif}
    res = await asyncio.to_thread(nbed.peer.exec, str(VIF_SCRIPT), "online", "type_if=vif", env=env)
    assert res.returncode == 0, res.stderr
    # No xenbr0 on this host: pvback left the tap unbridged (logged, not fatal: a routed or addressed vif needs no
    # bridge), and the script brought it up.
    link = nbed.peer.ip("-d", "link", "show", "dev", nic.vif)
    assert "master" not in link and "UP" in link, link
    assert await asyncio.wait_for(connecting, 10) == paths.backend
    assert await dom0.read_str(f"{paths.backend}/hotplug-status") == "connected"
    nbed.peer.ip("addr", "add", f"{PEER_V4}/24", "dev", nic.vif)
    assert await asyncio.to_thread(nbed.gns.run, lambda: pingtcp.ping(PEER_V4, count=2)) == 2

    res = await asyncio.to_thread(nbed.peer.exec, str(VIF_SCRIPT), "offline", "type_if=vif", env=env)
    assert res.returncode == 0, res.stderr


async def test_attach_refusals_leave_nothing(nbed: NetBed) -> None:
    """A second NIC with a garbage frontend key fails only itself; a detach of a missing NIC is one line."""
    g, xs = await nbed.guest(name="badnet", mem_pages=64, gnt_entries=64)
    res = await asyncio.to_thread(nbed.cli, "attach", "nic", str(g.domid), "--devid", "3")
    assert res.returncode == 0, res.stderr
    be = res.stdout.strip()
    fe = f"/local/domain/{g.domid}/device/vif/3"
    vif = f"vif{g.domid}.3"
    assert vif in nbed.peer.ip("-br", "link", "show")
    # request-rx-copy missing: Linux refuses (-EOPNOTSUPP); the vif fails, its tap stays until unplug.
    await xs.write(f"{fe}/tx-ring-ref", "8")
    await xs.write(f"{fe}/state", str(int(S.CONNECTED)))
    await wait_for_state(await nbed.dom0(), be, {S.CLOSING, S.CLOSED}, timeout=10.0)
    err = await (await nbed.dom0()).read_str(f"{be}/error")
    assert err is not None and "rx-copy" in err, err
    await xs.write(f"{fe}/state", str(int(S.CLOSED)))
    res = await asyncio.to_thread(nbed.cli, "detach", "nic", str(g.domid), "3")
    assert res.returncode == 0, res.stderr
    await settles(lambda: vif not in nbed.peer.ip("-br", "link", "show"), f"{vif} deleted")
    res = await asyncio.to_thread(nbed.cli, "detach", "nic", str(g.domid), "3")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1 and "no vif" in res.stderr, res.stderr
    assert await read_state(await nbed.dom0(), be) is S.UNKNOWN


async def interrupted_transfer(q: NetNS, g: NetNS, port: int, interrupt: Callable[[], Awaitable[None]],
                               resume: Callable[[], Awaitable[None]] | None = None, *, nbytes: int = 48 << 20,
                               seed: int = 3, io_timeout: float = 60.0) -> None:
    """A hashed TCP transfer peer -> guest, with `interrupt` run once 4 MiB arrived (then `resume`): the same
    connection must complete with the right hash, and make progress after the interruption (what had arrived
    when `interrupt` returned).  io_timeout: each socket operation's; the whole transfer gets 30 s more."""
    received = [0]
    lst = g.run(lambda: pingtcp.listener(GUEST_V4, port))
    pool = concurrent.futures.ThreadPoolExecutor(2)
    loop = asyncio.get_running_loop()

    def server() -> tuple[int, str]:
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(io_timeout)
            h = hashlib.sha256()
            while data := conn.recv(1 << 16):
                h.update(data)
                received[0] += len(data)
            return received[0], h.hexdigest()

    def client() -> str:
        def connect() -> socket.socket:
            s = pingtcp.connect(GUEST_V4, port)
            s.settimeout(io_timeout)
            return s

        with q.run(connect) as c:
            return pingtcp.send_hashed(c, nbytes, seed=seed)

    try:
        srv = loop.run_in_executor(pool, server)
        cli = loop.run_in_executor(pool, client)
        async with asyncio.timeout(30):
            while received[0] < 4 << 20:
                await asyncio.sleep(0.005)
        assert received[0] < nbytes // 2, "the transfer was too quick to interrupt"
        await interrupt()
        after = received[0]
        if resume is not None:
            await resume()
        sent = await asyncio.wait_for(cli, io_timeout + 30)
        n, got = await asyncio.wait_for(srv, io_timeout + 30)
        assert (n, got) == (nbytes, sent)
        assert n > after
    finally:
        lst.close()
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.system_timeout(120)
async def test_sigkill_mid_transfer_the_connection_completes(nbed: NetBed) -> None:
    """The daemon is SIGKILLed while a TCP transfer from the peer to the guest runs; a new daemon re-attaches
    the same tap (same ifindex, addresses kept) and the rings, and the same connection completes with the
    right hash."""
    nic = await nbed.nic(queues=1)
    g, p = nbed.gns, nbed.peer
    ifindex = p.ip("-o", "link", "show", "dev", nic.vif).split(":")[0]

    async def kill() -> None:
        assert nbed.serve.kill(signal.SIGKILL) == -signal.SIGKILL

    async def restart() -> None:
        nbed.serve.start()
        await wait_for_state(await nbed.dom0(), nic.backend, S.CONNECTED, timeout=20.0)

    await interrupted_transfer(p, g, 5003, kill, restart, seed=7, io_timeout=30.0)
    assert p.ip("-o", "link", "show", "dev", nic.vif).split(":")[0] == ifindex  # the same interface
    second = nbed.serve.log_text().split("==== serve start #2")[1]
    assert f"vif={nic.vif} ifindex={ifindex} tap_created=False" in second, second[-2000:]
    assert await asyncio.to_thread(g.run, lambda: pingtcp.ping(PEER_V6, count=2)) == 2
    assert all(nf.error is None for nf in nic.fronts)
    assert metric(await nbed.serve.metrics(), "pvback_device_connects_total", nic.domid) == 1  # the new daemon's


def spare_tap(ns: NetNS, name: str) -> int:
    """A tap in `ns` for a netfront a test drives by hand (never carries traffic)."""

    def make() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", name.encode(), 0x0002 | 0x1000 | 0x4000))
        return fd

    return ns.run(make)


@pytest.mark.system_timeout(90)
async def test_fatal_frontend_fails_only_its_vif(nbed: NetBed) -> None:
    """A guest whose netfront publishes a 21-fragment packet (>= fatal_skb_slots): its vif fails with the
    rule named in its error node (Linux disables the vif); a healthy guest's NIC on the same daemon carries on."""
    from tests.net import wire

    healthy = await nbed.nic(queues=1)
    g, xs = await nbed.guest(name="hostile", mem_pages=640, gnt_entries=1024)
    res = await asyncio.to_thread(nbed.cli, "attach", "nic", str(g.domid), "--queues", "1")
    assert res.returncode == 0, res.stderr
    fd = spare_tap(nbed.gns, "hostile0")
    nf = NetFront(g, 0, fd, split=False)
    bad = Nic(g, xs, [nf], [fd], 0, backend=res.stdout.strip())
    nbed.nics.append(bad)
    await xenbus_connect(xs, bad.fe_path, [nf], start=False)
    ref = nf._tx_ref[nf._tx_free[0]]
    fatal = [struct.pack("<I", ref) + (s.pack() if isinstance(s, wire.Tx) else s)[4:]
             for s in wire.packet(14 + 21, [1] * 21)]
    nf.tx.put(fatal, wire.TX_SLOT)
    nf.tx.push()
    nf.ev_tx.notify()
    dom0 = await nbed.dom0()
    await wait_for_state(dom0, bad.backend, {S.CLOSING, S.CLOSED}, timeout=10.0)
    err = await dom0.read_str(f"{bad.backend}/error")
    assert err is not None and "fatal_slots" in err, err
    # The healthy NIC: untouched.
    assert await read_state(dom0, healthy.backend) is S.CONNECTED
    assert await asyncio.to_thread(nbed.gns.run, lambda: pingtcp.ping(PEER_V4, count=3)) == 3
    await tcp(nbed.gns, nbed.peer, PEER_V4, 2 << 20, 5004)
    assert all(f.error is None for f in healthy.fronts)
    text = await nbed.serve.metrics()
    assert metric(text, "pvback_device_state", bad.domid) in (S.CLOSING, S.CLOSED)
    assert metric(text, "pvback_errors_total", bad.domid, reason="fatal_slots") == 1  # kept after the failure
    assert metric(text, "pvback_device_state", healthy.domid) == S.CONNECTED
    assert metric(text, "pvback_drops_total", healthy.domid) == 0
