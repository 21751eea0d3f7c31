"""The bus against pvback's xenstored, with scripted frontends and a fake device class."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from backends.xenbus.device import DeviceError
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import remove_device, wait_for_state

from .conftest import FakeClass, Frontend, eventually, settle, xenbus_env

S = XenbusState


async def _close_when_asked(fe: Frontend) -> None:
    """The guest's side of an unplug: answer the backend's Closing by closing."""
    await fe.wait_backend(S.CLOSING)
    await fe.close()


async def connect(fe: Frontend, ring: int = 8, port: int = 5) -> None:
    assert await fe.wait_backend(S.INIT_WAIT) is S.INIT_WAIT
    await fe.publish(ring=ring, port=port)
    assert await fe.wait_backend(S.CONNECTED) is S.CONNECTED


async def test_normal_connect_and_close(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        await env.bus(cls)
        fe = await env.add(1)
        assert await fe.wait_backend(S.INIT_WAIT) is S.INIT_WAIT
        # Probe features are there before InitWait, where the frontend reads them.
        assert await fe.xs.read_str(f"{fe.paths.backend}/feature-fake") == "1"
        await fe.publish(ring=77, port=9, protocol="x86_64-abi")
        await fe.wait_backend(S.CONNECTED)
        assert await fe.xs.read_str(f"{fe.paths.backend}/sectors") == "2048"
        assert cls.rings[fe.paths.backend] == (77, 9)
        assert cls.platforms == [env.platform]
        await fe.set_state(S.CONNECTED)  # blkfront says Connected after Initialised: still one connection
        await fe.set_state(S.CLOSING)
        await fe.wait_backend(S.CLOSING)
        await fe.set_state(S.CLOSED)
        await fe.wait_backend(S.CLOSED)
        await eventually(lambda: fe.paths.backend not in cls.connected)
        assert cls.names() == ["realize", "connect", "disconnect"]


async def test_frontend_skips_initwait(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        # Bus already running, frontend publishes at once (races the bus's InitWait).
        await env.bus(cls)
        fe = await env.add(1)
        await fe.publish(ring=3, port=4)
        await fe.wait_backend(S.CONNECTED)
        # Frontend already Initialised before any backend exists.
        fe2 = await env.add(2)
        await fe2.publish(ring=5, port=6)
        cls2 = FakeClass(type_names=("fake2",))
        fe3 = await env.add(3, type_name="fake2")
        await fe3.publish(ring=5, port=6)
        await env.bus(cls2)
        await fe3.wait_backend(S.CONNECTED)
        await fe2.wait_backend(S.CONNECTED)  # the first bus had it all along
        assert cls.names(fe.paths.backend) == ["realize", "connect"]
        assert cls2.names() == ["realize", "connect"]
        assert cls2.rings[fe3.paths.backend] == (5, 6)


async def test_net_style_class_ignores_initialised(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass(connect_states=frozenset({S.CONNECTED}))
        bus = await env.bus(cls)
        fe = await env.add(1)
        await fe.wait_backend(S.INIT_WAIT)
        await fe.publish(state=S.INITIALISED)
        await env.dom0.write(f"{fe.paths.backend}/poke", "1")  # a spurious event: still no connect
        await settle(bus)
        assert await fe.backend_state() is S.INIT_WAIT
        await fe.set_state(S.CONNECTED)
        await fe.wait_backend(S.CONNECTED)
        assert cls.names() == ["realize", "connect"]


async def test_frontend_reboot_reconnects(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        await env.bus(cls)
        fe = await env.add(1)
        await connect(fe, ring=10)
        await fe.close()
        await fe.wait_backend(S.CLOSED)
        await fe.set_state(S.INITIALISING)
        await connect(fe, ring=20)
        assert cls.rings[fe.paths.backend] == (20, 5)
        assert cls.names() == ["realize", "connect", "disconnect", "connect"]
        # A reset without Closed (a crashed guest kexec-ing): the old connection is dropped before the new one.
        await fe.set_state(S.INITIALISING)
        await connect(fe, ring=30)
        assert cls.names()[-2:] == ["disconnect", "connect"]
        assert cls.rings[fe.paths.backend] == (30, 5)


async def test_hot_unplug_libxl_remove(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        bus = await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)

        answer = asyncio.create_task(_close_when_asked(fe))
        clean = await remove_device(env.dom0, backend_domid=0, frontend_domid=1, type_name="fake", devid=51712,
                                    timeout=3)
        await answer
        assert clean
        assert not await env.dom0.exists(fe.paths.backend)
        assert not await env.dom0.exists(fe.paths.frontend)
        assert cls.names() == ["realize", "connect", "disconnect", "unrealize"]
        await eventually(lambda: not bus.devices)


async def test_online_zero_waits_for_connected_frontend(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        bus = await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)
        await env.dom0.write(f"{fe.paths.backend}/online", "0")
        await fe.wait_backend(S.CLOSING)
        assert "disconnect" not in cls.names()  # the frontend still owns the rings
        await fe.close()
        await fe.wait_backend(S.CLOSED)
        await eventually(lambda: cls.names()[-1:] == ["unrealize"])
        assert cls.names() == ["realize", "connect", "disconnect", "unrealize"]
        # Stays known (and quiet) until the toolstack removes the directory.
        assert fe.paths.backend in bus.devices
        await env.dom0.rm(fe.paths.backend)
        await eventually(lambda: not bus.devices)
        assert cls.names() == ["realize", "connect", "disconnect", "unrealize"]


async def test_online_zero_idle_frontend_closes_at_once(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        await env.bus(cls)
        fe = await env.add(1)
        await fe.wait_backend(S.INIT_WAIT)
        await env.dom0.write(f"{fe.paths.backend}/online", "0")
        await fe.wait_backend(S.CLOSED)
        await eventually(lambda: cls.names() == ["realize", "unrealize"])


async def test_bus_restart_reconnects_connected_frontend(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls1 = FakeClass()
        bus1 = await env.bus(cls1)
        fe = await env.add(1)
        await connect(fe, ring=42)
        await bus1.stop(close_devices=False)
        assert cls1.names() == ["realize", "connect", "disconnect", "unrealize"]
        assert not bus1.devices
        assert await fe.backend_state() is S.CONNECTED  # xenstore untouched: the guest sees a pause only
        assert await env.read(f"{fe.paths.backend}/error") is None

        watch = await fe.xs.watch(f"{fe.paths.backend}/state")
        initial = await anext(watch)
        assert initial.endswith("/state")
        cls2 = FakeClass()
        await env.bus(cls2)
        # Connected is written again, so the frontend's watch fires (and it may re-read sectors).
        import asyncio

        fired = await asyncio.wait_for(anext(watch), 3)
        assert fired.endswith("/state")
        await watch.close()
        assert cls2.names() == ["realize", "connect"]
        assert cls2.rings[fe.paths.backend] == (42, 5)  # frontend keys re-read
        assert await fe.backend_state() is S.CONNECTED


async def test_frontend_garbage_fails_only_that_device(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        bus = await env.bus(cls)
        bad = await env.add(1)
        good = await env.add(2)
        await bad.wait_backend(S.INIT_WAIT)
        await bad.publish(ring="12abc")
        await bad.wait_backend(S.CLOSING)
        err = await env.read(f"{bad.paths.backend}/error")
        assert err is not None and "ring-ref" in err and "12abc" in err
        # Linux's place for it too, relative to the backend domain's home.
        assert await env.read("/local/domain/0/error/backend/fake/1/51712/error") == err
        assert bad.paths.backend not in cls.connected  # what connect had done was undone
        # The other guest's device is unaffected.
        await connect(good)
        assert good.paths.backend in cls.connected
        assert await env.read(f"{good.paths.backend}/error") is None
        # A failed device does not retry with the same frontend...
        await bad.publish(ring=9, state=S.CONNECTED)
        await settle(bus)
        assert await bad.backend_state() is S.CLOSING
        # ...until it closes and starts over.
        await bad.set_state(S.CLOSED)
        await bad.wait_backend(S.CLOSED)
        await bad.set_state(S.INITIALISING)
        await connect(bad, ring=9)


async def test_frontend_garbage_values(tmp_path: Path) -> None:
    bad_values = ["-1", "+5", " 5", "5 ", "0x10", "1e3", "", "99999999999999999999999", "٣", "5\x00"]
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        await env.bus(cls)
        fes = []
        for i, value in enumerate(bad_values):
            fe = await env.add(10 + i)
            await fe.wait_backend(S.INIT_WAIT)
            await fe.publish(port=value)
            fes.append(fe)
        for fe in fes:
            await fe.wait_backend(S.CLOSING)
            err = await env.read(f"{fe.paths.backend}/error")
            assert err is not None and "event-channel" in err, err
        # Out of range, and an over-long / unknown string.
        fe = await env.add(40)
        await fe.wait_backend(S.INIT_WAIT)
        await fe.publish(port=4096)
        await fe.wait_backend(S.CLOSING)
        assert "out of range" in (await env.read(f"{fe.paths.backend}/error") or "")
        fe = await env.add(41)
        await fe.wait_backend(S.INIT_WAIT)
        await fe.publish(protocol="x" * 300)
        await fe.wait_backend(S.CLOSING)
        assert "300 bytes" in (await env.read(f"{fe.paths.backend}/error") or "")
        assert not cls.connected


async def test_frontend_garbage_state(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)
        await fe.xs.write(f"{fe.paths.frontend}/state", "4; rm -rf /")
        # Reported once, then treated as gone: disconnected and Closed.
        await fe.wait_backend(S.CLOSED)
        assert "not a xenbus state" in (await env.read(f"{fe.paths.backend}/error") or "")
        await eventually(lambda: fe.paths.backend not in cls.connected)


async def test_frontend_deletes_its_dir(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)
        await fe.xs.rm(fe.paths.frontend)  # the guest owns it, it may
        await fe.wait_backend(S.CLOSED)
        assert cls.names() == ["realize", "connect", "disconnect"]
        assert await env.read(f"{fe.paths.backend}/error") is None


async def test_class_exceptions(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass(raise_on={"connect": RuntimeError("driver exploded")})
        await env.bus(cls)
        fe = await env.add(1)
        await fe.wait_backend(S.INIT_WAIT)
        await fe.publish()
        await fe.wait_backend(S.CLOSING)
        err = await env.read(f"{fe.paths.backend}/error") or ""
        assert "RuntimeError" in err and "driver exploded" in err
        assert cls.names() == ["realize", "connect", "disconnect"]
        await fe.close()
        await fe.wait_backend(S.CLOSED)
        await fe.set_state(S.INITIALISING)
        await connect(fe)  # the exception was one-shot: a restarted frontend connects

        # realize failing: the device never connects; the class gets unrealize to clean up.
        cls_r = FakeClass(type_names=("fake2",), raise_on={"realize": DeviceError("no such image: /x.img")})
        bus_r = await env.bus(cls_r)
        fe2 = await env.add(2, type_name="fake2")
        await fe2.wait_backend(S.CLOSING)
        assert await env.read(f"{fe2.paths.backend}/error") == "no such image: /x.img"
        await fe2.publish()
        await fe2.set_state(S.CLOSED)
        await fe2.wait_backend(S.CLOSED)
        await fe2.set_state(S.INITIALISING)
        await fe2.publish()
        await settle(bus_r)
        assert cls_r.names() == ["realize", "unrealize"]

        # disconnect raising on close: reported, and the device still reaches Closed.
        cls.raise_on["disconnect"] = OSError(5, "EIO")
        await fe.close()
        await fe.wait_backend(S.CLOSED)
        assert "disconnect failed" in (await env.read(f"{fe.paths.backend}/error") or "")


async def test_fail_from_outside_a_callback(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        bus = await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)
        dev = bus.devices[fe.paths.backend]
        await dev.fail("bogus ring requests")  # what a ring pump does on a bad req_prod
        await fe.wait_backend(S.CLOSING)
        assert await env.read(f"{fe.paths.backend}/error") == "bogus ring requests"
        assert cls.names()[-1] == "disconnect"


async def test_resize_notify_frontend(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        bus = await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)
        watch = await fe.xs.watch(f"{fe.paths.backend}/state")
        await anext(watch)  # initial event
        await bus.devices[fe.paths.backend].notify_frontend({"sectors": "4096"})
        import asyncio

        await asyncio.wait_for(anext(watch), 3)
        assert await fe.xs.read_str(f"{fe.paths.backend}/sectors") == "4096"
        assert await fe.backend_state() is S.CONNECTED
        await watch.close()


async def test_untrusted_frontend_key(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        await env.bus(cls)
        await env.guest(1)
        await env.guest(2)
        # Points at another guest's directory: never read, never watched, never realized.
        be = "/local/domain/0/backend/fake/1/5"
        await env.dom0.write(f"{be}/frontend-id", "1")
        await env.dom0.write(f"{be}/state", "1")
        await env.dom0.write(f"{be}/frontend", "/local/domain/2/device/vbd/5")
        await wait_for_state(env.dom0, be, S.CLOSED, 3)
        assert "expected /local/domain/1/device/<type>/5" in (await env.read(f"{be}/error") or "")
        # frontend-id disagreeing with the directory it sits in.
        be6 = "/local/domain/0/backend/fake/1/6"
        await env.dom0.write(f"{be6}/frontend-id", "2")
        await env.dom0.write(f"{be6}/frontend", "/local/domain/1/device/vbd/6")
        await wait_for_state(env.dom0, be6, S.CLOSED, 3)
        assert "frontend-id is b'2', expected 1" in (await env.read(f"{be6}/error") or "")
        assert cls.names() == []


async def test_existing_devices_served_at_start(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        a = await env.add(1, devid=1)
        b = await env.add(2, devid=2)
        await b.publish()
        cls = FakeClass()
        await env.bus(cls)
        await a.wait_backend(S.INIT_WAIT)
        await b.wait_backend(S.CONNECTED)
        await connect(a)


async def test_toolstack_permissions(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        from backends.xenstore.client import Perm

        from .conftest import expect_error

        fe = await env.add(3)
        assert (await env.dom0.get_perms(fe.paths.frontend))[:2] == [Perm(3, "n"), Perm(0, "r")]
        assert (await env.dom0.get_perms(fe.paths.backend))[:2] == [Perm(0, "n"), Perm(3, "r")]
        # The guest reads its backend but cannot write it; another guest sees neither.
        assert await fe.xs.read_str(f"{fe.paths.backend}/online") == "1"
        await expect_error(fe.xs, fe.paths.backend, "EACCES",
                           lambda: fe.xs.write(f"{fe.paths.backend}/state", "4"))
        other = await env.guest(4)
        await expect_error(other, fe.paths.frontend, "EACCES", lambda: other.read(f"{fe.paths.frontend}/state"))
        # Nobody serves it: remove times out, and removes it anyway like libxl's forced remove.
        clean = await remove_device(env.dom0, backend_domid=0, frontend_domid=3, type_name="fake", devid=51712,
                                    timeout=0.2)
        assert not clean
        assert not await env.dom0.exists(fe.paths.backend)
        assert not await env.dom0.exists(fe.paths.frontend)


async def test_stop_closing_devices(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        bus = await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)
        answer = asyncio.create_task(_close_when_asked(fe))
        await bus.stop(close_devices=True, close_timeout=3)
        await answer
        assert await fe.backend_state() is S.CLOSED
        assert cls.names() == ["realize", "connect", "disconnect", "unrealize"]


async def test_watch_storm_coalesces(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        bus = await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)
        await settle(bus)
        dev = bus.devices[fe.paths.backend]
        before = dev.stats["observations"]

        async def storm(tx: Any) -> None:
            for i in range(200):
                await tx.write(f"{fe.paths.frontend}/junk-{i}", "x")

        await fe.xs.transaction(storm)
        await settle(bus)
        # 200 watch events, a few re-reads (how many depends on how the events were split into reads of the
        # socket, so only bound it loosely); nothing else happened to the device.
        assert 1 <= dev.stats["observations"] - before <= 40
        assert cls.names() == ["realize", "connect"]
        assert await fe.backend_state() is S.CONNECTED


async def test_backend_dir_removed_while_connected(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = FakeClass()
        bus = await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)
        await env.dom0.rm("/local/domain/0/backend/fake/1")  # the whole frontend's subtree at once
        await eventually(lambda: not bus.devices)
        assert cls.names() == ["realize", "connect", "disconnect", "unrealize"]
        await settle(bus)
        # Nothing wrote into the removed directory (which would have recreated it).
        assert not await env.dom0.exists(fe.paths.backend)


class _SlowUnrealize(FakeClass):
    """unrealize waits until released: a device still shutting down when the toolstack re-adds it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.unrealizing = asyncio.Event()

    async def unrealize(self, dev: Any) -> None:
        await super().unrealize(dev)
        self.unrealizing.set()
        await self.release.wait()


async def test_device_readded_while_the_old_one_shuts_down(tmp_path: Path) -> None:
    """A quick detach + attach at the same path (xl vtpm-detach then vtpm-attach): the re-add's watch event
    reaches the old device, which is on its way out; the bus must look again once it is gone."""
    async with xenbus_env(tmp_path) as env:
        cls = _SlowUnrealize()
        bus = await env.bus(cls)
        fe = await env.add(1)
        await connect(fe)
        old = bus.devices[fe.paths.backend]
        await env.dom0.rm(fe.paths.backend)
        await asyncio.wait_for(cls.unrealizing.wait(), 3)
        fe = await env.add(1)  # same path, while the old device is still unrealizing
        await asyncio.sleep(0.2)  # the re-add's watch event has reached the old device by now
        assert bus.devices.get(fe.paths.backend) is old
        cls.release.set()
        await eventually(lambda: fe.paths.backend in bus.devices and bus.devices[fe.paths.backend] is not old)
        await connect(fe, ring=40)
        await eventually(lambda: cls.rings.get(fe.paths.backend) == (40, 5))
        assert cls.names() == ["realize", "connect", "disconnect", "unrealize", "realize", "connect"]


class _GatedClass(FakeClass):
    """A NIC-like class: Connected only once its device is plugged (hotplug-status), watching netback's keys."""

    hotplug_gate = True
    watch_backend_keys = ("rate",)
    watch_frontend_keys = ("request-multicast-control",)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.changes: list[tuple[str, str, str | None]] = []

    async def realize(self, dev: Any) -> None:
        await super().realize(dev)
        dev.data = object()  # what a real class keeps per device

    async def key_changed(self, dev: Any, side: str, key: str, value: str | None) -> None:
        self.changes.append((side, key, value))
        if value == "bogus":
            raise DeviceError(f"{key}={value!r} is not understood")


async def test_hotplug_gate_holds_connected_until_plugged(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = _GatedClass(connect_states=frozenset({S.CONNECTED}))
        bus = await env.bus(cls)
        fe = await env.add(1)
        await fe.wait_backend(S.INIT_WAIT)
        await fe.publish(state=S.CONNECTED)
        await eventually(lambda: fe.paths.backend in cls.connected)  # rings connected...
        await settle(bus)
        assert await fe.backend_state() is S.INIT_WAIT  # ...but not announced: the NIC is not plugged yet
        await env.dom0.write(f"{fe.paths.backend}/hotplug-status", "not-yet")
        await settle(bus)
        assert await fe.backend_state() is S.INIT_WAIT
        await env.dom0.write(f"{fe.paths.backend}/hotplug-status", "connected")
        await fe.wait_backend(S.CONNECTED)
        assert cls.names() == ["realize", "connect"]  # one connection, no reconnect while waiting


async def test_hotplug_error_fails_the_device(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = _GatedClass(connect_states=frozenset({S.CONNECTED}))
        await env.bus(cls)
        fe = await env.add(1)
        await fe.wait_backend(S.INIT_WAIT)
        await fe.publish(state=S.CONNECTED)
        await eventually(lambda: fe.paths.backend in cls.connected)
        await env.dom0.write(f"{fe.paths.backend}/hotplug-error", "ovs-vsctl add-port failed")
        await env.dom0.write(f"{fe.paths.backend}/hotplug-status", "error")
        await fe.wait_backend(S.CLOSING, S.CLOSED)
        assert "ovs-vsctl add-port failed" in (await env.read(f"{fe.paths.backend}/error") or "")
        assert fe.paths.backend not in cls.connected


async def test_watched_keys_reach_the_class(tmp_path: Path) -> None:
    async with xenbus_env(tmp_path) as env:
        cls = _GatedClass(connect_states=frozenset({S.CONNECTED}))
        bus = await env.bus(cls)
        fe = await env.add(1, backend={"params": "/dev/null", "rate": "10000,50000"})
        await fe.wait_backend(S.INIT_WAIT)
        await env.dom0.write(f"{fe.paths.backend}/hotplug-status", "connected")
        await fe.publish(state=S.CONNECTED)
        await fe.wait_backend(S.CONNECTED)
        await eventually(lambda: ("backend", "rate", "10000,50000") in cls.changes)
        assert ("frontend", "request-multicast-control", None) in cls.changes
        n = len(cls.changes)
        await env.dom0.write(f"{fe.paths.backend}/poke", "1")  # an unrelated change: nothing delivered
        await settle(bus)
        assert len(cls.changes) == n
        await fe.xs.write(f"{fe.path}/request-multicast-control", "1")
        await eventually(lambda: cls.changes[-1] == ("frontend", "request-multicast-control", "1"))
        await env.dom0.write(f"{fe.paths.backend}/rate", "20000,50000")
        await eventually(lambda: cls.changes[-1] == ("backend", "rate", "20000,50000"))
        # A value the class refuses fails this device, like any class error.
        await fe.xs.write(f"{fe.path}/request-multicast-control", "bogus")
        await fe.wait_backend(S.CLOSING, S.CLOSED)
        assert "not understood" in (await env.read(f"{fe.paths.backend}/error") or "")
