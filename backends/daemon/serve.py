"""`pvback serve`: the daemon.

One process serves every configured backend directory of its domain.  A device's failure stays with that
device (the bus turns class errors into an `error` node).  SIGTERM/SIGINT drain in-flight I/O and leave every
device Connected in xenstore, so a restarted daemon picks the rings up again and the frontend sees no more
than a pause.  SIGHUP re-reads the configuration; a bad file is refused and the running one kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from backends.daemon.config import Config, ConfigError, load_config
from backends.daemon.connect import (
    check_xen_nodes,
    connect_xenstore,
    probe_broker,
    resolve_kind,
    sim_socket,
)
from backends.daemon.errors import CliError

log = logging.getLogger("pvback.serve")
XS_CHECK_S = 1.0  # how often the main loop checks that xenstore is still there


class Daemon:
    """One XenBus per served backend type, all on one xenstore connection: a reload that adds or drops a type
    starts or stops that type's bus alone, and devices of the other types are not touched."""

    def __init__(self, cfg: Config, config_path: str | None, overrides: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        # Command-line settings win over the file on every reload too (--metrics, --types, --platform...).
        self.overrides = overrides or {}
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.platform: Any = None
        self.xs: Any = None
        self.buses: dict[str, Any] = {}
        self.classes: dict[str, Any] = {}
        self.metrics: Any = None
        # The user the daemon dropped to (None: it runs as started) and the capabilities it kept.
        self.user: Any = None
        self.kept_capabilities: set[str] = set()

    @property
    def devices(self) -> dict[str, Any]:
        """Every device of every bus, by backend path (what the metrics endpoint walks)."""
        out: dict[str, Any] = {}
        for bus in list(self.buses.values()):
            out.update(bus.devices)
        return out

    def _open_platform(self) -> None:
        from backends.platform import open_platform
        from backends.platform.base import PlatformError

        kind = resolve_kind(self.cfg.platform.kind)
        sim_dir = self.cfg.platform.sim_dir
        if kind == "xen":
            check_xen_nodes()
        else:
            probe_broker(sim_socket(sim_dir, "broker.sock"))
            sim_socket(sim_dir, "xenstored.sock")
        try:
            self.platform = open_platform(kind, sim_dir=sim_dir)
        except PlatformError as exc:
            raise CliError(str(exc)) from exc
        except PermissionError as exc:
            raise CliError(f"{exc.filename or exc}: permission denied: run pvback as root") from exc

    def _needs(self, types: list[str]) -> Any:
        from backends.daemon.privdrop import Needs
        from backends.xenbus.registry import for_backend_type

        needs = Needs()
        needs.add(device_nodes=self.platform.reopened_nodes)
        for type_name in types:
            dt = for_backend_type(type_name)
            p = dt.privileges(self.cfg.section(dt.name))
            needs.add(p.capabilities, p.device_nodes, p.dirs)
        return needs

    def _drop_privileges(self) -> None:
        from backends.daemon.devtypes import load_device_types
        from backends.daemon.privdrop import PrivDropError, drop_privileges

        needs = self._needs(self.cfg.serve.backend_types)
        # Every type's directories, served or not: a reload may add a type, and after the drop nothing can be
        # handed over any more.  Capabilities stay those of the served types.
        for dt in load_device_types():
            needs.add(dirs=dt.privileges(self.cfg.section(dt.name)).dirs)
        try:
            self.user = drop_privileges(self.cfg.daemon.user, needs)
        except PrivDropError as exc:
            raise CliError(str(exc)) from exc
        except OSError as exc:
            raise CliError(f"preparing to drop root: {exc.filename}: {exc.strerror or exc}") from exc
        self.kept_capabilities = set(needs.capabilities) if self.user is not None else set()

    def _held(self, type_name: str) -> bool:
        """A type added by a reload can only be served with what the daemon kept at start."""
        if self.user is None:
            return True
        missing = self._needs([type_name]).capabilities - self.kept_capabilities
        if missing:
            log.error("not serving a type added by reload: restart pvback to serve it (capabilities are "
                      "dropped at start)", extra={"type": type_name, "needs": ",".join(sorted(missing))})
            return False
        return True

    async def _start_type(self, type_name: str) -> None:
        from backends.xenbus.device import XenBus
        from backends.xenbus.registry import for_backend_type

        dt = for_backend_type(type_name)
        cls = dt.device_class(self.cfg.section(dt.name), (type_name,))
        bus = XenBus(self.platform, self.xs, [cls], backend_domid=self.platform.backend_domid)
        await bus.start()  # the initial watch event serves the devices that already exist (restart recovery)
        self.classes[type_name], self.buses[type_name] = cls, bus

    async def _stop_type(self, type_name: str) -> None:
        """Let go of the type's devices without touching xenstore: they stay Connected for whoever serves
        them next."""
        bus = self.buses.pop(type_name)
        self.classes.pop(type_name, None)
        await bus.stop(close_devices=False)

    async def _start_metrics(self, listen: str) -> Any:
        from backends.daemon.metrics import MetricsServer

        server = MetricsServer(listen, lambda: self)
        try:
            await server.start()
        except OSError as exc:
            raise CliError(f"metrics endpoint {listen}: {exc.strerror or exc}: choose another with --metrics "
                           "HOST:PORT or [serve] metrics_listen ('' disables it)") from exc
        return server

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        started = False
        clean = True
        lost = False
        try:
            self._open_platform()
            log.info(
                "starting",
                extra={"platform": self.platform.name, "backend_domid": self.platform.backend_domid,
                       "types": ",".join(self.cfg.serve.backend_types), "config": self.cfg.source,
                       "loop": type(loop).__module__.split(".")[0]},
            )
            started = True
            self.xs = await connect_xenstore(self.platform.xenstore_path())
            # Everything root-only is open now; no device has started, so no thread exists yet (the drop
            # refuses otherwise: capabilities are per thread).
            self._drop_privileges()
            for type_name in self.cfg.serve.backend_types:
                await self._start_type(type_name)
            if self.cfg.serve.metrics_listen:
                self.metrics = await self._start_metrics(self.cfg.serve.metrics_listen)
            log.info("serving", extra={"metrics": self._metrics_addr()})
            while not self._stop.is_set():
                stop = asyncio.ensure_future(self._stop.wait())
                reload = asyncio.ensure_future(self._reload.wait())
                await asyncio.wait({stop, reload}, timeout=XS_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                reload.cancel()
                if self.xs.closed:
                    # Nothing can be served without xenstore; exiting lets systemd restart us once it is back.
                    log.error("lost the xenstore connection", extra={"xenstore": self.platform.xenstore_path()})
                    lost = True
                    break
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    await self._do_reload()
        finally:
            clean = await self._shutdown(started)
        return 0 if clean and not lost else 1

    def _metrics_addr(self) -> str:
        if self.metrics is None:
            return "off"
        return f"{self.metrics.host}:{self.metrics.port}"

    async def _do_reload(self) -> None:
        try:
            cfg = load_config(self.config_path)
            apply_overrides(cfg, self.overrides)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration", extra={"error": str(exc)})
            return
        old = self.cfg
        changed = [s for s in cfg.section_names if getattr(old, s) != getattr(cfg, s)]
        if cfg.platform != old.platform:
            log.warning("platform settings change only on restart; keeping the running platform",
                        extra={"running": old.platform.kind, "configured": cfg.platform.kind})
            cfg.platform = old.platform
        if cfg.daemon != old.daemon:
            log.warning("[daemon] settings change only on restart; keeping the running ones",
                        extra={"user": old.daemon.user, "configured": cfg.daemon.user})
            cfg.daemon = old.daemon
        from backends.daemon.logs import setup_logging

        setup_logging(cfg.serve.log_level, cfg.serve.log_format)
        self.cfg = cfg
        # Connected devices keep the settings they connected with; new connections get the new ones.
        from backends.xenbus.registry import for_backend_type

        for type_name, cls in self.classes.items():
            dt = for_backend_type(type_name)
            dt.reconfigure(cls, cfg.section(dt.name))
        for type_name in [t for t in self.buses if t not in cfg.serve.backend_types]:
            await self._stop_type(type_name)
        for type_name in cfg.serve.backend_types:
            if type_name not in self.buses and self._held(type_name):
                await self._start_type(type_name)
        if cfg.serve.metrics_listen != old.serve.metrics_listen:
            await self._restart_metrics(old.serve.metrics_listen)
        log.info("reloaded", extra={"config": cfg.source, "changed": ",".join(changed) or "nothing",
                                    "types": ",".join(cfg.serve.backend_types), "metrics": self._metrics_addr()})

    async def _restart_metrics(self, previous: str) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        listen = self.cfg.serve.metrics_listen
        if not listen:
            return
        try:
            self.metrics = await self._start_metrics(listen)
        except CliError as exc:
            log.error("metrics endpoint not moved", extra={"error": str(exc)})
            self.cfg.serve.metrics_listen = previous
            if previous:
                with contextlib.suppress(CliError):
                    self.metrics = await self._start_metrics(previous)

    async def _shutdown(self, started: bool) -> bool:
        clean = True
        if self.metrics is not None:
            await self.metrics.stop()
        n = len(self.devices)
        try:
            # In-flight requests are answered before each ring is let go; xenstore keeps every device Connected.
            await asyncio.wait_for(self._stop_all(), self.cfg.serve.drain_timeout_s)
            if started:
                log.info("drained", extra={"devices": n})
        except TimeoutError:
            clean = False
            log.error("in-flight I/O did not drain in time", extra={"timeout_s": self.cfg.serve.drain_timeout_s})
        if self.xs is not None:
            await self.xs.close()
            self.xs = None
        if self.platform is not None:
            self.platform.close()
        if started:
            log.info("stopped")
        return clean

    async def _stop_all(self) -> None:
        await asyncio.gather(*(self._stop_type(t) for t in list(self.buses)))


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> None:
    """Command-line values over the file's; "section.key" -> value."""
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        setattr(getattr(cfg, section), key, value)


def run_daemon(cfg: Config, config_path: str | None, overrides: dict[str, Any] | None = None) -> int:
    from backends.daemon.loop import run

    return run(Daemon(cfg, config_path, overrides).run())
