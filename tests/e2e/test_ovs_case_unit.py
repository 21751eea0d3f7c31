"""What the real-Xen net-ovs check (tests/e2e/dom0/ovs_case.py) makes of the switch, here on ovs-vsctl's JSON as
OVS 3.1 prints it: it passes pvback's port as the issue wants it and catches each way it could be wrong (tag,
external_ids on either row, an ofport vswitchd never assigned, a duplicate, a port left behind after the detach)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.e2e.dom0 import ovs_case
from tests.e2e.dom0.ovs_case import DomOvs, OvsProblem

TAP = "vif3.2"
UUID = "3d0f6a52-71c4-4b8e-9a15-e2b7c40d8f93"
IFACE_UUID = "f922cbed-b4ef-43c9-8b4b-b123bdef2986"
IDS = ovs_case.expected_ids(mac=ovs_case.MAC, vm_name="pvguest", vm_uuid=UUID, devid=ovs_case.DEVID)


def ovs_map(d: dict[str, str]) -> list[Any]:
    return ["map", [[k, v] for k, v in sorted(d.items())]]


def find_json(headings: list[str], rows: list[list[Any]]) -> str:
    return json.dumps({"data": rows, "headings": headings})


class FakeSwitch(DomOvs):
    """DomOvs whose ovs-vsctl answers from tables given here (the JSON cells as OVS 3.1 prints them)."""

    def __init__(self, port: dict[str, Any] | None, iface: dict[str, Any] | None, ports: list[str]) -> None:
        super().__init__(lambda _line: None)
        self.rows = {"Port": [port] if port else [], "Interface": [iface] if iface else []}
        self.bridge_ports = ports

    def vsctl(self, *args: str, timeout: float = 30) -> str:
        if args[0] == "list-ports":
            return "\n".join(self.bridge_ports)
        assert args[:2] == ("--format=json", "--data=json") and args[3] == "find", args
        columns = args[2].removeprefix("--columns=").split(",")
        table, cond = args[4], args[5]
        rows = [r for r in self.rows[table] if cond == f"name={r['name']}"]
        return find_json(columns, [[r[c] for c in columns] for r in rows])


def good_rows() -> tuple[dict[str, Any], dict[str, Any]]:
    port = {"_uuid": ["uuid", "321dfd7e-093a-464b-b5b7-170a92d69726"], "name": TAP,
            "interfaces": ["uuid", IFACE_UUID], "tag": ovs_case.VLAN, "trunks": ["set", []],
            "external_ids": ovs_map(IDS)}
    iface = {"_uuid": ["uuid", IFACE_UUID], "name": TAP, "type": "", "ofport": 3, "error": ["set", []],
             "external_ids": ovs_map(IDS)}
    return port, iface


def test_parse_find_real_output() -> None:
    # Verbatim from ovs-vsctl 3.1.0 --format=json --data=json ... find Interface name=vif3.2
    out = ('{"data":[[["uuid","f922cbed-b4ef-43c9-8b4b-b123bdef2986"],"vif3.2","",["set",[]],["set",[]],'
           '["map",[["attached-mac","00:16"],["iface-id","x"]]]]],'
           '"headings":["_uuid","name","type","ofport","error","external_ids"]}')
    assert ovs_case.parse_find(out) == [{"_uuid": IFACE_UUID, "name": "vif3.2", "type": "", "ofport": [],
                                         "error": [], "external_ids": {"attached-mac": "00:16", "iface-id": "x"}}]
    assert ovs_case.parse_find('{"data":[],"headings":["name"]}') == []


def test_expected_ids_are_the_issues_list() -> None:
    want = {"attached-mac": "00:16:3e:5e:00:03", "iface-id": f"{UUID}-2", "iface-status": "active",
            "xen-vm-name": "pvguest", "xen-vm-uuid": UUID, "vm-id": UUID}
    assert want == IDS


def test_check_port_passes_pvbacks_port() -> None:
    port, iface = good_rows()
    ofport, detail = FakeSwitch(port, iface, [ovs_case.PEER_PORT, TAP]).check_port(TAP, vm_name="pvguest",
                                                                                   vm_uuid=UUID)
    assert ofport == 3
    assert f"iface-id={UUID}-2" in detail and "tag 10" in detail


@pytest.mark.parametrize(("row", "column", "value", "complaint"), [
    ("port", "tag", ["set", []], "tag=[]"),
    ("port", "trunks", ["set", [10, 20]], "trunks=[10, 20]"),
    ("iface", "ofport", ["set", []], "ofport=[]"),
    ("iface", "ofport", -1, "ofport=-1"),
    ("iface", "error", "could not open network device vif3.2 (No such device)", "error="),
    ("iface", "type", "internal", "type='internal'"),
    ("iface", "external_ids", ovs_map({**IDS, "iface-id": "other"}), "Interface vif3.2 external_ids:iface-id"),
    ("port", "external_ids", ovs_map({k: v for k, v in IDS.items() if k != "vm-id"}), "Port vif3.2 external_ids:vm-id"),
    ("port", "interfaces", ["set", [["uuid", IFACE_UUID], ["uuid", "00000000-0000-0000-0000-000000000000"]]],
     "interfaces"),
])
def test_check_port_catches(row: str, column: str, value: Any, complaint: str) -> None:
    port, iface = good_rows()
    (port if row == "port" else iface)[column] = value
    with pytest.raises(OvsProblem, match=re.escape(complaint)):
        FakeSwitch(port, iface, [ovs_case.PEER_PORT, TAP]).check_port(TAP, vm_name="pvguest", vm_uuid=UUID)


def test_check_port_catches_a_missing_port_and_one_off_the_bridge() -> None:
    port, iface = good_rows()
    with pytest.raises(OvsProblem, match="0 Port and 0 Interface rows"):
        FakeSwitch(None, None, [ovs_case.PEER_PORT]).check_port(TAP, vm_name="pvguest", vm_uuid=UUID)
    with pytest.raises(OvsProblem, match=f"not a port of {ovs_case.BRIDGE}"):
        FakeSwitch(port, iface, [ovs_case.PEER_PORT]).check_port(TAP, vm_name="pvguest", vm_uuid=UUID)


def test_check_gone() -> None:
    port, iface = good_rows()
    assert "no Port/Interface row" in FakeSwitch(None, None, [ovs_case.PEER_PORT]).check_gone(TAP)
    with pytest.raises(OvsProblem, match="1 Port and 1 Interface rows"):
        FakeSwitch(port, iface, [ovs_case.PEER_PORT, TAP]).check_gone(TAP)
    with pytest.raises(OvsProblem, match="ports on pvbr0"):  # the rows went, but something else is on the bridge
        FakeSwitch(None, None, [ovs_case.PEER_PORT, "vif3.9"]).check_gone(TAP)


class Quiet(FakeSwitch):
    def socket_acl(self, gid: int) -> bool:
        return gid == 999


@pytest.mark.parametrize(("status", "keys", "gid", "complaint"), [
    ({"ovs_ofport": 3, "ovsdb_connected": 1}, {}, 999, None),
    ({"ovs_ofport": 4, "ovsdb_connected": 1}, {}, 999, "ovs_ofport=4 (OVSDB says 3)"),
    ({"ovs_ofport": 3, "ovsdb_connected": 0}, {}, 999, "ovsdb_connected=0"),
    ({"ovs_ofport": 3, "ovsdb_connected": 1}, {"hotplug-status": ""}, 999, "backend hotplug-status=''"),
    ({"ovs_ofport": 3, "ovsdb_connected": 1}, {"bridge": "pvbr0"}, 999, "backend bridge='pvbr0'"),
    ({"ovs_ofport": 3, "ovsdb_connected": 1}, {}, 1000, "no rw ACL entry for group 1000"),
])
def test_on_up_holds_pvbacks_view_against_the_switch(status: dict[str, float], keys: dict[str, str | None],
                                                     gid: int, complaint: str | None) -> None:
    port, iface = good_rows()
    case = ovs_case.OvsCase(lambda _line: None)
    case.switch = Quiet(port, iface, [ovs_case.PEER_PORT, TAP])
    backend: dict[str, str | None] = {"bridge": "pvbr0.10", "hotplug-status": "connected", "state": "4",
                                      "iface-id": f"{UUID}-2", **keys}
    case.on_up(TAP, vm_name="pvguest", vm_uuid=UUID, shown=lambda: (status, backend), pvback_gid=gid)
    if complaint is None:
        assert case.notes["up"].startswith("ok port vif3.2 on pvbr0 tag 10, ofport 3"), case.notes
    else:
        assert complaint in case.notes["up"], case.notes
