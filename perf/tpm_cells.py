"""`pvback bench tpm`: the vTPM backend's per-command latency and its cost at scale, measured in one run.

Latency, per command (TPM2_GetRandom of 32 bytes, TPM2_PCR_Extend of PCR 16 with SHA-256, TPM2_Sign with an
ECDSA P-256 primary key):
  - guest:          an emulated xen-tpmfront (backends/guests/tpmfront.py, in this process) -> tpmif page ->
                    `pvback serve` (its own process) -> swtpm; the frontend blocks in poll() on its event
                    channel between submit and answer (TpmFront.transmit_blocking), as a kernel frontend
                    sleeps on its irq,
  - guest-asyncio:  the same frontend waiting from an asyncio loop (TpmFront.transmit, what the tests and the
                    tpm2-tools socket use),
  - direct:         the same raw command bytes written straight to a swtpm's data socket (blocking socket),
  - direct-asyncio: the same over asyncio streams: what the socket costs from an event loop,
next to the bare eventfd ping-pong (perf/eventfd_pingpong.c) of the same run.  Each path is compared with the
direct path that waits the same way (guest with direct, guest-asyncio with direct-asyncio), and the added p50
is reported as a ratio to the ping-pong's p50.  By construction the guest path has two more cross-process
hand-offs than the direct one (frontend -> daemon, daemon -> frontend: one event-channel round trip), so ~1x
is the floor; the target (guest) is <= 1.5.

Scale: N vTPMs attached at once through the daemon (a fresh `pvback serve`): the time from the toolstack's
write to the first answered command of each (swtpm_setup + swtpm start + the xenbus connect), and the memory
(each swtpm's VmRSS summed, and the daemon's VmRSS growth), per vTPM.

Cells are analysis.Sample rows (store "tpm", workload = the command, system = the path; `iops` = commands per
second), aggregated by perf/analysis.py; the markdown comes from perf/report.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import statistics
import struct
import tempfile
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perf import analysis, runner
from perf.analysis import Cell, CellKey, Sample, Targets
from perf.runner import Progress, Serve, simulator

COMMANDS = ["getrandom32", "pcr_extend", "ecc_sign"]
SYSTEMS = ["direct", "direct-asyncio", "guest", "guest-asyncio"]
STORE = "tpm"  # unpinned: the processes go where the scheduler puts them; compared with the cross-CPU ping-pong
STORE_1CPU = "tpm-1cpu"  # frontend, daemon and both swtpms on one vCPU; compared with the same-CPU ping-pong
SYSTEMS_1CPU = ["direct", "guest"]
PEER = {"direct-asyncio": "direct", "guest": "direct", "guest-asyncio": "direct-asyncio"}  # waits the same way
TARGET_RATIO = 1.5

# ---- raw TPM 2.0 commands (TPM 2.0 Library Part 3; big-endian) ---------------------------------------------

ST_NO_SESSIONS, ST_SESSIONS = 0x8001, 0x8002
CC_GET_RANDOM, CC_PCR_EXTEND, CC_CREATE_PRIMARY, CC_SIGN, CC_FLUSH_CONTEXT = 0x17B, 0x182, 0x131, 0x15D, 0x165
TPM_RS_PW, TPM_RH_OWNER, TPM_RH_NULL = 0x40000009, 0x40000001, 0x40000007
ALG_SHA256, ALG_ECC, ALG_NULL, ALG_ECDSA, ECC_NIST_P256 = 0x000B, 0x0023, 0x0010, 0x0018, 0x0003
ST_HASHCHECK = 0x8024
# fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | sign
SIGN_KEY_ATTRS = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 18)
# authorizationSize, then one password session with an empty password: handle, nonce (empty), attributes, hmac
PW_AUTH = struct.pack(">IIHBH", 9, TPM_RS_PW, 0, 0, 0)
PCR = 16  # resettable, extendable from any locality, empty auth


def tpm_cmd(tag: int, cc: int, body: bytes) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), cc) + body


def get_random(n: int = 32) -> bytes:
    return tpm_cmd(ST_NO_SESSIONS, CC_GET_RANDOM, struct.pack(">H", n))


def pcr_extend(digest: bytes, pcr: int = PCR) -> bytes:
    return tpm_cmd(ST_SESSIONS, CC_PCR_EXTEND,
                   struct.pack(">I", pcr) + PW_AUTH + struct.pack(">IH", 1, ALG_SHA256) + digest)


def create_primary_ecc() -> bytes:
    """An unrestricted ECDSA-SHA256 P-256 signing key under the owner hierarchy (empty auth)."""
    public = (struct.pack(">HHI", ALG_ECC, ALG_SHA256, SIGN_KEY_ATTRS) + struct.pack(">H", 0)  # authPolicy
              + struct.pack(">H", ALG_NULL)  # symmetric
              + struct.pack(">HH", ALG_ECDSA, ALG_SHA256) + struct.pack(">H", ECC_NIST_P256)
              + struct.pack(">H", ALG_NULL)  # kdf
              + struct.pack(">HH", 0, 0))  # unique: empty x, y
    body = (struct.pack(">I", TPM_RH_OWNER) + PW_AUTH + struct.pack(">HHH", 4, 0, 0)  # inSensitive
            + struct.pack(">H", len(public)) + public + struct.pack(">H", 0)  # outsideInfo
            + struct.pack(">I", 0))  # creationPCR: none
    return tpm_cmd(ST_SESSIONS, CC_CREATE_PRIMARY, body)


def sign(handle: int, digest: bytes) -> bytes:
    body = (struct.pack(">I", handle) + PW_AUTH + struct.pack(">H", len(digest)) + digest
            + struct.pack(">HH", ALG_ECDSA, ALG_SHA256) + struct.pack(">HIH", ST_HASHCHECK, TPM_RH_NULL, 0))
    return tpm_cmd(ST_SESSIONS, CC_SIGN, body)


def flush_context(handle: int) -> bytes:
    return tpm_cmd(ST_NO_SESSIONS, CC_FLUSH_CONTEXT, struct.pack(">I", handle))


def rc_of(rsp: bytes) -> int:
    return int(struct.unpack_from(">I", rsp, 6)[0]) if len(rsp) >= 10 else -1


Send = Callable[[bytes], Awaitable[bytes]]


async def make_key(send: Send) -> int:
    rsp = await send(create_primary_ecc())
    if rc_of(rsp) != 0:
        raise RuntimeError(f"TPM2_CreatePrimary answered {rc_of(rsp):#x}")
    return int(struct.unpack_from(">I", rsp, 10)[0])


def command_bytes(name: str, key: int) -> bytes:
    digest = hashlib.sha256(name.encode()).digest()
    if name == "getrandom32":
        return get_random(32)
    if name == "pcr_extend":
        return pcr_extend(digest)
    if name == "ecc_sign":
        return sign(key, digest)
    raise ValueError(name)


# ---- clients ---------------------------------------------------------------------------------------------------


class DirectTpm:
    """A blocking client on a swtpm data socket: the cheapest way to send it a command."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30.0)
        self.sock.connect(str(path))

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("swtpm closed the connection")
            buf += chunk
        return bytes(buf)

    def transmit(self, cmd: bytes) -> bytes:
        self.sock.sendall(cmd)
        head = self._recv(6)
        size = struct.unpack_from(">I", head, 2)[0]
        return head + self._recv(size - 6)

    async def send(self, cmd: bytes) -> bytes:
        return self.transmit(cmd)

    def close(self) -> None:
        self.sock.close()


class AioTpm:
    """The same over asyncio streams, as the driver's client talks to swtpm (one connection at a time: swtpm
    serves a single client on its data socket)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> AioTpm:
        r, w = await asyncio.open_unix_connection(str(path))
        return cls(r, w)

    async def send(self, cmd: bytes) -> bytes:
        self.writer.write(cmd)
        await self.writer.drain()
        head = await self.reader.readexactly(6)
        size = struct.unpack_from(">I", head, 2)[0]
        return head + await self.reader.readexactly(size - 6)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# ---- plan ------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    quick: bool
    reps: int
    rounds: int  # timed commands per (command, system, rep)
    warmup: int
    scale_n: int
    pingpong_rounds: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(quick=True, reps=1, rounds=400, warmup=40, scale_n=8, pingpong_rounds=20_000)
        return cls(quick=False, reps=3, rounds=3000, warmup=200, scale_n=64, pingpong_rounds=100_000)


def pct(xs_ns: list[int], q: float) -> float:
    """The q-quantile (nearest rank) in microseconds."""
    s = sorted(xs_ns)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))] / 1e3 if s else 0.0


def vm_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


# ---- latency ---------------------------------------------------------------------------------------------------


async def _timed(send: Send, cmd: bytes, rounds: int, warmup: int) -> tuple[list[int], int, float]:
    """(latencies in ns, non-zero answers, elapsed s) of `rounds` commands after `warmup` untimed ones."""
    for _ in range(warmup):
        await send(cmd)
    lat: list[int] = []
    errors = 0
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        a = time.perf_counter_ns()
        rsp = await send(cmd)
        lat.append(time.perf_counter_ns() - a)
        if rc_of(rsp) != 0:
            errors += 1
    return lat, errors, (time.perf_counter_ns() - t0) / 1e9


def _sample(store: str, cmd: str, system: str, rep: int, lat: list[int], errors: int, secs: float, cpu_s: float,
            cpu_backend_s: float | None) -> Sample:
    return Sample(store, cmd, system, rep, len(lat) / secs if secs else 0.0, 0.0, pct(lat, 0.50), pct(lat, 0.99),
                  pct(lat, 0.999), cpu_s, cpu_backend_s, secs, errors)


async def run_latency(plan: Plan, work: Path, run_dir: Path, sim_dir: Path, serve: Serve, progress: Progress, *,
                      store: str = STORE, systems: list[str] = SYSTEMS, cpu: int | None = None) -> list[Sample]:
    """The latency cells of `systems`.  `cpu`: this process (the frontend and the direct clients) and the
    direct swtpm run on that vCPU only (the caller pins `serve`, whose swtpm inherits it)."""
    if cpu is None:
        return await _run_latency(plan, work, run_dir, sim_dir, serve, progress, store, systems)
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return await _run_latency(plan, work, run_dir, sim_dir, serve, progress, store, systems)
    finally:
        os.sched_setaffinity(0, allowed)


async def _run_latency(plan: Plan, work: Path, run_dir: Path, sim_dir: Path, serve: Serve, progress: Progress,
                       store: str, systems: list[str]) -> list[Sample]:
    from backends.drivers.tpm.swtpm import Swtpm, SwtpmPaths, ensure_state, private_setup_config
    from backends.guests.guest import Guest
    from backends.guests.tpmfront import TpmFront
    from backends.xenbus.toolstack import add_device, remove_device
    from backends.xenstore.client import XenStoreClient
    from perf.blkload import self_cpu_s, thread_cpu_ns

    samples: list[Sample] = []
    # The direct swtpm: the driver sets it up and starts it as the daemon would.
    paths = SwtpmPaths(state_dir=work / "direct-state", run_dir=run_dir / f"direct-{store}")
    t0 = time.monotonic()
    await ensure_state(paths.state_dir, tpm2=True, vmid="bench-direct",
                       setup_config=await asyncio.to_thread(private_setup_config, work / "ca"))
    sw = Swtpm(paths)
    await sw.start()
    progress(f"direct swtpm pid {sw.pid} up in {time.monotonic() - t0:.2f} s")
    dom0 = await XenStoreClient.connect(str(sim_dir / "xenstored.sock"))
    guest = await asyncio.to_thread(Guest.in_sim, sim_dir, name=f"bench-{store}", mem_pages=64, gnt_entries=64)
    assert guest.xenstore_sock is not None
    gxs = await XenStoreClient.from_socket(guest.xenstore_sock)
    front: TpmFront | None = None
    attached = False
    try:
        await add_device(dom0, backend_domid=0, frontend_domid=guest.domid, type_name="vtpm", devid=0,
                         backend={"uuid": str(uuidlib.uuid4()), "resume": "False"}, frontend={},
                         frontend_type="vtpm")
        attached = True
        front = TpmFront(guest, gxs, 0, timeout=60.0)
        t0 = time.monotonic()
        await front.connect()
        fr = front

        async def guest_send(cmd: bytes) -> bytes:
            return await fr.transmit(cmd, timeout_c=10.0, duration=30.0)

        async def guest_send_blocking(cmd: bytes) -> bytes:
            return fr.transmit_blocking(cmd, timeout_c=10.0, duration=30.0)

        first = await guest_send(get_random(8))
        if rc_of(first) != 0:
            raise RuntimeError(f"the guest's first GetRandom answered {rc_of(first):#x}")
        progress(f"guest vTPM connected in {time.monotonic() - t0:.2f} s")
        # swtpm serves one client at a time on its data socket: each direct cell opens and closes its own.
        d = DirectTpm(paths.sock)
        try:
            direct_key = await make_key(d.send)
        finally:
            d.close()
        guest_key = await make_key(guest_send)
        keys = {"direct": direct_key, "direct-asyncio": direct_key, "guest": guest_key, "guest-asyncio": guest_key}
        for rep in range(plan.reps):
            for cmd_name in COMMANDS:
                for system in systems:
                    cmd = command_bytes(cmd_name, keys[system])
                    blocking = DirectTpm(paths.sock) if system == "direct" else None
                    aio = await AioTpm.open(paths.sock) if system == "direct-asyncio" else None
                    send = (blocking.send if blocking else aio.send if aio else
                            guest_send_blocking if system == "guest" else guest_send)
                    try:
                        c0, b0 = self_cpu_s(), thread_cpu_ns(serve.pid)
                        lat, errors, secs = await _timed(send, cmd, plan.rounds, plan.warmup)
                        c1, b1 = self_cpu_s(), thread_cpu_ns(serve.pid)
                    finally:
                        if blocking:
                            blocking.close()
                        if aio:
                            await aio.close()
                    # CPU of the frontend/client (this process) and, on the guest path, the daemon; swtpm's own
                    # is the same work on every path and is left out.
                    be = (b1 - b0) / 1e9 if system.startswith("guest") else None
                    s = _sample(store, cmd_name, system, rep, lat, errors, secs, (c1 - c0) + (be or 0.0), be)
                    samples.append(s)
                    progress(f"{store:8s} {cmd_name:11s} {system:14s} rep {rep}: p50 {s.p50_us:8.1f} us p99 "
                             f"{s.p99_us:8.1f} us ({s.iops:7.0f}/s, {errors} errors)")
        with contextlib.suppress(Exception):
            await guest_send(flush_context(keys["guest"]))
    finally:
        if front is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await front.close()
        if attached:
            with contextlib.suppress(Exception):
                await remove_device(dom0, backend_domid=0, frontend_domid=guest.domid, type_name="vtpm", devid=0,
                                    frontend_type="vtpm", timeout=10.0)
        if front is not None:
            with contextlib.suppress(Exception):
                await front.release(revoke_timeout=1.0)
        await sw.stop()
        with contextlib.suppress(Exception):
            await gxs.close()
        guest.close()
        await dom0.close()
    return samples


# ---- scale -----------------------------------------------------------------------------------------------------


async def run_scale(n: int, work: Path, run_dir: Path, sim_dir: Path, serve: Serve,
                    progress: Progress) -> dict[str, Any]:
    """N vTPMs attached at once; start-up time of each (attach -> first answered command) and memory."""
    from backends.guests.guest import Guest
    from backends.guests.tpmfront import TpmFront
    from backends.xenbus.state import XenbusState as S
    from backends.xenbus.toolstack import add_device, remove_device
    from backends.xenstore.client import XenStoreClient

    dom0 = await XenStoreClient.connect(str(sim_dir / "xenstored.sock"))
    guests: list[tuple[Any, XenStoreClient]] = []
    fronts: list[TpmFront] = []
    attached: list[int] = []
    toolstacks: list[XenStoreClient] = []  # one connection per attach, as N `pvback attach` processes have
    try:
        for i in range(n):
            toolstacks.append(await XenStoreClient.connect(str(sim_dir / "xenstored.sock")))
            g = await asyncio.to_thread(Guest.in_sim, sim_dir, name=f"bench-tpm-{i}", mem_pages=16, gnt_entries=16)
            assert g.xenstore_sock is not None
            guests.append((g, await XenStoreClient.from_socket(g.xenstore_sock)))
        await asyncio.sleep(0.5)
        rss0 = vm_rss_kib(serve.pid)
        uuids = [str(uuidlib.uuid4()) for _ in range(n)]

        phases: dict[str, list[float]] = {"initwait_s": [0.0] * n, "connected_s": [0.0] * n}

        async def one(i: int) -> float:
            g, gxs = guests[i]
            # All N toolstack transactions at once (they conflict on backend/vtpm and retry until they commit);
            # each start-up is timed from the start of its own attach.
            t0 = time.monotonic()
            await add_device(toolstacks[i], backend_domid=0, frontend_domid=g.domid, type_name="vtpm", devid=0,
                             backend={"uuid": uuids[i], "resume": "False"}, frontend={}, frontend_type="vtpm")
            attached.append(i)
            front = TpmFront(g, gxs, 0, timeout=max(60.0, 3.0 * n))
            fronts.append(front)
            front.be_path = f"/local/domain/0/backend/vtpm/{g.domid}/0"
            await front.wait_backend({S.INIT_WAIT, S.CONNECTED})
            phases["initwait_s"][i] = time.monotonic() - t0
            await front.connect()
            phases["connected_s"][i] = time.monotonic() - t0
            rsp = await front.transmit(get_random(8), timeout_c=10.0, duration=60.0)
            if rc_of(rsp) != 0:
                raise RuntimeError(f"vTPM {i}: GetRandom answered {rc_of(rsp):#x}")
            return time.monotonic() - t0

        t_all = time.monotonic()
        async with asyncio.timeout(60.0 + 5.0 * n):
            startup = list(await asyncio.gather(*(one(i) for i in range(n))))
        wall = time.monotonic() - t_all
        await asyncio.sleep(0.3)
        rss1 = vm_rss_kib(serve.pid)
        pids = [int((run_dir / u / "swtpm.pid").read_text()) for u in uuids]
        swtpm_kib = [vm_rss_kib(p) for p in pids]
        res = {
            "n": n, "wall_s": wall, "startup_s": startup,
            "startup_p50_s": statistics.median(startup), "startup_max_s": max(startup),
            "startup_min_s": min(startup), "wall_per_vtpm_s": wall / n, **phases,
            "swtpm_rss_kib": swtpm_kib, "swtpm_rss_total_kib": sum(swtpm_kib),
            "swtpm_rss_per_vtpm_kib": sum(swtpm_kib) / n,
            "daemon_rss_before_kib": rss0, "daemon_rss_after_kib": rss1,
            "daemon_rss_growth_per_vtpm_kib": (rss1 - rss0) / n,
            "memory_per_vtpm_kib": (sum(swtpm_kib) + rss1 - rss0) / n,
        }
        progress(f"scale {n} vTPMs: all up in {wall:.2f} s (per vTPM p50 {res['startup_p50_s']:.2f} s, max "
                 f"{res['startup_max_s']:.2f} s, wall/N {wall / n:.2f} s); swtpm RSS {sum(swtpm_kib) / n:.0f} "
                 f"KiB/vTPM, daemon +{(rss1 - rss0) / n:.0f} KiB/vTPM")
        return res
    finally:
        for f in fronts:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await f.close()

        async def unplug(i: int) -> None:
            with contextlib.suppress(Exception):
                await remove_device(dom0, backend_domid=0, frontend_domid=guests[i][0].domid, type_name="vtpm",
                                    devid=0, frontend_type="vtpm", timeout=10.0)

        await asyncio.gather(*(unplug(i) for i in attached))
        for f in fronts:
            with contextlib.suppress(Exception):
                await f.release(revoke_timeout=1.0)
        for g, gxs in guests:
            with contextlib.suppress(Exception):
                await gxs.close()
            g.close()
        for ts in toolstacks:
            await ts.close()
        await dom0.close()


def kill_leftover_swtpms(run_dir: Path) -> int:
    """swtpm processes of this run still alive (pid files under our run dir), killed by PID."""
    n = 0
    for pidfile in run_dir.glob("*/swtpm.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text())
            if str(run_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                n += 1
    return n


# ---- the run ---------------------------------------------------------------------------------------------------


def vtpm_serve(work: Path, sim_dir: Path, name: str, run_dir: Path, *, cpus: set[int] | None = None) -> Serve:
    vtpm: dict[str, int | str] = {"state_dir": str(work / f"state-{name}"), "run_dir": str(run_dir),
                                  "localities": "0"}
    return Serve(work, sim_dir, name, serve_keys={"backend_types": ["vtpm"]}, sections={"vtpm": vtpm},
                 settings={"backend_types": ["vtpm"], **vtpm}, cpus=cpus)


def run_all(plan: Plan, work: Path, progress: Progress) -> dict[str, Any]:
    from perf.bench_event import cpu_modes, pingpong

    pp: dict[str, Any] = {}
    pp_after: dict[str, Any] = {}
    load = {"before": os.getloadavg()[0]}
    for mode in cpu_modes():
        r = pingpong(mode, plan.pingpong_rounds)
        pp[mode] = r.__dict__
        progress(f"eventfd ping-pong {mode}: p50 {r.p50_us:.2f} us p99 {r.p99_us:.2f} us")
    # Unix socket paths are short: the run directory lives under /tmp.
    run_dir = Path(tempfile.mkdtemp(prefix="pvbtb-", dir="/tmp"))
    samples: list[Sample] = []
    scale: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    try:
        with simulator(work) as sim_dir:
            serve = vtpm_serve(work, sim_dir, "lat", run_dir)
            settings["lat"] = serve.settings
            try:
                samples = asyncio.run(run_latency(plan, work, run_dir, sim_dir, serve, progress))
            finally:
                serve.close()
            # Everything on one vCPU: the placement the same-CPU ping-pong is measured in (its parent's CPU).
            cpu = cpu_modes()["same-cpu"][0]
            serve = vtpm_serve(work, sim_dir, "lat1cpu", run_dir, cpus={cpu})
            settings["lat1cpu"] = {**serve.settings, "cpus": [cpu]}
            try:
                samples += asyncio.run(run_latency(plan, work, run_dir, sim_dir, serve, progress, store=STORE_1CPU,
                                                   systems=SYSTEMS_1CPU, cpu=cpu))
            finally:
                serve.close()
            load["after_latency"] = os.getloadavg()[0]
            # Again after the latency cells: on a shared machine the ping-pong moves by 2x within minutes, and
            # the reader should see how far it moved around the cells it is the yardstick of.
            for mode in cpu_modes():
                r = pingpong(mode, plan.pingpong_rounds)
                pp_after[mode] = r.__dict__
                progress(f"eventfd ping-pong {mode} (after the latency cells): p50 {r.p50_us:.2f} us")
            if plan.scale_n:
                serve = vtpm_serve(work, sim_dir, "scale", run_dir)
                settings["scale"] = serve.settings
                try:
                    try:
                        scale = asyncio.run(run_scale(plan.scale_n, work, run_dir, sim_dir, serve, progress))
                    except Exception as exc:
                        runner.failed(progress, f"scale {plan.scale_n}", exc)
                        scale = {"n": plan.scale_n, "error": str(exc)}
                finally:
                    serve.close()
                load["after_scale"] = os.getloadavg()[0]
    finally:
        if kill_leftover_swtpms(run_dir):
            progress("killed swtpm processes left behind")
        shutil.rmtree(run_dir, ignore_errors=True)
    # Added latency vs the ping-pong in the placement the path runs in: unpinned processes on a machine with
    # two CPUs or more meet across CPUs.
    ref = "cross-cpu" if "cross-cpu" in pp else "same-cpu"
    return {"samples": [s.__dict__ for s in samples], "pingpong": pp, "pingpong_after": pp_after,
            "pingpong_ref": ref, "scale": scale, "serve_settings": settings, "loadavg_1min": load}


def relate_to(pingpong_p50_us: Mapping[str, float]) -> analysis.Relate:
    """Added latency against the peer path, as a ratio to the ping-pong of the store's placement."""

    def relate(c: Cell, by: Mapping[CellKey, Cell]) -> None:
        if c["system"] not in PEER:
            return
        peer = by.get((c["store"], c["workload"], PEER[c["system"]]))
        if not peer or not peer["p50_us"]:
            return
        c["added_p50_us"] = c["p50_us"] - peer["p50_us"]
        c["added_p99_us"] = c["p99_us"] - peer["p99_us"]
        c["ratio_p50_to_direct"] = c["p50_us"] / peer["p50_us"]
        c["peer"] = PEER[c["system"]]
        pp = pingpong_p50_us.get(c["store"], 0.0)
        c["pingpong_p50_us"] = pp
        c["ratio_added_p50_to_pingpong"] = c["added_p50_us"] / pp if pp else None

    return relate


def aggregate(samples: list[dict[str, Any]], pingpong_p50_us: Mapping[str, float]) -> list[Cell]:
    return analysis.aggregate(samples, relate=relate_to(pingpong_p50_us), workload_order=COMMANDS)


def evaluate_targets(cells: list[Cell], scale: dict[str, Any]) -> list[dict[str, Any]]:
    t = Targets()
    for c in cells:
        if c["system"] == "guest" and c.get("ratio_added_p50_to_pingpong") is not None:
            where = "unpinned" if c["store"] == STORE else "one vCPU"
            t.add(f"vtpm {c['workload']} added p50 vs eventfd ping-pong ({where})", c["ratio_added_p50_to_pingpong"],
                  TARGET_RATIO, f"guest {c['p50_us']:.1f} us - direct {c['p50_us'] - c['added_p50_us']:.1f} us = "
                  f"{c['added_p50_us']:.1f} us vs ping-pong {c['pingpong_p50_us']:.2f} us", higher=False)
    return t.rows


def main(quick: bool, out: str, *, argv: list[str] | None = None, plan: Plan | None = None) -> int:
    from perf.report import target_lines, tpm_markdown

    plan = plan or Plan.make(quick)
    if runner.tools_missing("pvback bench tpm", ("swtpm", "swtpm_setup", "gcc")):
        return 1

    def body(out_dir: Path, work: Path, progress: Progress) -> int:
        host = runner.host_description({})
        progress(f"{runner.host_line(host)}; "
                 f"{plan.reps} rep(s) x {plan.rounds} commands per cell, scale N = {plan.scale_n}")
        runner.FAILURES.clear()
        raw = run_all(plan, work, progress)
        pp = raw["pingpong"]
        pp_p50 = {STORE: float(pp[raw["pingpong_ref"]]["p50_us"]), STORE_1CPU: float(pp["same-cpu"]["p50_us"])}
        cells = aggregate(raw["samples"], pp_p50)
        targets = evaluate_targets(cells, raw["scale"])
        result = {
            **runner.result_head(argv, f"pvback bench tpm{' --quick' if quick else ''} --out {out}", host, plan),
            "swtpm": runner.run_text(["swtpm", "--version"]),
            "serve_settings": raw["serve_settings"],
            "failures": list(runner.FAILURES),
            "pingpong": raw["pingpong"], "pingpong_after": raw["pingpong_after"],
            "pingpong_ref": raw["pingpong_ref"], "loadavg_1min": raw["loadavg_1min"],
            "cells": cells, "targets": targets, "scale": raw["scale"], "samples": raw["samples"],
        }
        runner.write_report(out_dir, "bench-tpm", result, tpm_markdown(result), target_lines(targets))
        return 0

    return runner.run_bench(out, "pvback-bench-tpm-", body)
