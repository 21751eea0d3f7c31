"""netback's registration, `[net]`, `pvback attach nic`'s keys and the device's metrics view, without a bus."""

from __future__ import annotations

import tomllib

import pytest

from backends.daemon.config import ConfigError, parse_config
from backends.daemon.devtypes import default_backend_types, load_device_types
from backends.drivers.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6
from backends.net.commands import MAX_QUEUES_KEY, nic_spec
from backends.net.device import metrics_view, offload_names, tap_offload
from backends.net.proto import parse_frontend
from backends.xenbus.registry import CommandError, for_backend_type, for_kind
from backends.xenbus.toolstack import ATTACHED_MARK


def test_registered_but_not_served_by_default() -> None:
    load_device_types()
    dt = for_kind("nic")
    assert for_backend_type("vif") is dt and dt.frontend_type == "vif" and dt.name == "net"
    assert "vif" not in default_backend_types()  # xen-netback serves backend/vif on most dom0s
    cfg = parse_config({"serve": {"backend_types": ["qdisk", "vif"]}, "net": {"max_queues": 4, "gso": False}})
    assert cfg.serve.backend_types == ["qdisk", "vif"]
    assert cfg.section("net").max_queues == 4 and cfg.section("net").gso is False


@pytest.mark.parametrize(("text", "message"), [
    ("[net]\nmax_queues = 0", "outside 1..64"),
    ("[net]\ngso = 1", "expected bool"),
    ("[net]\ncheck_macs = true", "unknown key [net] check_macs"),
])
def test_bad_net_config(text: str, message: str) -> None:
    load_device_types()
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(tomllib.loads(text))


def test_attach_spec_is_what_libxl_writes() -> None:
    spec = nic_spec(5, 1, "00:16:3E:AA:bb:01", 3, 9000)
    assert spec.devid == 1
    assert spec.backend == {"mac": "00:16:3e:aa:bb:01", "mtu": "9000", "handle": "1", ATTACHED_MARK: "1",
                            MAX_QUEUES_KEY: "3"}
    assert spec.frontend == {"mac": "00:16:3e:aa:bb:01", "mtu": "9000", "handle": "1"}
    dflt = nic_spec(5, 0, None, None, None)
    mac = bytes.fromhex(dflt.backend["mac"].replace(":", ""))
    assert mac[:3] == b"\x00\x16\x3e" and not mac[0] & 1 and dflt.backend["mtu"] == "1500"
    assert MAX_QUEUES_KEY not in dflt.backend
    assert nic_spec(5, 0, None, None, None).backend["mac"] != dflt.backend["mac"]


@pytest.mark.parametrize(("args", "message"), [
    ((5, 256, None, None, None), "--devid 256"),
    ((5, 0, "01:00:5e:00:00:01", None, None), "multicast"),
    ((5, 0, "00:16:3e:00:00", None, None), "six hex bytes"),
    ((5, 0, None, 0, None), "--queues 0"),
    ((5, 0, None, None, 67), "--mtu 67"),
])
def test_attach_spec_refuses(args: tuple[int, int, str | None, int | None, int | None], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        nic_spec(*args)


BASE = {"request-rx-copy": "1", "tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "3"}


@pytest.mark.parametrize(("extra", "flags"), [
    ({"feature-no-csum-offload": "1"}, 0),
    ({}, 0),  # no feature-ipv6-csum-offload: the tap cannot tell the families apart, so no partial csums
    ({"feature-ipv6-csum-offload": "1"}, TUN_F_CSUM),
    ({"feature-ipv6-csum-offload": "1", "feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1"}, TUN_F_CSUM),
    ({"feature-ipv6-csum-offload": "1", "feature-sg": "1", "feature-gso-tcpv4": "1"}, TUN_F_CSUM | TUN_F_TSO4),
    ({"feature-ipv6-csum-offload": "1", "feature-sg": "1", "feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1"},
     TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
])
def test_tap_offload_follows_the_frontend(extra: dict[str, str], flags: int) -> None:
    assert tap_offload(parse_frontend({**BASE, **extra}, max_queues=1)) == flags


def test_metrics_view_shape() -> None:
    s = {"tx_packets": 10, "rx_packets": 20, "tx_bytes": 1000, "rx_bytes": 2000, "tx_dropped": 3,
         "rx_dropped": 1, "rx_stalls": 4, "rule_slots": 2, "rule_spoof": 1, "rule_fatal_slots": 0}
    v = metrics_view(s)
    assert v["requests"] == {"tx": 10, "rx": 20} and v["bytes"] == {"tx": 1000, "rx": 2000}
    assert v["errors"] == {"slots": 2, "spoof": 1, "rx_dropped": 1}
    assert v["drops"] == {"tx": 3, "rx": 1, "handoff": 0, "mcast_filtered": 0} and v["ring_full"] == 4
    c = metrics_view({**s, "rx_steered": 5, "rx_handoff_in": 6, "rx_handoff_drops": 7, "rx_mcast_filtered": 8,
                      "rx_hash_extras": 9, "mcast_add": 2, "mcast_del": 1, "mcast_full": 1, "ctrl_requests": 11,
                      "ctrl_errors": 3})
    assert c["drops"] == {"tx": 3, "rx": 1, "handoff": 7, "mcast_filtered": 8}
    assert c["shapes"] == {"steered_out": 5, "steered_in": 6, "rx_hash": 9}
    assert c["requests"] == {"tx": 10, "rx": 20, "ctrl": 11, "mcast_add": 2, "mcast_del": 1}
    assert c["errors"]["ctrl"] == 3 and c["errors"]["mcast_full"] == 1
    assert offload_names(0) == "none" and offload_names(TUN_F_CSUM | TUN_F_TSO6) == "csum,tso6"
