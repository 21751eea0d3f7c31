"""The vTPM backend end to end: tpm2-tools (unmodified, `-T swtpm:path=`) -> emulated xen-tpmfront -> tpmif
page -> `pvback serve` -> one swtpm per vTPM, with the daemon and swtpm killed and restarted under it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.xenbus.toolstack import wait_for_state
from tests.system.conftest import SimProc, settles
from tests.system.vtpmbed import S, TpmBed, Vtpm, tpm_bed

NV = "0x1500016"


@pytest.fixture
def tbed(sim: SimProc, tmp_path: Path) -> Iterator[TpmBed]:
    with tpm_bed(sim, tmp_path) as bed:
        yield bed


async def test_tpm2_tools_through_the_guest(tbed: TpmBed) -> None:
    """getrandom, pcrread/pcrextend, createprimary + create + load + sign + verifysignature, all unmodified
    tpm2-tools through the guest's page; the metrics count the commands."""
    v = await tbed.tpm()
    _rc, out, _ = await tbed.tools(v, "tpm2_getrandom", "--hex", "16")
    assert len(out.strip()) == 32 and int(out.strip(), 16) >= 0
    _rc, before, _ = await tbed.tools(v, "tpm2_pcrread", "sha256:16")
    assert "0x" + "0" * 64 in before.upper().replace("0X", "0x")
    digest = hashlib.sha256(b"measured").hexdigest()
    await tbed.tools(v, "tpm2_pcrextend", f"16:sha256={digest}")
    _rc, after, _ = await tbed.tools(v, "tpm2_pcrread", "sha256:16")
    want = hashlib.sha256(bytes(32) + bytes.fromhex(digest)).hexdigest().upper()
    assert want in after.upper(), after
    await tbed.tools(v, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "prim.ctx")
    await tbed.tools(v, "tpm2_create", "-C", "prim.ctx", "-G", "ecc", "-u", "key.pub", "-r", "key.priv")
    await tbed.tools(v, "tpm2_load", "-C", "prim.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx")
    (tbed.tmp / "msg").write_bytes(b"sign me")
    await tbed.tools(v, "tpm2_sign", "-c", "key.ctx", "-g", "sha256", "-o", "sig", "msg")
    await tbed.tools(v, "tpm2_verifysignature", "-c", "key.ctx", "-g", "sha256", "-s", "sig", "-m", "msg")
    (tbed.tmp / "msg").write_bytes(b"tampered")
    rc, _o, _e = await tbed.tools(v, "tpm2_verifysignature", "-c", "key.ctx", "-g", "sha256", "-s", "sig", "-m",
                                  "msg", check=False)
    assert rc != 0
    assert await tbed.metric("pvback_requests_total", v.domid, op="command") >= 10


VALUE = b"nv-value-0123456789abcdefghijklm"  # 32 bytes


async def nv_read(tbed: TpmBed, v: Vtpm) -> bytes:
    out = tbed.tmp / "nv.out"
    out.unlink(missing_ok=True)
    await tbed.tools(v, "tpm2_nvread", "-C", "o", "-s", "32", "-o", str(out), NV)
    return out.read_bytes()


async def test_nv_survives_daemon_kill_swtpm_kill_and_reboot(tbed: TpmBed) -> None:
    v = await tbed.tpm()
    await tbed.tools(v, "tpm2_nvdefine", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite|authread|authwrite", NV)
    await tbed.tools(v, "tpm2_nvwrite", "-C", "o", "-i-", NV, stdin=VALUE)
    digest = hashlib.sha256(b"boot").hexdigest()
    await tbed.tools(v, "tpm2_pcrextend", f"16:sha256={digest}")
    pid = tbed.swtpm_pid(v.uuid)

    # Daemon SIGKILL + restart: the guest carries on with the same swtpm (adopted, volatile state kept).
    assert tbed.serve.kill(signal.SIGKILL) == -signal.SIGKILL
    tbed.serve.start()
    await wait_for_state(await tbed.dom0(), v.paths.backend, S.CONNECTED, timeout=20.0)
    assert await nv_read(tbed, v) == VALUE
    assert tbed.swtpm_pid(v.uuid) == pid
    _rc, pcr, _ = await tbed.tools(v, "tpm2_pcrread", "sha256:16")
    assert "0x" + "0" * 64 not in pcr.upper().replace("0X", "0x"), "PCR 16 lost across a daemon restart"

    # swtpm SIGKILL: restarted with its state by the daemon.
    os.kill(pid, signal.SIGKILL)
    await settles(lambda: tbed.swtpm_pid(v.uuid) not in (0, pid), "swtpm was not restarted", 10.0, poll=0.01)
    assert await nv_read(tbed, v) == VALUE

    # Guest reboot (xl: a new domain, the same vTPM uuid): TPM reset (PCRs zero), NV kept.
    uuid = v.uuid
    old = tbed.swtpm_pid(uuid)
    await tbed.detach_tpm(v)

    def gone() -> bool:
        try:
            return b"swtpm" not in Path(f"/proc/{old}/cmdline").read_bytes()  # a zombie has an empty one
        except OSError:
            return True

    await settles(gone, "swtpm left running at unplug", 5.0, poll=0.01)
    v2 = await tbed.tpm(uuid=uuid, name="rebooted")
    assert await nv_read(tbed, v2) == VALUE
    _rc, pcr, _ = await tbed.tools(v2, "tpm2_pcrread", "sha256:16")
    assert "0x" + "0" * 64 in pcr.upper().replace("0X", "0x"), pcr


async def test_two_guests_are_separate(tbed: TpmBed) -> None:
    a = await tbed.tpm(name="a")
    b = await tbed.tpm(name="b")
    assert a.uuid != b.uuid and tbed.swtpm_pid(a.uuid) != tbed.swtpm_pid(b.uuid)
    for v, name in ((a, "a"), (b, "b")):
        await tbed.tools(v, "tpm2_createek", "-c", f"ek_{name}.ctx", "-G", "rsa", "-u", f"ek_{name}.pub")
    ek_a, ek_b = (tbed.tmp / "ek_a.pub").read_bytes(), (tbed.tmp / "ek_b.pub").read_bytes()
    assert len(ek_a) > 256 and ek_a != ek_b
    await tbed.tools(a, "tpm2_nvdefine", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite|authread|authwrite", NV)
    _rc, pub_a, _ = await tbed.tools(a, "tpm2_nvreadpublic")
    _rc, pub_b, _ = await tbed.tools(b, "tpm2_nvreadpublic")
    assert NV in pub_a and NV not in pub_b
    rc, _o, _e = await tbed.tools(b, "tpm2_nvread", "-C", "o", "-s", "32", NV, check=False)
    assert rc != 0


async def test_cancel_of_a_long_command(tbed: TpmBed) -> None:
    """RSA-2048 key generation (70-700 ms in swtpm) cancelled by the guest mid-way, as xen-tpmfront cancels on
    a timeout: the page goes back to IDLE (never FINISH), the tool sees the cancel, the TPM keeps answering."""
    v = await tbed.tpm()
    await tbed.tools(v, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "prim.ctx")
    tool = asyncio.ensure_future(tbed.tools(v, "tpm2_create", "-C", "prim.ctx", "-G", "rsa2048", "-u", "k.pub",
                                            "-r", "k.priv", check=False, flush=False))

    def create_running() -> bool:
        shr = v.front.shr
        return v.front.state == 1 and struct.unpack_from(">I", shr, 8 + 6)[0] == 0x153  # TPM2_CC_Create

    await settles(create_running, "TPM2_Create never reached the page", 20.0, poll=0.01)
    v.front.cancel()
    await settles(lambda: v.front.state in (0, 2), "the backend never answered the cancel", 20.0, poll=0.01)
    assert v.front.state == 0, "a cancelled command must be answered with IDLE"
    rc, _o, _e = await tool
    assert rc != 0
    assert await tbed.metric("pvback_requests_total", v.domid, op="cancel") == 1
    assert len(await tbed.getrandom_raw(v)) == 8


async def test_daemon_killed_mid_command_never_runs_it_twice(tbed: TpmBed) -> None:
    """SIGKILL while RSA key generation runs: the restarted daemon finds SUBMIT with its restart note and
    answers TPM_RC_FAILURE instead of sending the command again."""
    v = await tbed.tpm()
    await tbed.tools(v, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "prim.ctx")
    tool = asyncio.ensure_future(tbed.tools(v, "tpm2_create", "-C", "prim.ctx", "-G", "rsa2048", "-u", "k.pub",
                                            "-r", "k.priv", check=False, flush=False))
    # tpm2_create first sends ContextLoad (and others): wait for the Create itself, taken by the backend.
    await settles(lambda: v.front.state == 1 and v.front.shr[6] == 1 and
                  struct.unpack_from(">I", v.front.shr, 8 + 6)[0] == 0x153, "TPM2_Create never taken", 20.0,
                  poll=0.01)
    tbed.serve.kill(signal.SIGKILL)
    assert v.front.state == 1
    tbed.serve.start()
    rc, _o, err = await tool
    assert rc != 0 and "Esys_Create(0x101)" in err, err  # TPM_RC_FAILURE, from the restart note
    # Answered from the restart note (a second run would have succeeded and written the key files).
    assert await tbed.metric("pvback_errors_total", v.domid, reason="restart:_command_may_have_run") == 1
    assert not (tbed.tmp / "k.priv").exists()
    assert len(await tbed.getrandom_raw(v)) == 8
