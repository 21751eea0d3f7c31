"""`pvback guest`: an emulated guest domain with a blkfront, running a verified workload against whatever
`pvback serve` serves it (the disk is attached with --attach, or by `pvback attach` from another shell)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from backends.daemon.cli import CliError


def cmd_guest(args: argparse.Namespace) -> int:
    if not (Path(args.sim_dir) / "broker.sock").exists():
        raise CliError(f"no emulated platform in {args.sim_dir}: start `pvback sim --sim-dir {args.sim_dir}` first")
    return asyncio.run(_guest(args))


async def _guest(args: argparse.Namespace) -> int:
    from backends.daemon.config import Config
    from backends.daemon.vdev import vdev_to_devid
    from backends.emu.blkfront import BlkFront
    from backends.emu.guest import Guest
    from backends.emu.workload import Shadow, full_compare, random_verified
    from backends.xenstore.client import XenStoreClient

    devid = vdev_to_devid(args.vdev)
    guest = Guest.in_sim(args.sim_dir, name=args.name, mem_pages=8192, gnt_entries=4096)
    assert guest.xenstore_sock is not None
    xs = await XenStoreClient.from_socket(guest.xenstore_sock)
    try:
        print(f"guest {args.name}: domain {guest.domid}", flush=True)
        if args.attach:
            from backends.daemon.toolstack_cmds import _attach, _check_target, params_for

            cfg = Config()
            cfg.platform.kind = "emulated"
            cfg.platform.sim_dir = args.sim_dir
            params, path = params_for(args.attach)
            _check_target(params, path, "w")
            ns = argparse.Namespace(domid=guest.domid, backend_type="qdisk", backend_domid=0, vdev=args.vdev,
                                    mode="w", no_wait=False)
            await _attach(ns, cfg, devid, params)
        else:
            print(f"waiting for a disk: pvback attach disk {guest.domid} IMAGE --vdev {args.vdev}", flush=True)
            await _wait_for_device(xs, f"/local/domain/{guest.domid}/device/vbd/{devid}/backend")
        front = BlkFront(guest, xs, devid, ring_page_order=2, queues=2)
        info = await front.connect()
        print(f"connected: {info}", flush=True)
        if args.workload == "idle":
            await asyncio.sleep(args.seconds)
            await front.close()
            return 0
        # The disk's current content is unknown to a fresh guest: read it first, then verify against it.
        initial = bytearray()
        for off in range(0, info.size_bytes, 1 << 20):
            initial += await front.read(off // 512, min(1 << 20, info.size_bytes - off))
        shadow = Shadow(bytes(initial))
        res = await random_verified(front, shadow, seconds=args.seconds, max_ops=10**9, depth=8)
        print(res.summary(), flush=True)
        if args.workload == "verify":
            res.mismatches += await full_compare(front, shadow)
        await front.close()
        if res.mismatches:
            for m in res.mismatches[:10]:
                print("MISMATCH:", m, file=sys.stderr)
            return 1
        print("verified: every read matched what was written", flush=True)
        return 0
    finally:
        await xs.close()
        guest.close()


async def _wait_for_device(xs: object, path: str) -> None:
    while await xs.read_str(path) is None:  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)
