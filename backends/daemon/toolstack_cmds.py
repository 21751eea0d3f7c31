"""`pvback attach`, `detach` and `status`: the toolstack's side of a device, on either platform."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from backends.daemon.cli import CliError
from backends.daemon.config import Config
from backends.daemon.vdev import VdevError, vdev_to_devid

STATE_NAMES = {0: "Unknown", 1: "Initialising", 2: "InitWait", 3: "Initialised", 4: "Connected",
               5: "Closing", 6: "Closed", 7: "Reconfiguring", 8: "Reconfigured"}
INIT_TIMEOUT_S = 10.0  # libxl's LIBXL_INIT_TIMEOUT


def xenstore_path(cfg: Config) -> str:
    """The xenstore the toolstack commands talk to, chosen like open_platform() chooses the platform."""
    kind = cfg.platform.kind
    if kind == "auto":
        kind = "xen" if Path("/dev/xen/gntdev").exists() else "emulated"
    if kind == "emulated":
        p = Path(cfg.platform.sim_dir) / "xenstored.sock"
        if not p.exists():
            raise CliError(f"no emulated platform in {cfg.platform.sim_dir} ({p} missing): start `pvback sim` first")
        return str(p)
    for cand in (os.environ.get("XENSTORED_PATH"), "/var/run/xenstored/socket", "/dev/xen/xenbus"):
        if cand and Path(cand).exists():
            return cand
    raise CliError(
        "no xenstore found (XENSTORED_PATH, /var/run/xenstored/socket, /dev/xen/xenbus): is xenstored running?"
    )


async def connect_xenstore(path: str) -> Any:
    """Connect and prove the peer speaks the xenstore protocol, so a wrong socket fails with a clear line."""
    from backends.xenstore.client import XenStoreClient, XenStoreError

    try:
        xs = await asyncio.wait_for(XenStoreClient.connect(path), 5)
    except PermissionError as exc:
        raise CliError(f"{path}: permission denied (run as root)") from exc
    except (OSError, TimeoutError) as exc:
        raise CliError(f"cannot connect to xenstore at {path}: {exc}") from exc
    try:
        await asyncio.wait_for(xs.get_domain_path(0), 5)
    except (TimeoutError, XenStoreError, OSError, ValueError, EOFError) as exc:
        await xs.close()
        raise CliError(f"{path} is not a xenstored (no valid reply to GET_DOMAIN_PATH: {exc!r})") from exc
    return xs


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


def _check_target(params: str, path: str | None, mode: str) -> None:
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise CliError(f"image {path} does not exist: create it (e.g. truncate -s 1G {path}) or fix the path")
        want = os.R_OK | (os.W_OK if mode == "w" else 0)
        if not os.access(p, want):
            what = "writable" if mode == "w" else "readable"
            raise CliError(f"image {path} is not {what}: fix its permissions or use --mode r")
    if params.startswith("nbd:unix:"):
        sock_path = params[len("nbd:unix:"):].split(":", 1)[0]
        _probe_unix(sock_path)
    elif params.startswith("nbd://"):
        hostport = params[len("nbd://"):].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        _probe_tcp(host or hostport, int(port) if port.isdigit() else 10809)


def _probe_unix(path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(path)
    except OSError as exc:
        why = exc.strerror or exc
        raise CliError(f"NBD server at unix:{path} is unreachable ({why}): start it or fix the path") from exc
    finally:
        s.close()


def _probe_tcp(host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise CliError(f"NBD server at {host}:{port} is unreachable ({exc.strerror or exc})") from exc


def cmd_attach(args: argparse.Namespace, cfg: Config) -> int:
    try:
        devid = vdev_to_devid(args.vdev)
    except VdevError as exc:
        raise CliError(str(exc)) from exc
    params, path = params_for(args.target)
    _check_target(params, path, args.mode)
    return asyncio.run(_attach(args, cfg, devid, params))


async def _attach(args: argparse.Namespace, cfg: Config, devid: int, params: str) -> int:
    from backends.xenbus.state import XenbusState
    from backends.xenbus.toolstack import add_device, remove_device, wait_for_state

    xs = await connect_xenstore(xenstore_path(cfg))
    try:
        if not await xs.exists(f"/local/domain/{args.domid}"):
            raise CliError(f"domain {args.domid} does not exist (no /local/domain/{args.domid})")
        backend = {"params": params, "type": args.backend_type, "mode": args.mode, "dev": args.vdev,
                   "device-type": "disk", "removable": "0", "bootable": "1", "discard-enable": "1"}
        frontend = {"virtual-device": str(devid), "device-type": "disk", "trusted": "1"}
        paths = await add_device(xs, backend_domid=args.backend_domid, frontend_domid=args.domid,
                                 type_name=args.backend_type, devid=devid, backend=backend, frontend=frontend,
                                 frontend_type="vbd")
        if not args.no_wait:
            try:
                await wait_for_state(xs, paths.backend, {XenbusState.INIT_WAIT, XenbusState.CONNECTED},
                                     timeout=INIT_TIMEOUT_S)
            except TimeoutError as exc:
                await remove_device(xs, backend_domid=args.backend_domid, frontend_domid=args.domid,
                                    type_name=args.backend_type, devid=devid, frontend_type="vbd", timeout=0.5)
                raise CliError(f"no backend took {paths.backend} within {INIT_TIMEOUT_S:.0f} s: is `pvback "
                               f"serve` running for type {args.backend_type}? (device removed again)") from exc
        print(paths.backend)
        return 0
    finally:
        await xs.close()


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
            raise CliError(f"no such device: {be}")
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


def scrape_totals(metrics: str) -> dict[tuple[str, str, str], dict[str, float]]:
    """Per-device request and byte totals from a daemon's metrics endpoint."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=3) as r:
        text = r.read().decode()
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels_s, value = rest.rsplit("}", 1)
        labels = dict(kv.split("=", 1) for kv in labels_s.split(","))
        labels = {k: v.strip('"') for k, v in labels.items()}
        key = (labels.get("type", ""), labels.get("domid", ""), labels.get("devid", ""))
        slot = out.setdefault(key, {"requests": 0.0, "bytes": 0.0})
        if name == "pvback_requests_total":
            slot["requests"] += float(value)
        elif name == "pvback_bytes_total":
            slot["bytes"] += float(value)
    return out


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    metrics = args.metrics if args.metrics is not None else cfg.serve.metrics_listen
    prev: dict[tuple[str, str, str], dict[str, float]] = {}
    prev_t = 0.0
    while True:
        rows = asyncio.run(_status_rows(cfg))
        totals: dict[tuple[str, str, str], dict[str, float]] = {}
        if metrics:
            try:
                totals = scrape_totals(metrics)
            except OSError:
                totals = {}
        now = time.monotonic()
        print(_render(rows, totals, prev, now - prev_t if prev_t else 0.0))
        if args.watch <= 0:
            return 0
        prev, prev_t = totals, now
        time.sleep(args.watch)
        print("\x1b[2J\x1b[H", end="")


async def _status_rows(cfg: Config) -> list[dict[str, Any]]:
    xs = await connect_xenstore(xenstore_path(cfg))
    try:
        return await collect_status(xs)
    finally:
        await xs.close()


def _render(rows: list[dict[str, Any]], totals: dict[tuple[str, str, str], dict[str, float]],
            prev: dict[tuple[str, str, str], dict[str, float]], dt: float) -> str:
    head = ["TYPE", "DOM", "DEVID", "DEV", "BACKEND", "FRONTEND", "REQS", "MB", "MB/s", "PARAMS / FEATURES"]
    table = [head]
    for r in rows:
        key = (r["type"], r["domid"], r["devid"])
        t = totals.get(key)
        reqs = f"{t['requests']:.0f}" if t else "-"
        mb = f"{t['bytes'] / 1e6:.1f}" if t else "-"
        rate = "-"
        if t and dt > 0 and key in prev:
            rate = f"{(t['bytes'] - prev[key]['bytes']) / 1e6 / dt:.1f}"
        extra = r["params"] + ("  " + r["features"] if r["features"] else "")
        if r["error"]:
            extra += f"  ERROR: {r['error']}"
        table.append([r["type"], r["domid"], r["devid"], r["dev"], r["state"], r["fe_state"], reqs, mb, rate, extra])
    if len(table) == 1:
        return "no devices"
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head) - 1)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + str(row[-1])
                     for row in table)
