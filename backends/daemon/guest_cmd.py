"""`pvback guest`: an emulated guest domain with a blkfront, running a verified workload against whatever
`pvback serve` serves it (the disk is attached with --attach, or by `pvback attach` from another shell)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from backends.blk.commands import devid_of, disk_spec
from backends.daemon.errors import CliError

if TYPE_CHECKING:
    from backends.xenbus.registry import AttachSpec
    from backends.xenstore.client import XenStoreClient


def cmd_guest(args: argparse.Namespace) -> int:
    from backends.daemon.connect import probe_broker, sim_socket

    probe_broker(sim_socket(args.sim_dir, "broker.sock"))
    if args.seconds < 0 or args.timeout < 0:
        raise CliError("--seconds and --timeout must not be negative")
    devid = devid_of(args.vdev)
    # Before the guest exists: a bad image creates nothing.
    spec = disk_spec(args.vdev, args.attach, "w") if args.attach else None
    return asyncio.run(_guest(args, devid, spec))


async def _guest(args: argparse.Namespace, devid: int, spec: AttachSpec | None) -> int:
    from backends.daemon.config import Config
    from backends.guests.blkfront import BlkFront
    from backends.guests.guest import Guest
    from backends.guests.workload import Shadow, full_compare, random_verified
    from backends.xenstore.client import XenStoreClient

    guest = Guest.in_sim(args.sim_dir, name=args.name, mem_pages=8192, gnt_entries=4096)
    assert guest.xenstore_sock is not None
    xs = await XenStoreClient.from_socket(guest.xenstore_sock)
    try:
        await name_domain(args.sim_dir, guest.domid, args.name)
        print(f"guest {args.name}: domain {guest.domid}", flush=True)
        if args.workload == "hold":
            # The domain exists while this process does (the broker releases it when we go).
            await asyncio.sleep(args.seconds if args.seconds > 0 else float("inf"))
            return 0
        if spec is not None:
            from backends.daemon.devtypes import load_device_types
            from backends.daemon.toolstack_cmds import attach_device
            from backends.xenbus.registry import for_kind

            load_device_types()
            cfg = Config()
            cfg.platform.kind = "emulated"
            cfg.platform.sim_dir = args.sim_dir
            ns = argparse.Namespace(domid=guest.domid, backend_domid=0, no_wait=False, timeout=10.0,
                                    vdev=args.vdev, target=args.attach, mode="w")
            await attach_device(ns, cfg, for_kind("disk"), spec, "qdisk")
        else:
            print(f"waiting for a disk: pvback attach disk {guest.domid} IMAGE --vdev {args.vdev}", flush=True)
            path = f"/local/domain/{guest.domid}/device/vbd/{devid}/backend"
            try:
                async with asyncio.timeout(args.timeout or None):
                    await _wait_for_device(xs, path)
            except TimeoutError:
                raise CliError(f"no disk {args.vdev} was attached to domain {guest.domid} within "
                               f"{args.timeout:g} s") from None
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


async def name_domain(sim_dir: str, domid: int, name: str) -> None:
    """Write `name` as the toolstack does when it creates a domain (the broker introduces it unnamed)."""
    from backends.xenstore.client import XenStoreClient

    xs = await XenStoreClient.connect(str(Path(sim_dir) / "xenstored.sock"))
    try:
        await xs.write(f"/local/domain/{domid}/name", name)
    finally:
        await xs.close()


async def _wait_for_device(xs: XenStoreClient, path: str) -> None:
    async with await xs.watch(path) as watch:
        async for _ in watch:
            if await xs.read_str(path) is not None:
                return
