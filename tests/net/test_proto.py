"""backends.net.proto: the keys netback writes and the strict reading of the frontend's and toolstack's keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.net import proto
from backends.net.proto import ProtocolError


def fe(**extra: str) -> dict[str, str]:
    keys = {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "5", "request-rx-copy": "1"}
    keys.update(extra)
    return keys


def test_probe_keys_match_linux_netback() -> None:
    keys = proto.probe_keys(proto.BackendOffer(max_queues=4))
    assert keys["feature-rx-copy"] == "1" and keys["feature-rx-flip"] == "0"
    for k in ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-ipv6-csum-offload",
              "feature-split-event-channels", "feature-xdp-headroom"):
        assert keys[k] == "1", k
    assert keys["multi-queue-max-queues"] == "4"
    for k in ("feature-ctrl-ring", "feature-multicast-control", "feature-dynamic-multicast-control"):
        assert keys[k] == "1", k  # honoured: csrc/netctrl.c
    off = proto.probe_keys(proto.BackendOffer(ctrl_ring=False, multicast_control=False))
    assert off["feature-ctrl-ring"] == off["feature-multicast-control"] == "0"
    assert proto.probe_keys(proto.BackendOffer(gso=False))["feature-gso-tcpv4"] == "0"


LINUX_KEYS = Path(__file__).parent / "fixtures" / "linux-netfront-keys.json"


def test_what_linux_netfront_wrote() -> None:
    """The keys Linux 6.1's xen-netfront wrote under real Xen (the e2e records them; its host test fails when a
    run's keys are not in the fixture).  Unlike the emulated netfront, Linux writes multi-queue-num-queues=1 with
    its one queue's rings at the top level, and `trusted`, `xdp-headroom=0`, `mac`, `mtu`, `handle`: all must
    be read as Linux netback reads them."""
    keys = json.loads(LINUX_KEYS.read_text())["frontend"]
    cfg = proto.parse_frontend({k: keys[k] for k in proto.frontend_key_names(1) if k in keys}, max_queues=2)
    assert len(cfg.queues) == 1
    q = cfg.queues[0]
    assert (q.tx_ring_ref, q.rx_ring_ref) == (int(keys["tx-ring-ref"]), int(keys["rx-ring-ref"]))
    assert q.split and (q.event_channel_tx, q.event_channel_rx) == (10, 11)
    assert cfg.rx_notify and cfg.sg and cfg.gso_tcpv4 and cfg.gso_tcpv6 and cfg.ip_csum and cfg.ipv6_csum
    assert cfg.rx_csum and cfg.rx_gso == (True, True)
    assert cfg.xdp_headroom == 0 and not cfg.multicast_control
    # Every key Linux wrote that netback reads is one frontend_key_names lists (so the device reads it).
    read = set(proto.frontend_key_names(1))
    assert {"multi-queue-num-queues", "request-rx-copy", "feature-rx-notify", "xdp-headroom"} <= read


def test_single_queue_one_channel() -> None:
    cfg = proto.parse_frontend(fe(**{"feature-sg": "1", "feature-rx-notify": "1"}), max_queues=2)
    assert cfg.queues == (proto.QueueRings(8, 9, 5, 5),) and not cfg.queues[0].split
    assert cfg.sg and cfg.rx_notify and cfg.ip_csum and not cfg.ipv6_csum and not cfg.rx_csum
    assert cfg.rx_gso == (False, False)


def test_ctrl_ring_multicast_and_xdp_keys() -> None:
    cfg = proto.parse_frontend(fe(), max_queues=1)
    assert cfg.ctrl is None and not cfg.multicast_control and cfg.xdp_headroom == 0  # all optional
    cfg = proto.parse_frontend(fe(**{"ctrl-ring-ref": "12", "event-channel-ctrl": "6",
                                     "request-multicast-control": "1", "xdp-headroom": "256"}), max_queues=1)
    assert cfg.ctrl == proto.CtrlRing(12, 6) and cfg.multicast_control and cfg.xdp_headroom == 256
    assert {"ctrl-ring-ref", "event-channel-ctrl"} <= set(proto.frontend_key_names(1))
    assert proto.parse_xdp_headroom(None) == 0 and proto.parse_xdp_headroom("256") == 256
    for bad in ("1025", "-1", "0x100", "65536"):
        with pytest.raises(ProtocolError):
            proto.parse_xdp_headroom(bad)


def test_split_channels_and_queues() -> None:
    keys = {"multi-queue-num-queues": "2", "request-rx-copy": "1"}
    for i in range(2):
        keys |= {f"queue-{i}/tx-ring-ref": str(10 + i), f"queue-{i}/rx-ring-ref": str(20 + i),
                 f"queue-{i}/event-channel-tx": str(30 + i), f"queue-{i}/event-channel-rx": str(40 + i)}
    cfg = proto.parse_frontend(keys, max_queues=4)
    assert [q.split for q in cfg.queues] == [True, True]
    assert cfg.queues[1] == proto.QueueRings(11, 21, 31, 41)
    assert set(proto.frontend_key_names(2)) >= set(keys)


@pytest.mark.parametrize("bad", [
    {"multi-queue-num-queues": "0"}, {"multi-queue-num-queues": "3"}, {"multi-queue-num-queues": "-1"},
    {"request-rx-copy": "0"}, {"request-rx-copy": None}, {"tx-ring-ref": "0x10"}, {"tx-ring-ref": None},
    {"rx-ring-ref": "4294967296"}, {"event-channel": "0"}, {"event-channel": " 5"}, {"feature-sg": "yes"},
    {"event-channel-tx": "6"}, {"xdp-headroom": "4000"}, {"feature-no-csum-offload": "2"},
    {"ctrl-ring-ref": "7"}, {"ctrl-ring-ref": "x", "event-channel-ctrl": "6"},
    {"ctrl-ring-ref": "7", "event-channel-ctrl": "5"}, {"ctrl-ring-ref": "7", "event-channel-ctrl": "0"},
    {"request-multicast-control": "2"},
])
def test_garbage_fails(bad: dict[str, str | None]) -> None:
    keys = fe()
    for k, v in bad.items():
        if v is None:
            keys.pop(k, None)
        else:
            keys[k] = v
    with pytest.raises(ProtocolError):
        proto.parse_frontend(keys, max_queues=2)


def test_offloads_need_sg_and_both_checksums() -> None:
    all_on = {"feature-sg": "1", "feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1",
              "feature-ipv6-csum-offload": "1"}
    assert proto.parse_frontend(fe(**all_on), max_queues=1).rx_gso == (True, True)
    assert proto.parse_frontend(fe(**{**all_on, "feature-sg": "0"}), max_queues=1).rx_gso == (False, False)
    cfg = proto.parse_frontend(fe(**{**all_on, "feature-no-csum-offload": "1"}), max_queues=1)
    assert not cfg.rx_csum and cfg.rx_gso == (False, False)


def test_mac_mtu_rate_vifname() -> None:
    assert proto.parse_mac("00:16:3E:01:02:03") == bytes.fromhex("00163e010203")
    for bad in ("00:16:3e:01:02", "00-16-3e-01-02-03", "01:00:5e:00:00:01", "zz:16:3e:01:02:03", None):
        with pytest.raises(ProtocolError):
            proto.parse_mac(bad)
    assert proto.parse_mtu(None) == 1500 and proto.parse_mtu("9000") == 9000
    for bad in ("67", "65536", "1500 ", "abc"):
        with pytest.raises(ProtocolError):
            proto.parse_mtu(bad)
    assert proto.parse_rate("10000000,50000") == proto.Rate(10_000_000, 50_000)
    assert proto.parse_rate(None) is None
    for bad in ("100", "100,", ",5", "1,0", "a,b", "1,2,3"):
        with pytest.raises(ProtocolError):
            proto.parse_rate(bad)
    assert proto.vif_name(5, 0, None) == "vif5.0" and proto.vif_name(5, 0, "guest-eth0") == "guest-eth0"
    for bad in ("a/b", "x" * 16, "..", "a b"):
        with pytest.raises(ProtocolError):
            proto.vif_name(5, 0, bad)


@given(st.dictionaries(st.sampled_from(proto.frontend_key_names(2)), st.text(max_size=12), max_size=12))
def test_any_keys_parse_or_raise_protocol_error(keys: dict[str, str]) -> None:
    try:
        cfg = proto.parse_frontend(keys, max_queues=2)
    except ProtocolError:
        return
    assert 1 <= len(cfg.queues) <= 2
    assert cfg.xdp_headroom <= proto.MAX_XDP_HEADROOM
