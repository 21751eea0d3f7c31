"""The vTPM system test bed: `pvback serve` (vtpm only, private state and run directories) on the session's
sim, guests with a TpmFront each, and tpm2-tools run unmodified against the guest's swtpm-compatible socket
(`-T swtpm:path=...`).  Everything it starts is stopped by PID; swtpm processes a killed daemon left behind
are found by their pid files in this bed's run directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import struct
import tempfile
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from backends.guests.guest import Guest
from backends.guests.tpmfront import TpmFront, TpmSocket
from backends.xenbus.state import XenbusState
from backends.xenbus.toolstack import DevicePaths, add_device, remove_device, wait_for_state
from backends.xenstore.client import XenStoreClient
from tests.system.conftest import Bed, ServeProc, SimProc

TOOL_TIMEOUT = 30.0
GETRANDOM8 = bytes.fromhex("80010000000c0000017b0008")
S = XenbusState


def config(state_dir: Path, run_dir: Path, localities: str = "0,1") -> str:
    return (f'[serve]\nbackend_types = ["vtpm"]\n[vtpm]\nstate_dir = "{state_dir}"\nrun_dir = "{run_dir}"\n'
            f'localities = "{localities}"\ncommand_timeout_s = 30.0\n')


def rc_of(rsp: bytes) -> int:
    return int(struct.unpack_from(">I", rsp, 6)[0])


@dataclass
class Vtpm:
    guest: Guest
    xs: XenStoreClient
    front: TpmFront
    sock: TpmSocket
    paths: DevicePaths
    uuid: str
    devid: int = 0

    @property
    def domid(self) -> int:
        return self.guest.domid

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.sock.path}"


@dataclass
class TpmBed(Bed):
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pvbt-", dir="/tmp")))
    tpms: list[Vtpm] = field(default_factory=list)

    async def attach_tpm(self, domid: int, uuid: str, *, version: str | None = None, devid: int = 0,
                         wait: bool = True) -> DevicePaths:
        xs = await self.dom0()
        backend = {"uuid": uuid, "resume": "False", **({"version": version} if version else {})}
        paths = await add_device(xs, backend_domid=0, frontend_domid=domid, type_name="vtpm", devid=devid,
                                 backend=backend, frontend={}, frontend_type="vtpm")
        if wait:
            await wait_for_state(xs, paths.backend, {S.INIT_WAIT, S.CONNECTED}, timeout=20.0)
        return paths

    async def detach_tpm(self, v: Vtpm) -> None:
        await v.sock.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await v.front.close()
        await remove_device(await self.dom0(), backend_domid=0, frontend_domid=v.domid, type_name="vtpm",
                            devid=v.devid, frontend_type="vtpm", timeout=5.0)
        await v.front.release(revoke_timeout=1.0)
        self.tpms.remove(v)

    async def tpm(self, guest: tuple[Guest, XenStoreClient] | None = None, *, uuid: str | None = None,
                  version: str | None = None, name: str = "g") -> Vtpm:
        g, xs = guest if guest is not None else await self.guest(name=name, mem_pages=64, gnt_entries=64)
        ident = uuid or str(uuidlib.uuid4())
        paths = await self.attach_tpm(g.domid, ident, version=version)
        front = TpmFront(g, xs, 0, timeout=20.0)
        await front.connect()
        sock = TpmSocket(front, self.run_dir / f"g{g.domid}-{len(self.tpms)}.sock")
        await sock.start()
        v = Vtpm(g, xs, front, sock, paths, ident)
        self.tpms.append(v)
        return v

    async def tools(self, v: Vtpm, *argv: str, stdin: bytes | None = None, check: bool = True,
                    flush: bool = True) -> tuple[int, str, str]:
        """One tpm2-tools command through the guest path, bounded; between tools the transient objects are
        flushed (no resource manager on a raw TPM: 0x902 otherwise)."""
        env = {**os.environ, "TPM2TOOLS_TCTI": v.tcti, "TSS2_LOG": "all+none"}
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=str(self.tmp), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(TOOL_TIMEOUT):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        rc = int(proc.returncode or 0)
        if check and rc != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({rc}): {err.decode(errors='replace')[-800:]}")
        if flush and argv[0] != "tpm2_flushcontext":
            await self.tools(v, "tpm2_flushcontext", "-t", check=False)
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    async def getrandom_raw(self, v: Vtpm) -> bytes:
        rsp = await v.front.transmit(GETRANDOM8, timeout_c=10.0, duration=30.0)
        assert rc_of(rsp) == 0 and len(rsp) == 20, rsp.hex()
        return rsp[12:]

    def swtpm_pid(self, uuid: str) -> int:
        """0 while there is no pid file (swtpm is being restarted)."""
        try:
            return int((self.run_dir / uuid / "swtpm.pid").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    async def metric(self, name: str, domid: int, **labels: str) -> float:
        pat = re.compile(rf'^{name}\{{(?P<labels>[^}}]*)\}} (?P<v>[0-9.e+-]+)$')
        total = 0.0
        for line in (await self.serve.metrics()).splitlines():
            m = pat.match(line)
            if not m:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            if got.get("type") == "vtpm" and got.get("domid") == str(domid) and \
                    all(got.get(k) == val for k, val in labels.items()):
                total += float(m["v"])
        return total

    async def aclose(self) -> None:
        for v in list(self.tpms):
            await v.sock.close()
            if self.serve.alive:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await v.front.close()
            with contextlib.suppress(Exception):
                await remove_device(await self.dom0(), backend_domid=0, frontend_domid=v.domid, type_name="vtpm",
                                    devid=v.devid, frontend_type="vtpm", timeout=5.0 if self.serve.alive else 0.2)
            with contextlib.suppress(Exception):
                await v.front.release(revoke_timeout=1.0)
        self.tpms.clear()
        await super().aclose()
        kill_swtpms(self.run_dir)


def kill_swtpms(run_dir: Path) -> None:
    """swtpm processes of this bed's run dir only, by PID: those a killed daemon left behind, and those a live
    daemon restarts when one is killed under it (so call it again once the daemon has stopped)."""
    for pidfile in run_dir.glob("*/swtpm.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(run_dir).encode() in cmd:
                os.kill(pid, signal.SIGKILL)


def make_serve(sim: SimProc, tmp: Path, run_dir: Path, localities: str = "0,1") -> ServeProc:
    return ServeProc(sim, tmp, config=config(tmp / "vtpm-state", run_dir, localities))


@contextlib.contextmanager
def tpm_bed(sim: SimProc, tmp: Path) -> Iterator[TpmBed]:
    """A daemon serving vTPMs from a run dir of its own, and the bed around it; every test module's fixture.
    At the end the daemon must have lived (unless the test killed it) and stopped cleanly; the bed's swtpms
    are killed again after it stopped (it restarts one killed under it while the bed cleans up)."""
    run_dir = Path(tempfile.mkdtemp(prefix="pvbt-", dir="/tmp"))
    serve = make_serve(sim, tmp, run_dir)
    serve.start()
    try:
        yield TpmBed(sim, serve, tmp, run_dir=run_dir)
    finally:
        try:
            alive = serve.alive
            rc = serve.stop()
            if not serve.killed:
                assert alive and rc == 0, f"pvback serve died or failed to stop ({rc}):\n{serve.log_text()[-3000:]}"
        finally:
            kill_swtpms(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
