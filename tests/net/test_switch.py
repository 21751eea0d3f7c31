"""The `bridge` key as vif-openvswitch parses it, iface-id defaults and the external_ids written (pure), and
which switch a vif goes to (and the clear refusals) without any switch running."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from backends.net.config import NetConfig
from backends.net.proto import ProtocolError
from backends.net.switch import Attachment, BridgeSpec, SwitchPlug, default_iface_id, external_ids, parse_bridge
from backends.xenbus.device import DeviceError

UUID = "0b9e4c2a-51f1-4d0a-9a3e-3f1f2b6f8c11"


@pytest.mark.parametrize(("text", "spec"), [
    ("br0", BridgeSpec("br0")),
    ("xenbr0", BridgeSpec("xenbr0")),
    ("br0.10", BridgeSpec("br0", 10)),
    ("br0.0", BridgeSpec("br0", 0)),
    ("br0:20:30", BridgeSpec("br0", None, (20, 30))),
    ("br0:4095", BridgeSpec("br0", None, (4095,))),
    ("br0.10:20:30", BridgeSpec("br0", 10, (20, 30))),
    ("ovs-br_1.7:7", BridgeSpec("ovs-br_1", 7, (7,))),
])
def test_parse_bridge(text: str, spec: BridgeSpec) -> None:
    assert parse_bridge(text) == spec
    assert str(spec) == text


@pytest.mark.parametrize("text", [
    "", ".10", ":20", "br0.", "br0:", "br0..10", "br0.10.20", "br0:20:", "br0::20", "br0.x", "br0:a",
    "br0.4096", "br0:1:4096", "br0.-1", "br 0", "br/0", "averyveryverylongbridge", "br0.10:20.30", "br0\n",
])
def test_parse_bridge_refuses(text: str) -> None:
    with pytest.raises(ProtocolError, match="bridge"):
        parse_bridge(text)


def test_iface_id_default_is_uuid_and_devid() -> None:
    f = {"vm_uuid": UUID, "vm_name": "web", "domid": "5", "devid": "1", "vif": "vif5.1"}
    assert default_iface_id("{vm_uuid}-{devid}", **f) == f"{UUID}-1"
    assert default_iface_id("{vm_name}/{domid}/{vif}", **f) == "web/5/vif5.1"
    # A domain without a UUID: the vif's name (unique on this host), not "-1".
    assert default_iface_id("{vm_uuid}-{devid}", **{**f, "vm_uuid": ""}) == "vif5.1"
    with pytest.raises(ProtocolError, match="iface_id"):
        default_iface_id("{nope}", **f)


def test_external_ids_exact() -> None:
    ids = external_ids(mac="00:16:3e:00:00:05", vm_name="web", vm_uuid=UUID, iface_id=f"{UUID}-0")
    assert ids == {"attached-mac": "00:16:3e:00:00:05", "xen-vm-name": "web", "xen-vm-uuid": UUID, "vm-id": UUID,
                   "iface-status": "active", "iface-id": f"{UUID}-0"}
    bare = external_ids(mac="00:16:3e:00:00:05", vm_name="", vm_uuid="", iface_id="vif5.0")
    assert bare == {"attached-mac": "00:16:3e:00:00:05", "iface-status": "active", "iface-id": "vif5.0"}


def test_attachment_summary() -> None:
    a = Attachment("ovs", "br0", "vif5.0", 10, (20, 30), "x-0", 3)
    assert a.summary() == {"switch": "ovs", "bridge": "br0", "port": "vif5.0", "ofport": 3,
                           "tag": "10", "trunks": "20,30", "iface_id": "x-0"}


class FakeDev:
    """What SwitchPlug.attach reads of a device: its backend keys, ids and logger."""

    frontend_id, devid = 5, 0

    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys
        self.log = logging.getLogger("test.switch")
        self.xs = self  # the domain's name and UUID: absent

    async def read_str(self, path: str) -> str | None:
        return None

    async def read_backend(self, key: str) -> str | None:
        return self.keys.get(key)


def attach(cfg: NetConfig, keys: dict[str, str]) -> Attachment:
    async def main() -> Attachment:
        return await SwitchPlug(cfg).attach(FakeDev(keys), vif="vif5.0", mac="00:16:3e:00:00:05",  # type: ignore[arg-type]
                                            tap_created=True)

    return asyncio.run(main())


def test_switch_choice_and_refusals(tmp_path: Path) -> None:
    nowhere = NetConfig(ovsdb=f"unix:{tmp_path}/no.sock")
    assert attach(nowhere, {}).kind == "none"  # no bridge key: the tap stays unbridged
    assert attach(NetConfig(switch="none"), {"bridge": "br0"}).kind == "none"  # a script's job
    with pytest.raises(DeviceError, match=r"bad toolstack keys: bridge 'br0\.x'"):
        attach(nowhere, {"bridge": "br0.x"})
    # auto: neither a Linux bridge of that name nor an OVSDB socket.
    with pytest.raises(DeviceError, match=r"bridge pvbt-nobr0: no Linux bridge of that name and no OVSDB at unix:"):
        attach(nowhere, {"bridge": "pvbt-nobr0"})
    with pytest.raises(DeviceError, match="VLAN tags and trunks need an Open vSwitch bridge"):
        attach(NetConfig(switch="linux"), {"bridge": "pvbt-nobr0.10"})
    with pytest.raises(DeviceError, match="Linux bridge: bridge pvbt-nobr0 does not exist"):
        attach(NetConfig(switch="linux"), {"bridge": "pvbt-nobr0"})
    with pytest.raises(DeviceError, match="cannot reach OVSDB at unix:"):
        attach(NetConfig(switch="ovs", ovsdb=f"unix:{tmp_path}/no.sock"), {"bridge": "br0"})
