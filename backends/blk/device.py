"""blkback's device class: the lifecycle callbacks the bus calls for each `backend/qdisk` (or `vbd`) device.

realize: parse the toolstack's `params`/`type`/`mode`, open the storage driver, advertise ring limits.
connect: parse the frontend's ring keys strictly, map the rings, bind the event channels, start one pump per
queue, then write the disk's geometry and features.  disconnect: stop the pumps (in-flight I/O answered),
unmap, unbind.  unrealize: close the driver.  Every error is a DeviceError for this device only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends.blk.dataplane import BlkDataplane, DiskLimit, QueueConfig, RejectedRequest
from backends.blk.limits import LIMIT_KEYS, IoLimits, limits_from_keys
from backends.blk.proto import (
    OP_NAMES,
    BackendLimits,
    DiskTarget,
    FrontendConfig,
    ProtocolError,
    connect_keys,
    disk_features,
    frontend_queue_dirs,
    parse_frontend,
    parse_mode,
    parse_params,
    parse_uint,
    probe_keys,
)
from backends.blk.pumps import PumpPool
from backends.blk.stallwatch import StallWatch
from backends.drivers.storage.base import StorageCaps, StorageDriver, StorageError
from backends.xenbus.device import DeviceError
from backends.xenbus.state import XenbusState

if TYPE_CHECKING:
    from backends.blk.config import BlkConfig
    from backends.xenbus.device import BackendDevice

log = logging.getLogger("pvback.blk")

# Frontend keys a blkfront writes; anything longer than this is garbage, not a number or protocol name.
_FE_VALUE_MAX = 64


def open_driver(target: DiskTarget, readonly: bool, cfg: BlkConfig) -> StorageDriver:
    """The storage driver for a parsed `params` target (not yet opened)."""
    if target.kind == "file":
        from backends.drivers.storage.file import FileDriver

        if not target.path:
            raise DeviceError("file target without a path")
        return FileDriver(target.path, readonly=readonly, threads=cfg.io_threads)
    if target.kind == "null":
        from backends.drivers.storage.null import NullDriver

        return NullDriver(target.size, readonly=readonly)
    if target.kind == "nbd":
        from backends.drivers.storage.nbd import NbdDriver

        return NbdDriver(target.nbd, readonly=readonly)
    if target.kind == "image":
        from backends.drivers.storage.qemu_nbd import QemuNbdDriver

        return QemuNbdDriver(f"{target.format}:{target.path}", readonly=readonly)
    raise DeviceError(f"no storage driver for target kind {target.kind!r}")


def _start_supervisor(driver: StorageDriver) -> None:
    """Network drivers reconnect from a task on the event loop; open() ran in a worker thread without one."""
    from backends.drivers.storage.nbd import NbdDriver
    from backends.drivers.storage.qemu_nbd import QemuNbdDriver

    if isinstance(driver, QemuNbdDriver):
        driver.nbd.start_supervisor()
    elif isinstance(driver, NbdDriver):
        driver.start_supervisor()


@dataclass
class BlkDisk:
    """Per-device state of blkback (BackendDevice.data)."""

    driver: StorageDriver
    caps: StorageCaps
    limits: BackendLimits
    cdrom: bool
    removable: bool
    queues: list[BlkDataplane] = field(default_factory=list)
    # The disk's I/O caps (backends/blk/limits.py) and the C buckets that enforce them, shared by its queues.
    io_limits: IoLimits = field(default_factory=IoLimits)
    limit: DiskLimit = field(default_factory=DiskLimit)
    frontend: FrontendConfig | None = None
    failing: set[asyncio.Task[None]] = field(default_factory=set)
    # Lost-notification recovery (backends/blk/stallwatch.py), checked by the monitor.
    stalls: StallWatch = field(default_factory=lambda: StallWatch(BlkDeviceClass.REJECT_WARN_INTERVAL_S))

    monitor_task: asyncio.Task[None] | None = None

    def stats(self) -> dict[str, Any]:
        out = []
        raw = [(dp, dp.stats()) for dp in self.queues]
        for dp, s in raw:
            if s:
                view = _metrics_view(s, dp.queue.latency_histogram())
                view["shapes"] = dp.queue.shapes()
                view["ring"] = dp.queue.ring_state()
                out.append(view)
        lim = self.limit.stats()
        status = {"iops_limit": lim["iops"], "bps_limit": lim["bps"], "limit_burst_ms": lim["burst_ms"],
                  "limit_waits": lim["waits"], "limit_throttled_ms": lim["throttled_ns"] // 1_000_000,
                  # What the data path uses: mappings made persistently, and O_DIRECT requests served on a
                  # buffer registered with io_uring (or refused by the kernel, which then pins per op).
                  **{k: sum(s.get(k, 0) for _, s in raw) for k in ("spurious_pauses", "persistent_maps",
                                                                "fixed_buffer_reqs", "fixed_buffer_refusals")},
                  "stall_kicks": self.stalls.kicks, "stall_notifies": self.stalls.notifies}
        return {"queues": out, "limit": lim, "status": status}

    def apply_limits(self, limits: IoLimits) -> None:
        """New caps for the running disk: the buckets change at once and sleeping queues look again now."""
        self.io_limits = limits
        self.limit.set(limits.iops, limits.bps, limits.burst_ms)
        for dp in self.queues:
            if not dp.queue.closed:
                dp.queue.limit_kick()

    def shapes(self) -> dict[str, int]:
        """Requests received on every queue, by shape."""
        total: dict[str, int] = {}
        for dp in self.queues:
            if not dp.queue.closed:
                for shape, n in dp.queue.shapes().items():
                    total[shape] = total.get(shape, 0) + n
        return total


def format_shapes(shapes: dict[str, int]) -> str:
    """`shape=count ...`, sorted: one log field an operator (or the real-Xen test) can read back."""
    return " ".join(f"{k}={v}" for k, v in sorted(shapes.items()))


def _metrics_view(s: dict[str, int], lat: list[int]) -> dict[str, Any]:
    """The C counters in the shape backends.daemon.metrics expects."""
    return {
        "requests": {name: s.get(f"req_{name}", 0) for name in OP_NAMES.values()},
        "bytes": {"read": s.get("bytes_read", 0), "write": s.get("bytes_written", 0)},
        "errors": {k[4:]: v for k, v in s.items() if k.startswith("err_") and v},
        "ring_full": s.get("out_of_requests", 0),
        "latency_us_log2": lat if any(lat) else [],
        "inflight": s.get("inflight", 0),
    }


class _RejectWarnings:
    """A warning when a disk answers requests with errors, at most one per `interval` seconds per device, naming
    the reason and the last such request; the error counters in the metrics hold the exact numbers."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.reported = 0  # errors already covered by a warning
        self.last_warning = -float("inf")

    def check(self, dev: BackendDevice, disk: BlkDisk) -> None:
        total = 0
        last: RejectedRequest | None = None
        for dp in disk.queues:
            if dp.queue.closed:
                continue
            total += dp.stats().get("errors", 0)
            last = dp.queue.last_error() or last
        now = asyncio.get_running_loop().time()
        if total <= self.reported or last is None or now - self.last_warning < self.interval:
            return
        op = OP_NAMES.get(last.op, str(last.op))
        if last.operation != last.op:
            op = f"{OP_NAMES.get(last.operation, str(last.operation))}({op})"
        dev.log.warning(
            "answered %d request(s) with an error since the last report; the last one: %s, op=%s sector=%d "
            "nr_segments=%d",
            total - self.reported, last.reason, op, last.sector, last.nr_segments,
            extra={"reason": last.reason, "op": op, "sector": last.sector, "failed": total - self.reported},
        )
        self.reported = total
        self.last_warning = now


class BlkDeviceClass:
    connect_states = frozenset({XenbusState.INITIALISED, XenbusState.CONNECTED})
    # The disk's I/O limits, changed live (backends/blk/limits.py).
    watch_backend_keys = LIMIT_KEYS
    # How often a connected disk's backing size is checked for an online resize (Linux blkback checks on
    # every ring wakeup; a timer also catches an idle guest) and its error counters for rejected requests.
    # An fstat and a counter read per disk per period: negligible.
    MONITOR_S = 1.0
    # At most one warning about rejected requests per device per this many seconds: a hostile or broken
    # frontend can fail thousands of requests a second, and the counters keep the exact number anyway.
    REJECT_WARN_INTERVAL_S = 10.0

    def __init__(self, cfg: BlkConfig, type_names: tuple[str, ...] = ("qdisk",)) -> None:
        self.cfg = cfg
        self.type_names = type_names
        self._pool: PumpPool | None = None

    def pump_pool(self) -> PumpPool | None:
        """The shared pumps every queue of this daemon goes to (`[blk] pumps`), None for a thread per queue."""
        if self.cfg.pumps == 0:
            return None
        if self._pool is None:
            size = self.cfg.pumps if self.cfg.pumps > 0 else len(os.sched_getaffinity(0))
            self._pool = PumpPool(size, self.cfg.pump_budget, self.cfg.poll_us, pin=bool(self.cfg.pump_pinning))
        return self._pool

    # -- realize / unrealize ----------------------------------------------------------------------------

    async def realize(self, dev: BackendDevice) -> None:
        params = await dev.read_backend("params")
        try:
            target = parse_params(params, await dev.read_backend("type"))
            readonly = parse_mode(await dev.read_backend("mode"))
        except ProtocolError as exc:
            raise DeviceError(f"bad toolstack keys: {exc}") from exc
        driver = open_driver(target, readonly, self.cfg)
        try:
            await asyncio.to_thread(driver.open)
            caps = driver.capabilities()
        except (StorageError, OSError) as exc:
            driver.close()
            raise DeviceError(f"cannot open {params}: {exc}") from exc
        _start_supervisor(driver)
        discard_enable = (await dev.read_backend("discard-enable")) != "0"
        limits = BackendLimits(
            max_ring_page_order=self.cfg.max_ring_page_order,
            max_queues=self.cfg.max_queues,
            max_indirect_segments=self.cfg.max_indirect_segments,
            persistent=self.cfg.max_persistent_grants > 0,
            discard_enable=discard_enable,
        )
        dev.data = BlkDisk(
            driver=driver,
            caps=caps,
            limits=limits,
            cdrom=(await dev.read_backend("device-type")) == "cdrom",
            removable=(await dev.read_backend("removable")) == "1",
        )
        await self._read_limits(dev, dev.data)
        await dev.write_backend(probe_keys(limits))
        dev.log.info("realized", extra={"params": params, "size": caps.size_bytes, "readonly": caps.readonly,
                                        "threaded": caps.threaded, "direct_io": caps.direct_io})

    def _default_limits(self) -> IoLimits:
        return IoLimits(iops=self.cfg.iops_limit, bps=self.cfg.bps_limit, burst_ms=self.cfg.limit_burst_ms)

    async def _read_limits(self, dev: BackendDevice, disk: BlkDisk) -> None:
        values = {k: await dev.read_backend(k) for k in LIMIT_KEYS}
        try:
            limits = limits_from_keys(values, self._default_limits())
        except ProtocolError as exc:
            # Not the guest's doing and no reason to fail its disk: the operator hears of it, the default holds.
            dev.log.warning("limits ignored: %s", exc)
            limits = self._default_limits()
        if limits != disk.io_limits:
            disk.apply_limits(limits)
            dev.log.info("limits %s", limits.describe(), extra={"iops_limit": limits.iops, "bps_limit": limits.bps,
                                                             "burst_ms": limits.burst_ms})

    async def key_changed(self, dev: BackendDevice, side: str, key: str, value: str | None) -> None:
        disk: BlkDisk | None = dev.data
        if disk is None or side != "backend" or key not in LIMIT_KEYS:
            return
        await self._read_limits(dev, disk)

    async def unrealize(self, dev: BackendDevice) -> None:
        disk: BlkDisk | None = dev.data
        if disk is None:
            return
        await self.disconnect(dev)
        await asyncio.to_thread(disk.driver.close)
        dev.data = None

    # -- connect / disconnect ---------------------------------------------------------------------------

    async def _frontend_keys(self, dev: BackendDevice) -> dict[str, str]:
        """Every key parse_frontend may look at, read once (a frontend can rewrite them at any moment)."""
        keys: dict[str, str] = {}

        async def get(key: str) -> str | None:
            v = await dev.read_frontend(key, max_len=_FE_VALUE_MAX)
            if v is not None:
                keys[key] = v
            return v

        nq_text = await get("multi-queue-num-queues")
        order_text = await get("ring-page-order")
        for k in ("protocol", "feature-persistent", "feature-large-sector-size"):
            await get(k)
        disk: BlkDisk = dev.data
        try:
            nq = parse_uint(nq_text, "multi-queue-num-queues", 1, disk.limits.max_queues, 1)
            order = parse_uint(order_text, "ring-page-order", 0, disk.limits.max_ring_page_order, 0)
        except ProtocolError:
            return keys  # parse_frontend reports it with the full rule
        for prefix in frontend_queue_dirs(nq):
            if order_text is None:
                await get(prefix + "ring-ref")
            else:
                for i in range(1 << order):
                    await get(f"{prefix}ring-ref{i}")
            await get(prefix + "event-channel")
        return keys

    async def connect(self, dev: BackendDevice) -> None:
        disk: BlkDisk = dev.data
        keys = await self._frontend_keys(dev)
        try:
            fe = parse_frontend(keys, max_ring_page_order=disk.limits.max_ring_page_order,
                                max_queues=disk.limits.max_queues, backend_persistent=disk.limits.persistent)
        except ProtocolError as exc:
            raise DeviceError(f"frontend keys: {exc}") from exc
        if "protocol" not in keys:
            dev.log.info("frontend wrote no protocol: assuming x86_32-abi like Linux blkback")
        feats = disk_features(disk.caps, disk.limits)
        qcfg = QueueConfig(
            abi=fe.abi,
            frontend_domid=dev.frontend_id,
            nr_ring_pages=fe.nr_ring_pages,
            sectors=disk.caps.size_bytes // 512,
            sector_size=disk.caps.logical_sector_size,
            readonly=disk.caps.readonly,
            can_flush=feats["flush"],
            can_barrier=feats["barrier"],
            can_discard=feats["discard"],
            can_secure_discard=feats["secure_discard"],
            max_indirect_segments=disk.limits.max_indirect_segments,
            persistent=fe.persistent,
            max_persistent_grants=self.cfg.max_persistent_grants,
            persistent_min_bytes=self.cfg.persistent_threshold_bytes,
            poll_us=self.cfg.poll_us,
            spurious_pause_max_us=self.cfg.spurious_pause_max_us,
            limit=disk.limit,
        )
        platform = dev.platform
        loop = asyncio.get_running_loop()

        def on_dead(message: str) -> None:
            task = loop.create_task(dev.fail(f"frontend broke the ring protocol: {message}"))
            disk.failing.add(task)
            task.add_done_callback(disk.failing.discard)

        try:
            for qi, q in enumerate(fe.queues):
                ring, evtchn = dev.connect_ring(list(q.ring_refs), q.event_channel)
                try:
                    dp = BlkDataplane(ring, evtchn, platform.gnt, disk.driver.engine(), qcfg, on_dead=on_dead,
                                      name=f"{dev.backend_path} queue {qi}", pool=self.pump_pool())
                except BaseException:
                    ring.unmap()
                    evtchn.close()
                    raise
                disk.queues.append(dp)
                dp.start(loop)
                # A daemon killed between publishing responses and notifying left the guest waiting for an
                # event nobody would send (restart recovery); a spurious event costs a frontend nothing.
                evtchn.notify()
        except (OSError, ValueError) as exc:
            await self.disconnect(dev)
            raise DeviceError(f"cannot connect the rings: {exc}") from exc
        disk.frontend = fe
        try:
            values = connect_keys(disk.caps, disk.limits, cdrom=disk.cdrom, removable=disk.removable)
        except ProtocolError as exc:
            await self.disconnect(dev)
            raise DeviceError(str(exc)) from exc
        await dev.write_backend(values)
        disk.stalls.forget()
        disk.monitor_task = loop.create_task(self._monitor(dev, disk), name=f"monitor {dev.backend_path}")
        dev.log.info("connected", extra={"queues": len(fe.queues), "ring_pages": fe.nr_ring_pages,
                                         "protocol": fe.abi.name, "persistent": fe.persistent})

    async def disconnect(self, dev: BackendDevice) -> None:
        disk: BlkDisk | None = dev.data
        if disk is None:
            return
        if disk.monitor_task is not None:
            disk.monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await disk.monitor_task
            disk.monitor_task = None
        shapes = disk.shapes()
        if shapes:
            dev.log.info("request shapes", extra={"shapes": format_shapes(shapes)})
        queues, disk.queues = disk.queues, []
        for dp in queues:
            await dp.stop()
        dev.release_frontend_domain()
        disk.frontend = None

    async def _monitor(self, dev: BackendDevice, disk: BlkDisk) -> None:
        warned = _RejectWarnings(self.REJECT_WARN_INTERVAL_S)
        while True:
            await asyncio.sleep(self.MONITOR_S)
            await self._check_size(dev, disk)
            warned.check(dev, disk)
            disk.stalls.check(dev, disk.queues)

    async def _check_size(self, dev: BackendDevice, disk: BlkDisk) -> None:
        """Online resize: when the image or device changes size, check later requests against the new size,
        rewrite `sectors` and rewrite `state` so the frontend's watch fires (what Linux and QEMU do)."""
        try:
            size = disk.driver.current_size()
        except OSError as exc:
            dev.log.warning("cannot check the disk size", extra={"error": str(exc)})
            return
        if size is None or size == disk.caps.size_bytes or size <= 0:
            return
        old = disk.caps.size_bytes
        disk.caps = dataclasses.replace(disk.caps, size_bytes=size)
        for dp in disk.queues:
            dp.queue.set_sectors(size // 512)
        await dev.notify_frontend({"sectors": str(size // 512)})
        dev.log.info("resized", extra={"old_bytes": old, "new_bytes": size})
