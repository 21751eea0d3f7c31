"""The tap driver in a private network namespace: created persistent, multi-queue, with a vnet header, MAC,
MTU and up; attached again after the fds closed (a restarted daemon); frames carry the vnet header; removed."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from backends.drivers.net.tap import TUN_F_CSUM, VNET_HDR_LEN, Tap, TapError

from .netns import NetNS

MAC = "fe:ff:ff:ff:ff:ff"


@pytest.fixture
def ns() -> Iterator[NetNS]:
    with NetNS(f"pvbk-tap-{os.getpid()}") as n:
        yield n


def test_create_configure_reattach_remove(ns: NetNS) -> None:
    tap = Tap("vif9.0", mac=MAC, mtu=9000, queues=2)
    info = ns.run(tap.open)
    assert info.created and len(tap.fds) == 2
    show = ns.ip("-d", "link", "show", "vif9.0")
    assert "mtu 9000" in show and MAC in show and "vnet_hdr on" in show and "multi_queue" in show
    assert "persist on" in show and "UP" in show
    tap.set_offload(TUN_F_CSUM)
    tap.close()
    assert "vif9.0" in ns.ip("link", "show")  # persistent: survives its fds
    again = Tap("vif9.0", mac=MAC, mtu=9000, queues=2)
    info2 = ns.run(again.open)
    assert not info2.created and info2.ifindex == info.ifindex
    ns.run(again.remove)
    assert "vif9.0" not in ns.ip("link", "show")
    ns.run(again.remove)  # idempotent


def test_frames_carry_the_vnet_header(ns: NetNS) -> None:
    tap = Tap("vif9.1", mac=MAC, mtu=1500)
    ns.run(tap.open)
    try:
        ns.ip("addr", "add", "198.18.9.1/24", "dev", "vif9.1")
        ns.run(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("198.18.9.2", 9)))  # ARP
        fd = tap.fds[0]
        arp = None
        for _ in range(20):  # IPv6 neighbour discovery may come first
            r, _, _ = select.select([fd], [], [], 5)
            assert r
            data = os.read(fd, 65536)
            _flags, gso_type, _hl, _gs, _cs, _co = struct.unpack_from("<BBHHHH", data)
            assert gso_type == 0
            if data[VNET_HDR_LEN + 12:VNET_HDR_LEN + 14] == b"\x08\x06":
                arp = data[VNET_HDR_LEN:]
                break
        assert arp is not None, "no ARP request after a 10-byte vnet header"
        assert arp[6:12] == bytes.fromhex(MAC.replace(":", ""))
    finally:
        ns.run(tap.remove)


def test_a_plain_tap_of_the_same_name_is_refused(ns: NetNS) -> None:
    ns.ip("tuntap", "add", "vif9.2", "mode", "tap")
    with pytest.raises(TapError, match="not a multi-queue tap"):
        ns.run(Tap("vif9.2", mac=MAC, mtu=1500).open)
