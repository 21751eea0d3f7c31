"""blkback's `pvback attach disk` / `detach disk` arguments: the target grammar, the checks an operator can be
given before any xenstore node exists, and the keys libxl writes for a disk.  The xenstore work itself is the
daemon's (generic over device types)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from backends.blk.limits import KEY_BPS, KEY_BURST, KEY_IOPS, MAX_BPS, MAX_IOPS, parse_burst, parse_count
from backends.blk.proto import ParamsError, ProtocolError, parse_params
from backends.blk.vdev import VdevError, vdev_to_devid
from backends.xenbus.registry import AttachSpec, CommandError, Commands
from backends.xenbus.toolstack import ATTACHED_MARK

NBD_PROBE_TIMEOUT_S = 3.0


def params_for(target: str) -> tuple[str, str | None]:
    """The `params` string to write for an operator's target, and the image path to check (if any)."""
    if ":" in target.split("/", 1)[0] or target.startswith(("nbd:", "null:", "nbd+")):
        params = target
    else:
        params = f"aio:{os.path.abspath(target)}"
    try:
        spec = parse_params(params)
    except ParamsError as exc:
        raise CommandError(f"bad target {target!r}: {exc}") from exc
    return params, getattr(spec, "path", None)


def check_target(params: str, path: str | None, mode: str) -> None:
    """What the operator can be told before any xenstore node exists: the image, the NBD server."""
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise CommandError(f"image {path} does not exist: create it (e.g. truncate -s 1G {path}) or fix the path")
        if p.is_dir():
            raise CommandError(f"image {path} is a directory: give the path of an image file or block device")
        want = os.R_OK | (os.W_OK if mode == "w" else 0)
        if not os.access(p, want):
            what = "writable" if mode == "w" else "readable"
            raise CommandError(f"image {path} is not {what}: fix its permissions or use --mode r")
    if params.startswith("nbd"):
        _probe_nbd(params, readonly=mode == "r")


def _probe_nbd(params: str, *, readonly: bool) -> None:
    """Connect and negotiate like the backend will, so an unreachable or wrong server fails here."""
    from backends.drivers.storage.base import StorageError
    from backends.drivers.storage.nbd import open_export, parse_target

    try:
        target = parse_target(params)
    except StorageError as exc:
        raise CommandError(f"bad NBD target {params!r}: {exc}") from exc
    where = f"unix:{target.socket_path}" if target.socket_path else f"{target.host}:{target.port}"
    try:
        sock, _info = open_export(target, readonly=readonly, timeout=NBD_PROBE_TIMEOUT_S)
    except (StorageError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CommandError(f"NBD server at {where} is unreachable or unusable ({why}): start it or fix the "
                           "target") from exc
    sock.close()


def devid_of(vdev: str) -> int:
    try:
        return vdev_to_devid(vdev)
    except VdevError as exc:
        raise CommandError(str(exc)) from exc


def disk_spec(vdev: str, target: str, mode: str) -> AttachSpec:
    """Check the target and say what libxl would write for this disk."""
    devid = devid_of(vdev)
    params, path = params_for(target)
    check_target(params, path, mode)
    backend = {"params": params, "mode": mode, "dev": vdev, "device-type": "disk", "removable": "0",
               "bootable": "1", "discard-enable": "1", ATTACHED_MARK: "1"}
    frontend = {"virtual-device": str(devid), "device-type": "disk", "trusted": "1"}
    return AttachSpec(devid=devid, backend=backend, frontend=frontend)


def _add_attach(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="image path, or a params string (aio:/path, qcow2:/path, nbd:unix:/sock, null:SIZE)")
    p.add_argument("--vdev", default="xvda")
    p.add_argument("--mode", choices=("r", "w"), default="w")


def _add_detach(p: argparse.ArgumentParser) -> None:
    p.add_argument("vdev")


def _arg(parse: Callable[[str], int]) -> Callable[[str], int]:
    """An argparse type: a value the backend would refuse is a usage error (one line, exit 2)."""

    def convert(text: str) -> int:
        try:
            return parse(text)
        except ProtocolError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return convert


def _add_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iops", type=_arg(lambda t: parse_count(t, "--iops", MAX_IOPS)), default=None,
                   help="requests per second (0 or 'none': no cap)")
    p.add_argument("--bps", type=_arg(lambda t: parse_count(t, "--bps", MAX_BPS, sizes=True)), default=None,
                   help="bytes per second, k/M/G or Ki/Mi/Gi suffixes (0 or 'none': no cap)")
    p.add_argument("--burst", type=_arg(parse_burst), default=None, metavar="MS",
                   help="milliseconds at full speed an idle disk may run before the caps bite (default 100)")
    p.add_argument("--default", action="store_true",
                   help="drop the disk's own limits: the [blk] defaults apply again")


def limit_keys(args: argparse.Namespace) -> dict[str, str]:
    """The backend keys `pvback limit disk` writes (backends/blk/limits.py); an empty value means the default."""
    if args.default:
        if args.iops is not None or args.bps is not None or args.burst is not None:
            raise CommandError("--default drops every limit of the disk: give it alone")
        return {KEY_IOPS: "", KEY_BPS: "", KEY_BURST: ""}
    keys = {k: str(v) for k, v in ((KEY_IOPS, args.iops), (KEY_BPS, args.bps), (KEY_BURST, args.burst))
            if v is not None}
    if not keys:
        raise CommandError("nothing to set: give --iops, --bps and/or --burst (or --default)")
    return keys


COMMANDS = Commands(
    add_attach_arguments=_add_attach,
    attach_spec=lambda args: disk_spec(args.vdev, args.target, args.mode),
    add_detach_arguments=_add_detach,
    detach_devid=lambda args: devid_of(args.vdev),
    describe=lambda args: f"disk {args.vdev}",
    add_limit_arguments=_add_limit,
    limit_keys=limit_keys,
)
