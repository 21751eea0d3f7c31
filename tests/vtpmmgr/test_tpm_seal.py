"""The KEK sealed to a host TPM 2.0: a second swtpm plays the host's TPM (tpm2-tools' `swtpm:` TCTI).  Sealed
and unsealed through pipes only; a change of a policy PCR makes the TPM refuse, and the manager then refuses
to start with its store untouched."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.vtpmmgr import kek as keksrc
from backends.vtpmmgr.config import ManagerConfig
from backends.vtpmmgr.server import ManagerFatal, obtain_kek
from backends.vtpmmgr.store import Store

PCRS = "sha256:16,23"  # resettable debug PCRs: extending one stands for a changed boot measurement


@pytest.fixture
def host_tpm() -> Iterator[str]:
    """A private swtpm as the host's TPM; its TCTI string.  Stopped by PID."""
    d = Path(tempfile.mkdtemp(prefix="pvbt-host-", dir="/tmp"))
    (d / "state").mkdir(mode=0o700)
    sock = d / "tpm.sock"
    subprocess.run(["swtpm", "socket", "--tpm2", "--server", f"type=unixio,path={sock}", "--ctrl",
                    f"type=unixio,path={sock}.ctrl", "--tpmstate", f"dir={d / 'state'}", "--flags",
                    "not-need-init,startup-clear", "--pid", f"file={d / 'pid'}", "--log", f"file={d / 'log'}",
                    "--daemon"], check=True, timeout=20, stdin=subprocess.DEVNULL)
    pid = int((d / "pid").read_text())
    try:
        yield f"swtpm:path={sock}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(d, ignore_errors=True)


def extend(tcti: str, pcr: int) -> None:
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti, "TSS2_LOG": "all+none"}
    digest = hashlib.sha256(b"a different boot").hexdigest()
    subprocess.run(["tpm2_pcrextend", f"{pcr}:sha256={digest}"], env=env, check=True, timeout=30,
                   capture_output=True)


def test_seal_unseal_and_a_pcr_change_refuses(host_tpm: str, tmp_path: Path) -> None:
    kek = os.urandom(32)
    keksrc.seal(kek, tcti=host_tpm, pcrs=PCRS, out_dir=tmp_path)
    blobs = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(blobs) == {"kek.pub", "kek.priv"}
    assert all(kek not in b and kek.hex().encode() not in b for b in blobs.values())
    assert keksrc.unseal(tcti=host_tpm, pcrs=PCRS, blob_dir=tmp_path) == kek
    assert keksrc.unseal(tcti=host_tpm, pcrs=PCRS, blob_dir=tmp_path) == kek  # no handles left behind
    extend(host_tpm, 16)
    with pytest.raises(keksrc.KekError, match="refused to unseal"):
        keksrc.unseal(tcti=host_tpm, pcrs=PCRS, blob_dir=tmp_path)


def test_a_manager_sealed_to_the_host_tpm_refuses_after_a_pcr_change(host_tpm: str, tmp_path: Path) -> None:
    cfg = ManagerConfig(state_dir=str(tmp_path / "mgr"), kek_source="tpm", tpm_tcti=host_tpm, tpm_pcrs=PCRS)
    store = Store(Path(cfg.state_dir))
    kek = obtain_kek(cfg, store, init=True, passphrase_fd=None)
    store.create("3f1c2a4e-0000-4000-8000-00000000000a", 0, vtpm_uuid="7b9d8c6e-1111-4111-8111-00000000000b")
    key = bytes(store.key_of(store.get("3f1c2a4e-0000-4000-8000-00000000000a", 0)))
    # A restart on the same host state: same KEK, same keys.
    again = Store(Path(cfg.state_dir))
    assert obtain_kek(cfg, again, init=False, passphrase_fd=None) == kek
    assert bytes(again.key_of(again.get("3f1c2a4e-0000-4000-8000-00000000000a", 0))) == key
    before = {p: p.read_bytes() for p in Path(cfg.state_dir).rglob("*") if p.is_file()}
    extend(host_tpm, 23)
    with pytest.raises(ManagerFatal, match="refused to unseal"):
        obtain_kek(cfg, Store(Path(cfg.state_dir)), init=False, passphrase_fd=None)
    assert {p: p.read_bytes() for p in Path(cfg.state_dir).rglob("*") if p.is_file()} == before
    # The configuration must not silently switch KEK source either.
    with pytest.raises(ManagerFatal, match="comes from 'tpm'"):
        obtain_kek(ManagerConfig(state_dir=cfg.state_dir, kek_source="file", kek_file=str(tmp_path / "k")),
                   Store(Path(cfg.state_dir)), init=False, passphrase_fd=None)
