"""`pvback serve`: the daemon.

One process serves every configured backend directory of its domain.  A device's failure stays with that
device (the bus turns class errors into an `error` node); the daemon only exits on SIGTERM/SIGINT, after
draining in-flight I/O and leaving every device Connected in xenstore so a restarted daemon (or this one after
SIGHUP) picks the rings up again and the frontend never notices more than a pause.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from backends.daemon.config import Config, ConfigError, load_config

log = logging.getLogger("pvback.serve")


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.platform: Any = None
        self.bus: Any = None
        self.metrics: Any = None

    def device_classes(self) -> list[Any]:
        from backends.blk.device import BlkDeviceClass

        return [BlkDeviceClass(self.cfg.blk, type_names=tuple(self.cfg.serve.backend_types))]

    async def _start_bus(self) -> None:
        from backends.xenbus.device import XenBus

        xs = await self.platform.open_xenstore()
        self.bus = XenBus(self.platform, xs, self.device_classes(), backend_domid=self.platform.backend_domid)
        await self.bus.start()

    async def run(self) -> int:
        from backends.platform import open_platform

        self.platform = open_platform(self.cfg.platform.kind, sim_dir=self.cfg.platform.sim_dir)
        log.info(
            "starting",
            extra={"platform": self.platform.name, "domid": self.platform.backend_domid,
                   "types": ",".join(self.cfg.serve.backend_types), "config": self.cfg.source},
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            await self._start_bus()
            if self.cfg.serve.metrics_listen:
                from backends.daemon.metrics import MetricsServer

                self.metrics = MetricsServer(self.cfg.serve.metrics_listen, lambda: self.bus)
                await self.metrics.start()
            log.info("serving", extra={"metrics": self.cfg.serve.metrics_listen or "off"})
            while not self._stop.is_set():
                stop = asyncio.ensure_future(self._stop.wait())
                reload = asyncio.ensure_future(self._reload.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                reload.cancel()
                if self._reload.is_set():
                    self._reload.clear()
                    await self._do_reload()
        finally:
            await self._shutdown()
        return 0

    async def _do_reload(self) -> None:
        try:
            cfg = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration", extra={"error": str(exc)})
            return
        # Devices keep the settings they connected with; new connections get the new ones.  The bus is
        # restarted without touching xenstore state, exactly like a daemon restart.
        self.cfg = cfg
        await self.bus.stop(close_devices=False)
        await self._start_bus()
        log.info("reloaded", extra={"config": cfg.source})

    async def _shutdown(self) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
        if self.bus is not None:
            try:
                await asyncio.wait_for(self.bus.stop(close_devices=False), self.cfg.serve.drain_timeout_s)
            except TimeoutError:
                log.error("in-flight I/O did not drain in time", extra={"timeout_s": self.cfg.serve.drain_timeout_s})
        if self.platform is not None:
            self.platform.close()
        log.info("stopped")


def run_daemon(cfg: Config, config_path: str | None) -> int:
    from backends.daemon.loop import run

    return run(Daemon(cfg, config_path).run())
