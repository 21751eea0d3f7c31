"""csrc/netif.h against Xen's official io/netif.h (Debian libxen-dev), natively and with -m32: every size,
offset and constant the netback and the tests rely on, plus the numbers the ring conformance suite pins."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .test_ring_conformance import EXPECTED

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("netif_layout.c")


def _measure(tmp: Path, m32: bool) -> dict[str, tuple[int, int]]:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required"
    exe = tmp / ("netif32" if m32 else "netif64")
    cmd = [gcc, "-O0", "-std=gnu11", "-Wall", f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(exe)]
    if m32:
        cmd.append("-m32")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=10, check=True).stdout
    rows = {}
    for line in out.splitlines():
        name, official, mirror = line.split()
        rows[name] = (int(official), int(mirror))
    return rows


@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "x86_32"])
def test_netif_mirrors_match_official_header(tmp_path: Path, m32: bool) -> None:
    rows = _measure(tmp_path, m32)
    assert len(rows) >= 40
    wrong = {k: v for k, v in rows.items() if v[0] != v[1]}
    assert not wrong, f"csrc/netif.h differs from io/netif.h (official, ours): {wrong}"
    # The same numbers the ring suite measured from the headers (so both suites read the same headers).
    col = 1 if m32 else 0
    for ours, theirs in [("sz_netif_tx_request", "sz_netif_tx_request"), ("off_txreq_size", "off_txreq_size"),
                         ("sz_netif_rx_response", "sz_netif_rx_response"), ("off_rxrsp_status", "off_rxrsp_status"),
                         ("sz_ctrl_req", "sz_ctrl_req"), ("sz_ctrl_rsp", "sz_ctrl_rsp"),
                         ("sz_netif_tx_sring_entry", "sz_netif_tx_sring_entry")]:
        assert rows[ours][0] == EXPECTED[theirs][col], ours
