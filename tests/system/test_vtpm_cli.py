"""`pvback attach tpm` / `detach tpm` / `status` as an operator runs them (subprocesses), against `pvback serve`
and an emulated xen-tpmfront: the keys libxl would write, the vTPM's live columns in `status` (swtpm pid,
version, commands, errors, cancels, p50), a graceful swtpm stop on detach with the state kept, and the
one-line errors of a bad uuid and of detaching what is not there."""

from __future__ import annotations

import asyncio
import os
import re
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.guests.tpmfront import TpmFront
from backends.xenbus.toolstack import wait_for_state
from tests.system.conftest import PY, SimProc
from tests.system.vtpmbed import GETRANDOM8, S, TpmBed, rc_of, tpm_bed

CMD_TIMEOUT = 60.0


@pytest.fixture
def tbed(sim: SimProc, tmp_path: Path) -> Iterator[TpmBed]:
    with tpm_bed(sim, tmp_path) as bed:
        yield bed


async def pvback(tbed: TpmBed, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XENSTORED_PATH", "PVBACK_SIM_DIR")}
    proc = await asyncio.create_subprocess_exec(*PY, *args, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(CMD_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return int(proc.returncode or 0), out.decode(), err.decode()


def sim_args(tbed: TpmBed) -> list[str]:
    return ["--platform", "emulated", "--sim-dir", str(tbed.sim.dir)]


async def test_attach_status_detach_tpm(tbed: TpmBed) -> None:
    g, xs = await tbed.guest(name="cli", mem_pages=64, gnt_entries=64)
    ident = str(uuidlib.uuid4())
    rc, out, err = await pvback(tbed, "attach", "tpm", str(g.domid), "--uuid", ident.upper(), "--version", "2.0",
                                *sim_args(tbed))
    assert rc == 0, err
    be = f"/local/domain/0/backend/vtpm/{g.domid}/0"
    assert out.strip() == be
    dom0 = await tbed.dom0()
    # libxl's keys (the uuid canonical), the version pvback serves, and InitWait reached (attach waits for it).
    assert await dom0.read_str(f"{be}/uuid") == ident
    assert await dom0.read_str(f"{be}/resume") == "False"
    assert await dom0.read_str(f"{be}/version") == "2.0"
    await wait_for_state(dom0, be, {S.INIT_WAIT}, timeout=20.0)

    front = TpmFront(g, xs, 0, timeout=30.0)
    await front.connect()
    for _ in range(3):
        rsp = await front.transmit(GETRANDOM8, timeout_c=10.0, duration=30.0)
        assert rc_of(rsp) == 0, rsp.hex()
    pid = tbed.swtpm_pid(ident)
    assert pid > 0 and Path(f"/proc/{pid}").exists()

    rc, out, err = await pvback(tbed, "status", *sim_args(tbed), "--metrics", f"127.0.0.1:{tbed.serve.port}",
                                "--interval", "0")
    assert rc == 0, err
    row = next((ln for ln in out.splitlines() if ln.startswith("vtpm ")), None)
    assert row is not None, out
    assert row.split()[:5] == ["vtpm", str(g.domid), "0", "Connected", "Connected"], row  # no `dev` key
    assert ident in row and "feature-protocol-v2=1" in row, row
    assert f"swtpm_pid={pid}" in row and "tpm=2.0" in row, row
    assert re.search(r"commands=([3-9]|\d\d+) errors=0 cancels=0 p50=\d+us", row), row
    head, *rows = out.split("\n\n")[0].splitlines()[1:]
    domains = {r.split()[0]: dict(zip(head.split(), r.split(), strict=True)) for r in rows}
    assert domains[str(g.domid)]["TPMS"] == "1" and domains[str(g.domid)]["DISKS"] == "0", out

    # detach: the backend closes (the frontend answers Closing as xen-tpmfront does), swtpm is stopped, the
    # nodes go, the state stays for the next attach of this uuid.
    detach = asyncio.create_task(pvback(tbed, "detach", "tpm", str(g.domid), *sim_args(tbed), "--timeout", "20"))
    await wait_for_state(dom0, be, {S.CLOSING, S.CLOSED}, timeout=20.0)
    await front.close()
    rc, out, err = await detach
    assert rc == 0, err
    assert not await dom0.exists(be)
    assert not await dom0.exists(f"/local/domain/{g.domid}/device/vtpm/0")
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        await asyncio.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "swtpm still running after detach"
    state = tbed.tmp / "vtpm-state" / ident / "tpm2"
    assert (state / "tpm2-00.permall").exists(), sorted(p.name for p in state.iterdir())
    await front.release(revoke_timeout=1.0)


async def test_attach_and_detach_tpm_errors(tbed: TpmBed) -> None:
    g, _xs = await tbed.guest(name="clierr", mem_pages=64, gnt_entries=64)
    rc, _out, err = await pvback(tbed, "attach", "tpm", str(g.domid), "--uuid", "not-a-uuid", *sim_args(tbed))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1 and "--uuid 'not-a-uuid' is not a UUID" in lines[0], err
    assert not await (await tbed.dom0()).exists(f"/local/domain/0/backend/vtpm/{g.domid}")
    rc, _out, err = await pvback(tbed, "detach", "tpm", str(g.domid), "3", *sim_args(tbed))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("pvback detach: "), err
    assert "has no vtpm tpm 3" in lines[0], err
