"""netback on Open vSwitch, through the real daemon and a real, private OVS.

A "host" namespace runs `pvback serve` (so the vif taps are its interfaces) and a private ovsdb-server +
ovs-vswitchd (netdev datapath; tests/net/ovsbed.py), started by the test and stopped by PID.  Each emulated guest
has its own namespace (its NIC is a tap that the guest's netfront bridges to its rings); the peer is a
namespace on a veth whose host end the test adds to the bridge.  `pvback attach nic --bridge ...` writes the
toolstack's `bridge` key; pvback adds the OVS port through OVSDB before it says `hotplug-status=connected`.

Shown here: ping and hashed TCP guest <-> peer through the bridge, with and without userspace TSO (GSO offered
to the frontend only with it); the external_ids exactly; VLAN isolation (tags 10 and 20) and a trunk vif
carrying both; a stale port of the vif's name replaced, never duplicated; a bridge that does not exist failing
only that vif; ovs-vswitchd SIGKILLed and restarted mid-transfer with the same TCP connection completing;
ovsdb-server restarted on an empty database with pvback putting its port back (counted and logged); unplug
removing the port; and the same ping/TCP through a Linux bridge.

Addresses from 198.18.0.0/15 and fd00::/8 only, in namespaces created here (no route out), deleted at teardown.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.guests.netfront import NetFront, xenbus_connect
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import add_device, wait_for_state
from tests.net import pingtcp
from tests.net.netns import NetNS
from tests.net.ovsbed import PrivateOvs, veth_peer
from tests.net.test_csum_full import csum_errors
from tests.net.test_datapath import guest_tap, tcp
from tests.net.test_ovsdb import ext_ids
from tests.system.conftest import SimProc, settles
from tests.system.test_net import NetBed, NetnsServe, Nic, interrupted_transfer, metric

S = XenbusState
PEER_V4, PEER_V6 = "198.18.0.1", "fd00::1"
GUEST_V4, GUEST_V6 = "198.18.0.2", "fd00::2"
VM_UUID = "5c0ffee0-51f1-4d0a-9a3e-3f1f2b6f8c11"
SOL_PACKET = 263
TUNSETOFFLOAD, TUN_F_CSUM = 0x400454D0, 0x01
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100



class OvsNetBed(NetBed):
    """NetBed whose `p` namespace is the host (daemon, OVS, vif taps); guests and peers get namespaces of their
    own."""

    ovs: PrivateOvs
    spaces: list[NetNS]

    def space(self, role: str) -> NetNS:
        ns = NetNS(f"pvbo-{role}-{os.getpid()}")
        self.spaces.append(ns)
        return ns

    def peer_on(self, bridge: str, role: str = "q", v4: str = PEER_V4, v6: str = PEER_V6, *,
                tx_csum: bool = True, tag: int | None = None) -> NetNS:
        """A peer namespace on a veth whose host end `pv-<role>` is a port of the OVS `bridge`."""
        ns = self.space(role)
        veth_peer(self.peer, ns, f"pv-{role}", [f"{v4}/24", f"{v6}/64"])
        if not tx_csum:  # netdev without userspace TSO loses partial checksums (ovs-userspace.md §3e)
            r = ns.exec("ethtool", "-K", "eth0", "tx", "off")
            assert r.returncode == 0, r.stderr
        self.ovs.vsctl("--timeout=20", "add-port", bridge, f"pv-{role}", *(
            ["tag=" + str(tag)] if tag is not None else []))
        return ns

    async def ovs_nic(self, bridge: str, *, role: str = "g", mac: str = "00:16:3e:00:00:02",
                      v4: str = GUEST_V4, v6: str = GUEST_V6, offload: bool = True, devid: int = 0,
                      vm_uuid: str | None = VM_UUID, connect: bool = True) -> Nic:
        """A guest (its domain UUID and name in xenstore, as libxl writes them) with one NIC attached by
        `pvback attach nic --bridge`, its netfront connected."""
        gns = self.space(role)
        g, xs = await self.guest(name=f"ovs-{role}", mem_pages=640, gnt_entries=1024)
        await self.identify(g.domid, f"ovs-{role}", vm_uuid)
        res = await asyncio.to_thread(self.cli, "attach", "nic", str(g.domid), "--mac", mac, "--queues", "1",
                                      "--bridge", bridge, "--devid", str(devid))
        assert res.returncode == 0, res.stderr
        fd = guest_nic(gns, mac, v4, v6)
        fronts = [NetFront(g, 0, fd, offload=offload)]
        nic = Nic(g, xs, fronts, [fd], devid, backend=res.stdout.strip())
        nic.ns = gns  # type: ignore[attr-defined]
        self.nics.append(nic)
        if connect:
            assert await xenbus_connect(xs, nic.fe_path, fronts) == nic.backend
        return nic

    async def identify(self, domid: int, name: str, vm_uuid: str | None) -> None:
        """The domain's name and UUID as libxl writes them (the emulated platform's guests have neither)."""
        dom0 = await self.dom0()
        await dom0.write(f"/local/domain/{domid}/name", name)
        if vm_uuid is not None:
            await dom0.write(f"/local/domain/{domid}/vm", f"/vm/{vm_uuid}")
            await dom0.write(f"/vm/{vm_uuid}/uuid", vm_uuid)

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            for ns in self.spaces:
                ns.delete()


def guest_nic(ns: NetNS, mac: str, v4: str, v6: str) -> int:
    def make() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", b"eth0",
                                                IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE))
        return fd

    fd = ns.run(make)
    ns.ip("link", "set", "eth0", "address", mac, "up")
    ns.ip("addr", "add", f"{v4}/24", "dev", "eth0")
    ns.ip("addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
    return fd


def gns(nic: Nic) -> NetNS:
    ns: NetNS = nic.ns  # type: ignore[attr-defined]
    return ns


def make_bed(sim: SimProc, tmp: Path, *, userspace_tso: bool, bridges: tuple[str, ...] = ("br0",),
             net: str = "", ovs_timeout: float = 10.0) -> Iterator[OvsNetBed]:
    tag = f"{os.getpid()}"
    with NetNS(f"pvbo-unused-{tag}") as g, NetNS(f"pvbo-host-{tag}") as h:
        ovs = PrivateOvs(h, userspace_tso=userspace_tso).start()
        try:
            for br in bridges:
                ovs.add_bridge(br)
            config = (f'[serve]\nbackend_types = ["vif"]\n[net]\novsdb = "{ovs.remote}"\n'
                      f'ovs_timeout = {ovs_timeout}\n{net}')
            serve = NetnsServe(sim, tmp, h, config)
            serve.start()
            bed = OvsNetBed(sim, serve, tmp, g=g, p=h)
            bed.ovs, bed.spaces = ovs, []
            try:
                yield bed
            finally:
                alive = serve.alive
                rc = serve.stop()
                for ns in bed.spaces:
                    ns.delete()
                if not serve.killed:
                    assert alive and rc == 0, f"pvback serve died or failed to stop ({rc}):\n" \
                        f"{serve.log_text()[-3000:]}"
        finally:
            ovs.stop()


@pytest.fixture
def obed(sim: SimProc, tmp_path: Path) -> Iterator[OvsNetBed]:
    yield from make_bed(sim, tmp_path, userspace_tso=True)


@pytest.fixture
def obed_notso(sim: SimProc, tmp_path: Path) -> Iterator[OvsNetBed]:
    yield from make_bed(sim, tmp_path, userspace_tso=False)


async def ping(ns: NetNS, addr: str, count: int = 3, size: int = 56) -> int:
    return await asyncio.to_thread(ns.run, lambda: pingtcp.ping(addr, count=count, size=size, timeout=2.0))


# -- ping / TCP / external_ids / unplug ---------------------------------------------------------------------


@pytest.mark.system_timeout(150)
async def test_ping_tcp_external_ids_detach_with_userspace_tso(obed: OvsNetBed) -> None:
    nic = await obed.ovs_nic("br0")
    q = obed.peer_on("br0")
    g, ovs, d = gns(nic), obed.ovs, nic.domid
    assert await ping(g, PEER_V4) == 3
    assert await ping(g, PEER_V6) == 3
    assert await ping(q, GUEST_V4, 2, 1472) == 2
    await tcp(g, q, PEER_V4, 16 << 20, 5101)
    await tcp(q, g, GUEST_V6, 16 << 20, 5102)
    assert all(nf.error is None for nf in nic.fronts)

    dom0 = await obed.dom0()
    # userspace TSO on a netdev bridge: GSO is offered, and the guest's 64 KiB frames crossed the switch.
    assert await dom0.read_str(f"{nic.backend}/feature-gso-tcpv4") == "1"
    text = await obed.serve.metrics()
    assert metric(text, "pvback_bytes_total", d, direction="tx") > 16 << 20
    assert metric(text, "pvback_requests_total", d, op="tx") < (16 << 20) // 1448  # GSO frames, not MTU ones
    assert metric(text, "pvback_drops_total", d, direction="tx") == 0

    vif = nic.vif
    assert sorted(ovs.ports("br0")) == sorted([vif, "pv-q"]) and ovs.port_rows(vif) == 1
    want = {"attached-mac": "00:16:3e:00:00:02", "xen-vm-name": "ovs-g", "xen-vm-uuid": VM_UUID, "vm-id": VM_UUID,
            "iface-status": "active", "iface-id": f"{VM_UUID}-0"}
    assert ext_ids(ovs, "Interface", vif) == want
    assert ext_ids(ovs, "Port", vif) == want
    assert ovs.get("Interface", vif, "type") == '""' and int(ovs.get("Interface", vif, "ofport")) > 0
    assert await dom0.read_str(f"{nic.backend}/hotplug-status") == "connected"
    log = obed.serve.log_text()
    assert "plugged into OVS bridge br0" in log and f"iface_id={VM_UUID}-0" in log, log[-2000:]

    # `pvback status`: the bridge (with its VLAN syntax), the iface-id, and the live ofport from the metrics.
    res = await asyncio.to_thread(obed.cli, "status", "--metrics", f"127.0.0.1:{obed.serve.port}", ns=obed.peer)
    assert res.returncode == 0, res.stderr
    row = next((ln for ln in res.stdout.splitlines() if ln.startswith("vif ") and f" {d} " in ln), None)
    assert row is not None, res.stdout
    ofport = ovs.get("Interface", vif, "ofport")
    assert "bridge=br0" in row and f"iface-id={VM_UUID}-0" in row and f"ofport={ofport}" in row, row
    assert metric(text, "pvback_device_status", d, key="ovs_ofport") == int(ofport)
    assert metric(text, "pvback_device_status", d, key="ovsdb_connected") == 1

    # Detach: the port leaves the bridge with the tap.
    await obed.unplug(nic)
    res = await asyncio.to_thread(obed.cli, "detach", "nic", str(d), "0")
    assert res.returncode == 0, res.stderr
    await settles(lambda: ovs.ports("br0") == ["pv-q"] and ovs.port_rows(vif) == 0, f"port {vif} removed")
    await settles(lambda: vif not in obed.peer.ip("-br", "link", "show"), f"{vif} deleted")


@pytest.mark.system_timeout(150)
async def test_ping_tcp_without_userspace_tso_offers_no_gso(obed_notso: OvsNetBed) -> None:
    """OVS 3.1's netdev datapath without userspace TSO drops frames above the MTU and loses partial checksums
    (ovs-userspace.md §3e): GSO is not offered, and the guest's csum_blank frames are written to the tap with
    their checksum finished, so the peer's TCP sees no checksum error and vswitchd drops nothing as too big."""
    bed = obed_notso
    nic = await bed.ovs_nic("br0", offload=True, connect=False)
    # What Linux's netfront does when the backend offers no GSO (xennet_fix_features): TSO off, checksum
    # offload kept, so the guest still hands over partial checksums (NETTXF_csum_blank).
    fcntl.ioctl(nic.gfds[0], TUNSETOFFLOAD, TUN_F_CSUM)
    assert await xenbus_connect(nic.xs, nic.fe_path, nic.fronts) == nic.backend
    q = bed.peer_on("br0", tx_csum=False)
    g = gns(nic)
    dom0 = await bed.dom0()
    assert await dom0.read_str(f"{nic.backend}/feature-gso-tcpv4") == "0"
    assert await dom0.read_str(f"{nic.backend}/feature-gso-tcpv6") == "0"
    assert await ping(g, PEER_V4) == 3
    assert await ping(q, GUEST_V6) == 3
    await tcp(g, q, PEER_V4, 8 << 20, 5111)
    await tcp(q, g, GUEST_V4, 8 << 20, 5112)
    await tcp(g, q, PEER_V6, 4 << 20, 5113)
    assert csum_errors(q) == 0
    assert "Dropped packet: Too big" not in bed.ovs.log("ovs-vswitchd")
    text = await bed.serve.metrics()
    assert metric(text, "pvback_drops_total", nic.domid, direction="tx") == 0
    assert metric(text, "pvback_requests_total", nic.domid, op="tx") > (8 << 20) // 1514  # MTU-sized frames
    assert all(nf.error is None for nf in nic.fronts)


# -- VLANs --------------------------------------------------------------------------------------------------


def arp_request(src_mac: bytes, src_ip: str, dst_ip: str, vlan: int | None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, socket.inet_aton(src_ip), b"\0" * 6,
                      socket.inet_aton(dst_ip))
    return b"\xff" * 6 + src_mac + tag + struct.pack("!H", 0x0806) + arp


def arp_probe(ns: NetNS, dst_ip: str, vlan: int | None, src_mac: bytes, timeout: float = 1.5
              ) -> tuple[bytes, int | None] | None:
    """Send a (tagged) ARP who-has on eth0 through a raw socket; returns (sender MAC, VLAN of the reply) of the
    answer, or None.  The kernel here has no 8021q, so VLANs are tested with raw frames (ovs-userspace.md §3d)."""

    def run() -> tuple[bytes, int | None] | None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)) as s:
            s.setsockopt(SOL_PACKET, 8, 1)  # PACKET_AUXDATA: the kernel strips received VLAN tags
            s.bind(("eth0", 0))
            s.sendto(arp_request(src_mac, "198.18.1.9", dst_ip, vlan), ("eth0", 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, anc, _f, _a = s.recvmsg(2048, socket.CMSG_SPACE(20))
                except TimeoutError:
                    return None
                rx_vlan = None
                for level, typ, cdata in anc:
                    if level == SOL_PACKET and typ == 8 and len(cdata) >= 20:
                        status, _len, _snap, _mac, _net, tci, _tpid = struct.unpack("=IIIHHHH", cdata[:20])
                        if status & (1 << 4):  # TP_STATUS_VLAN_VALID
                            rx_vlan = tci & 0xFFF
                off = 12
                if data[12:14] == b"\x81\x00":
                    rx_vlan, off = struct.unpack("!H", data[14:16])[0] & 0xFFF, 16
                if data[off:off + 2] != b"\x08\x06":
                    continue
                arp = data[off + 2:]
                if struct.unpack("!H", arp[6:8])[0] == 2 and arp[14:18] == socket.inet_aton(dst_ip) and \
                        data[:6] == src_mac:
                    return arp[8:14], rx_vlan
            return None

    return ns.run(run)


@pytest.mark.system_timeout(180)
async def test_vlan_isolation_and_trunk(obed: OvsNetBed) -> None:
    """Guests A (br0.10) and B (br0.20) on the same subnet cannot reach each other; each reaches a peer on its
    own VLAN; a trunk vif (br0:10:20) answers-to and reaches both, tagged, and nothing untagged."""
    a = await obed.ovs_nic("br0.10", role="a", mac="00:16:3e:00:01:01", v4="198.18.1.1", v6="fd00:1::1")
    b = await obed.ovs_nic("br0.20", role="b", mac="00:16:3e:00:01:02", v4="198.18.1.2", v6="fd00:1::2")
    t = await obed.ovs_nic("br0:10:20", role="t", mac="00:16:3e:00:01:03", v4="198.18.1.3", v6="fd00:1::3")
    p10 = obed.peer_on("br0", "p10", "198.18.1.10", "fd00:1::10", tag=10)
    ovs = obed.ovs
    assert ovs.get("Port", a.vif, "tag") == "10" and ovs.get("Port", b.vif, "tag") == "20"
    assert ovs.get("Port", t.vif, "trunks") == "[10, 20]" and ovs.get("Port", t.vif, "tag") == "[]"

    assert await ping(gns(a), "198.18.1.10") == 3  # same VLAN
    await tcp(gns(a), p10, "198.18.1.10", 4 << 20, 5121)
    assert await ping(gns(b), "198.18.1.10", 2) == 0  # VLAN 20 -> 10
    assert await ping(gns(a), "198.18.1.2", 2) == 0  # 10 <-> 20, same subnet
    assert await ping(gns(b), "fd00:1::1", 2) == 0

    tmac = bytes.fromhex("00163e000103")
    got_a = arp_probe(gns(t), "198.18.1.1", 10, tmac)
    got_b = arp_probe(gns(t), "198.18.1.2", 20, tmac)
    assert got_a == (bytes.fromhex("00163e000101"), 10), got_a
    assert got_b == (bytes.fromhex("00163e000102"), 20), got_b
    assert arp_probe(gns(t), "198.18.1.1", 20, tmac) is None  # A is not on 20
    assert arp_probe(gns(t), "198.18.1.1", None, tmac) is None  # untagged: not in the trunk
    assert arp_probe(gns(t), "198.18.1.1", 30, tmac) is None  # 30: not in the trunk
    assert all(nf.error is None for nic in (a, b, t) for nf in nic.fronts)


# -- stale port, missing bridge -----------------------------------------------------------------------------


@pytest.mark.system_timeout(150)
async def test_stale_port_replaced_and_missing_bridge_fails_only_that_vif(obed: OvsNetBed) -> None:
    ovs = obed.ovs
    ovs.add_bridge("br9")
    g, _xs = await obed.guest(name="stale", mem_pages=640, gnt_entries=1024)
    await obed.identify(g.domid, "stale", None)
    vif = f"vif{g.domid}.0"
    # What a crashed host or an old toolstack left: a port of that name, on another bridge, foreign ids.
    ovs.vsctl("--timeout=20", "add-port", "br9", vif, "--", "set", "Interface", vif,
              "external_ids:attached-mac=de:ad:be:ef:00:00", "external_ids:iface-id=old")
    res = await asyncio.to_thread(obed.cli, "attach", "nic", str(g.domid), "--mac", "00:16:3e:00:02:01",
                                  "--bridge", "br0.7", "--queues", "1")
    assert res.returncode == 0, res.stderr
    be = res.stdout.strip()
    dom0 = await obed.dom0()
    deadline = time.monotonic() + 15
    while await dom0.read_str(f"{be}/hotplug-status") != "connected":
        assert time.monotonic() < deadline, obed.serve.log_text()[-2000:]
        await asyncio.sleep(0.05)
    assert ovs.port_rows(vif) == 1 and ovs.ports("br9") == [] and ovs.ports("br0") == [vif]
    assert ovs.get("Port", vif, "tag") == "7"
    ids = ext_ids(ovs, "Interface", vif)
    assert ids["attached-mac"] == "00:16:3e:00:02:01" and ids["iface-id"] == f"{vif}"  # no UUID in xenstore
    assert "xen-vm-uuid" not in ids and ids["xen-vm-name"] == "stale"
    assert "replacing the existing port" in obed.serve.log_text()

    # A bridge that does not exist: that vif fails with a clear error node; the first one is untouched.
    good = await obed.ovs_nic("br0", role="ok", vm_uuid=None)
    q = obed.peer_on("br0")
    g2, _xs2 = await obed.guest(name="nobridge", mem_pages=64, gnt_entries=64)
    res = await asyncio.to_thread(obed.cli, "attach", "nic", str(g2.domid), "--bridge", "nobr0")
    # `pvback attach` waits for the backend: it reports the device's error node and removes the device again.
    assert res.returncode != 0 and "bridge nobr0 does not exist" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not await dom0.exists(f"/local/domain/0/backend/vif/{g2.domid}/0")
    await settles(lambda: f"vif{g2.domid}.0" not in obed.peer.ip("-br", "link", "show"), "its tap deleted")
    assert f"vif{g2.domid}.0" not in ovs.ports("br0")
    assert "bridge nobr0 does not exist" in obed.serve.log_text()
    assert await ping(gns(good), PEER_V4) == 3
    await tcp(q, gns(good), GUEST_V4, 2 << 20, 5131)
    assert await dom0.read_str(f"{good.backend}/state") == str(int(S.CONNECTED))


@pytest.mark.system_timeout(120)
async def test_libxl_default_bridge_absent_from_ovs_is_left_to_the_hotplug_script(obed: OvsNetBed) -> None:
    """libxl writes bridge=xenbr0 for a vif line that names no bridge, with its hotplug script (the real-Xen e2e's
    vif 0, beside a vif on an OVS bridge): with OVSDB there but no xenbr0 in it, the vif is not failed — the tap
    stays unplugged (logged), the script says connected, the guest's netfront connects; no port is added."""
    g, xs = await obed.guest(name="xlnobr", mem_pages=640, gnt_entries=1024)
    dom0 = await obed.dom0()
    keys = {"mac": "00:16:3e:00:03:01", "mtu": "1500", "handle": "0"}
    paths = await add_device(dom0, backend_domid=0, frontend_domid=g.domid, type_name="vif", devid=0,
                             backend={**keys, "bridge": "xenbr0", "script": "/etc/xen/scripts/vif-pvback",
                                      "hotplug-status": "", "type": "vif"},
                             frontend=keys)
    gfds = guest_tap(obed.gns, 1500, 1)
    nic = Nic(g, xs, [NetFront(g, 0, fd) for fd in gfds], gfds, 0, backend=paths.backend)
    obed.nics.append(nic)
    connecting = asyncio.create_task(xenbus_connect(xs, nic.fe_path, nic.fronts))
    await wait_for_state(dom0, paths.backend, S.INIT_WAIT, timeout=10)
    assert await dom0.read_str(f"{paths.backend}/error") is None
    assert nic.vif in obed.peer.ip("-br", "link", "show")
    assert obed.ovs.port_rows(nic.vif) == 0 and nic.vif not in obed.ovs.ports("br0")
    assert "bridge xenbr0: no such OVS bridge" in obed.serve.log_text()
    await dom0.write(f"{paths.backend}/hotplug-status", "connected")  # what vif-pvback online writes
    assert await asyncio.wait_for(connecting, 10) == paths.backend
    await wait_for_state(dom0, paths.backend, S.CONNECTED, timeout=10)
    assert obed.ovs.port_rows(nic.vif) == 0


# -- switch restarts ----------------------------------------------------------------------------------------


@pytest.mark.system_timeout(180)
async def test_vswitchd_killed_mid_transfer_the_connection_completes(obed: OvsNetBed) -> None:
    nic = await obed.ovs_nic("br0")
    q = obed.peer_on("br0")
    g, ovs = gns(nic), obed.ovs
    assert await ping(g, PEER_V4) == 3

    async def kill_and_restart() -> None:
        ovs.kill_vswitchd(signal.SIGKILL)
        await asyncio.sleep(1.0)  # the switch is down: nothing flows
        await asyncio.to_thread(ovs.start_vswitchd)

    await interrupted_transfer(q, g, 5141, kill_and_restart)
    assert ovs.port_rows(nic.vif) == 1 and sorted(ovs.ports("br0")) == sorted([nic.vif, "pv-q"])
    assert await ping(g, PEER_V6) == 3
    assert all(nf.error is None for nf in nic.fronts)


@pytest.mark.system_timeout(180)
async def test_pvback_killed_mid_transfer_keeps_its_port(obed: OvsNetBed) -> None:
    """The daemon is SIGKILLed mid-transfer; the next one re-attaches the persistent tap and adopts the OVS port
    it finds (same ofport: vswitchd never lost the interface), and the same TCP connection completes."""
    nic = await obed.ovs_nic("br0")
    q = obed.peer_on("br0")
    g, ovs = gns(nic), obed.ovs
    ofport = ovs.get("Interface", nic.vif, "ofport")

    async def kill_and_restart() -> None:
        assert obed.serve.kill(signal.SIGKILL) == -signal.SIGKILL
        obed.serve.start()
        await wait_for_state(await obed.dom0(), nic.backend, S.CONNECTED, timeout=20.0)

    await interrupted_transfer(q, g, 5142, kill_and_restart)
    assert ovs.port_rows(nic.vif) == 1 and ovs.get("Interface", nic.vif, "ofport") == ofport
    second = obed.serve.log_text().split("==== serve start #2")[1]
    assert "adopted=True" in second and "replacing the existing port" not in second, second[-2000:]
    assert await ping(g, PEER_V6) == 3
    assert all(nf.error is None for nf in nic.fronts)


@pytest.mark.system_timeout(180)
async def test_ovsdb_restart_on_empty_database_port_put_back(obed: OvsNetBed) -> None:
    nic = await obed.ovs_nic("br0.5")
    q = obed.peer_on("br0", tag=5)
    g, ovs = gns(nic), obed.ovs
    assert await ping(g, PEER_V4) == 3
    # A plain restart (same database): pvback reconnects, nothing is missing.
    await asyncio.to_thread(ovs.restart_ovsdb)
    await wait_metric(obed, nic, "ovsdb_reconnects", 1)
    assert await ping(g, PEER_V4) == 3
    # Restarted on an empty database: every bridge and port is gone; the operator (here the test) re-creates the
    # bridge and its uplink, pvback puts the vif's port back with its tag and ids, traffic flows again.
    await asyncio.to_thread(ovs.restart_ovsdb, fresh=True)
    await wait_metric(obed, nic, "ovsdb_reconnects", 2)
    assert await ping(g, PEER_V4, 1) == 0
    await asyncio.to_thread(ovs.add_bridge, "br0")
    await asyncio.to_thread(ovs.vsctl, "--timeout=20", "add-port", "br0", "pv-q", "tag=5")
    await wait_metric(obed, nic, "ovs_port_repairs", 1)
    assert ovs.port_rows(nic.vif) == 1 and ovs.get("Port", nic.vif, "tag") == "5"
    assert ext_ids(ovs, "Interface", nic.vif)["iface-id"] == f"{VM_UUID}-0"
    deadline = time.monotonic() + 10
    while await ping(g, PEER_V4, 1) != 1:
        assert time.monotonic() < deadline, "no traffic after the repair"
    await tcp(q, g, GUEST_V4, 4 << 20, 5151)
    log = obed.serve.log_text()
    assert "reconnected to OVSDB" in log and f"put back the missing port {nic.vif} on br0" in log, log[-3000:]
    assert all(nf.error is None for nf in nic.fronts)


async def wait_metric(bed: OvsNetBed, nic: Nic, key: str, want: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (v := metric(await bed.serve.metrics(), "pvback_device_status", nic.domid, key=key)) < want:
        assert time.monotonic() < deadline, f"{key} = {v}, want {want}"
        await asyncio.sleep(0.1)
    assert v == want, (key, v)


# -- Linux bridge -------------------------------------------------------------------------------------------


@pytest.mark.system_timeout(150)
async def test_linux_bridge_ping_tcp(obed: OvsNetBed) -> None:
    """The same NIC on a Linux bridge (no OVS involved): the tap is enslaved with rtnetlink."""
    h = obed.peer
    h.ip("link", "add", "lxbr0", "type", "bridge")
    h.ip("link", "set", "lxbr0", "up")
    q = obed.space("lq")
    veth_peer(h, q, "pv-lq", [f"{PEER_V4}/24", f"{PEER_V6}/64"])
    h.ip("link", "set", "pv-lq", "master", "lxbr0")
    nic = await obed.ovs_nic("lxbr0")
    g = gns(nic)
    assert "master lxbr0" in h.ip("-d", "link", "show", "dev", nic.vif)
    assert nic.vif not in obed.ovs.vsctl("show")
    assert await ping(g, PEER_V4) == 3
    assert await ping(q, GUEST_V6) == 3
    await tcp(g, q, PEER_V4, 16 << 20, 5161)
    await tcp(q, g, GUEST_V4, 16 << 20, 5162)
    assert "plugged into Linux bridge lxbr0" in obed.serve.log_text()
    # VLAN syntax on a Linux bridge: refused for that vif, clearly; the first NIC carries on.
    g2, _xs2 = await obed.guest(name="lxvlan", mem_pages=64, gnt_entries=64)
    res = await asyncio.to_thread(obed.cli, "attach", "nic", str(g2.domid), "--bridge", "lxbr0.10")
    assert res.returncode != 0 and "VLAN tags and trunks need an Open vSwitch bridge" in res.stderr, res.stderr
    await settles(lambda: f"vif{g2.domid}.0" not in h.ip("-br", "link", "show"), "its tap deleted")
    assert await ping(g, PEER_V4, 2) == 2


@pytest.fixture
def obed_ovn(sim: SimProc, tmp_path: Path) -> Iterator[OvsNetBed]:
    yield from make_bed(sim, tmp_path, userspace_tso=True, net="ovn_installed_timeout = 3.0\n")


@pytest.mark.system_timeout(120)
async def test_hotplug_connected_waits_for_ovn_installed(obed_ovn: OvsNetBed) -> None:
    """With [net] ovn_installed_timeout, `hotplug-status=connected` comes only once ovn-controller (played by the
    test) marked the Interface ovn-installed=true; without it, after the timeout, with a warning."""
    bed, ovs = obed_ovn, obed_ovn.ovs
    dom0 = await bed.dom0()
    g, _xs = await bed.guest(name="ovn", mem_pages=64, gnt_entries=64)
    vif = f"vif{g.domid}.0"
    attach = asyncio.create_task(asyncio.to_thread(bed.cli, "attach", "nic", str(g.domid), "--bridge", "br0",
                                                   "--iface-id", "lsp-web-0"))
    deadline = time.monotonic() + 15
    while vif not in await asyncio.to_thread(ovs.vsctl, "list-ports", "br0"):
        assert time.monotonic() < deadline and not attach.done(), bed.serve.log_text()[-2000:]
        await asyncio.sleep(0.05)
    be = f"/local/domain/0/backend/vif/{g.domid}/0"
    await asyncio.sleep(0.5)
    assert await dom0.read_str(f"{be}/hotplug-status") is None  # plugged, but OVN has not installed it yet
    assert ext_ids(ovs, "Interface", vif)["iface-id"] == "lsp-web-0"
    await asyncio.to_thread(ovs.vsctl, "set", "Interface", vif, "external_ids:ovn-installed=true")
    res = await attach
    assert res.returncode == 0, res.stderr
    assert await dom0.read_str(f"{be}/hotplug-status") == "connected"
    assert "ovn-installed not set" not in bed.serve.log_text()

    g2, _xs2 = await bed.guest(name="noovn", mem_pages=64, gnt_entries=64)
    start = time.monotonic()
    res = await asyncio.to_thread(bed.cli, "attach", "nic", str(g2.domid), "--bridge", "br0")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - start >= 2.5
    be2 = f"/local/domain/0/backend/vif/{g2.domid}/0"
    assert await dom0.read_str(f"{be2}/hotplug-status") == "connected"
    assert f"ovn-installed not set on vif{g2.domid}.0 within 3 s" in bed.serve.log_text()
    for d in (g.domid, g2.domid):
        res = await asyncio.to_thread(bed.cli, "detach", "nic", str(d), "0")
        assert res.returncode == 0, res.stderr
    assert ovs.ports("br0") == []


@pytest.fixture
def obed_short(sim: SimProc, tmp_path: Path) -> Iterator[OvsNetBed]:
    yield from make_bed(sim, tmp_path, userspace_tso=True, ovs_timeout=2.0)


@pytest.mark.system_timeout(120)
async def test_dead_vswitchd_fails_the_attach_and_leaves_nothing(obed_short: OvsNetBed) -> None:
    """vswitchd down: the port never gets applied, so the vif fails after [net] ovs_timeout with the reason, and
    neither its port nor its tap stays behind; with vswitchd back, the same NIC attaches and carries traffic."""
    bed, ovs = obed_short, obed_short.ovs
    ovs.kill_vswitchd()
    g, _xs = await bed.guest(name="novsd", mem_pages=640, gnt_entries=1024)
    res = await asyncio.to_thread(bed.cli, "attach", "nic", str(g.domid), "--bridge", "br0")
    assert res.returncode != 0 and "ovs-vswitchd did not apply the change" in res.stderr, res.stderr
    vif = f"vif{g.domid}.0"
    await settles(lambda: ovs.port_rows(vif) == 0 and vif not in bed.peer.ip("-br", "link", "show"),
                  f"{vif} and its port gone")
    await asyncio.to_thread(ovs.start_vswitchd)
    nic = await bed.ovs_nic("br0", role="back")
    q = bed.peer_on("br0")
    assert await ping(gns(nic), PEER_V4) == 3
    await tcp(q, gns(nic), GUEST_V4, 2 << 20, 5171)
