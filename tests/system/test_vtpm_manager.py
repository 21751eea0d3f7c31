"""The vTPM manager end to end: `pvback vtpm-manager` (its own process, key file KEK, private store) releasing
state keys to `pvback serve`, which hands them to swtpm/swtpm_setup by fd; tpm2-tools through the emulated
guest path.  What #17 must show: no NV plaintext and no key anywhere it must not be, a guest claiming another
guest's identity gets nothing, a manager that is down is waited for (then a clear error), a wrong KEK or a
key that does not open the state never makes a fresh vTPM and leaves the state as it was, delete shreds, a
manager restart keeps every binding, and only the configured peer uid gets keys."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends.drivers.tpm.keymgr import ManagerRefused, release_key, request
from backends.guests.guest import Guest
from backends.guests.tpmfront import TpmFront, TpmSocket
from backends.xenbus.toolstack import DevicePaths, remove_device, write_domain_identity
from backends.xenstore.client import XenStoreClient, XenStoreError
from tests.system.conftest import PY, REPO, Proc, ServeProc, SimProc, _env
from tests.system.reachable import reachable_prefix
from tests.system.vtpmbed import TpmBed, Vtpm, config, kill_swtpms

NV = "0x1500016"
VALUE = b"guest-secret-nv-0123456789abcdef"  # 32 bytes
MANAGER_WAIT_S = 6.0


class ManagerProc:
    """`pvback vtpm-manager` with a key-file KEK, stopped by PID."""

    def __init__(self, sim: SimProc, workdir: Path, run_dir: Path, sock_name: str = "mgr.sock") -> None:
        workdir.mkdir(exist_ok=True)
        self.dir = workdir / "mgr"
        self.kek = workdir / "kek"
        self.socket = run_dir / sock_name
        self.log = workdir / "manager.log"
        self.config = workdir / "vtpm-manager.toml"
        self.config.write_text(f'[manager]\nstate_dir = "{self.dir}"\nsocket = "{self.socket}"\n'
                               f'kek_file = "{self.kek}"\nxenstore = "{sim.xenstored}"\n')
        self.proc: Proc | None = None
        self.prefix: list[str] = []  # e.g. reachable_prefix() when the manager drops to another user

    def start(self, *, init: bool = False) -> None:
        argv = [*self.prefix, *PY, "vtpm-manager", "--config", str(self.config), *(["--init"] if init else [])]
        self.proc = Proc(argv, self.log)
        deadline = time.monotonic() + 20
        while True:
            if not self.proc.alive:
                raise RuntimeError(f"vtpm-manager exited ({self.proc.p.returncode}):\n{self.log_text()[-2000:]}")
            try:
                asyncio.run(request(str(self.socket), {"op": "ping"}, timeout=1.0))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        return self.proc.stop()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class MgrBed(TpmBed):
    """The vTPM bed with a manager; a Bed, so the test runner closes it in the test's loop."""

    mgr: ManagerProc | None = None
    attached: list[tuple[int, int]] = field(default_factory=list)
    vms: list[str] = field(default_factory=list)  # /vm/<uuid> written, removed at the end as libxl does

    @property
    def bed(self) -> TpmBed:
        return self

    @property
    def m(self) -> ManagerProc:
        assert self.mgr is not None
        return self.mgr

    async def vm(self, name: str) -> tuple[Guest, XenStoreClient, str]:
        """A guest with the identity a toolstack gives it (dom0-owned /vm/<uuid>)."""
        g, xs = await self.bed.guest(name=name, mem_pages=64, gnt_entries=64)
        domain_uuid = str(uuidlib.uuid4())
        await write_domain_identity(await self.bed.dom0(), g.domid, domain_uuid, name)
        self.vms.append(domain_uuid)
        return g, xs, domain_uuid

    async def provision(self, domain_uuid: str, devid: int = 0) -> str:
        vtpm_uuid = str(uuidlib.uuid4())
        await request(str(self.m.socket), {"op": "create", "domain_uuid": domain_uuid, "devid": devid,
                                             "vtpm_uuid": vtpm_uuid})
        return vtpm_uuid

    async def mtpm(self, g: Guest, xs: XenStoreClient, vtpm_uuid: str) -> Vtpm:
        return await self.bed.tpm((g, xs), uuid=vtpm_uuid)

    def state_dir(self, vtpm_uuid: str) -> Path:
        return self.bed.tmp / "vtpm-state" / vtpm_uuid

    async def attach_tpm(self, domid: int, uuid: str, *, version: str | None = None, devid: int = 0,
                         wait: bool = True) -> DevicePaths:
        """Also remembered for aclose: a device that failed (refused, no manager) has no Vtpm the bed would
        remove, and its directories must not outlive the test (the sim is the session's)."""
        self.attached.append((domid, devid))
        return await super().attach_tpm(domid, uuid, version=version, devid=devid, wait=wait)

    async def aclose(self) -> None:
        xs = await self.dom0()
        for domid, devid in self.attached:
            if not any(v.domid == domid and v.devid == devid for v in self.tpms):
                with contextlib.suppress(Exception):
                    await remove_device(xs, backend_domid=0, frontend_domid=domid, type_name="vtpm", devid=devid,
                                        frontend_type="vtpm", timeout=5.0 if self.serve.alive else 0.2)
        for u in self.vms:
            with contextlib.suppress(Exception):
                await xs.rm(f"/vm/{u}")
        await super().aclose()

    async def forgotten(self, domid: int, timeout: float = 20.0) -> None:
        """Until the daemon has dropped every vTPM device of `domid` (gone from its metrics).  A device
        re-added at the same backend path while the daemon still holds the old one is not picked up (a
        xenbus race, reported): the tests that re-attach to the same domain wait for this first."""
        needle = f'domid="{domid}"'
        async with asyncio.timeout(timeout):
            while any(needle in line and 'type="vtpm"' in line
                      for line in (await self.serve.metrics()).splitlines()
                      if line.startswith("pvback_device_state")):
                await asyncio.sleep(0.05)

    async def detach_tpm(self, v: Vtpm) -> None:
        await super().detach_tpm(v)
        await self.forgotten(v.domid)

    async def error_of(self, backend: str, timeout: float = 20.0) -> str:
        xs = await self.bed.dom0()
        async with asyncio.timeout(timeout):
            while (err := await xs.read_str(f"{backend}/error")) is None:
                await asyncio.sleep(0.05)
        return err


def serve_config(state_dir: Path, run_dir: Path, socket: Path) -> str:
    return config(state_dir, run_dir) + f'manager_socket = "{socket}"\nmanager_wait_s = {MANAGER_WAIT_S}\n'


@pytest.fixture
def mbed(sim: SimProc, tmp_path: Path) -> Iterator[MgrBed]:
    run_dir = Path(tempfile.mkdtemp(prefix="pvbt-", dir="/tmp"))
    mgr = ManagerProc(sim, tmp_path, run_dir)
    mgr.start(init=True)
    serve = ServeProc(sim, tmp_path, config=serve_config(tmp_path / "vtpm-state", run_dir, mgr.socket))
    bed = MgrBed(sim, serve, tmp_path, run_dir=run_dir, mgr=mgr)
    try:
        serve.start()
        yield bed
    finally:
        try:
            serve = bed.serve  # a test may have moved the daemon to another manager
            alive = serve.alive
            rc = serve.stop()
            assert alive and rc == 0, f"pvback serve died or failed to stop ({rc}):\n{serve.log_text()[-3000:]}"
        finally:
            kill_swtpms(run_dir)
            if mgr.proc is not None and mgr.proc.alive:
                assert mgr.stop() == 0, mgr.log_text()[-2000:]
            shutil.rmtree(run_dir, ignore_errors=True)


async def nv_write(bed: TpmBed, v: Vtpm) -> None:
    await bed.tools(v, "tpm2_nvdefine", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite|authread|authwrite", NV)
    await bed.tools(v, "tpm2_nvwrite", "-C", "o", "-i-", NV, stdin=VALUE)


async def nv_read(bed: TpmBed, v: Vtpm) -> bytes:
    out = bed.tmp / "nv.out"
    out.unlink(missing_ok=True)
    await bed.tools(v, "tpm2_nvread", "-C", "o", "-s", "32", "-o", str(out), NV)
    return out.read_bytes()


def files_under(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for r in roots if r.exists() for p in r.rglob("*") if p.is_file() and not p.is_socket()}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(b).hexdigest() for p, b in files_under(root).items()
            if p.suffix != ".lock"}


def key_forms(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)]


def proc_exposures(key: bytes, programs: set[str] | None = None) -> list[str]:
    """Every process's cmdline and environ searched for the key in any form; `programs` collects the program
    names seen (to show the watch covered the processes it is meant to)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        for what in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                data = (d / what).read_bytes()
                if any(f in data for f in key_forms(key)):
                    found.append(f"{d.name}/{what}")
                if programs is not None and what == "cmdline" and data:
                    programs.add(Path(data.split(b"\0", 1)[0].decode(errors="replace")).name)
    return found


async def test_state_is_encrypted_and_the_key_is_nowhere_else(mbed: MgrBed) -> None:
    bed = mbed.bed
    g, xs, dom = await mbed.vm("enc")
    # Provisioned with a key the test knows, so every process can be watched for it from the first moment:
    # through swtpm_setup (and the swtpm, swtpm_cert, swtpm_localca it runs) and the swtpm start.
    known = os.urandom(32)
    vtpm_uuid = str(uuidlib.uuid4())
    await request(str(mbed.m.socket), {"op": "create", "domain_uuid": dom, "devid": 0, "vtpm_uuid": vtpm_uuid,
                                       "key": base64.b64encode(known).decode()})
    stop = threading.Event()
    seen: list[str] = []
    programs: set[str] = set()

    def watch() -> None:
        while not stop.is_set():
            seen.extend(proc_exposures(known, programs))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        v = await mbed.mtpm(g, xs, vtpm_uuid)
        await nv_write(bed, v)
    finally:
        stop.set()
        watcher.join()
    assert seen == []
    assert {"swtpm_setup", "swtpm"} <= programs, programs
    assert await nv_read(bed, v) == VALUE
    state = files_under(mbed.state_dir(vtpm_uuid))
    assert any(p.name == "tpm2-00.permall" for p in state)
    for p, data in state.items():
        assert VALUE not in data, f"{p} holds the NV value in the clear"
    # swtpm was given the key by fd, and runs in encrypted mode.
    cmd = Path(f"/proc/{bed.swtpm_pid(vtpm_uuid)}/cmdline").read_bytes().split(b"\0")
    assert any(a.startswith(b"fd=") and b"mode=aes-256-cbc" in a for a in cmd), cmd
    # The test may ask for the key (it runs as the release uid, and the binding is the guest's): it appears in
    # no process's cmdline or environ, in no log, in no file of the bed other than wrapped.
    rel = await release_key(str(mbed.m.socket), v.paths.backend)
    key = bytes(rel.key)
    assert key == known
    assert rel.initialized and rel.vtpm_uuid == vtpm_uuid and rel.domain_uuid == dom
    assert proc_exposures(key) == []
    for p, data in files_under(bed.tmp, bed.run_dir).items():
        for form in key_forms(key):
            assert form not in data, f"{p} holds the key"
    assert "swtpm" in bed.serve.log_text() and "release" in mbed.m.log_text()
    # The state does not open without the key (swtpm itself says so), and opens with it.
    await bed.detach_tpm(v)
    probe = Path(tempfile.mkdtemp(prefix="pvbt-", dir="/tmp"))
    try:
        shutil.copytree(mbed.state_dir(vtpm_uuid) / "tpm2", probe / "st")
        plain = subprocess.run(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={probe / 'st'}", "--flags",
                                "not-need-init", "--server", f"type=unixio,path={probe / 's'}", "--ctrl",
                                f"type=unixio,path={probe / 'c'}", "--log", f"file={probe / 'log'}"],
                               capture_output=True, timeout=20, check=False)
        assert plain.returncode != 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    v = await mbed.mtpm(g, xs, vtpm_uuid)
    assert await nv_read(bed, v) == VALUE


async def test_a_guest_claiming_another_guests_identity_gets_nothing(mbed: MgrBed) -> None:
    bed = mbed.bed
    dom0 = await bed.dom0()
    ga, xa, dom_a = await mbed.vm("victim")
    vtpm_a = await mbed.provision(dom_a)
    va = await mbed.mtpm(ga, xa, vtpm_a)
    await nv_write(bed, va)
    await bed.detach_tpm(va)

    # B has no toolstack identity yet: it writes A's into its own home (the emulated platform lets a guest
    # own /local/domain/<id>) and into its frontend directory.
    gb, xb = await bed.guest(name="thief", mem_pages=64, gnt_entries=64)
    await xb.write(f"/local/domain/{gb.domid}/vm", f"/vm/{dom_a}")
    await xb.write(f"/local/domain/{gb.domid}/device/vtpm/0/uuid", vtpm_a)
    await xb.write(f"/local/domain/{gb.domid}/device/vtpm/0/vm", f"/vm/{dom_a}")
    paths = await bed.attach_tpm(gb.domid, vtpm_a)  # even the backend names A's vTPM
    err = await mbed.error_of(paths.backend)
    assert "refused" in err and f"/local/domain/{gb.domid}/vm is owned by domain {gb.domid}" in err, err
    with pytest.raises(ManagerRefused, match="not trusted"):
        await release_key(str(mbed.m.socket), paths.backend)
    assert not (bed.run_dir / vtpm_a / "swtpm.pid").exists()

    # With its real identity (dom0-owned; the planted node is gone) B still names A's vTPM: refused.
    dom_b = str(uuidlib.uuid4())
    await write_domain_identity(dom0, gb.domid, dom_b, "thief")
    mbed.vms.append(dom_b)
    with pytest.raises(XenStoreError):
        await xb.write(f"/local/domain/{gb.domid}/vm", f"/vm/{dom_a}")
    with pytest.raises(ManagerRefused, match=f"no vTPM is provisioned for domain {dom_b}"):
        await release_key(str(mbed.m.socket), paths.backend)
    # A backend path of someone else's domain, or not a vTPM's: refused before any lookup.
    with pytest.raises(ManagerRefused, match="not below backend domain 0"):
        await release_key(str(mbed.m.socket), f"/local/domain/{gb.domid}/backend/vtpm/{ga.domid}/0")
    with pytest.raises(ManagerRefused, match="not a vTPM backend path"):
        await release_key(str(mbed.m.socket), "/local/domain/0/backend/vtpm/../../vm")
    for p, data in files_under(mbed.state_dir(vtpm_a)).items():
        assert VALUE not in data, p

    # A still gets its TPM, NV intact.
    with contextlib.suppress(Exception):
        await remove_device(dom0, backend_domid=0, frontend_domid=gb.domid, type_name="vtpm", devid=0,
                            frontend_type="vtpm", timeout=5.0)
        await mbed.forgotten(gb.domid)
    va = await mbed.mtpm(ga, xa, vtpm_a)
    assert await nv_read(bed, va) == VALUE


async def test_manager_down_the_vtpm_waits_then_connects_or_fails_clearly(mbed: MgrBed) -> None:
    bed = mbed.bed
    g, xs, dom = await mbed.vm("waiter")
    vtpm_uuid = await mbed.provision(dom)
    assert mbed.m.stop() == 0
    paths = await bed.attach_tpm(g.domid, vtpm_uuid)
    front = TpmFront(g, xs, 0, timeout=30.0)
    connecting = asyncio.ensure_future(front.connect())
    await asyncio.sleep(2.0)
    assert not connecting.done()
    retries = await bed.metric("pvback_device_status", g.domid, key="manager_retries")
    assert retries >= 2, retries
    assert "waiting for the vTPM manager" in bed.serve.log_text()
    await asyncio.to_thread(mbed.m.start)
    await connecting
    sock = TpmSocket(front, bed.run_dir / f"g{g.domid}.sock")
    await sock.start()
    v = Vtpm(g, xs, front, sock, paths, vtpm_uuid)
    bed.tpms.append(v)
    rsp = await bed.getrandom_raw(v)
    assert len(rsp) == 8

    # Down for longer than manager_wait_s: a clear error, no swtpm, no state.
    g2, _xs2, dom2 = await mbed.vm("late")
    vtpm2 = await mbed.provision(dom2)
    assert mbed.m.stop() == 0
    t0 = time.monotonic()
    paths2 = await bed.attach_tpm(g2.domid, vtpm2)
    err = await mbed.error_of(paths2.backend, timeout=MANAGER_WAIT_S + 15)
    assert f"no vTPM manager within {MANAGER_WAIT_S:.0f} s" in err, err
    assert time.monotonic() - t0 >= MANAGER_WAIT_S - 1
    assert not mbed.state_dir(vtpm2).exists() and not (bed.run_dir / vtpm2 / "swtpm.pid").exists()
    await asyncio.to_thread(mbed.m.start)


async def test_wrong_kek_and_a_key_that_does_not_open_the_state_never_make_a_fresh_vtpm(mbed: MgrBed) -> None:
    bed = mbed.bed
    g, xs, dom = await mbed.vm("wrongkey")
    vtpm_uuid = await mbed.provision(dom)
    v = await mbed.mtpm(g, xs, vtpm_uuid)
    await nv_write(bed, v)
    old_key = bytes((await release_key(str(mbed.m.socket), v.paths.backend)).key)
    await bed.detach_tpm(v)
    before = digests(mbed.state_dir(vtpm_uuid))
    store_before = digests(mbed.m.dir)

    # A wrong KEK: the manager refuses to start and touches nothing.
    assert mbed.m.stop() == 0
    good = mbed.m.kek.read_bytes()
    mbed.m.kek.write_bytes(os.urandom(32))
    with pytest.raises(RuntimeError, match="not the store's KEK"):
        await asyncio.to_thread(mbed.m.start)
    assert digests(mbed.m.dir) == store_before
    mbed.m.kek.write_bytes(good)
    await asyncio.to_thread(mbed.m.start)

    # Delete (crypto-shred, state kept to show it is now undecryptable) and provision the same binding anew:
    # the new key does not open the old state; the device fails, the state is left exactly as it was.
    rc = await asyncio.to_thread(subprocess.run, [*PY, "vtpm", "delete", "--socket", str(mbed.m.socket),
                                                  "--domain-uuid", dom, "--keep-state"],
                                 capture_output=True, text=True, env=_env(), cwd=REPO, timeout=30)
    assert rc.returncode == 0 and "key shredded" in rc.stdout, rc.stderr
    for p, data in files_under(mbed.m.dir).items():
        assert not any(f in data for f in key_forms(old_key)), p
    assert not list((mbed.m.dir / "keys").glob(f"{dom}.*"))
    await request(str(mbed.m.socket), {"op": "create", "domain_uuid": dom, "devid": 0, "vtpm_uuid": vtpm_uuid})
    paths = await bed.attach_tpm(g.domid, vtpm_uuid)
    err = await mbed.error_of(paths.backend)
    assert "cannot open the vTPM state with the key" in err and "no new TPM is made" in err, err
    assert digests(mbed.state_dir(vtpm_uuid)) == before

    # A vTPM the manager knows as created whose state went missing is not made anew either.
    await remove_device(await bed.dom0(), backend_domid=0, frontend_domid=g.domid, type_name="vtpm", devid=0,
                        frontend_type="vtpm", timeout=5.0)
    await mbed.forgotten(g.domid)
    g2, xs2, dom2 = await mbed.vm("lost")
    vtpm2 = await mbed.provision(dom2)
    v2 = await mbed.mtpm(g2, xs2, vtpm2)
    await bed.detach_tpm(v2)
    shutil.rmtree(mbed.state_dir(vtpm2))
    paths2 = await bed.attach_tpm(g2.domid, vtpm2)
    err = await mbed.error_of(paths2.backend)
    assert "refusing to make a fresh TPM" in err, err
    assert not mbed.state_dir(vtpm2).exists()


async def test_manager_restart_and_kek_rotation_keep_bindings_and_only_the_release_uid_gets_keys(
        mbed: MgrBed) -> None:
    bed = mbed.bed
    g, xs, dom = await mbed.vm("keeper")
    vtpm_uuid = await mbed.provision(dom)
    v = await mbed.mtpm(g, xs, vtpm_uuid)
    await nv_write(bed, v)
    await bed.detach_tpm(v)
    old_kek = mbed.m.kek.read_bytes()
    rot = await asyncio.to_thread(subprocess.run, [*PY, "vtpm", "rotate", "--socket", str(mbed.m.socket)],
                                  capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert rot.returncode == 0 and "1 vTPM key(s) re-wrapped" in rot.stdout, rot.stderr
    assert mbed.m.kek.read_bytes() != old_kek
    assert mbed.m.stop() == 0
    await asyncio.to_thread(mbed.m.start)
    v = await mbed.mtpm(g, xs, vtpm_uuid)
    assert await nv_read(bed, v) == VALUE

    listing = await asyncio.to_thread(subprocess.run, [*PY, "vtpm", "list", "--socket", str(mbed.m.socket)],
                                      capture_output=True, text=True, env=_env(), cwd=REPO, timeout=30)
    assert listing.returncode == 0 and dom in listing.stdout and vtpm_uuid in listing.stdout, listing.stderr
    assert "created" in listing.stdout
    other = str(uuidlib.uuid4())
    made = await asyncio.to_thread(cli, "vtpm", "create", "--socket", str(mbed.m.socket), "--domain-uuid", other,
                                   "--devid", "3", "--group", "gold")
    assert made.returncode == 0 and f"domain_uuid: {other}" in made.stdout, made.stderr
    new_vtpm = next(line.split(": ", 1)[1] for line in made.stdout.splitlines() if line.startswith("vtpm_uuid: "))
    shown = await asyncio.to_thread(cli, "vtpm", "show", "--socket", str(mbed.m.socket), "--vtpm-uuid", new_vtpm,
                                    "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) | {"created": 0} == {"domain_uuid": other, "devid": 3, "group": "gold",
                                                        "vtpm_uuid": new_vtpm, "initialized": False,
                                                        "created": 0, "version": 1}
    again = await asyncio.to_thread(cli, "vtpm", "create", "--socket", str(mbed.m.socket), "--domain-uuid", other,
                                    "--devid", "3")
    assert again.returncode == 1 and "already has a vTPM" in again.stderr, again.stderr

    # Another uid that can reach the socket (opened up for the test) is refused by its peer credentials.
    os.chmod(mbed.run_dir, 0o711)
    os.chmod(mbed.m.socket, 0o666)
    script = ("import asyncio, os, sys\n"
              "from backends.drivers.tpm.keymgr import ManagerRefused, release_key, request\n"
              "os.setgid(65534); os.setuid(65534)\n"
              "for coro in (release_key(sys.argv[1], sys.argv[2]), request(sys.argv[1], {'op': 'list'})):\n"
              "    try:\n        asyncio.run(coro)\n    except ManagerRefused as e:\n        print('REFUSED', e)\n"
              "    else:\n        print('GOT IT')\n")
    out = await asyncio.to_thread(subprocess.run, [*PY[:1], "-c", script, str(mbed.m.socket), v.paths.backend],
                                  capture_output=True, text=True, env=_env(), cwd=REPO, timeout=30)
    assert out.stdout.count("REFUSED") == 2 and "GOT IT" not in out.stdout, (out.stdout, out.stderr)
    assert "uid 65534 may not ask for vTPM keys" in out.stdout and "may not administer" in out.stdout




def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *argv], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60,
                          check=False)


async def test_export_import_to_another_manager_keeps_nv_and_a_store_backup_restores(mbed: MgrBed,
                                                                                     sim: SimProc) -> None:
    bed = mbed.bed
    g, xs, dom = await mbed.vm("mover")
    vtpm_uuid = await mbed.provision(dom)
    v = await mbed.mtpm(g, xs, vtpm_uuid)
    await nv_write(bed, v)
    key = bytes((await release_key(str(mbed.m.socket), v.paths.backend)).key)
    await bed.detach_tpm(v)
    backup = bed.tmp / "mgr-backup"
    shutil.copytree(mbed.m.dir, backup, symlinks=True)

    b = ManagerProc(sim, bed.tmp / "b", bed.run_dir, sock_name="mgr-b.sock")
    await asyncio.to_thread(b.start, init=True)
    try:
        b_cfg = bed.tmp / "b" / "pvback.toml"
        b_cfg.write_text(serve_config(bed.tmp / "b" / "vtpm-state", bed.run_dir, b.socket))
        a_cfg = bed.serve.config_path
        assert a_cfg is not None
        pub = await asyncio.to_thread(cli, "vtpm", "transport-key", "--socket", str(b.socket))
        assert pub.returncode == 0, pub.stderr
        bundle = bed.tmp / "bundle.json"
        out = await asyncio.to_thread(cli, "vtpm", "export", "--config", str(a_cfg), "--socket", str(mbed.m.socket),
                                      "--domain-uuid", dom, "--to", pub.stdout.strip(), "--out", str(bundle))
        assert out.returncode == 0 and "state file(s)" in out.stdout, out.stderr
        data = bundle.read_bytes()
        assert not any(f in data for f in key_forms(key)) and VALUE not in data
        # Only the manager it was exported for can import it.
        wrong = await asyncio.to_thread(cli, "vtpm", "import", "--socket", str(mbed.m.socket), "--config",
                                        str(b_cfg), str(bundle))
        assert wrong.returncode != 0 and "exported for another manager" in wrong.stderr, wrong.stderr
        imp = await asyncio.to_thread(cli, "vtpm", "import", "--socket", str(b.socket), "--config", str(b_cfg),
                                      str(bundle))
        assert imp.returncode == 0, imp.stderr

        # Meanwhile on the source host: the vTPM is deleted (shredded) and the store's backup brings it back.
        gone = await asyncio.to_thread(cli, "vtpm", "delete", "--socket", str(mbed.m.socket), "--domain-uuid", dom,
                                       "--keep-state")
        assert gone.returncode == 0, gone.stderr
        assert mbed.m.stop() == 0
        shutil.rmtree(mbed.m.dir)
        shutil.copytree(backup, mbed.m.dir, symlinks=True)
        await asyncio.to_thread(mbed.m.start)
        xs0 = await bed.dom0()
        paths = await bed.attach_tpm(g.domid, vtpm_uuid, wait=False)
        assert bytes((await release_key(str(mbed.m.socket), paths.backend)).key) == key
        await remove_device(xs0, backend_domid=0, frontend_domid=g.domid, type_name="vtpm", devid=0,
                            frontend_type="vtpm", timeout=10.0)
        await mbed.forgotten(g.domid)

        # The daemon moves to the target host's manager and state directory: the guest reads its NV value.
        assert bed.serve.stop() == 0
        kill_swtpms(bed.run_dir)
        bed.serve = ServeProc(sim, bed.tmp / "b", config=b_cfg.read_text())
        await asyncio.to_thread(bed.serve.start)
        v = await mbed.mtpm(g, xs, vtpm_uuid)
        assert await nv_read(bed, v) == VALUE
        assert bytes((await release_key(str(b.socket), v.paths.backend)).key) == key
    finally:
        if b.proc is not None and b.proc.alive:
            assert b.stop() == 0, b.log_text()[-2000:]


async def test_daemon_and_swtpm_restarts_ask_the_manager_again_and_auto_provisioning(mbed: MgrBed) -> None:
    from backends.xenbus.toolstack import wait_for_state
    from tests.system.vtpmbed import S

    bed = mbed.bed
    g, xs, dom = await mbed.vm("crashy")
    vtpm_uuid = await mbed.provision(dom)
    v = await mbed.mtpm(g, xs, vtpm_uuid)
    await nv_write(bed, v)
    releases = mbed.m.log_text().count("op=release")

    # Daemon SIGKILL + restart: the identity is checked again before the running swtpm is adopted.
    pid = bed.swtpm_pid(vtpm_uuid)
    assert bed.serve.kill(signal.SIGKILL) == -signal.SIGKILL
    bed.serve.start()
    await wait_for_state(await bed.dom0(), v.paths.backend, S.CONNECTED, timeout=20.0)
    assert await nv_read(bed, v) == VALUE and bed.swtpm_pid(vtpm_uuid) == pid
    assert mbed.m.log_text().count("op=release") > releases

    # swtpm SIGKILL: restarted with a key released anew (the daemon keeps none).
    releases = mbed.m.log_text().count("op=release")
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(20):
        while bed.swtpm_pid(vtpm_uuid) in (0, pid):
            await asyncio.sleep(0.02)
    assert await nv_read(bed, v) == VALUE
    assert mbed.m.log_text().count("op=release") > releases

    # The daemon dies, the vTPM is deleted meanwhile: the next daemon is refused its key and stops the swtpm
    # the dead one left running (it must not go on holding a shredded key); the state stays on disk.
    pid = bed.swtpm_pid(vtpm_uuid)
    assert bed.serve.kill(signal.SIGKILL) == -signal.SIGKILL
    await request(str(mbed.m.socket), {"op": "delete", "domain_uuid": dom, "devid": 0})
    bed.serve.start()
    err = await mbed.error_of(v.paths.backend)
    assert "refused" in err and "no vTPM is provisioned" in err, err
    async with asyncio.timeout(20):
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(0.02)
    assert (mbed.state_dir(vtpm_uuid) / "tpm2" / "tpm2-00.permall").exists()
    await bed.detach_tpm(v)

    # auto_provision (off by default: the other tests' unknown guests are refused): a new guest's first vTPM
    # gets a key bound to its identity.
    assert mbed.m.stop() == 0
    mbed.m.config.write_text(mbed.m.config.read_text() + "auto_provision = true\ndefault_group = \"auto\"\n")
    await asyncio.to_thread(mbed.m.start)
    g2, xs2, dom2 = await mbed.vm("newcomer")
    vtpm2 = str(uuidlib.uuid4())
    v2 = await mbed.mtpm(g2, xs2, vtpm2)
    assert len(await bed.getrandom_raw(v2)) == 8
    shown = await request(str(mbed.m.socket), {"op": "show", "vtpm_uuid": vtpm2})
    assert shown["record"]["domain_uuid"] == dom2 and shown["record"]["group"] == "auto"
    assert shown["record"]["initialized"] is True


def test_the_manager_runs_as_its_own_user(sim: SimProc) -> None:
    """[manager] user: xenstore and the socket opened as root, then setuid; the store and the key file it
    makes belong to that user, and it serves (root, the release/admin uid, still reaches it)."""
    nobody = 65534
    top = Path(tempfile.mkdtemp(prefix="pvbt-", dir="/tmp"))
    try:
        os.chmod(top, 0o711)
        work = top / "w"
        work.mkdir(mode=0o700)
        os.chown(work, nobody, nobody)
        mgr = ManagerProc(sim, top, top)
        mgr.dir, mgr.kek = work / "mgr", work / "kek"
        mgr.prefix = reachable_prefix(top)
        mgr.config.write_text(f'[manager]\nstate_dir = "{mgr.dir}"\nsocket = "{mgr.socket}"\nkek_file = "{mgr.kek}"\n'
                              f'xenstore = "{sim.xenstored}"\nuser = "nobody"\n')
        mgr.start(init=True)
        try:
            status = Path(f"/proc/{mgr.proc.pid if mgr.proc else 0}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            assert uids == [str(nobody)] * 4, uids
            made = asyncio.run(request(str(mgr.socket), {"op": "create", "domain_uuid": str(uuidlib.uuid4()),
                                                          "devid": 0}))
            assert made["record"]["devid"] == 0
            pub = asyncio.run(request(str(mgr.socket), {"op": "transport-key"}))
            assert len(base64.b64decode(pub["public"])) == 32
            for p in (mgr.kek, mgr.dir, *mgr.dir.rglob("*")):
                assert os.lstat(p).st_uid == nobody, p
            assert os.stat(mgr.socket).st_uid == nobody
        finally:
            assert mgr.stop() == 0, mgr.log_text()[-2000:]
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def test_bad_requests_fail_alone_and_the_manager_keeps_serving(mbed: MgrBed) -> None:
    sock = str(mbed.m.socket)

    async def raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(sock)
        try:
            writer.write(data)
            await writer.drain()
            if not data.endswith(b"\n"):
                writer.write_eof()
            return await asyncio.wait_for(reader.readline(), 15)
        finally:
            writer.close()
            await writer.wait_closed()

    for data in (b"not json\n", b"[1, 2]\n", b"{}\n", b'{"op": "format-disk"}\n', b'{"op": "create", "devid": "x"}\n',
                 b'{"op": "create", "domain_uuid": "../../etc/passwd", "devid": 0}\n',
                 b'{"op": "create", "domain_uuid": "3f1c2a4e-0000-4000-8000-00000000000a", "key": 5}\n',
                 b'{"op": "create", "domain_uuid": "3f1c2a4e-0000-4000-8000-00000000000a", "key": "AAAA"}\n',
                 b'{"op": "release", "backend": 5}\n', b'{"op": "release", "backend": {"a": 1}}\n',
                 b'{"op": "show", "devid": 1.5}\n', b'{"op": "export", "vtpm_uuid": "x", "target": "!!"}\n',
                 b'{"op": "import", "bundle": {"version": 1, "devid": []}}\n', b'{"op": "import", "bundle": 7}\n',
                 b'{"op": "release"', b"\xff\xfe\n"):
        answer = await raw(data)
        assert answer.startswith(b'{"error":') and b'"ok":false' in answer, (data[:60], answer)
    # Past the size limit the manager answers and hangs up while the peer is still writing: an error or a reset.
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        answer = await raw(b"x" * (2 << 20) + b"\n")
        assert b'"ok":false' in answer, answer
    assert (await request(sock, {"op": "ping"}))["records"] == 0
    assert "request failed" not in mbed.m.log_text()  # each one refused by a check, none by the catch-all
    assert list((mbed.m.dir / "keys").glob("*-*.*.json")) == []
