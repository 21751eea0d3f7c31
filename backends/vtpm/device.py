"""The vTPM backend's device class: the lifecycle callbacks the bus calls for each `backend/vtpm` device.

realize: read the toolstack's `uuid`/`version`/`resume`, advertise `feature-protocol-v2`, and start preparing the
vTPM in the background: create its state once (swtpm_setup: EK and certificates), start its swtpm (or adopt the
one a previous daemon left running).  realize does not wait for that: libxl gives a backend 10 s to reach
InitWait (LIBXL_INIT_TIMEOUT) and `xl create` fails past it, while swtpm_setup took 15 s in the real-Xen e2e
(dom0 under QEMU TCG; ~1.5 s natively).  connect waits for the preparation (a failure fails the device).
connect: map the frontend's one page and bind its event channel (both or neither),
answer what a previous daemon left in the page (restart note), then serve: every event copies the page once
into private memory and hands the copy to `proto.Machine`; a command goes to swtpm from a task, so the loop
never waits on a TPM.  disconnect: wait (bounded) for the command in flight, unmap, unbind.  unrealize: stop
swtpm gracefully (CMD_SHUTDOWN), or leave it running for the next daemon when the daemon restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.drivers.tpm.keymgr import (
    ManagerError,
    ManagerRefused,
    ManagerUnavailable,
    Release,
    mark_initialized,
    release_key,
)
from backends.drivers.tpm.link import SwtpmLink
from backends.drivers.tpm.swtpm import Swtpm, SwtpmError, SwtpmPaths, ensure_state, private_setup_config
from backends.vtpm.proto import (
    DATA_OFFSET,
    NOTE_TAKEN,
    OFF_LENGTH,
    OFF_PAD,
    OFF_STATE,
    PAGE_SIZE,
    Action,
    Answered12,
    CancelTpm,
    ClearNote,
    Command,
    Execute,
    Fail,
    Machine,
    Note,
    ProtocolError,
    Respond,
    State,
    Version,
    connect_keys,
    parse_frontend,
    parse_localities,
    parse_resume,
    parse_uuid,
    parse_version,
    probe_keys,
)
from backends.xenbus.device import DeviceError
from backends.xenbus.state import XenbusState

if TYPE_CHECKING:
    from backends.platform.base import EventChannel, GrantMapping
    from backends.vtpm.config import VtpmConfig
    from backends.xenbus.device import BackendDevice

log = logging.getLogger("pvback.vtpm")

_FE_VALUE_MAX = 32
SOCKET_PATH_MAX = 107  # sun_path
LATENCY_WINDOW = 1024  # commands the p50 is taken over
# swtpm restarts allowed within RESTART_WINDOW_S before the device fails (a TPM that keeps crashing).
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0
DRAIN_S = 5.0  # how long a disconnect waits for the command in flight
CLAIM_WAIT_S = 10.0  # how long a device waits for another one to let go of its vTPM
MANAGER_RETRY_S = (0.2, 2.0)  # first and longest pause between attempts to reach a manager that is down


@dataclass
class VtpmData:
    """Per-device state (BackendDevice.data)."""

    uuid: str
    version: Version
    swtpm: Swtpm
    resume: bool
    fresh: bool  # swtpm was started (not adopted) by this realize and has seen no guest yet
    machine: Machine | None = None
    page: GrantMapping | None = None
    view: memoryview | None = None  # page.buffer(), made once per connection (it costs ~1 us per call)
    evtchn: EventChannel | None = None
    locality: int | None = None  # what swtpm was last told
    link: SwtpmLink | None = None  # the data socket to swtpm while connected
    busy: bool = False  # a command taken from the page is not answered yet
    command_task: asyncio.Task[None] | None = None  # a command's slow start (restart wait, locality), if any
    cancel_task: asyncio.Task[None] | None = None
    restart_task: asyncio.Task[None] | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    failed: bool = False
    commands: int = 0
    cancels: int = 0
    tpm12: dict[str, int] = field(default_factory=dict)  # TPM 1.2 commands to a 2.0 vTPM, answered here
    notes: dict[str, int] = field(default_factory=dict)
    latencies_us: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    hist: list[int] = field(default_factory=lambda: [0] * 32)
    restarts: list[float] = field(default_factory=list)
    prepare: asyncio.Task[None] | None = None  # state creation + swtpm start (realize does not wait for it)
    manager_retries: int = 0  # attempts to reach a vTPM manager that was down
    encrypted: bool = False  # the state key came from the vTPM manager

    @property
    def errors(self) -> int:
        return sum(self.notes.values())

    def p50_us(self) -> int | None:
        if not self.latencies_us:
            return None
        return sorted(self.latencies_us)[len(self.latencies_us) // 2]

    def record(self, us: int) -> None:
        self.latencies_us.append(us)
        self.hist[min(max(us, 0).bit_length(), len(self.hist) - 1)] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "queues": [{
                "requests": {"command": self.commands, "cancel": self.cancels,
                             **{f"tpm12_{k}": v for k, v in self.tpm12.items()}},
                "errors": {k.replace(" ", "_"): v for k, v in self.notes.items()},
                "latency_us_log2": list(self.hist) if any(self.hist) else [],
                "inflight": int(self.busy),
            }],
            "vtpm": self.summary(),
            "status": self.status_values(),
        }

    def status_values(self) -> dict[str, float]:
        """Numbers for `pvback status` (pvback_device_status; devtype.status_columns renders them)."""
        out: dict[str, float] = {"version": 2.0 if self.version is Version.TPM2 else 1.2,
                                 "swtpm_pid": float(self.swtpm.pid or 0), "swtpm_restarts": float(len(self.restarts)),
                                 "manager_retries": float(self.manager_retries)}
        p50 = self.p50_us()
        if p50 is not None:
            out["p50_us"] = float(p50)
        return out

    def summary(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "version": self.version.value, "swtpm_pid": self.swtpm.pid,
                "commands": self.commands, "errors": self.errors, "cancels": self.cancels,
                "p50_us": self.p50_us(), "swtpm_restarts": len(self.restarts),
                "tpm12_answered": sum(self.tpm12.values()), "encrypted": self.encrypted,
                "manager_retries": self.manager_retries}


class VtpmDeviceClass:
    connect_states = frozenset({XenbusState.INITIALISED, XenbusState.CONNECTED})

    def __init__(self, cfg: VtpmConfig, type_names: tuple[str, ...] = ("vtpm",)) -> None:
        self.cfg = cfg
        self.type_names = type_names
        self.allowed = parse_localities(cfg.localities)
        self.in_use: dict[str, tuple[str, asyncio.Event]] = {}  # vTPM uuid -> (backend path, set when released)

    # -- realize / unrealize ----------------------------------------------------------------------------

    async def realize(self, dev: BackendDevice) -> None:
        try:
            uuid = parse_uuid(await dev.read_backend("uuid"))
            version = parse_version(await dev.read_backend("version"), Version(self.cfg.default_version))
            resume = parse_resume(await dev.read_backend("resume"))
        except ProtocolError as exc:
            raise DeviceError(f"bad toolstack keys: {exc}") from exc
        await self._claim(dev, uuid)
        try:
            await self._realize(dev, uuid, version, resume)
        except BaseException:
            self._unclaim(dev, uuid)
            raise

    async def _claim(self, dev: BackendDevice, uuid: str) -> None:
        """One device per vTPM.  A guest that reboots gets a new device while the old one may still be letting
        go of the vTPM (Closed is written before unrealize when the frontend closes): wait for it, bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLAIM_WAIT_S
        while (owner := self.in_use.get(uuid)) is not None and owner[0] != dev.backend_path:
            left = deadline - loop.time()
            if left <= 0:
                raise DeviceError(f"vTPM {uuid} is already in use by {owner[0]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(owner[1].wait(), left)
        self.in_use[uuid] = (dev.backend_path, asyncio.Event())

    def _unclaim(self, dev: BackendDevice, uuid: str) -> None:
        owner = self.in_use.get(uuid)
        if owner is not None and owner[0] == dev.backend_path:
            del self.in_use[uuid]
            owner[1].set()

    async def _realize(self, dev: BackendDevice, uuid: str, version: Version, resume: bool) -> None:
        tpm2 = version is Version.TPM2
        state_dir = Path(self.cfg.state_dir) / uuid / ("tpm2" if tpm2 else "tpm12")
        paths = SwtpmPaths(state_dir=state_dir, run_dir=Path(self.cfg.run_dir) / uuid)
        if len(str(paths.ctrl)) > SOCKET_PATH_MAX:
            raise DeviceError(f"[vtpm] run_dir is too long for unix sockets ({paths.ctrl})")
        swtpm = Swtpm(paths, tpm2=tpm2, swtpm_bin=self.cfg.swtpm)
        data = VtpmData(uuid=uuid, version=version, swtpm=swtpm, resume=resume, fresh=True)
        swtpm.on_exit = lambda _s: self._on_swtpm_exit(dev, data)
        data.prepare = asyncio.get_running_loop().create_task(self._prepare(dev, data, state_dir))
        dev.data = data
        await dev.write_backend(probe_keys())
        dev.log.info("realized", extra={"uuid": uuid, "version": version.value})

    async def _prepare(self, dev: BackendDevice, data: VtpmData, state_dir: Path) -> None:
        """The slow half of realize, in the background: the vTPM's state (once) and its swtpm.  A failure fails
        the device (error node, Closing) whether or not the frontend has come yet; connect re-raises it."""
        t0 = time.monotonic()
        tpm2 = data.version is Version.TPM2
        setup_cfg = Path(self.cfg.setup_config) if self.cfg.setup_config else None
        release: Release | None = None
        try:
            if self.cfg.manager_socket:
                try:
                    release = await self._release(dev, data)
                except DeviceError:
                    # A swtpm a previous daemon left running must not go on holding a key no longer released.
                    with contextlib.suppress(SwtpmError, OSError):
                        if await data.swtpm.stop_leftover():
                            dev.log.warning("vtpm: stopped the swtpm left running for a vTPM whose key was "
                                            "not released")
                    raise
            key = release.key if release is not None else None
            try:
                if setup_cfg is None:
                    setup_cfg = await asyncio.to_thread(private_setup_config, Path(self.cfg.state_dir) / "ca")
                vmid = f"d{dev.frontend_id}:{data.uuid}"
                # A vTPM the manager knows as created never gets a fresh state in place of a missing one.
                created = await ensure_state(state_dir, tpm2=tpm2, vmid=vmid, setup_config=setup_cfg,
                                             swtpm_setup=self.cfg.swtpm_setup, key=key,
                                             must_exist=release is not None and release.initialized)
            except (SwtpmError, OSError) as exc:
                raise DeviceError(f"cannot create the vTPM state: {exc}") from exc
            try:
                await data.swtpm.start(key)
            except (SwtpmError, OSError) as exc:
                if key is not None:
                    raise DeviceError(f"swtpm cannot open the vTPM state with the key the vTPM manager released "
                                      f"(the state is kept as it was; no new TPM is made): {exc}") from exc
                raise DeviceError(f"cannot start swtpm: {exc}") from exc
            if release is not None and not release.initialized:
                try:
                    await mark_initialized(self.cfg.manager_socket, dev.backend_path)
                except ManagerError as exc:  # the state exists and works: say so, serve anyway
                    dev.log.warning("vtpm: cannot tell the manager the state was created: %s", exc)
        except DeviceError as exc:
            await dev.fail(str(exc))
            raise
        finally:
            if release is not None:
                release.wipe()
        data.fresh = not data.swtpm.adopted
        dev.log.info("vtpm ready", extra={"uuid": data.uuid, "swtpm_pid": data.swtpm.pid,
                                          "adopted": data.swtpm.adopted, "state_created": created,
                                          "seconds": round(time.monotonic() - t0, 2)})

    async def _release(self, dev: BackendDevice, data: VtpmData) -> Release:
        """The state key from the vTPM manager.  A manager that is down is waited for (retries counted in
        status) up to [vtpm] manager_wait_s; a refusal fails the device at once with the manager's reason."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.manager_wait_s
        pause = MANAGER_RETRY_S[0]
        while True:
            try:
                release = await release_key(self.cfg.manager_socket, dev.backend_path)
                data.encrypted = True
                if data.manager_retries:
                    dev.log.info("vtpm: the vTPM manager answered", extra={"retries": data.manager_retries})
                return release
            except ManagerRefused as exc:
                raise DeviceError(f"the vTPM manager refused the state key: {exc}") from exc
            except ManagerUnavailable as exc:
                if loop.time() + pause > deadline:
                    raise DeviceError(f"no vTPM manager within {self.cfg.manager_wait_s:.0f} s "
                                      f"({data.manager_retries} retries): {exc}") from exc
                if data.manager_retries == 0:
                    dev.log.warning("vtpm: waiting for the vTPM manager: %s", exc)
                data.manager_retries += 1
            except ManagerError as exc:
                raise DeviceError(f"the vTPM manager: {exc}") from exc
            await asyncio.sleep(pause)
            pause = min(pause * 2, MANAGER_RETRY_S[1])

    @staticmethod
    async def _prepared(data: VtpmData) -> None:
        """Wait for the background half of realize (each of its steps is bounded); its DeviceError, if any."""
        if data.prepare is not None:
            await asyncio.shield(data.prepare)

    async def unrealize(self, dev: BackendDevice) -> None:
        data: VtpmData | None = dev.data
        if data is None:
            return
        await self.disconnect(dev)
        if data.prepare is not None and not data.prepare.done():
            data.prepare.cancel()
        if data.prepare is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await data.prepare
        if data.restart_task is not None:
            data.restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await data.restart_task
        if dev.restarting:
            data.swtpm.release()  # the next daemon adopts it: the guest's TPM keeps its volatile state
        else:
            await data.swtpm.stop(graceful=True)
        self._unclaim(dev, data.uuid)
        dev.log.info("unrealized", extra=data.summary())
        dev.data = None

    # -- connect / disconnect ---------------------------------------------------------------------------

    async def connect(self, dev: BackendDevice) -> None:
        data: VtpmData = dev.data
        await self._prepared(data)
        keys: dict[str, str] = {}
        for key in ("ring-ref", "event-channel", "feature-protocol-v2"):
            v = await dev.read_frontend(key, max_len=_FE_VALUE_MAX)
            if v is not None:
                keys[key] = v
        try:
            fe = parse_frontend(keys)
        except ProtocolError as exc:
            raise DeviceError(f"frontend keys: {exc}") from exc
        # A frontend that (re)initialised is a guest that booted: its TPM resets like a machine's, keeping NV.
        # A daemon restart finds the frontend Connected and leaves the TPM as it was; so does a restore.
        rebooted = dev.frontend_state is XenbusState.INITIALISED
        if rebooted and not data.fresh and not data.resume:
            try:
                await data.swtpm.reset()
                data.locality = 0
            except (SwtpmError, OSError) as exc:
                raise DeviceError(f"cannot reset the TPM: {exc}") from exc
        data.fresh = data.resume = False
        try:
            page, evtchn = dev.connect_ring([fe.ring_ref], fe.event_channel)
        except (OSError, ValueError) as exc:
            dev.release_frontend_domain()
            raise DeviceError(f"cannot map the shared page: {exc}") from exc
        data.page, data.evtchn, data.view = page, evtchn, page.buffer()
        data.machine = Machine(data.version, self.allowed)
        data.failed = False
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(evtchn.fileno(), self._on_event, dev, data)
            self._apply(dev, data, data.machine.recover(bytes(page.buffer())))
        except BaseException:
            await self.disconnect(dev)
            raise
        evtchn.notify()  # a daemon killed between writing an answer and notifying left the guest waiting
        await dev.write_backend(connect_keys())
        dev.log.info("connected", extra={"ring_ref": fe.ring_ref, "event_channel": fe.event_channel,
                                         "reset": rebooted})

    async def disconnect(self, dev: BackendDevice) -> None:
        data: VtpmData | None = dev.data
        if data is None:
            return
        if data.evtchn is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(data.evtchn.fileno())
        # Answer the command in flight while the page is still mapped; past DRAIN_S leave the restart note for
        # whoever connects next.  Polled: a future per command to wait on here would cost every command.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_S
        while data.busy and loop.time() < deadline:
            await asyncio.sleep(0.005)
        task = data.command_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for t in list(data.tasks):
            t.cancel()
        data.command_task = None
        data.busy = False
        if data.link is not None:
            data.link.close()  # an answer still owed goes nowhere: the note stays set
            data.link = None
        if data.view is not None:
            data.view.release()
            data.view = None
        if data.page is not None:
            data.page.unmap()
            data.page = None
        if data.evtchn is not None:
            data.evtchn.close()
            data.evtchn = None
        dev.release_frontend_domain()
        data.machine = None

    # -- the data path ----------------------------------------------------------------------------------

    def _on_event(self, dev: BackendDevice, data: VtpmData) -> None:
        evtchn, view, machine = data.evtchn, data.view, data.machine
        if evtchn is None or view is None or machine is None or data.failed:
            return
        try:
            evtchn.pending()
        except OSError:
            return
        copy = bytes(view)  # the only read of the shared page for this event
        self._apply(dev, data, machine.on_page(copy))
        with contextlib.suppress(OSError):
            evtchn.unmask()

    def _apply(self, dev: BackendDevice, data: VtpmData, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Execute):
                self._set_pad(data, NOTE_TAKEN)  # before swtpm can see it: the restart note
                data.commands += 1
                self._execute(dev, data, a.command)
            elif isinstance(a, Respond):
                self._respond(data, a.data, a.state)
            elif isinstance(a, CancelTpm):
                data.cancels += 1
                data.cancel_task = self._spawn(data, self._cancel(dev, data))
            elif isinstance(a, Note):
                data.notes[a.reason] = data.notes.get(a.reason, 0) + 1
                if data.notes[a.reason] == 1:
                    dev.log.warning("vtpm: %s", a.reason, extra={"reason": a.reason})
            elif isinstance(a, ClearNote):
                self._set_pad(data, 0)
            elif isinstance(a, Answered12):
                data.tpm12[a.kind] = data.tpm12.get(a.kind, 0) + 1
                if sum(data.tpm12.values()) == 1:
                    dev.log.info("vtpm: the guest sends TPM 1.2 commands to this TPM 2.0 (Linux xen-tpmfront "
                                 "registers a 1.2 chip): answered by pvback", extra={"ordinal": a.ordinal,
                                                                                     "answer": a.kind})
            elif isinstance(a, Fail):
                data.failed = True
                data.notes["protocol"] = data.notes.get("protocol", 0) + 1
                self._spawn(data, dev.fail(f"frontend broke tpmif: {a.message}"))

    def _spawn(self, data: VtpmData, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        data.tasks.add(task)
        task.add_done_callback(data.tasks.discard)
        return task

    @staticmethod
    def _set_pad(data: VtpmData, value: int) -> None:
        if data.view is not None:
            data.view[OFF_PAD] = value

    @staticmethod
    def _respond(data: VtpmData, rsp: bytes, state: State) -> None:
        """The answer, its length, the state, then the note cleared (a crash between the last two leaves a
        note on a finished page: recover clears it), then the event."""
        buf = data.view
        if buf is None or data.evtchn is None:
            return
        if len(rsp) > PAGE_SIZE - DATA_OFFSET:
            raise ValueError("answer larger than the page")
        buf[DATA_OFFSET:DATA_OFFSET + len(rsp)] = rsp
        struct.pack_into("<I", buf, OFF_LENGTH, len(rsp))
        buf[OFF_STATE] = int(state)
        buf[OFF_PAD] = 0
        with contextlib.suppress(OSError):
            data.evtchn.notify()

    def _execute(self, dev: BackendDevice, data: VtpmData, cmd: Command) -> None:
        """Send the command to swtpm.  The common case (swtpm up, locality unchanged) is one non-blocking send
        from this callback, and the answer comes back through the link's reader callback: no task, no
        coroutine, no future to resume per command (those cost more daemon CPU than the whole event channel
        round trip).  A restart in progress or a locality change goes through a task first."""
        data.busy = True
        t0 = time.monotonic()
        restarting = data.restart_task is not None and not data.restart_task.done()
        if not restarting and data.locality == cmd.locality:
            self._send(dev, data, cmd, t0)
        else:
            data.command_task = self._spawn(data, self._slow_start(dev, data, cmd, t0))

    async def _slow_start(self, dev: BackendDevice, data: VtpmData, cmd: Command, t0: float) -> None:
        try:
            if data.restart_task is not None and not data.restart_task.done():
                await asyncio.wait_for(asyncio.shield(data.restart_task), self.cfg.command_timeout_s)
            if data.locality != cmd.locality:
                await data.swtpm.set_locality(cmd.locality)
                data.locality = cmd.locality
        except asyncio.CancelledError:
            raise
        except (TimeoutError, OSError, SwtpmError) as exc:
            self._answered(dev, data, cmd, t0, None, exc)
            return
        self._send(dev, data, cmd, t0)

    def _send(self, dev: BackendDevice, data: VtpmData, cmd: Command, t0: float) -> None:
        if data.link is None:
            data.link = SwtpmLink(data.swtpm.paths.sock)
        data.link.send(cmd.data, self.cfg.command_timeout_s,
                       lambda rsp, exc: self._answered(dev, data, cmd, t0, rsp, exc))

    def _answered(self, dev: BackendDevice, data: VtpmData, cmd: Command, t0: float, rsp: bytes | None,
                  exc: BaseException | None) -> None:
        """swtpm's answer (or why there is none: timeout, swtpm gone or broken) to the command in the page."""
        if isinstance(exc, TimeoutError):
            data.notes["timeout"] = data.notes.get("timeout", 0) + 1
            dev.log.warning("vtpm: command %#x timed out after %.0f s", cmd.ordinal, self.cfg.command_timeout_s)
        elif exc is not None:
            data.notes["tpm_error"] = data.notes.get("tpm_error", 0) + 1
            dev.log.warning("vtpm: swtpm failed under command %#x: %s", cmd.ordinal, exc)
        data.record(int((time.monotonic() - t0) * 1e6))
        data.busy = False
        if data.machine is None or data.view is None:
            return
        cancel_seen = data.view[OFF_STATE] == State.CANCEL  # one byte: IDLE rather than FINISH
        self._apply(dev, data, data.machine.on_answer(rsp if exc is None else None, cancel_seen=cancel_seen))

    async def _cancel(self, dev: BackendDevice, data: VtpmData) -> None:
        try:
            await data.swtpm.cancel(timeout=self.cfg.command_timeout_s)
        except (OSError, SwtpmError, TimeoutError) as exc:
            dev.log.info("vtpm: cancel not delivered: %s", exc)

    # -- swtpm supervision ------------------------------------------------------------------------------

    def _on_swtpm_exit(self, dev: BackendDevice, data: VtpmData) -> None:
        if dev.data is not data or (data.restart_task is not None and not data.restart_task.done()):
            return
        data.restart_task = asyncio.get_running_loop().create_task(self._restart(dev, data))

    async def _restart(self, dev: BackendDevice, data: VtpmData) -> None:
        now = time.monotonic()
        data.restarts = [t for t in data.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(data.restarts) > MAX_RESTARTS:
            await dev.fail(f"swtpm exited {len(data.restarts)} times in {RESTART_WINDOW_S:.0f} s")
            return
        data.locality = None
        release: Release | None = None
        try:
            if self.cfg.manager_socket:
                release = await self._release(dev, data)
            await data.swtpm.start(release.key if release is not None else None)
        except (SwtpmError, OSError, DeviceError) as exc:
            await dev.fail(f"swtpm exited and cannot be restarted: {exc}")
            return
        finally:
            if release is not None:
                release.wipe()
        dev.log.warning("vtpm: swtpm restarted with its state", extra={"swtpm_pid": data.swtpm.pid})
