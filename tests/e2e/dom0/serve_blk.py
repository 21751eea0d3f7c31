#!/usr/bin/env python3
"""dom0: serve every `backend/qdisk` device with pvback's blkback over the real-Xen platform, through the
library API (docs/DESIGN.md), until SIGTERM.

Prints "SERVE-READY" once the bus watches xenstore, or "SERVE-UNAVAILABLE <why>" and exits 3 when a piece of
pvback it needs is not there yet, so the dom0 driver reports the disk tests as failing for that reason.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from typing import Any


def unavailable(why: str) -> int:
    print(f"SERVE-UNAVAILABLE {why}", flush=True)
    return 3


def device_class() -> Any:
    # Looked up by name: the blk device class is written in parallel and may not exist yet.
    cls: Any = importlib.import_module("backends.blk.device").BlkDeviceClass
    try:
        from backends.daemon.config import BlkConfig

        return cls(BlkConfig(), type_names=("qdisk",))
    except (ImportError, TypeError):
        return cls()


async def serve() -> int:
    from backends.platform import open_platform
    from backends.xenbus.device import XenBus

    platform = open_platform("xen")
    xs = await platform.open_xenstore()
    bus = XenBus(platform, xs, [device_class()], backend_domid=platform.backend_domid)
    await bus.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"SERVE-READY domid={platform.backend_domid} grant_copy={platform.features.grant_copy}", flush=True)
    await stop.wait()
    await bus.stop(close_devices=True)
    await xs.close()
    platform.close()
    print(f"SERVE-STOPPED live_mappings={platform.live_mappings}", flush=True)
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s")
    try:
        for mod in ("backends.blk.device", "backends.xenbus.device", "backends.xenstore.client"):
            importlib.import_module(mod)
        import backends.platform

        if not hasattr(backends.platform, "open_platform"):
            return unavailable("backends.platform.open_platform does not exist yet")
    except ImportError as exc:
        return unavailable(str(exc))
    return asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())
