"""The swtpm driver alone (backends/drivers/tpm/swtpm.py), against Debian's swtpm: no tpmif, no daemon, no sim.
State creation once and never overwritten, start / command / control channel, adoption by a second driver
(a restarted daemon), the exit callback on a crash, the graceful stop that keeps the state, reset as at a reboot,
and the errors an operator sees when something is missing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import stat
import struct
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from backends.drivers.tpm.swtpm import (
    CMD_GET_CAPABILITY,
    Swtpm,
    SwtpmError,
    SwtpmPaths,
    capabilities,
    ensure_state,
    private_setup_config,
)

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
                                reason="swtpm / swtpm-tools not installed")

GETRANDOM8 = bytes.fromhex("80010000000c0000017b0008")
PW_SESSION = struct.pack(">IHBH", 0x40000009, 0, 0, 0)  # TPM_RS_PW, empty nonce, no attributes, empty password
TPM_RH_OWNER = 0x40000001
SHA256 = 0x000B
NV_INDEX = 0x01500016
TPM_RC_NV_DEFINED = 0x14C


def command(tag: int, cc: int, body: bytes) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), cc) + body


def with_pw(handle: int, params: bytes) -> bytes:
    return struct.pack(">II", handle, len(PW_SESSION)) + PW_SESSION + params


def nv_define(index: int, size: int) -> bytes:
    """TPM2_NV_DefineSpace(owner, index, size, ownerwrite|ownerread), empty auth and policy."""
    public = struct.pack(">IHIHH", index, SHA256, 0x00020002, 0, size)
    return command(0x8002, 0x12A, with_pw(TPM_RH_OWNER, struct.pack(">H", 0) + struct.pack(">H", len(public))
                                          + public))


def pcr_extend(pcr: int, digest: bytes) -> bytes:
    return command(0x8002, 0x182, with_pw(pcr, struct.pack(">IH", 1, SHA256) + digest))


def pcr_reset(pcr: int) -> bytes:
    return command(0x8002, 0x13D, with_pw(pcr, b""))


def pcr_read(pcr: int) -> bytes:
    select = bytearray(3)
    select[pcr // 8] |= 1 << (pcr % 8)
    return command(0x8001, 0x17E, struct.pack(">IHB", 1, SHA256, 3) + bytes(select))
T = TypeVar("T")
TEST_TIMEOUT = 60.0


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, TEST_TIMEOUT)

    return asyncio.run(bounded())


def rc_of(rsp: bytes) -> int:
    return int(struct.unpack_from(">I", rsp, 6)[0])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def template() -> Iterator[Path]:
    """One TPM 2.0 state made by swtpm_setup (~1.5 s), copied for each test that needs a state."""
    root = Path(tempfile.mkdtemp(prefix="pvst-", dir="/tmp"))
    cfg = private_setup_config(root / "ca")
    created = run(ensure_state(root / "state", tpm2=True, vmid="t:template", setup_config=cfg))
    assert created
    try:
        yield root / "state"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def paths(template: Path) -> Iterator[SwtpmPaths]:
    root = Path(tempfile.mkdtemp(prefix="pvsw-", dir="/tmp"))  # short: unix socket paths
    shutil.copytree(template, root / "s")
    p = SwtpmPaths(state_dir=root / "s", run_dir=root / "r")
    try:
        yield p
    finally:
        pidfile = p.pidfile
        if pidfile.exists():  # a test that failed half-way: its swtpm by PID, only if it is ours
            try:
                pid = int(pidfile.read_text())
                if str(root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, 9)
            except (ValueError, OSError):
                pass
        shutil.rmtree(root, ignore_errors=True)


def with_swtpm(paths: SwtpmPaths, body: Callable[[Swtpm], Awaitable[T]], **kw: object) -> T:
    async def main() -> T:
        s = Swtpm(paths, **kw)  # type: ignore[arg-type]
        await s.start()
        try:
            return await body(s)
        finally:
            await s.stop(graceful=True)

    return run(main())


def test_state_is_created_once_private_and_never_overwritten(tmp_path: Path) -> None:
    cfg = private_setup_config(tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert "create_certs_tool_config" in cfg.read_text()
    state = tmp_path / "st"
    assert run(ensure_state(state, tpm2=True, vmid="t:once", setup_config=cfg)) is True
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    perm = state / "tpm2-00.permall"
    before = perm.read_bytes()
    assert run(ensure_state(state, tpm2=True, vmid="t:once", setup_config=cfg)) is False
    assert perm.read_bytes() == before
    # The local CA stays in the private dir: its signing key and issuer certificate are there.
    assert (tmp_path / "ca" / "issuercert.pem").exists()


def test_concurrent_setups_share_one_complete_ca_config(tmp_path: Path) -> None:
    """Two vTPMs made at once (bench tpm's scale step, a host booting many guests) both find no config and
    write it: neither fails, and a reader never sees a half-written file."""
    ca = tmp_path / "ca"
    stop = threading.Event()
    torn: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            for name in ("swtpm-localca.conf", "swtpm-localca.options", "swtpm_setup.conf"):
                with contextlib.suppress(FileNotFoundError):
                    text = (ca / name).read_text()
                    if not text.endswith("\n"):
                        torn.append(name)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        for round_ in range(20):
            shutil.rmtree(ca, ignore_errors=True)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                cfgs = list(pool.map(lambda _: private_setup_config(ca), range(8)))
            assert set(cfgs) == {ca / "swtpm_setup.conf"}, round_
            assert sorted(p.name for p in ca.iterdir()) == ["swtpm-localca.conf", "swtpm-localca.options",
                                                            "swtpm_setup.conf"]  # no temporary file left
    finally:
        stop.set()
        watcher.join()
    assert torn == []


def test_missing_tools_say_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(SwtpmError, match="install swtpm-tools"):
        run(ensure_state(tmp_path / "st", tpm2=True, vmid="t:x", setup_config=None,
                         swtpm_setup="/nonexistent/swtpm_setup"))
    with pytest.raises(SwtpmError, match="install swtpm"):
        run(capabilities("/nonexistent/swtpm"))

    async def start() -> None:
        await Swtpm(SwtpmPaths(tmp_path / "s", tmp_path / "r"), swtpm_bin="/nonexistent/swtpm").start()

    with pytest.raises(SwtpmError, match="install swtpm"):
        run(start())


def test_a_setup_that_times_out_takes_its_children_along(tmp_path: Path) -> None:
    """swtpm_setup runs a swtpm that locks the state: on a timeout the whole process group goes, or the child
    keeps the lock and the next start of that vTPM fails ("Could not lock access to lockfile")."""
    fake = tmp_path / "swtpm_setup"
    pidfile = tmp_path / "child.pid"
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\nwait\n")
    fake.chmod(0o755)
    with pytest.raises(SwtpmError, match="did not finish"):
        run(ensure_state(tmp_path / "st", tpm2=True, vmid="t:x", setup_config=None, swtpm_setup=str(fake),
                         timeout=1.0))
    child = int(pidfile.read_text())
    try:  # gone, or a zombie waiting for a reaper (this container's init may not reap)
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"the setup's child {child} survived its timeout (state {state})"


def test_capabilities_are_probed_and_cached() -> None:
    caps = run(capabilities())
    assert caps and all(isinstance(c, str) for c in caps), caps
    assert run(capabilities()) is caps


def test_start_command_locality_and_graceful_stop(paths: SwtpmPaths) -> None:
    async def body(s: Swtpm) -> tuple[int, int]:
        assert s.running and s.pid is not None and not s.adopted
        assert stat.S_IMODE(paths.run_dir.stat().st_mode) == 0o700
        rsp = await s.command(GETRANDOM8, timeout=10.0)
        assert rc_of(rsp) == 0 and len(rsp) == 20
        assert await s.get_capability() != 0
        await s.set_locality(1)
        with pytest.raises(SwtpmError, match="failed"):
            await s.set_locality(4)  # --locality reject-locality-4
        await s.set_locality(0)
        raw = await s.ctrl(CMD_GET_CAPABILITY)
        assert len(raw) == 8
        return s.pid, len(rsp)

    pid, _ = with_swtpm(paths, body)
    assert not alive(pid), "swtpm still running after a graceful stop"
    assert (paths.state_dir / "tpm2-00.permall").exists()


def test_a_second_driver_adopts_the_running_swtpm(paths: SwtpmPaths) -> None:
    async def main() -> None:
        first = Swtpm(paths)
        await first.start()
        pid = first.pid
        assert pid is not None
        await first.command(GETRANDOM8, timeout=10.0)
        first.release()  # the daemon restarts: the TPM keeps running
        assert alive(pid)
        second = Swtpm(paths)
        await second.start()
        try:
            assert second.adopted and second.pid == pid
            assert rc_of(await second.command(GETRANDOM8, timeout=10.0)) == 0
        finally:
            await second.stop()
        assert not alive(pid)

    run(main())


def test_a_pid_file_of_another_process_is_not_adopted(paths: SwtpmPaths) -> None:
    async def main() -> None:
        paths.run_dir.mkdir(mode=0o700, parents=True)
        paths.pidfile.write_text(str(os.getpid()))  # a live pid, but not a swtpm of this vTPM
        s = Swtpm(paths)
        await s.start()
        try:
            assert not s.adopted and s.pid != os.getpid()
        finally:
            await s.stop()

    run(main())


def test_a_crash_calls_on_exit_and_a_restart_keeps_the_state(paths: SwtpmPaths) -> None:
    async def main() -> None:
        exited: asyncio.Event = asyncio.Event()
        s = Swtpm(paths, on_exit=lambda _s: exited.set())
        await s.start()
        try:
            rsp = await s.command(nv_define(NV_INDEX, 8), timeout=10.0)
            assert rc_of(rsp) == 0, rsp.hex()
            old = s.pid
            s.kill_for_test()
            await asyncio.wait_for(exited.wait(), 10.0)
            assert not s.running
            with pytest.raises((OSError, SwtpmError, asyncio.IncompleteReadError)):
                await s.command(GETRANDOM8, timeout=5.0)
            await s.start()  # what the device class does: restarted on its state
            assert s.pid != old and not s.adopted
            rsp = await s.command(nv_define(NV_INDEX, 8), timeout=10.0)
            assert rc_of(rsp) == TPM_RC_NV_DEFINED, f"NV index lost across the crash: {rsp.hex()}"
        finally:
            await s.stop()

    run(main())


def test_reset_is_a_reboot_of_the_tpm(paths: SwtpmPaths) -> None:
    async def body(s: Swtpm) -> None:
        assert rc_of(await s.command(pcr_extend(16, b"\x11" * 32), timeout=10.0)) == 0
        after = await s.command(pcr_read(16), timeout=10.0)
        assert rc_of(after) == 0 and after[-32:] != bytes(32), after.hex()
        await s.set_locality(1)
        await s.reset()  # CMD_INIT, locality 0, Startup(CLEAR): the PCRs reset, locality 0 again
        again = await s.command(pcr_read(16), timeout=10.0)
        assert rc_of(again) == 0 and again[-32:] == bytes(32), again.hex()
        assert rc_of(await s.command(pcr_reset(16), timeout=10.0)) == 0

    with_swtpm(paths, body)
