"""`pvback attach`, `detach` and `status`: the toolstack's side of a device, on either platform."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from backends.daemon.config import Config
from backends.daemon.connect import connect_xenstore, xenstore_path
from backends.daemon.errors import CliError
from backends.daemon.vdev import VdevError, vdev_to_devid

STATE_NAMES = {0: "Unknown", 1: "Initialising", 2: "InitWait", 3: "Initialised", 4: "Connected",
               5: "Closing", 6: "Closed", 7: "Reconfiguring", 8: "Reconfigured"}
NBD_PROBE_TIMEOUT_S = 3.0


def params_for(target: str) -> tuple[str, str | None]:
    """The `params` string to write for an operator's target, and the image path to check (if any)."""
    if ":" in target.split("/", 1)[0] or target.startswith(("nbd:", "null:", "nbd+")):
        params = target
    else:
        params = f"aio:{os.path.abspath(target)}"
    from backends.blk.proto import ParamsError, parse_params

    try:
        spec = parse_params(params)
    except ParamsError as exc:
        raise CliError(f"bad target {target!r}: {exc}") from exc
    return params, getattr(spec, "path", None)


def check_target(params: str, path: str | None, mode: str) -> None:
    """What the operator can be told before any xenstore node exists: the image, the NBD server."""
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise CliError(f"image {path} does not exist: create it (e.g. truncate -s 1G {path}) or fix the path")
        if p.is_dir():
            raise CliError(f"image {path} is a directory: give the path of an image file or block device")
        want = os.R_OK | (os.W_OK if mode == "w" else 0)
        if not os.access(p, want):
            what = "writable" if mode == "w" else "readable"
            raise CliError(f"image {path} is not {what}: fix its permissions or use --mode r")
    if params.startswith("nbd"):
        _probe_nbd(params, readonly=mode == "r")


def _probe_nbd(params: str, *, readonly: bool) -> None:
    """Connect and negotiate like the backend will, so an unreachable or wrong server fails here."""
    from backends.drivers.storage.base import StorageError
    from backends.drivers.storage.nbd import open_export, parse_target

    try:
        target = parse_target(params)
    except StorageError as exc:
        raise CliError(f"bad NBD target {params!r}: {exc}") from exc
    where = f"unix:{target.socket_path}" if target.socket_path else f"{target.host}:{target.port}"
    try:
        sock, _info = open_export(target, readonly=readonly, timeout=NBD_PROBE_TIMEOUT_S)
    except (StorageError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(f"NBD server at {where} is unreachable or unusable ({why}): start it or fix the "
                       "target") from exc
    sock.close()


def cmd_attach(args: argparse.Namespace, cfg: Config) -> int:
    try:
        devid = vdev_to_devid(args.vdev)
    except VdevError as exc:
        raise CliError(str(exc)) from exc
    if not 0 <= args.domid < 0x7FF0:
        raise CliError(f"domain id {args.domid} is out of range (0..32751)")
    if args.timeout <= 0:
        raise CliError(f"--timeout {args.timeout:g}: must be a positive number of seconds")
    params, path = params_for(args.target)
    check_target(params, path, args.mode)
    return asyncio.run(attach_disk(args, cfg, devid, params))


async def attach_disk(args: argparse.Namespace, cfg: Config, devid: int, params: str) -> int:
    from backends.xenbus.toolstack import ATTACHED_MARK, add_device, device_paths, remove_device

    xs = await connect_xenstore(xenstore_path(cfg))
    try:
        if not await xs.exists(f"/local/domain/{args.domid}"):
            raise CliError(f"domain {args.domid} does not exist (no /local/domain/{args.domid}): start the guest "
                           "first (`pvback guest`)")
        paths = device_paths(backend_domid=args.backend_domid, frontend_domid=args.domid,
                             type_name=args.backend_type, devid=devid, frontend_type="vbd")
        for existing in (paths.backend, paths.frontend):
            # add_device would replace it, pulling a live disk from under the guest.
            if await xs.exists(existing):
                raise CliError(f"{args.vdev} of domain {args.domid} already exists ({existing}): detach it first "
                               f"(pvback detach disk {args.domid} {args.vdev}) or pick another --vdev")
        parents = _parents(paths.backend, 3) + _parents(paths.frontend, 2)
        fresh = [p for p in parents if not await xs.exists(p)]
        backend = {"params": params, "type": args.backend_type, "mode": args.mode, "dev": args.vdev,
                   "device-type": "disk", "removable": "0", "bootable": "1", "discard-enable": "1",
                   ATTACHED_MARK: "1"}
        frontend = {"virtual-device": str(devid), "device-type": "disk", "trusted": "1"}
        await add_device(xs, backend_domid=args.backend_domid, frontend_domid=args.domid,
                         type_name=args.backend_type, devid=devid, backend=backend, frontend=frontend,
                         frontend_type="vbd")
        if not args.no_wait:
            problem = await _wait_taken(xs, paths.backend, args.timeout)
            if problem is not None:
                # Like libxl: a device no backend took (or one it refused) is removed again.
                from backends.xenbus.state import XenbusState
                from backends.xenbus.toolstack import read_state

                # A backend that took the device gets a moment to let go of the image; nobody else needs one.
                untouched = await read_state(xs, paths.backend) in (XenbusState.UNKNOWN, XenbusState.INITIALISING)
                await remove_device(xs, backend_domid=args.backend_domid, frontend_domid=args.domid,
                                    type_name=args.backend_type, devid=devid, frontend_type="vbd",
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
    try:
        devid = vdev_to_devid(args.vdev)
    except VdevError as exc:
        raise CliError(str(exc)) from exc
    return asyncio.run(_detach(args, cfg, devid))


async def _detach(args: argparse.Namespace, cfg: Config, devid: int) -> int:
    from backends.xenbus.toolstack import remove_device

    xs = await connect_xenstore(xenstore_path(cfg))
    try:
        be = f"/local/domain/{args.backend_domid}/backend/{args.backend_type}/{args.domid}/{devid}"
        if not await xs.exists(be):
            raise CliError(f"domain {args.domid} has no {args.backend_type} disk {args.vdev} ({be} missing): see "
                           "`pvback status`")
        clean = await remove_device(xs, backend_domid=args.backend_domid, frontend_domid=args.domid,
                                    type_name=args.backend_type, devid=devid, frontend_type="vbd",
                                    timeout=args.timeout)
        if not clean:
            raise CliError(f"the backend did not close {be} within {args.timeout:.0f} s (nodes removed anyway)")
        return 0
    finally:
        await xs.close()


# -- status ----------------------------------------------------------------------------------------------

FEATURE_KEYS_FE = ("protocol", "ring-page-order", "multi-queue-num-queues", "feature-persistent")
FEATURE_KEYS_BE = ("sectors", "sector-size", "feature-flush-cache", "feature-discard", "feature-persistent",
                   "feature-max-indirect-segments")


async def collect_status(xs: Any, backend_domid: int = 0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    root = f"/local/domain/{backend_domid}/backend"
    for btype in await _ls(xs, root):
        for dom in await _ls(xs, f"{root}/{btype}"):
            for dev in await _ls(xs, f"{root}/{btype}/{dom}"):
                be = f"{root}/{btype}/{dom}/{dev}"
                fe = await xs.read_str(f"{be}/frontend") or ""
                row: dict[str, Any] = {"type": btype, "domid": dom, "devid": dev,
                                       "dev": await xs.read_str(f"{be}/dev") or "",
                                       "params": await xs.read_str(f"{be}/params") or "",
                                       "state": _state(await xs.read_str(f"{be}/state")),
                                       "fe_state": _state(await xs.read_str(f"{fe}/state")) if fe else "-",
                                       "error": await xs.read_str(f"{be}/error") or ""}
                feats = []
                for k in FEATURE_KEYS_BE:
                    v = await xs.read_str(f"{be}/{k}")
                    if v is not None and v != "0":
                        feats.append(f"{k}={v}")
                if fe:
                    for k in FEATURE_KEYS_FE:
                        v = await xs.read_str(f"{fe}/{k}")
                        if v is not None:
                            feats.append(f"fe:{k}={v}")
                row["features"] = " ".join(feats)
                rows.append(row)
    return rows


async def _ls(xs: Any, path: str) -> list[str]:
    from backends.xenstore.client import XenStoreError

    try:
        return sorted(await xs.directory(path), key=lambda s: (len(s), s))
    except XenStoreError:
        return []


def _state(v: str | None) -> str:
    if v is None:
        return "-"
    return STATE_NAMES.get(int(v), v) if v.isdigit() else f"garbage({v[:8]!r})"


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
Totals = dict[tuple[str, str, str], dict[str, float]]
_COUNTED = {"pvback_requests_total": "requests", "pvback_bytes_total": "bytes", "pvback_errors_total": "errors",
            "pvback_ring_full_total": "ring_full"}


def parse_metrics(text: str) -> Totals:
    """Per-device totals (all queues and ops summed) from the Prometheus text a daemon serves."""
    out: Totals = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) not in _COUNTED:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        key = (labels.get("type", ""), labels.get("domid", ""), labels.get("devid", ""))
        slot = out.setdefault(key, dict.fromkeys(_COUNTED.values(), 0.0))
        slot[_COUNTED[m.group(1)]] += float(m.group(3))
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
    out = []
    for dom in await _ls(xs, "/local/domain"):
        name = await xs.read_str(f"/local/domain/{dom}/name") or ("Domain-0" if dom == "0" else "")
        vbds = await _ls(xs, f"/local/domain/{dom}/device/vbd")
        out.append({"domid": dom, "name": name, "disks": str(len(vbds))})
    return out


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]


def render_status(domains: list[dict[str, str]], rows: list[dict[str, Any]], totals: Totals, prev: Totals,
                  dt: float, note: str = "") -> str:
    out = ["DOMAINS"]
    out += _table([["DOMID", "NAME", "DISKS"]] + [[d["domid"], d["name"] or "-", d["disks"]] for d in domains])
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
            if r["error"]:
                extra += f"  ERROR: {r['error']}"
            table.append([r["type"], r["domid"], r["devid"], r["dev"], r["state"], r["fe_state"], reqs, mb, errs,
                          iops, rate, extra])
        out += _table(table)
    if note:
        out += ["", note]
    return "\n".join(out)
