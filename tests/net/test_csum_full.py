"""tx_csum_full (a switch that takes neither partial checksums nor GSO: OVS netdev without userspace TSO): the
guest's csum_blank frames reach the host with a finished checksum that the host kernel verifies (no
DATA_VALID), and a GSO frame is dropped as "tap" without disabling the vif."""

from __future__ import annotations

import asyncio
import fcntl
import socket
from typing import Any

from backends.drivers.net.tap import TUN_F_CSUM, TUN_F_TSO4

from . import pingtcp
from .netns import NetNS
from .test_datapath import Wire, bed, run, tcp

TUNSETOFFLOAD = 0x400454D0
__all__ = ["bed"]


def csum_errors(ns: NetNS) -> int:
    """InCsumErrors of TCP and UDP (v4) in the namespace."""
    lines = ns.exec("cat", "/proc/net/snmp").stdout.splitlines()
    total = 0
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        names, values = head.split()[1:], vals.split()[1:]
        if head.startswith(("Tcp:", "Udp:")) and "InCsumErrors" in names:
            total += int(values[names.index("InCsumErrors")])
    return total


def test_partial_checksums_finished_and_gso_dropped(bed: Any) -> None:
    plat, broker, g, p = bed

    async def main() -> None:
        w = Wire(plat, broker, g, p, offload=True, csum_full=True)
        try:
            # Linux netfront without the backend's GSO: checksum offload only.
            fcntl.ioctl(w.gfds[0], TUNSETOFFLOAD, TUN_F_CSUM)
            w.start()
            assert await asyncio.to_thread(g.run, lambda: pingtcp.ping("198.18.0.1", count=3)) == 3
            await tcp(g, p, "198.18.0.1", 4 << 20, 5201)
            await tcp(g, p, "fd00::1", 2 << 20, 5202)

            def udp() -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    for _ in range(20):
                        s.sendto(b"u" * 1000, ("198.18.0.1", 9))

            await asyncio.to_thread(g.run, udp)
            s = w.stats()
            assert s["tx_csum_blank"] > 1000 and s["tx_gso"] == 0 and s["tx_dropped"] == 0, s
            assert csum_errors(p) == 0

            # A guest that sends GSO anyway: dropped (counted as "tap"), the vif lives on.
            fcntl.ioctl(w.gfds[0], TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)

            lst = p.run(lambda: pingtcp.listener("198.18.0.1", 5203))

            def send() -> None:
                with socket.create_connection(("198.18.0.1", 5203), timeout=2) as c:
                    c.settimeout(1)
                    try:
                        c.sendall(b"x" * (1 << 20))  # stalls: its 64 KiB frames never arrive
                    except OSError:
                        pass

            try:
                await asyncio.to_thread(g.run, send)
            finally:
                lst.close()
            for _ in range(50):
                if w.stats().get("rule_tap", 0) > 0:
                    break
                await asyncio.sleep(0.05)
            s = w.stats()
            assert s["rule_tap"] > 0 and s["tx_gso"] == 0 and not w.dead, s
            assert csum_errors(p) == 0
        finally:
            await w.close(p)

    run(main())
