"""The generic backend device and the bus that owns xenstore for it (QEMU xen-bus design).

A device class (blk, net, vtpm) supplies only realize/connect/disconnect/unrealize; `XenBus` watches
`backend/<type>` for each of its type names, creates one `BackendDevice` per `<frontend-id>/<devid>` and runs
`state.BackendMachine` for it.  Every device has one runner task: watch events only set a flag (they coalesce,
and an event storm costs one re-read, XSA-349), the runner re-reads the whole observation and carries out what
the machine says, so class callbacks of one device never overlap.  A class callback that raises fails that
device only: an `error` node, Closing, and nothing else in the process is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from backends.xenbus.state import (
    Action,
    BackendMachine,
    Connect,
    Disconnect,
    Observation,
    Phase,
    Realize,
    Reconfigure,
    ReportError,
    SetState,
    Unrealize,
    XenbusState,
)

if TYPE_CHECKING:
    from backends.platform.base import EventChannel, GrantMapping, Platform
    from backends.xenstore.client import Transaction, XenStoreClient

log = logging.getLogger("pvback.xenbus")
T = TypeVar("T")

# A frontend may write anything into its own directory; these bound what we accept from it.
FRONTEND_STR_MAX = 256
ERROR_MESSAGE_MAX = 1024  # xenstored's default entry size quota is 2048
_DEC = re.compile(r"[0-9]{1,20}")
_HEX = re.compile(r"(?:0[xX])?[0-9a-fA-F]{1,16}")
_KEY = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
_FRONTEND_PATH = re.compile(r"/local/domain/([0-9]{1,5})/device/([a-z][a-z0-9_-]{0,31})/([0-9]{1,10})")


class DeviceError(Exception):
    """Fails one device: the message goes into its `error` node and the device goes Closing."""


class _Gone(DeviceError):
    """The backend directory disappeared under us; never recreate it by writing into it."""


class DeviceClass(Protocol):
    """What a device type gives the bus.  Optional, read with getattr (defaults in brackets):

    - `hotplug_gate: bool` [False]: after connect, hold the backend's Connected until `hotplug-status` in the
      backend dir says "connected" (the class writes it once its device is plugged, e.g. a tap in its switch;
      an external hotplug script may too).  "error" fails the device with `hotplug-error`.
    - `watch_backend_keys` / `watch_frontend_keys: tuple[str, ...]` [()]: keys whose changes while the device
      is realized are delivered to `async key_changed(dev, side, key, value)` (side "backend"/"frontend",
      value None when absent): netback's `rate` and `request-multicast-control`.
    - `async reconfigure_frontend(dev)`: a connected frontend went Reconfiguring (it rewrote some keys and
      waits); the class re-reads what it honours while its data path keeps running, then the bus answers
      Reconfigured, and Connected once the frontend is.  A class without it leaves such a frontend waiting.
      Raising DeviceError fails the device.
    """

    type_names: tuple[str, ...]
    connect_states: frozenset[XenbusState]

    async def realize(self, dev: BackendDevice) -> None: ...
    async def connect(self, dev: BackendDevice) -> None: ...
    async def disconnect(self, dev: BackendDevice) -> None: ...
    async def unrealize(self, dev: BackendDevice) -> None: ...


HOTPLUG_STATUS = "hotplug-status"


class _DeviceLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds the device path to every record while keeping the caller's own `extra` fields."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def _show(raw: bytes) -> str:
    """A guest-supplied value, quoted and cut short, fit for a log line or an error node."""
    return repr(raw[:40]) + ("..." if len(raw) > 40 else "")


def parse_state(raw: bytes | None) -> XenbusState | None:
    """Absent -> UNKNOWN; anything but a decimal 0..8 -> None (garbage)."""
    if raw is None:
        return XenbusState.UNKNOWN
    text = raw.decode("ascii", "replace")
    if not _DEC.fullmatch(text) or int(text) > max(XenbusState):
        return None
    return XenbusState(int(text))


class BackendDevice:
    """One backend device, owned by the bus; what a DeviceClass sees.

    `data` is the class's own per-device object (set it in realize).  `stats` holds counters for metrics.
    """

    def __init__(self, bus: XenBus, cls: DeviceClass, type_name: str, frontend_id: int, devid: int) -> None:
        self.bus = bus
        self.cls = cls
        self.platform: Platform = bus.platform
        self.xs: XenStoreClient = bus.xs
        self.type_name = type_name
        self.frontend_id = frontend_id
        self.devid = devid
        self.backend_domid = bus.backend_domid
        self.backend_rel = f"backend/{type_name}/{frontend_id}/{devid}"
        self.backend_path = f"{bus.home}/{self.backend_rel}"
        self.frontend_path = ""  # set once the toolstack's `frontend` key has been checked
        self.log = _DeviceLog(log, {"device": self.backend_path})
        self.stats: dict[str, int] = {}
        self.data: Any = None
        self.frontend_state = XenbusState.UNKNOWN
        self.hotplug_gate = bool(getattr(cls, "hotplug_gate", False))
        self.machine = BackendMachine(cls.connect_states, hotplug_gate=self.hotplug_gate,
                                      reconfigurable=hasattr(cls, "reconfigure_frontend"))
        self._watched = [("backend", k) for k in getattr(cls, "watch_backend_keys", ())] + \
            [("frontend", k) for k in getattr(cls, "watch_frontend_keys", ())]
        self._watched_values: dict[tuple[str, str], bytes | None] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._pending_failures: list[str] = []
        self._stop: bool | None = None  # None: running; else stop(close=<value>) requested
        self._close_timeout = 0.0
        self._task: asyncio.Task[None] | None = None
        self._fe_watch: Any = None
        self._fe_task: asyncio.Task[None] | None = None
        self._removed = False
        self._domain_held = False
        self._frontend_seen = False  # the frontend's state key has been read at least once
        self.done = asyncio.Event()

    @property
    def busy(self) -> bool:
        """Work is queued or running (tests use it to let the device settle)."""
        return self._wake.is_set() or self._lock.locked()

    @property
    def restarting(self) -> bool:
        """The bus is stopping without closing this device (a daemon restart: the frontend stays Connected and
        the next daemon reconnects it).  A class may keep per-device helpers (a vTPM's swtpm) running."""
        return self._stop is False

    @property
    def state(self) -> XenbusState:
        """The backend state as last written or observed."""
        return self.machine.backend

    def __repr__(self) -> str:
        return f"<BackendDevice {self.backend_path} {self.state.name} fe={self.frontend_state.name}>"

    # -- the API for device classes -------------------------------------------------------------------------

    async def read_backend(self, key: str) -> str | None:
        raw = await self._read(f"{self.backend_path}/{_check_key(key)}")
        if raw is None:
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise DeviceError(f"backend key {key}={_show(raw)} is not UTF-8") from None

    async def read_frontend(self, key: str, *, max_len: int = FRONTEND_STR_MAX) -> str | None:
        """A frontend string, or None if absent.  Longer than `max_len` bytes, not UTF-8, or holding NUL or
        control characters: DeviceError."""
        raw = await self._read_frontend_raw(key)
        if raw is None:
            return None
        if len(raw) > max_len:
            raise DeviceError(f"frontend key {key} is {len(raw)} bytes long (at most {max_len})")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise DeviceError(f"frontend key {key}={_show(raw)} is not UTF-8") from None
        if any(ord(c) < 0x20 or c == "\x7f" for c in text):
            raise DeviceError(f"frontend key {key}={_show(raw)} holds control characters")
        return text

    async def read_frontend_int(self, key: str, lo: int, hi: int, default: int | None = None, *,
                                base: int = 10) -> int:
        """A frontend integer in [lo, hi].  Decimal digits only (base=16: hex digits, optional 0x); no sign,
        no spaces, no leading '+'.  Absent: `default`, or DeviceError when there is none."""
        raw = await self._read_frontend_raw(key)
        if raw is None:
            if default is None:
                raise DeviceError(f"frontend key {key} is missing")
            return default
        text = raw.decode("ascii", "replace")
        pattern = _HEX if base == 16 else _DEC
        if base not in (10, 16) or not pattern.fullmatch(text):
            what = "hexadecimal" if base == 16 else "decimal"
            raise DeviceError(f"frontend key {key}={_show(raw)} is not a {what} number")
        value = int(text, base)
        if not lo <= value <= hi:
            raise DeviceError(f"frontend key {key}={value} is out of range [{lo}, {hi}]")
        return value

    async def write_backend(self, values: dict[str, str]) -> None:
        """Write keys into the backend dir in one transaction (a frontend never sees half of them)."""
        checked = {_check_key(k): v for k, v in values.items()}

        async def body(tx: Transaction) -> None:
            await self._require_backend_dir(tx)
            for k, v in checked.items():
                await tx.write(f"{self.backend_path}/{k}", v)

        await self._transaction(body)

    async def notify_frontend(self, values: dict[str, str] | None = None) -> None:
        """Rewrite `values` and the current `state` in one transaction so the frontend's watch on our state
        fires and it re-reads them (how a resize is announced: write `sectors`, rewrite Connected).  Waits for
        the device's runner to be idle, except when called from this device's own callbacks."""
        checked = {_check_key(k): v for k, v in (values or {}).items()}

        async def body(tx: Transaction) -> None:
            await self._require_backend_dir(tx)
            for k, v in checked.items():
                await tx.write(f"{self.backend_path}/{k}", v)
            state = await tx.read_str(f"{self.backend_path}/state")
            await tx.write(f"{self.backend_path}/state", state if state is not None else str(int(self.state)))

        if self._in_runner():
            await self._transaction(body)
        else:
            async with self._lock:
                await self._transaction(body)

    # -- rings and event channels: the set-up every data path does, with its unwinding -----------------------

    def hold_frontend_domain(self) -> None:
        """Make the frontend's grants reachable (the platform's open_domain), once until released."""
        if not self._domain_held:
            self.platform.open_domain(self.frontend_id)
            self._domain_held = True

    def release_frontend_domain(self) -> None:
        """Undo hold_frontend_domain; idempotent (disconnect paths call it whatever happened before)."""
        if self._domain_held:
            self._domain_held = False
            self.platform.close_domain(self.frontend_id)

    def connect_ring(self, refs: list[int], port: int, *, writable: bool = True) -> tuple[GrantMapping,
                                                                                           EventChannel]:
        """Map the frontend's ring pages and bind its event channel: both or neither (the mapping is undone
        when the bind fails).  Holds the frontend domain first.  Raises GrantError/OSError/ValueError."""
        self.hold_frontend_domain()
        ring = self.platform.map_grants(self.frontend_id, list(refs), writable=writable)
        try:
            evtchn = self.platform.bind_interdomain(self.frontend_id, port)
        except BaseException:
            ring.unmap()
            raise
        return ring, evtchn

    async def fail(self, message: str) -> None:
        """Fail this device from anywhere (a ring pump that saw a bogus request, a driver error).  Returns at
        once; the runner writes the error node, disconnects and goes Closing."""
        self._pending_failures.append(message)
        self._wake.set()

    # -- internals --------------------------------------------------------------------------------------------

    def _in_runner(self) -> bool:
        return self._task is not None and asyncio.current_task() is self._task

    async def _read(self, path: str) -> bytes | None:
        from backends.xenstore.client import XenStoreError

        try:
            return await self.xs.read(path)
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return None
            # In a driver domain xenstored answers EACCES, not ENOENT, for a frontend node that is gone: it
            # judges the nearest existing ancestor, the guest's home, which only the guest and dom0 may read.
            if exc.name == "EACCES" and not path.startswith(self.backend_path + "/"):
                return None
            raise

    async def _read_frontend_raw(self, key: str) -> bytes | None:
        if not self.frontend_path:
            raise DeviceError("the frontend path is not trusted")
        return await self._read(f"{self.frontend_path}/{_check_key(key)}")

    async def _transaction(self, body: Callable[[Transaction], Awaitable[T]]) -> T:
        return await self.xs.transaction(body)

    async def _require_backend_dir(self, tx: Transaction) -> None:
        if not await tx.exists(self.backend_path):
            raise _Gone(f"{self.backend_path} was removed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"xenbus {self.backend_path}")
        self._wake.set()

    async def _check_frontend(self) -> None:
        """Trust the `frontend` key only if the toolstack wrote the canonical path for this device; read once."""
        fe_id = await self._read(f"{self.backend_path}/frontend-id")
        if fe_id is None or fe_id.decode("ascii", "replace") != str(self.frontend_id):
            shown = "missing" if fe_id is None else _show(fe_id)
            raise DeviceError(f"frontend-id is {shown}, expected {self.frontend_id} (the directory name)")
        raw = await self._read(f"{self.backend_path}/frontend")
        text = (raw or b"").decode("ascii", "replace")
        m = _FRONTEND_PATH.fullmatch(text)
        if m is None or m.group(1) != str(self.frontend_id) or m.group(3) != str(self.devid):
            shown = "missing" if raw is None else _show(raw)
            raise DeviceError(
                f"frontend is {shown}, expected /local/domain/{self.frontend_id}/device/<type>/{self.devid}"
            )
        self.frontend_path = text
        self._fe_watch = await self.xs.watch(self.frontend_path)
        self._fe_task = asyncio.get_running_loop().create_task(
            self._follow_frontend(self._fe_watch), name=f"xenbus frontend {self.frontend_path}"
        )

    async def _follow_frontend(self, watch: Any) -> None:
        with contextlib.suppress(Exception):  # a lost connection also ends the runner's own reads
            async for _path in watch:
                self._wake.set()

    async def _observe(self) -> Observation | None:
        """None when the backend dir is gone.  A garbage frontend state fails the device once and then counts
        as Unknown, so a frontend cannot keep the runner busy by leaving it there."""
        if not await self.xs.exists(self.backend_path):
            return None
        backend = parse_state(await self._read(f"{self.backend_path}/state"))
        online = await self._read(f"{self.backend_path}/online")
        frontend = XenbusState.UNKNOWN
        if self.frontend_path:
            raw = await self._read(f"{self.frontend_path}/state")
            parsed = parse_state(raw)
            if parsed is None:
                if not self.machine.failed:
                    self._pending_failures.append(f"frontend state {_show(raw or b'')} is not a xenbus state")
            else:
                frontend = parsed
                self._frontend_seen = True
        self.frontend_state = frontend
        self.stats["observations"] = self.stats.get("observations", 0) + 1
        plugged = True
        if self.hotplug_gate:
            status = await self._read(f"{self.backend_path}/{HOTPLUG_STATUS}")
            plugged = status == b"connected"
            if status == b"error" and not self.machine.failed:
                why = await self._read(f"{self.backend_path}/hotplug-error")
                self._pending_failures.append(f"hotplug failed: {_show(why) if why else 'no hotplug-error given'}")
        return Observation(
            frontend=frontend,
            backend=backend if backend is not None else XenbusState.UNKNOWN,
            online=(online or b"").strip() != b"0",
            plugged=plugged,
        )

    async def _run(self) -> None:
        try:
            async with self._lock:
                try:
                    await self._check_frontend()
                except DeviceError as exc:
                    self._pending_failures.append(str(exc))
            while self.machine.phase is not Phase.STOPPED:
                await self._wake.wait()
                self._wake.clear()
                async with self._lock:
                    if self._stop is not None:
                        await self._shut(self._stop)
                        break
                    await self._step()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Only xenstore connection failures get here (class errors are handled per action).
            self.log.exception("device runner failed")
        finally:
            await self._release()

    async def _step(self) -> None:
        while self._pending_failures:
            msg = self._pending_failures.pop(0)
            if not self.machine.failed:
                await self._execute(self.machine.failed_with(msg), feed_failures=False)
        ob = await self._observe()
        if self._pending_failures:  # _observe found garbage
            self._wake.set()
            return
        if ob is None:
            self._removed = True
            await self._execute(self.machine.removed(), feed_failures=False)
            return
        if ob.frontend is XenbusState.UNKNOWN:
            if await self.bus.domain_dead(self.frontend_id):
                await self._retire()
                return
            if not self.bus.sees_domains and ob.online and self._frontend_seen and await self._frontend_dir_gone():
                await self._retire_offline()
                return
        await self._execute(self.machine.observe(ob), feed_failures=True)
        if self._watched and self.machine.phase is Phase.LIVE and self.data is not None:
            await self._deliver_watched()

    async def _deliver_watched(self) -> None:
        """Hand the class each watched key that changed since it last saw it (the first look counts as a
        change).  A key the class refuses (DeviceError) fails the device like any class error."""
        for side, key in self._watched:
            base = self.backend_path if side == "backend" else self.frontend_path
            if not base:
                continue
            raw = await self._read(f"{base}/{_check_key(key)}")
            if (side, key) in self._watched_values and self._watched_values[(side, key)] == raw:
                continue
            self._watched_values[(side, key)] = raw
            value = None if raw is None else raw.decode("utf-8", "replace")
            try:
                await self.cls.key_changed(self, side, key, value)  # type: ignore[attr-defined]
            except DeviceError as exc:
                await self._execute(self.machine.failed_with(str(exc)), feed_failures=False)
                return

    async def _retire(self) -> None:
        """The frontend's domain is gone: let go of everything (pumps, mappings, the image), say Closed, and
        remove the nodes `pvback attach` made, as libxl removes its own; the toolstack removes the rest."""
        self.log.info("frontend domain %d is gone: releasing the device", self.frontend_id)
        await self._execute(self.machine.stop(close=True), feed_failures=False)
        if await self.bus.remove_if_attached(self.backend_path, self.frontend_path):
            self._removed = True

    async def _frontend_dir_gone(self) -> bool:
        """The frontend's directory, readable to us until now, no longer is: removed (ENOENT, or EACCES where
        xenstored judges the guest's home instead, as it does for a driver domain)."""
        from backends.xenstore.client import XenStoreError

        try:
            return not await self.xs.exists(self.frontend_path)
        except XenStoreError as exc:
            if exc.name == "EACCES":
                return True
            raise

    async def _retire_offline(self) -> None:
        """The toolstack removed the frontend but left this backend online.  libxl 4.17 does so when it destroys
        a guest whose qdisk disks live in a driver domain (its QEMU bodge writes no `online=0` for a dying
        guest), then waits 10 s for the driver domain to remove the backend, which `xl devd` there only does
        once it sees Closed with online=0.  Say both, so devd stops the guest's device model and removes the
        directory; without it the directory and the device model stay behind for good."""
        self.log.info("the frontend directory is gone but the backend is still online: releasing the device "
                      "and marking it offline for the toolstack to remove", extra={"frontend": self.frontend_path})
        await self._execute(self.machine.stop(close=True), feed_failures=False)

        async def body(tx: Transaction) -> None:
            await self._require_backend_dir(tx)
            await tx.write(f"{self.backend_path}/online", "0")

        with contextlib.suppress(_Gone):
            await self._transaction(body)

    async def _execute(self, actions: list[Action], *, feed_failures: bool) -> None:
        for action in actions:
            try:
                await self._do(action)
                continue
            except _Gone:
                self._wake.set()  # the next step sees the removal
                return
            except DeviceError as exc:
                msg = str(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.exception("%s raised", type(action).__name__)
                msg = f"{type(action).__name__.lower()} failed: {type(exc).__name__}: {exc}"
            self.stats["errors"] = self.stats.get("errors", 0) + 1
            if feed_failures:
                await self._execute(self.machine.failed_with(msg, action), feed_failures=False)
            else:
                self.log.error("while failing the device: %s", msg)
            self._wake.set()  # re-observe: the frontend may have moved on meanwhile
            return

    async def _do(self, action: Action) -> None:
        if isinstance(action, Realize):
            self.log.info("realize")
            await self.cls.realize(self)
        elif isinstance(action, Connect):
            self.log.info("connect", extra={"frontend": self.frontend_path})
            self._watched_values.clear()  # a new connection hears every watched key afresh
            await self.cls.connect(self)
            self.stats["connects"] = self.stats.get("connects", 0) + 1
        elif isinstance(action, Reconfigure):
            self.log.info("reconfigure")
            await self.cls.reconfigure_frontend(self)  # type: ignore[attr-defined]
        elif isinstance(action, Disconnect):
            self.log.info("disconnect")
            await self.cls.disconnect(self)
        elif isinstance(action, Unrealize):
            self.log.info("unrealize")
            await self.cls.unrealize(self)
        elif isinstance(action, SetState):
            await self._write_state(action.state)
        elif isinstance(action, ReportError):
            await self._write_error(action.message)

    async def _write_state(self, state: XenbusState) -> None:
        async def body(tx: Transaction) -> None:
            await self._require_backend_dir(tx)
            await tx.write(f"{self.backend_path}/state", str(int(state)))

        await self._transaction(body)
        self.log.info("state -> %s", state.name,
                      extra={"state": state.name, "frontend_state": self.frontend_state.name})

    async def _write_error(self, message: str) -> None:
        message = message[:ERROR_MESSAGE_MAX]
        self.log.error("device failed: %s", message)

        # Where Linux's xenbus_dev_error puts it (relative to the domain's home), plus the backend dir
        # where QEMU and people look; never recreate a removed backend dir.
        async def body(tx: Transaction) -> None:
            await self._require_backend_dir(tx)
            await tx.write(f"{self.backend_path}/error", message)
            await tx.write(self._error_tree_path(), message)

        await self._transaction(body)

    def _error_tree_path(self) -> str:
        return f"{self.bus.home}/error/{self.backend_rel}/error"

    async def _shut(self, close: bool) -> None:
        if close:
            await self._execute(self.machine.closing_for_stop(), feed_failures=False)
            if self.machine.backend is XenbusState.CLOSING and self.frontend_path:
                await self._wait_frontend_closed(self._close_timeout)
        await self._execute(self.machine.stop(close=close), feed_failures=False)

    async def _wait_frontend_closed(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            state = parse_state(await self._read(f"{self.frontend_path}/state"))
            if state in (XenbusState.CLOSED, XenbusState.UNKNOWN, None):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.log.warning("frontend did not close in %.1f s, closing anyway", timeout)
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    async def _release(self) -> None:
        if self._fe_task is not None:
            self._fe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._fe_task
        if self._fe_watch is not None:
            with contextlib.suppress(Exception):
                await self._fe_watch.close()
            self._fe_watch = None
        if self._removed:
            # The toolstack destroyed the device: do not leave its error report behind (entry quota).
            with contextlib.suppress(Exception):
                await self.xs.rm(f"{self.bus.home}/error/{self.backend_rel}")
        self.bus._forget(self)
        self.done.set()

    async def _request_stop(self, close: bool, timeout: float) -> None:
        self._stop = close
        self._close_timeout = timeout
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)


def _check_key(key: str) -> str:
    """Keys come from class code, not from guests; a bad one is a programming error."""
    if not _KEY.fullmatch(key) or ".." in key.split("/"):
        raise ValueError(f"bad xenstore key {key!r}")
    return key


class XenBus:
    """Serves every device of the registered classes under this domain's `backend/` directory."""

    def __init__(self, platform: Platform, xs: XenStoreClient, classes: list[DeviceClass], *,
                 backend_domid: int) -> None:
        self.platform = platform
        self.xs = xs
        self.backend_domid = backend_domid
        self.home = f"/local/domain/{backend_domid}"
        self.classes: dict[str, DeviceClass] = {}
        for cls in classes:
            for name in cls.type_names:
                if name in self.classes:
                    raise ValueError(f"two device classes claim backend type {name!r}")
                if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name):
                    raise ValueError(f"bad backend type name {name!r}")
                self.classes[name] = cls
        self.devices: dict[str, BackendDevice] = {}  # by backend path
        self._ask_introduced = True  # xenstored may refuse IS_DOMAIN_INTRODUCED to a driver domain
        # False once xenstored refused us another domain's home (a driver domain): a guest's death is then
        # only seen as its directories going away.
        self.sees_domains = True
        self._watches: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._rechecks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopping = False

    async def start(self) -> None:
        """Watch `backend/<type>` for every type name; the initial watch event serves existing devices."""
        if self._started:
            raise RuntimeError("XenBus already started")
        self._started = True
        loop = asyncio.get_running_loop()
        for name in self.classes:
            watch = await self.xs.watch(f"{self.home}/backend/{name}")
            self._watches.append(watch)
            self._tasks.append(loop.create_task(self._follow_type(name, watch), name=f"xenbus backend/{name}"))
        released = await self.xs.watch("@releaseDomain")
        self._watches.append(released)
        self._tasks.append(loop.create_task(self._follow_releases(released), name="xenbus @releaseDomain"))

    async def _follow_releases(self, watch: Any) -> None:
        """A domain died: every device re-observes, and one whose frontend domain is gone retires."""
        try:
            async for _path in watch:
                for dev in list(self.devices.values()):
                    dev._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the watch on @releaseDomain ended: devices of dead domains stay until removed")

    async def domain_dead(self, domid: int) -> bool:
        """The domain no longer exists: its home `/local/domain/<domid>` is gone (libxl removes it before
        destroying the domain, the emulated platform when the guest's process goes) and, where xenstored lets us
        ask, it is no longer introduced.  Both, so a directory written by hand (tests, a toolstack mid-create)
        never counts as a dead domain, and a live domain never does."""
        from backends.xenstore.client import XenStoreError

        if domid in (0, self.backend_domid):
            return False
        try:
            if await self.xs.exists(f"/local/domain/{domid}"):
                return False
        except XenStoreError as exc:
            if exc.name != "EACCES":
                raise
            # A driver domain may not read another domain's home (libxl gives it to the domain and dom0 only),
            # nor ask IS_DOMAIN_INTRODUCED: it cannot tell, so the domain counts as alive and its devices go when
            # the toolstack removes their backend directories (libxl does when it destroys the domain).
            self.sees_domains = False
            return False
        if self._ask_introduced:
            try:
                return not await self.xs.is_domain_introduced(domid)
            except XenStoreError as exc:
                log.info("xenstored does not answer IS_DOMAIN_INTRODUCED (%s): a domain without a home "
                         "directory counts as gone", exc.name)
                self._ask_introduced = False
        return True

    async def remove_if_attached(self, backend_path: str, frontend_path: str) -> bool:
        """Remove a device's nodes if `pvback attach` made them (it marks the backend dir); True if removed."""
        from backends.xenbus.toolstack import ATTACHED_MARK

        async def body(tx: Transaction) -> bool:
            if await tx.read_str(f"{backend_path}/{ATTACHED_MARK}") != "1":
                return False
            for path in (frontend_path, backend_path):
                if path and await tx.exists(path):
                    await tx.rm(path)
            return True

        removed: bool = await self.xs.transaction(body)
        if removed:
            log.info("removed %s and its frontend: made by `pvback attach` for a domain that is gone", backend_path)
        return removed

    async def stop(self, *, close_devices: bool, close_timeout: float = 5.0) -> None:
        """Stop watching and let go of every device.  close_devices=False leaves xenstore untouched (the
        frontends stay Connected and a new bus reconnects them); True closes each device, giving a connected
        frontend `close_timeout` seconds to answer Closing first."""
        self._stopping = True
        for task in list(self._rechecks):
            task.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for watch in self._watches:
            with contextlib.suppress(Exception):
                await watch.close()
        self._tasks.clear()
        self._watches.clear()
        devices = list(self.devices.values())
        await asyncio.gather(*(d._request_stop(close_devices, close_timeout) for d in devices))

    def _forget(self, dev: BackendDevice) -> None:
        if self.devices.get(dev.backend_path) is not dev:
            return
        del self.devices[dev.backend_path]
        if dev._removed and self._started and not self._stopping:
            # The toolstack may have re-added the device at the same path (a quick detach + attach) while the
            # old one was still shutting down: that event woke the old device, so nothing else will look again.
            task = asyncio.get_running_loop().create_task(
                self._recheck(dev.type_name, dev.frontend_id, dev.devid), name=f"xenbus recheck {dev.backend_path}")
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)

    async def _recheck(self, name: str, fe: int, devid: int) -> None:
        try:
            if f"{self.home}/backend/{name}/{fe}/{devid}" not in self.devices:
                await self._maybe_create(name, str(fe), str(devid))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("looking again at backend/%s/%d/%d", name, fe, devid)

    async def _follow_type(self, name: str, watch: Any) -> None:
        root = f"{self.home}/backend/{name}"
        try:
            async for path in watch:
                try:
                    await self._on_event(name, root, path)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # One bad event (a racing toolstack, a device that vanished mid-read) must not end the watch.
                    log.exception("handling watch event %s", path)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the watch on %s ended: no new %s devices will be served", root, name)

    async def _on_event(self, name: str, root: str, path: str) -> None:
        if path != root and not path.startswith(root + "/"):
            return
        parts = path[len(root) + 1:].split("/") if path != root else []
        if len(parts) >= 2:
            key = f"{root}/{parts[0]}/{parts[1]}"
            dev = self.devices.get(key)
            if dev is not None:
                dev._wake.set()
            else:
                await self._maybe_create(name, parts[0], parts[1])
            return
        # The type dir or a frontend's dir changed (initial event, or a whole subtree added/removed): rescan.
        fe_names = parts[:1] if parts else await self._list(root)
        seen: set[str] = set()
        for fe in fe_names:
            for devid in await self._list(f"{root}/{fe}"):
                seen.add(f"{root}/{fe}/{devid}")
                if f"{root}/{fe}/{devid}" in self.devices:
                    self.devices[f"{root}/{fe}/{devid}"]._wake.set()
                else:
                    await self._maybe_create(name, fe, devid)
        prefix = f"{root}/{parts[0]}/" if parts else f"{root}/"
        for bpath, dev in list(self.devices.items()):
            if bpath.startswith(prefix) and bpath not in seen:
                dev._wake.set()  # it will find its dir gone

    async def _list(self, path: str) -> list[str]:
        from backends.xenstore.client import XenStoreError

        try:
            return await self.xs.directory(path)
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return []
            raise

    async def _maybe_create(self, name: str, fe: str, devid: str) -> None:
        if not (_DEC.fullmatch(fe) and _DEC.fullmatch(devid)) or int(fe) > 0xFFFF or int(devid) >= 1 << 31:
            log.warning("ignoring backend entry %s/%s/%s: not <frontend-domid>/<devid>", name, fe, devid)
            return
        path = f"{self.home}/backend/{name}/{fe}/{devid}"
        # A toolstack that does not use a transaction may still be writing: wait for both keys to appear.
        for key in ("frontend", "frontend-id"):
            if not await self.xs.exists(f"{path}/{key}"):
                return
        if await self.domain_dead(int(fe)):
            # Left behind by a domain that died while nobody served it (or that this bus just retired): never
            # open its storage again; clean up what `pvback attach` made.
            frontend = await self.xs.read_str(f"{path}/frontend")
            m = _FRONTEND_PATH.fullmatch(frontend or "")
            await self.remove_if_attached(path, frontend if frontend and m and m.group(1) == fe else "")
            return
        dev = BackendDevice(self, self.classes[name], name, int(fe), int(devid))
        if dev.backend_path != path:  # "007" and "7" must not make two devices
            log.warning("ignoring backend entry %s: non-canonical number", path)
            return
        self.devices[path] = dev
        dev.log.info("new device")
        dev.start()
