"""`pvback attach`, `detach` and `status`: the toolstack's side of a device, on either platform, for every
registered device type (the type supplies its arguments, its keys and its status columns)."""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

from backends.daemon.config import Config
from backends.daemon.connect import connect_xenstore, xenstore_path
from backends.daemon.errors import CliError
from backends.xenbus.registry import AttachSpec, DeviceType, device_types, for_backend_type, for_kind
from backends.xenbus.state import XenbusState


def _commands(dt: DeviceType) -> Any:
    if dt.commands is None:
        raise CliError(f"{dt.kind} devices cannot be attached by hand")
    return dt.commands


def cmd_attach(args: argparse.Namespace, cfg: Config) -> int:
    dt = for_kind(args.kind)
    if not 0 <= args.domid < 0x7FF0:
        raise CliError(f"domain id {args.domid} is out of range (0..32751)")
    if args.timeout <= 0:
        raise CliError(f"--timeout {args.timeout:g}: must be a positive number of seconds")
    backend_type = _backend_type(dt, args)
    spec = _commands(dt).attach_spec(args)
    return asyncio.run(attach_device(args, cfg, dt, spec, backend_type))


def _backend_type(dt: DeviceType, args: argparse.Namespace) -> str:
    backend_type: str = args.backend_type or dt.backend_types[0]
    if backend_type not in dt.backend_types:
        raise CliError(f"--type {backend_type}: {dt.kind} devices are served as {', '.join(dt.backend_types)}")
    return backend_type


async def attach_device(args: argparse.Namespace, cfg: Config, dt: DeviceType, spec: AttachSpec,
                        backend_type: str) -> int:
    """Create the device's nodes as libxl does and wait for a backend to take it; undone if none does."""
    from backends.xenbus.toolstack import add_device, device_paths, read_state, remove_device

    what = _commands(dt).describe(args)
    xs = await connect_xenstore(xenstore_path(cfg))
    try:
        if not await xs.exists(f"/local/domain/{args.domid}"):
            raise CliError(f"domain {args.domid} does not exist (no /local/domain/{args.domid}): start the guest "
                           "first (`pvback guest`)")
        paths = device_paths(backend_domid=args.backend_domid, frontend_domid=args.domid, type_name=backend_type,
                             devid=spec.devid, frontend_type=dt.frontend_type)
        for existing in (paths.backend, paths.frontend):
            # add_device would replace it, pulling a live device from under the guest.
            if await xs.exists(existing):
                raise CliError(f"{what} of domain {args.domid} already exists ({existing}): detach it first "
                               f"(pvback detach {dt.kind} {args.domid} ...) or pick another")
        parents = _parents(paths.backend, 3) + _parents(paths.frontend, 2)
        fresh = [p for p in parents if not await xs.exists(p)]
        await add_device(xs, backend_domid=args.backend_domid, frontend_domid=args.domid, type_name=backend_type,
                         devid=spec.devid, backend={**spec.backend, "type": backend_type}, frontend=spec.frontend,
                         frontend_type=dt.frontend_type)
        if not args.no_wait:
            problem = await _wait_taken(xs, paths.backend, args.timeout)
            if problem is not None:
                # Like libxl: a device no backend took (or one it refused) is removed again.  A backend that
                # took it gets a moment to let go of what it opened; nobody else needs one.
                untouched = await read_state(xs, paths.backend) in (XenbusState.UNKNOWN, XenbusState.INITIALISING)
                await remove_device(xs, backend_domid=args.backend_domid, frontend_domid=args.domid,
                                    type_name=backend_type, devid=spec.devid, frontend_type=dt.frontend_type,
                                    timeout=0.0 if untouched else 2.0)
                await _remove_if_empty(xs, fresh)
                raise CliError(f"{problem} (device removed again)")
        print(paths.backend)
        return 0
    finally:
        await xs.close()


def _parents(path: str, n: int) -> list[str]:
    """The `n` directories above `path`, nearest first."""
    parts = path.split("/")
    return ["/".join(parts[:-i]) for i in range(1, n + 1)]


async def _remove_if_empty(xs: Any, dirs: list[str]) -> None:
    """Remove the directories this attach created, nearest first, unless something else now lives there."""

    async def body(tx: Any) -> None:
        for d in dirs:
            if await tx.exists(d) and not await tx.directory(d):
                await tx.rm(d)

    await xs.transaction(body)


async def _wait_taken(xs: Any, backend: str, timeout: float) -> str | None:
    """None once a backend reached InitWait/Connected; else why not (its `error` node, or the timeout)."""
    from backends.xenbus.state import XenbusState
    from backends.xenbus.toolstack import read_state

    ok = {XenbusState.INIT_WAIT, XenbusState.CONNECTED}
    watch = await xs.watch(backend)
    try:
        async with asyncio.timeout(timeout):
            async for _ in watch:
                error = await xs.read_str(f"{backend}/error")
                if error:
                    return f"the backend refused {backend}: {error}"
                state = await read_state(xs, backend)
                if state in ok:
                    return None
                if state in (XenbusState.CLOSING, XenbusState.CLOSED):
                    return f"the backend closed {backend} at once (state {state.name})"
    except TimeoutError:
        return (f"no backend took {backend} within {timeout:g} s: is `pvback serve` running and serving type "
                f"{backend.split('/')[5]}?")
    finally:
        await watch.close()
    return f"lost the xenstore watch on {backend}"


def cmd_detach(args: argparse.Namespace, cfg: Config) -> int:
    dt = for_kind(args.kind)
    backend_type = _backend_type(dt, args)
    devid = _commands(dt).detach_devid(args)
    return asyncio.run(_detach(args, cfg, dt, devid, backend_type))


async def _detach(args: argparse.Namespace, cfg: Config, dt: DeviceType, devid: int, backend_type: str) -> int:
    from backends.xenbus.toolstack import remove_device

    xs = await connect_xenstore(xenstore_path(cfg))
    try:
        be = f"/local/domain/{args.backend_domid}/backend/{backend_type}/{args.domid}/{devid}"
        if not await xs.exists(be):
            raise CliError(f"domain {args.domid} has no {backend_type} {_commands(dt).describe(args)} ({be} "
                           "missing): see `pvback status`")
        clean = await remove_device(xs, backend_domid=args.backend_domid, frontend_domid=args.domid,
                                    type_name=backend_type, devid=devid, frontend_type=dt.frontend_type,
                                    timeout=args.timeout)
        if not clean:
            raise CliError(f"the backend did not close {be} within {args.timeout:.0f} s (nodes removed anyway)")
        return 0
    finally:
        await xs.close()


def cmd_limit(args: argparse.Namespace, cfg: Config) -> int:
    dt = for_kind(args.kind)
    backend_type = _backend_type(dt, args)
    cmds = _commands(dt)
    if cmds.limit_keys is None:
        raise CliError(f"{dt.kind} devices have no limits")
    devid = cmds.detach_devid(args)
    keys = cmds.limit_keys(args)
    return asyncio.run(_limit(args, cfg, dt, devid, backend_type, keys))


async def _limit(args: argparse.Namespace, cfg: Config, dt: DeviceType, devid: int, backend_type: str,
                 keys: dict[str, str]) -> int:
    """Write the limit keys into the device's backend directory (the backend watches them)."""
    xs = await connect_xenstore(xenstore_path(cfg))
    try:
        be = f"/local/domain/{args.backend_domid}/backend/{backend_type}/{args.domid}/{devid}"

        async def body(tx: Any) -> None:
            if not await tx.exists(be):
                raise CliError(f"domain {args.domid} has no {backend_type} {_commands(dt).describe(args)} ({be} "
                               "missing): see `pvback status`")
            for key, value in keys.items():
                await tx.write(f"{be}/{key}", value)

        await xs.transaction(body)
        print(f"{be}: " + " ".join(f"{k}={v}" for k, v in keys.items()))
        return 0
    finally:
        await xs.close()


# -- status ----------------------------------------------------------------------------------------------

async def collect_status(xs: Any, backend_domid: int = 0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    root = f"/local/domain/{backend_domid}/backend"
    for btype in await _ls(xs, root):
        try:
            columns = for_backend_type(btype).status
        except KeyError:
            continue  # another backend's directory (vif of xen-netback, ...): not ours to show
        for dom in await _ls(xs, f"{root}/{btype}"):
            for dev in await _ls(xs, f"{root}/{btype}/{dom}"):
                be = f"{root}/{btype}/{dom}/{dev}"
                fe = await xs.read_str(f"{be}/frontend") or ""
                summary = await xs.read_str(f"{be}/{columns.summary_key}") if columns.summary_key else None
                row: dict[str, Any] = {"type": btype, "domid": dom, "devid": dev,
                                       "dev": _dev_name(columns, dom, dev,
                                                        await xs.read_str(f"{be}/{columns.dev_key}")),
                                       "params": summary or "",
                                       "state": _state(await xs.read_str(f"{be}/state")),
                                       "fe_state": _state(await xs.read_str(f"{fe}/state")) if fe else "-",
                                       "error": await xs.read_str(f"{be}/error") or ""}
                feats = []
                for k in columns.backend_keys:
                    v = await xs.read_str(f"{be}/{k}")
                    if v is not None and v != "0":
                        feats.append(f"{k}={v}")
                if fe:
                    for k in columns.frontend_keys:
                        v = await xs.read_str(f"{fe}/{k}")
                        if v is not None:
                            feats.append(f"fe:{k}={v}")
                row["features"] = " ".join(feats)
                rows.append(row)
    return rows


def _dev_name(columns: Any, domid: str, devid: str, value: str | None) -> str:
    if columns.dev_name is None:
        return value or ""
    return str(columns.dev_name(domid, devid, value))


async def _ls(xs: Any, path: str) -> list[str]:
    from backends.xenstore.client import XenStoreError

    try:
        return sorted(await xs.directory(path), key=lambda s: (len(s), s))
    except XenStoreError:
        return []


def _state(v: str | None) -> str:
    if v is None:
        return "-"
    if not v.isdigit():
        return f"garbage({v[:8]!r})"
    try:
        return XenbusState(int(v)).label
    except ValueError:
        return v


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
Totals = dict[tuple[str, str, str], dict[str, float]]
_COUNTED = {"pvback_requests_total": "requests", "pvback_bytes_total": "bytes", "pvback_errors_total": "errors",
            "pvback_ring_full_total": "ring_full"}


def parse_metrics(text: str) -> Totals:
    """Per-device totals (all queues and ops summed) from the Prometheus text a daemon serves, plus per-op
    request counts ("requests:<op>") and the device's status values ("status:<key>", StatusColumns.extra)."""
    out: Totals = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or (m.group(1) not in _COUNTED and m.group(1) != "pvback_device_status"):
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        key = (labels.get("type", ""), labels.get("domid", ""), labels.get("devid", ""))
        slot = out.setdefault(key, dict.fromkeys(_COUNTED.values(), 0.0))
        if m.group(1) == "pvback_device_status":
            slot[f"status:{labels.get('key', '')}"] = float(m.group(3))
            continue
        slot[_COUNTED[m.group(1)]] += float(m.group(3))
        if m.group(1) == "pvback_requests_total" and "op" in labels:
            slot[f"requests:{labels['op']}"] = slot.get(f"requests:{labels['op']}", 0.0) + float(m.group(3))
    return out


def scrape_totals(metrics: str) -> Totals:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=3) as r:
        return parse_metrics(r.read().decode())


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    metrics = args.metrics if args.metrics is not None else cfg.serve.metrics_listen
    if metrics.endswith(":0"):
        metrics = ""  # a daemon told to pick a free port: the operator has to say which one it picked
    prev: Totals | None = None
    prev_t = 0.0
    while True:
        domains, rows = asyncio.run(_status_rows(cfg))
        totals, note = _scrape(metrics)
        now = time.monotonic()
        if prev is None and args.watch <= 0 and args.interval > 0 and totals is not None and rows:
            # One-shot: throughput needs two samples; take the second after --interval seconds.
            prev, prev_t = totals, now
            time.sleep(args.interval)
            totals, note = _scrape(metrics)
            now = time.monotonic()
        print(render_status(domains, rows, totals or {}, prev or {}, now - prev_t if prev is not None else 0.0,
                            note), flush=True)
        if args.watch <= 0:
            return 0
        prev, prev_t = totals, now
        time.sleep(args.watch)
        print("\x1b[2J\x1b[H", end="")


def _scrape(metrics: str) -> tuple[Totals | None, str]:
    if not metrics:
        return None, "throughput: no metrics endpoint given (--metrics HOST:PORT of `pvback serve`)"
    try:
        return scrape_totals(metrics), ""
    except (OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        why = getattr(why, "strerror", None) or why
        return None, f"throughput: metrics endpoint {metrics} unreachable ({why}): is `pvback serve` running?"


async def _status_rows(cfg: Config) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    xs = await connect_xenstore(xenstore_path(cfg))
    try:
        return await collect_domains(xs), await collect_status(xs)
    finally:
        await xs.close()


async def collect_domains(xs: Any) -> list[dict[str, str]]:
    """Each domain with its name and, per device type, how many devices its frontend directory lists."""
    out = []
    for dom in await _ls(xs, "/local/domain"):
        name = await xs.read_str(f"/local/domain/{dom}/name") or ("Domain-0" if dom == "0" else "")
        row = {"domid": dom, "name": name}
        for dt in device_types():
            row[dt.kind] = str(len(await _ls(xs, f"/local/domain/{dom}/device/{dt.frontend_type}")))
        out.append(row)
    return out


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]


def _extra_columns(backend_type: str, values: Mapping[str, float] | None) -> str:
    """The device type's own live columns (StatusColumns.extra), from what the metrics endpoint said of it."""
    if not values:
        return ""
    try:
        extra = for_backend_type(backend_type).status.extra
    except KeyError:
        return ""
    if extra is None:
        return ""
    try:
        return extra(values)
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        return f"(status columns unavailable: {exc})"


def render_status(domains: list[dict[str, str]], rows: list[dict[str, Any]], totals: Totals, prev: Totals,
                  dt: float, note: str = "") -> str:
    kinds = [dt.kind for dt in device_types()]
    out = ["DOMAINS"]
    out += _table([["DOMID", "NAME", *(f"{k.upper()}S" for k in kinds)]]
                  + [[d["domid"], d["name"] or "-", *(d.get(k, "0") for k in kinds)] for d in domains])
    out.append("")
    out.append("DEVICES")
    if not rows:
        out.append("no devices")
    else:
        table = [["TYPE", "DOM", "DEVID", "DEV", "BACKEND", "FRONTEND", "REQS", "MB", "ERRS", "IOPS", "MB/s",
                  "PARAMS / FEATURES"]]
        for r in rows:
            key = (r["type"], r["domid"], r["devid"])
            t = totals.get(key)
            p = prev.get(key)
            reqs = f"{t['requests']:.0f}" if t else "-"
            mb = f"{t['bytes'] / 1e6:.1f}" if t else "-"
            errs = f"{t['errors']:.0f}" if t else "-"
            iops = rate = "-"
            if t and p and dt > 0:
                iops = f"{(t['requests'] - p['requests']) / dt:.0f}"
                rate = f"{(t['bytes'] - p['bytes']) / 1e6 / dt:.1f}"
            extra = r["params"] + ("  " + r["features"] if r["features"] else "")
            more = _extra_columns(r["type"], t)
            if more:
                extra += "  " + more
            if r["error"]:
                extra += f"  ERROR: {r['error']}"
            table.append([r["type"], r["domid"], r["devid"], r["dev"], r["state"], r["fe_state"], reqs, mb, errs,
                          iops, rate, extra])
        out += _table(table)
    if note:
        out += ["", note]
    return "\n".join(out)
