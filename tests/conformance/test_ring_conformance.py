"""csrc/ring.c and our mirrored structs against Xen's official headers (Debian libxen-dev).

The C harness (ring_conformance.c) is compiled here, natively and with -m32, against /usr/include/xen and
csrc/ring.c.  It drives our ring and the io/ring.h macros on the same shared pages with a seeded random
operation sequence and compares every decision and byte; see the comment at its top.  The seed is printed and
can be pinned with PVBACK_CONFORMANCE_SEED=<n> to reproduce a failure.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HARNESS = Path(__file__).with_name("ring_conformance.c")
STEPS = 1000
ABIS = ("x86_64", "x86_32")

# Numbers measured with gcc from the official headers on both ABIs (shared/reference/xen-layouts.txt).  They
# pin that the -m32 build really is the i386 ABI and that the headers are the ones the project was written to.
EXPECTED = {
    "sz_sring_hdr": (176, 172),
    "sz_blkif_request": (112, 108),
    "off_blkreq_nr_segments": (1, 1),
    "off_blkreq_handle": (2, 2),
    "off_blkreq_id": (8, 4),
    "off_blkreq_sector_number": (16, 12),
    "off_blkreq_seg": (24, 20),
    "sz_blkif_request_segment": (8, 8),
    "sz_blkif_request_discard": (32, 28),
    "off_blkdisc_flag": (1, 1),
    "off_blkdisc_id": (8, 4),
    "off_blkdisc_sector_number": (16, 12),
    "off_blkdisc_nr_sectors": (24, 20),
    "sz_blkif_request_indirect": (64, 64),
    "off_blkind_indirect_op": (1, 1),
    "off_blkind_nr_segments": (2, 2),
    "off_blkind_id": (8, 4),
    "off_blkind_sector_number": (16, 12),
    "off_blkind_handle": (24, 20),
    "off_blkind_indirect_grefs": (28, 24),
    "sz_blkif_response": (16, 12),
    "off_blkrsp_operation": (8, 8),
    "off_blkrsp_status": (10, 10),
    "sz_blkif_sring_entry": (112, 108),
    "ring_size_blkif_1p": (32, 32),
    "ring_size_blkif_2p": (64, 64),
    "ring_size_blkif_4p": (128, 128),
    "ring_size_blkif_16p": (512, 512),
    "sz_netif_tx_request": (12, 12),
    "off_txreq_offset": (4, 4),
    "off_txreq_flags": (6, 6),
    "off_txreq_id": (8, 8),
    "off_txreq_size": (10, 10),
    "sz_netif_tx_response": (4, 4),
    "sz_netif_rx_request": (8, 8),
    "off_rxreq_gref": (4, 4),
    "sz_netif_rx_response": (8, 8),
    "off_rxrsp_offset": (2, 2),
    "off_rxrsp_flags": (4, 4),
    "off_rxrsp_status": (6, 6),
    "sz_netif_tx_sring_entry": (12, 12),
    "sz_netif_rx_sring_entry": (8, 8),
    "ring_size_netif_tx_1p": (256, 256),
    "ring_size_netif_rx_1p": (256, 256),
    "sz_ctrl_req": (16, 16),
    "sz_ctrl_rsp": (12, 12),
    "sz_ctrl_entry": (16, 16),
    "ring_size_xen_netif_ctrl_1p": (128, 128),
    "sz_grant_entry_v1": (8, 8),
}

# Rings exercised by the harness and how many of their start indices lie just below 2^32.
RINGS_RUN = 7
HIGH_STARTS_PER_RING = 2


@dataclass
class Run:
    abi: str
    seed: int
    returncode: int
    output: str
    layout: dict[str, int]
    summary: dict[str, str]

    def failures(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("FAIL")]


def _seed() -> int:
    env = os.environ.get("PVBACK_CONFORMANCE_SEED")
    return int(env, 0) if env else random.SystemRandom().randrange(1, 2**63)


def _gcc(args: list[str], *, m32: bool, opt: str = "-O2") -> None:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required (./dev installs it)"
    cmd = [gcc, opt, "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", f"-I{CSRC}"]
    if (CSRC / "blkif.h").exists():
        cmd.append("-DPVBACK_HAVE_BLKIF_H")
    if m32:
        cmd.append("-m32")
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    hint = " (needs the Debian package gcc-multilib, in ./dev APT_TEST)" if m32 else ""
    assert proc.returncode == 0, f"compiling the harness failed{hint}:\n{proc.stderr}"


def _harness_object(out: Path, *, m32: bool) -> Path:
    # -O1 compiles the big harness in half the time; ring.c, linked in later, gets the build's -O2.
    _gcc(["-c", str(HARNESS), "-o", str(out)], m32=m32, opt="-O1")
    return out


def _link(harness_obj: Path, out: Path, *, m32: bool, ring_c: Path = CSRC / "ring.c") -> Path:
    _gcc([str(harness_obj), str(ring_c), "-o", str(out)], m32=m32)
    return out


def _run(binary: Path, abi: str, seed: int, steps: int = STEPS) -> Run:
    proc = subprocess.run([str(binary), str(seed), str(steps)], capture_output=True, text=True, timeout=120)
    layout: dict[str, int] = {}
    summary: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("LAYOUT "):
            _, name, value = line.split()
            layout[name] = int(value)
        elif line.startswith("SUMMARY "):
            summary = dict(kv.split("=", 1) for kv in line.split()[1:])
    return Run(abi, seed, proc.returncode, proc.stdout + proc.stderr, layout, summary)


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The harness compiled once per ABI; each test links it with the ring.c it wants."""
    tmp = tmp_path_factory.mktemp("ring_conformance_obj")
    return {abi: _harness_object(tmp / f"harness_{abi}.o", m32=abi == "x86_32") for abi in ABIS}


@pytest.fixture(scope="module")
def runs(objects: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    tmp = tmp_path_factory.mktemp("ring_conformance")
    seed = _seed()
    print(f"ring conformance seed: {seed} (PVBACK_CONFORMANCE_SEED={seed} to reproduce)")
    yield {abi: _run(_link(objects[abi], tmp / f"rc_{abi}", m32=abi == "x86_32"), abi, seed) for abi in ABIS}


@pytest.mark.parametrize("abi", ABIS)
def test_ring_matches_xen_macros(runs: dict[str, Run], abi: str) -> None:
    run = runs[abi]
    assert run.summary, f"harness crashed (rc={run.returncode}):\n{run.output[-4000:]}"
    assert run.summary["abi"] == abi
    assert run.returncode == 0 and run.summary["failures"] == "0", (
        f"seed {run.seed}: ring differs from io/ring.h:\n" + "\n".join(run.failures())
    )
    # The run really exercised what it claims: many steps, every high start carried across 2^32, and
    # hostile frontends that killed the ring.
    assert int(run.summary["steps"]) > RINGS_RUN * 5 * STEPS
    assert int(run.summary["wrapped"]) == RINGS_RUN * HIGH_STARTS_PER_RING
    assert int(run.summary["hostile_dead"]) > 0


@pytest.mark.parametrize("abi", ABIS)
def test_official_layouts_are_the_documented_abi(runs: dict[str, Run], abi: str) -> None:
    layout = runs[abi].layout
    column = ABIS.index(abi)
    wrong = {n: (layout.get(n), want[column]) for n, want in EXPECTED.items() if layout.get(n) != want[column]}
    assert not wrong, f"{abi}: measured vs expected: {wrong}"


def test_blkif_mirrors_match_official_layouts_of_both_abis(runs: dict[str, Run]) -> None:
    assert (CSRC / "blkif.h").exists(), "csrc/blkif.h (the packed x86_32/x86_64 mirrors) is missing"
    for abi in ABIS:
        official = runs[abi].layout
        prefix = f"pv_{abi}."
        for build in ABIS:
            mirror = {k[len(prefix) :]: v for k, v in runs[build].layout.items() if k.startswith(prefix)}
            assert len(mirror) >= 30, f"harness printed too few {prefix} lines in the {build} build"
            diff = {k: (v, official.get(k)) for k, v in mirror.items() if official.get(k) != v}
            assert not diff, f"csrc/blkif.h {abi} mirror (built {build}) vs official {abi}: {diff}"


# Planted bugs the harness must catch: proof that the comparison can fail.
MUTATIONS = [
    ("r->req_cons + 1", "r->req_cons"),  # final check re-arms one event too early
    ("(uint32_t)(new - ev) < (uint32_t)(new - old)", "(uint32_t)(new - ev) <= (uint32_t)(new - old)"),
    ("memset(dst, 0, r->slot_size);", ";"),  # response slot not zeroed
]


def test_harness_detects_planted_ring_bugs(objects: dict[str, Path], tmp_path: Path) -> None:
    source = (CSRC / "ring.c").read_text()
    applicable = [(old, new) for old, new in MUTATIONS if old in source]
    assert applicable, "none of the planted-bug patterns occurs in csrc/ring.c any more: update MUTATIONS"
    for i, (old, new) in enumerate(applicable):
        mutant = tmp_path / f"ring_mut{i}.c"
        mutant.write_text(source.replace(old, new, 1))
        binary = _link(objects["x86_64"], tmp_path / f"rc_mut{i}", m32=False, ring_c=mutant)
        run = _run(binary, "x86_64", 1, steps=100)
        assert run.returncode != 0 and run.failures(), f"planted bug {old!r} -> {new!r} went unnoticed"


def test_seed_reproduces(objects: dict[str, Path], tmp_path: Path) -> None:
    binary = _link(objects["x86_64"], tmp_path / "rc", m32=False)
    a = _run(binary, "x86_64", 42, steps=200)
    b = _run(binary, "x86_64", 42, steps=200)
    assert a.returncode == 0 and a.output == b.output
    assert re.search(r"^SEED 42 ", a.output, re.M)
