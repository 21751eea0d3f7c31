"""Prometheus text endpoint with per-device and per-queue counters.

Each device's class data reports a plain dict (`BackendDevice.data.stats()`):
    {"queues": [{"requests": {op: n}, "bytes": {"read": n, "write": n},
                               "errors": {reason: n}, "shapes": {shape: n}, "ring_full": n,
                               "latency_us_log2": [n0, n1, ...], "drops": {direction: n},
                               "ring": {key: n}}],   (optional: the queue's ring indices and request state)
     "status": {key: number}}      (optional: pvback_device_status{key=...}, for the type's `pvback status` columns)
where latency bucket 0 counts requests that took < 1 µs and bucket i those in [2**(i-1), 2**i) µs, so the
cumulative count through bucket i is the Prometheus bucket le=2**i µs.  The C path keeps no latency sum;
when a queue does not report `latency_us_sum`, the histogram's _sum is estimated from bucket midpoints
(good to within a factor of 1.5 per request, enough for a mean in dashboards).  The exposition format is produced by
prometheus_client; the HTTP side is a few lines of asyncio so the daemon stays single-threaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from backends.daemon.config import parse_listen

log = logging.getLogger("pvback.metrics")


def _devices(bus: Any) -> list[Any]:
    if bus is None:
        return []
    devs = getattr(bus, "devices", None)
    if devs is None:
        return []
    if callable(devs):
        devs = devs()
    return list(devs.values() if isinstance(devs, dict) else devs)


def _device_stats(dev: Any, data: Any) -> dict[str, Any]:
    """The device's counters, as its device type reads them (the registry's `stats`)."""
    from backends.xenbus.registry import for_backend_type

    try:
        dt = for_backend_type(str(dev.type_name))
    except KeyError:
        return dict(data.stats()) if hasattr(data, "stats") else {}
    return dt.stats(data)


class BusCollector(Collector):
    def __init__(self, get_bus: Callable[[], Any]) -> None:
        self.get_bus = get_bus

    def collect(self) -> Iterator[Any]:
        labels = ["type", "domid", "devid"]
        qlabels = [*labels, "queue"]
        state = GaugeMetricFamily("pvback_device_state", "XenbusState of the backend", labels=labels)
        reqs = CounterMetricFamily("pvback_requests", "Requests completed", labels=[*qlabels, "op"])
        nbytes = CounterMetricFamily("pvback_bytes", "Bytes transferred", labels=[*qlabels, "direction"])
        errs = CounterMetricFamily("pvback_errors", "Requests failed", labels=[*qlabels, "reason"])
        shapes = CounterMetricFamily("pvback_request_shapes", "Requests received, by shape (op/segments/sector/fill)",
                                     labels=[*qlabels, "shape"])
        drops = CounterMetricFamily("pvback_drops", "Packets dropped", labels=[*qlabels, "direction"])
        full = CounterMetricFamily("pvback_ring_full", "Times the request pool or ring was full", labels=qlabels)
        lat = HistogramMetricFamily("pvback_request_latency_seconds", "Request latency", labels=qlabels)
        connects = CounterMetricFamily("pvback_device_connects", "Times the device connected", labels=labels)
        failures = CounterMetricFamily("pvback_device_failures", "Lifecycle steps that failed the device",
                                       labels=labels)
        ring = GaugeMetricFamily("pvback_queue_ring", "Shared ring indices and the queue's request state (a stuck "
                                 "guest's first look: requests produced, consumed, in flight, answered)",
                                 labels=[*qlabels, "key"])
        status = GaugeMetricFamily("pvback_device_status", "Device-specific values its type shows in `pvback status`",
                                   labels=[*labels, "key"])
        for dev in _devices(self.get_bus()):
            base = [str(dev.type_name), str(dev.frontend_id), str(dev.devid)]
            state.add_metric(base, float(int(dev.state)))
            dstats = getattr(dev, "stats", None) or {}
            connects.add_metric(base, float(dstats.get("connects", 0)))
            failures.add_metric(base, float(dstats.get("errors", 0)))
            data = getattr(dev, "data", None)
            try:
                st = _device_stats(dev, data) if data is not None else {}
            except Exception:  # a device being torn down must not break the scrape
                log.debug("stats unavailable", exc_info=True)
                continue
            for key, v in (st.get("status") or {}).items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    status.add_metric([*base, str(key)], float(v))
            for qi, q in enumerate(st.get("queues", [])):
                ql = [*base, str(qi)]
                for op, n in q.get("requests", {}).items():
                    reqs.add_metric([*ql, str(op)], float(n))
                for d, n in q.get("bytes", {}).items():
                    nbytes.add_metric([*ql, str(d)], float(n))
                for reason, n in q.get("errors", {}).items():
                    errs.add_metric([*ql, str(reason)], float(n))
                for shape, n in q.get("shapes", {}).items():
                    shapes.add_metric([*ql, str(shape)], float(n))
                for d, n in q.get("drops", {}).items():
                    drops.add_metric([*ql, str(d)], float(n))
                full.add_metric(ql, float(q.get("ring_full", 0)))
                for key, n in q.get("ring", {}).items():
                    ring.add_metric([*ql, str(key)], float(n))
                hist = list(q.get("latency_us_log2", []))
                if hist:
                    buckets: list[tuple[str, float]] = []
                    acc = 0
                    for i, n in enumerate(hist):
                        acc += n
                        buckets.append((repr((2**i) / 1e6), float(acc)))
                    buckets.append(("+Inf", float(acc)))
                    total_us = q.get("latency_us_sum")
                    if total_us is None:
                        total_us = sum(n * (0.5 if i == 0 else 1.5 * 2 ** (i - 1)) for i, n in enumerate(hist))
                    lat.add_metric(ql, buckets, sum_value=float(total_us) / 1e6)
        yield from (state, connects, failures, status, reqs, nbytes, errs, shapes, drops, full, ring, lat)


def render(get_bus: Callable[[], Any]) -> bytes:
    registry = CollectorRegistry()
    registry.register(BusCollector(get_bus))
    return bytes(generate_latest(registry))


class MetricsServer:
    def __init__(self, listen: str, get_bus: Callable[[], Any]) -> None:
        self.host, self.port = parse_listen(listen)
        self.get_bus = get_bus
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] in (b"/metrics", b"/"):
                body, status, ctype = render(self.get_bus), b"200 OK", b"text/plain; version=0.0.4"
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
