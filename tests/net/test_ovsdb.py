"""The OVSDB port driver against a real, private Open vSwitch (ovsdb-server + ovs-vswitchd, netdev datapath) in a
namespace of the test's own: ports added and applied by vswitchd, exact external_ids, adoption vs replacement of
an existing port, a port on the wrong bridge moved, unplug, a missing bridge refused, repairs after an
operator's del-port and after ovsdb-server came back on an empty database, and a dead vswitchd timing out
without stalling the event loop."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from backends.drivers.net.ovsdb import OvsdbSwitch, OvsError, OvsPort, fetch_schema
from backends.drivers.net.tap import Tap
from tests.net.netns import NetNS
from tests.net.ovsbed import PrivateOvs

IDS = {"attached-mac": "00:16:3e:00:00:05", "xen-vm-name": "web", "iface-status": "active", "iface-id": "x-0"}


@dataclass
class Bed:
    ns: NetNS
    ovs: PrivateOvs
    sw: OvsdbSwitch

    def tap(self, name: str) -> None:
        def make() -> None:
            t = Tap(name, mac="fe:ff:ff:ff:ff:ff", mtu=1500)
            t.open()
            t.close()  # the persistent interface stays

        self.ns.run(make)


@pytest.fixture
def bed() -> Iterator[Bed]:
    with NetNS(f"pvbo-{os.getpid()}") as ns:
        ovs = PrivateOvs(ns).start()
        try:
            ovs.add_bridge("br0")
            sw = OvsdbSwitch(ovs.remote, fetch_schema(ovs.remote), timeout=10)
            sw.start()
            try:
                b = Bed(ns, ovs, sw)
                b.tap("vif5.0")
                yield b
            finally:
                sw.close()
        finally:
            ovs.stop()


def ext_ids(ovs: PrivateOvs, table: str, name: str) -> dict[str, str]:
    raw = ovs.get(table, name, "external_ids").strip("{}")
    out = {}
    for item in filter(None, (s.strip() for s in raw.split(","))):
        k, _, v = item.partition("=")
        out[k.strip('"')] = v.strip('"')
    return out


def wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_plug_adopt_replace_unplug(bed: Bed) -> None:
    sw, ovs = bed.sw, bed.ovs
    info = sw.plug(OvsPort("br0", "vif5.0", 10, (), IDS)).result(15)
    assert info.ofport is not None and info.ofport > 0 and not info.adopted
    # Applied by vswitchd, not only written: the interface has its ofport in the database.
    assert ovs.get("Interface", "vif5.0", "ofport") == str(info.ofport)
    assert ovs.ports("br0") == ["vif5.0"] and ovs.get("Port", "vif5.0", "tag") == "10"
    assert ext_ids(ovs, "Interface", "vif5.0") == IDS == ext_ids(ovs, "Port", "vif5.0")
    assert ovs.get("Interface", "vif5.0", "type") == '""'

    # The same port again (a daemon restarted over its vif): kept, only changed ids rewritten.
    again = sw.plug(OvsPort("br0", "vif5.0", 10, (), {**IDS, "iface-id": "y-0"})).result(15)
    assert again.adopted and again.ofport == info.ofport
    assert ext_ids(ovs, "Interface", "vif5.0")["iface-id"] == "y-0"
    # A different VLAN, or a tap re-created under it: replaced (delete, then add), never duplicated.
    moved = sw.plug(OvsPort("br0", "vif5.0", None, (20, 30), IDS)).result(15)
    assert not moved.adopted and moved.ofport != info.ofport and moved.trunks == (20, 30) and moved.tag is None
    fresh = sw.plug(OvsPort("br0", "vif5.0", None, (20, 30), IDS), replace=True).result(15)
    assert not fresh.adopted and fresh.ofport != moved.ofport
    assert ovs.port_rows("vif5.0") == 1 and ovs.get("Port", "vif5.0", "trunks") == "[20, 30]"

    sw.unplug("vif5.0").result(15)
    assert ovs.ports("br0") == [] and ovs.port_rows("vif5.0") == 0
    sw.unplug("vif5.0").result(15)  # absent: fine
    assert sw.repairs == 0  # an unplugged port is not put back
    time.sleep(0.3)
    assert ovs.port_rows("vif5.0") == 0


def test_stale_port_on_another_bridge_and_missing_bridge(bed: Bed) -> None:
    sw, ovs = bed.sw, bed.ovs
    ovs.add_bridge("br1")
    ovs.vsctl("--timeout=20", "add-port", "br1", "vif5.0", "--", "set", "Interface", "vif5.0",
              "external_ids:attached-mac=stale")
    info = sw.plug(OvsPort("br0", "vif5.0", None, (), IDS)).result(15)
    assert ovs.ports("br1") == [] and ovs.ports("br0") == ["vif5.0"] and ovs.port_rows("vif5.0") == 1
    assert info.bridge == "br0" and ext_ids(ovs, "Interface", "vif5.0") == IDS
    assert sw.bridge("br1").result(5) is not None and sw.bridge("nobr").result(5) is None
    bed.tap("vif5.1")
    with pytest.raises(OvsError, match="bridge nobr does not exist"):
        sw.plug(OvsPort("nobr", "vif5.1")).result(15)
    assert ovs.port_rows("vif5.1") == 0
    with pytest.raises(OvsError, match="VLAN 4096"):
        sw.plug(OvsPort("br0", "vif5.1", 4096))
    # An interface vswitchd cannot open: refused with its reason, not reported plugged.
    with pytest.raises(OvsError, match="cannot open nosuchtap"):
        sw.plug(OvsPort("br0", "nosuchtap")).result(15)


def test_repairs_after_del_port_and_empty_database(bed: Bed) -> None:
    sw, ovs = bed.sw, bed.ovs
    sw.plug(OvsPort("br0", "vif5.0", 10, (), IDS)).result(15)
    ovs.vsctl("--timeout=20", "del-port", "br0", "vif5.0")
    wait_for(lambda: sw.repairs == 1 and ovs.ports("br0") == ["vif5.0"])
    assert sw.reconnects == 0
    # ovsdb-server restarted on an empty database (every bridge and port gone): pvback reconnects; the port
    # comes back once its bridge exists again, with its tag and ids.
    ovs.restart_ovsdb(fresh=True)
    wait_for(lambda: sw.reconnects == 1)
    assert sw.repairs == 1
    ovs.add_bridge("br0")
    wait_for(lambda: sw.repairs == 2 and ovs.ports("br0") == ["vif5.0"])
    assert ovs.get("Port", "vif5.0", "tag") == "10" and ext_ids(ovs, "Interface", "vif5.0") == IDS
    wait_for(lambda: int(ovs.get("Interface", "vif5.0", "ofport") or -1) > 0)
    # The same database back (a plain restart): a reconnect, nothing to repair.
    ovs.restart_ovsdb()
    wait_for(lambda: sw.reconnects == 2)
    time.sleep(0.5)
    assert sw.repairs == 2 and ovs.port_rows("vif5.0") == 1


def test_dead_vswitchd_times_out_off_the_loop(bed: Bed) -> None:
    bed.sw.timeout = 1.5
    bed.ovs.kill_vswitchd()
    took, ticks = asyncio.run(plug_while_ticking(bed.sw))
    assert 1.4 < took < 5
    assert ticks > 50, ticks  # the loop kept running while the OVSDB thread waited
    # Unplug does not wait for a dead vswitchd: deleted from the database is enough.
    bed.sw.unplug("vif5.0").result(1.0)
    assert bed.ovs.port_rows("vif5.0") == 0


async def plug_while_ticking(sw: OvsdbSwitch) -> tuple[float, int]:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        start = time.monotonic()
        with pytest.raises(OvsError, match="ovs-vswitchd did not apply"):
            await asyncio.wrap_future(sw.plug(OvsPort("br0", "vif5.0", None, (), IDS)))
        took = time.monotonic() - start
    finally:
        t.cancel()
    return took, ticks


def test_wait_external_id(bed: Bed) -> None:
    """What waiting for ovn-controller's ovn-installed looks like to the driver: True once the key appears,
    False when the time runs out; other requests are not held up meanwhile."""
    sw, ovs = bed.sw, bed.ovs
    sw.plug(OvsPort("br0", "vif5.0", None, (), IDS)).result(15)
    never = sw.wait_external_id("vif5.0", "ovn-installed", "true", 1.0)
    soon = sw.wait_external_id("vif5.0", "ovn-installed", "true", 10.0)
    bed.tap("vif5.1")
    start = time.monotonic()
    sw.plug(OvsPort("br0", "vif5.1", None, (), IDS)).result(15)  # not queued behind the waits
    assert time.monotonic() - start < 0.9 and not never.done()
    assert never.result(5) is False
    ovs.vsctl("set", "Interface", "vif5.0", "external_ids:ovn-installed=true")
    assert soon.result(5) is True
    assert sw.wait_external_id("vif5.0", "ovn-installed", "true", 1.0).result(5) is True


def test_a_thread_that_died_fails_requests_at_once(bed: Bed) -> None:
    """A bug in the thread must not leave callers waiting for ever: pending and later requests fail, `alive`
    says so (the device side then starts a new connection)."""
    sw = bed.sw
    assert sw.alive

    def boom() -> None:
        raise RuntimeError("injected")

    sw._step = boom  # type: ignore[method-assign]
    sw._wake()
    wait_for(lambda: not sw.alive, 5)
    start = time.monotonic()
    with pytest.raises(OvsError, match="closed"):
        sw.plug(OvsPort("br0", "vif5.0")).result(5)
    with pytest.raises(OvsError, match="closed"):
        sw.wait_external_id("vif5.0", "k", "v", 5).result(5)
    assert time.monotonic() - start < 1
