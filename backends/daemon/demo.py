"""`pvback demo`: the whole system on the emulated platform, as separate processes like on a real host.

sim (xenstored + broker) -> an image file -> `pvback serve` -> a guest domain -> `pvback attach` -> the guest's
blkfront connects -> a verified random workload -> the image file checked byte for byte -> `pvback attach nic`
-> the guest's netfront connects -> the guest pings a peer -> `pvback status` -> detach both, stop.  Prints what
happened at each step.

The network part lives in two network namespaces the demo creates and deletes: "peer", where `pvback serve` runs
(so the vif tap it creates is the peer's interface and nothing touches the host's network), and the guest's own
stack, whose tap its netfront bridges to the rings.  Addresses from 198.18.0.0/15 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.guests.netns import NetNS

PY = [sys.executable, "-m", "backends.daemon.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Step:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {msg}", flush=True)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited ({proc.returncode}); log {log}:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s (log {log})")
        time.sleep(0.05)


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _stop(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


PEER_V4, GUEST_V4, GUEST_MAC = "198.18.0.1", "198.18.0.2", "00:16:3e:00:00:0d"


def cmd_demo(args: argparse.Namespace) -> int:
    from backends.daemon.devtypes import default_backend_types
    from backends.guests.netns import NetNS

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pvback-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = args.dir is not None
    step = Step()
    procs: dict[str, subprocess.Popen[bytes] | None] = {"sim": None, "serve": None}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    spaces: list[NetNS] = []
    try:
        peer = NetNS(f"pvdemo-p-{os.getpid()}")
        spaces.append(peer)
        gns = NetNS(f"pvdemo-g-{os.getpid()}")
        spaces.append(gns)
        sim_dir = work / "sim"
        sim_log = work / "sim.log"
        sim = procs["sim"] = _spawn([*PY, "sim", "--sim-dir", str(sim_dir)], sim_log, env)
        _wait_for(sim_dir / "sim.pid", sim, "pvback sim", sim_log)
        step.say(f"emulated Xen platform up: XENSTORED_PATH={sim_dir / 'xenstored.sock'}")

        image = work / "disk.img"
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        step.say(f"disk image {image}: {args.size_mib} MiB of random data")

        port = _free_port()
        serve_log = work / "serve.log"
        serve = procs["serve"] = _spawn(  # `ip netns exec` execs the daemon: the PID is its own
            [*peer.argv(*PY, "serve"), "--platform", "emulated", "--sim-dir", str(sim_dir), "--metrics",
             f"127.0.0.1:{port}", "--types", ",".join([*default_backend_types(), "vif"])], serve_log, env)
        step.say(f"pvback serve started (pid {serve.pid}) in network namespace {peer.name}, metrics on "
                 f"127.0.0.1:{port} there")
        rc = asyncio.run(_guest_part(sim_dir, image, port, step, peer, gns))
        step.say("pvback serve stopped with SIGTERM: exit status " + str(_stop(procs["serve"])))
        procs["serve"] = None
        if rc == 0:
            print("\nDEMO PASSED: every byte the guest wrote is in the image; every read matched; the guest's NIC "
                  "reached its peer.")
        else:
            print(f"\nDEMO FAILED (logs in {work})")
            keep = True
        return rc
    except Exception as exc:
        print(f"\nDEMO FAILED: {exc} (logs in {work})", file=sys.stderr)
        keep = True
        return 1
    finally:
        _stop(procs["serve"])
        _stop(procs["sim"])
        for ns in spaces:  # the vif tap and the guest's tap go with them
            ns.delete()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


async def _guest_part(sim_dir: Path, image: Path, port: int, step: Step, peer: NetNS, gns: NetNS) -> int:
    from backends.guests.blkfront import BlkFront
    from backends.guests.guest import Guest
    from backends.guests.workload import Shadow, full_compare, random_verified
    from backends.xenstore.client import XenStoreClient

    guest = Guest.in_sim(sim_dir, name="demo-guest", mem_pages=8192, gnt_entries=4096)
    assert guest.xenstore_sock is not None
    xs = await XenStoreClient.from_socket(guest.xenstore_sock)
    front: BlkFront | None = None
    try:
        from backends.daemon.guest_cmd import name_domain

        await name_domain(str(sim_dir), guest.domid, "demo-guest")
        step.say(f"guest domain {guest.domid} created ({guest.mem_pages * 4 // 1024} MiB memory, grant table)")
        attach = await asyncio.to_thread(
            subprocess.run, [*PY, "attach", "disk", str(guest.domid), str(image), "--vdev", "xvda",
                             "--platform", "emulated", "--sim-dir", str(sim_dir)],
            capture_output=True, text=True)
        if attach.returncode != 0:
            print(attach.stderr.strip(), file=sys.stderr)
            return 1
        step.say(f"pvback attach disk {guest.domid} {image.name} -> {attach.stdout.strip()}")
        front = BlkFront(guest, xs, 51712, ring_page_order=2, queues=2, persistent=True)
        info = await front.connect()
        step.say(f"blkfront connected: {info.sectors} sectors of 512 B, sector-size {info.sector_size}, "
                 f"protocol {info.protocol}, ring-page-order {info.ring_page_order}, queues {info.queues}, "
                 f"persistent grants {'on' if info.persistent else 'off'}, indirect segments "
                 f"{info.max_indirect_segments}, flush {'yes' if info.flush else 'no'}, "
                 f"discard {'yes' if info.discard else 'no'}")
        shadow = Shadow(image.read_bytes())
        res = await random_verified(front, shadow, seconds=4.0, max_ops=4000, depth=8)
        step.say(f"workload: {res.summary()}")
        bad = res.mismatches + await full_compare(front, shadow)
        step.say(f"read back the whole disk through the guest: {'OK' if not bad else f'{len(bad)} mismatches'}")
        on_disk = image.read_bytes()
        file_ok = on_disk == bytes(shadow.data)
        step.say(f"image file compared byte for byte with what the guest wrote: {'OK' if file_ok else 'DIFFERS'}")
        nic_ok, nic_close = await _nic_part(sim_dir, guest, xs, step, peer, gns)
        status = await asyncio.to_thread(
            subprocess.run, [*peer.argv(*PY, "status"), "--platform", "emulated", "--sim-dir", str(sim_dir),
                             "--metrics", f"127.0.0.1:{port}", "--interval", "0"], capture_output=True, text=True)
        print(status.stdout.rstrip() or status.stderr.rstrip())
        nic_ok = await nic_close() and nic_ok
        await front.close()
        front = None
        detach = await asyncio.to_thread(
            subprocess.run, [*PY, "detach", "disk", str(guest.domid), "xvda", "--platform", "emulated",
                             "--sim-dir", str(sim_dir)], capture_output=True, text=True)
        step.say("pvback detach: " + ("OK, backend Closed and nodes removed" if detach.returncode == 0
                                      else detach.stderr.strip()))
        return 0 if not bad and file_ok and detach.returncode == 0 and nic_ok else 1
    finally:
        if front is not None:
            await front.release()
        await xs.close()
        guest.close()


async def _nic_part(sim_dir: Path, guest: Any, xs: Any, step: Step, peer: NetNS,
                    gns: NetNS) -> tuple[bool, Callable[[], Awaitable[bool]]]:
    """A two-queue NIC for the guest: `pvback attach nic`, the guest's tap in its namespace bridged by its netfront
    (C data path), the vif tap in the peer's namespace given the peer's address, and three pings.  Returns
    whether the pings came back, and the detach to run after `pvback status` (True if it went well)."""
    from backends.guests.netfront import NetFront, xenbus_connect
    from backends.guests.netns import guest_tap, ping

    fronts: list[NetFront] = []
    fds: list[int] = []
    fe = f"/local/domain/{guest.domid}/device/vif/0"

    async def close() -> bool:
        from backends.xenbus.state import XenbusState

        for nf in fronts:
            nf.stop()
        await xs.write(f"{fe}/state", str(int(XenbusState.CLOSED)))
        detach = await asyncio.to_thread(
            subprocess.run, [*PY, "detach", "nic", str(guest.domid), "0", "--platform", "emulated",
                             "--sim-dir", str(sim_dir)], capture_output=True, text=True)
        for nf in fronts:
            nf.close()
        for fd in fds:
            os.close(fd)
        gone = f"vif{guest.domid}.0" not in peer.ip("-br", "link", "show")
        ok = detach.returncode == 0 and gone
        why = detach.stderr.strip() or "the vif tap is still there"
        step.say("pvback detach nic: " + ("OK, backend Closed, nodes and the vif tap removed" if ok else why))
        return ok

    attach = await asyncio.to_thread(
        subprocess.run, [*PY, "attach", "nic", str(guest.domid), "--mac", GUEST_MAC, "--queues", "2",
                         "--platform", "emulated", "--sim-dir", str(sim_dir)], capture_output=True, text=True)
    if attach.returncode != 0:
        print(attach.stderr.strip(), file=sys.stderr)

        async def nothing() -> bool:
            return False

        return False, nothing
    vif = f"vif{guest.domid}.0"
    step.say(f"pvback attach nic {guest.domid} --mac {GUEST_MAC} --queues 2 -> {attach.stdout.strip()}; "
             f"tap {vif} in {peer.name}")
    try:
        fds += guest_tap(gns, queues=2, mtu=1500, mac=GUEST_MAC, addrs=[f"{GUEST_V4}/24"])
        fronts += [NetFront(guest, 0, fd, offload=True, split=True) for fd in fds]
        deadline = time.monotonic() + 10
        while vif not in peer.ip("-br", "link", "show"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {vif} in {peer.name}")
            await asyncio.sleep(0.05)
        peer.ip("addr", "add", f"{PEER_V4}/24", "dev", vif)
        await xenbus_connect(xs, fe, fronts)
        step.say(f"netfront connected: 2 queues, split event channels, GSO/checksum offload; the guest's eth0 is "
                 f"{GUEST_V4} in {gns.name}, the peer is {PEER_V4} on {vif}")
        rtts = await asyncio.to_thread(ping, gns, PEER_V4, count=3)
        step.say(f"guest pings the peer: {len(rtts)}/3 replies" +
                 (f", rtt {' '.join(f'{r * 1e3:.2f}' for r in rtts)} ms" if rtts else ""))
        ok = len(rtts) == 3 and all(nf.error is None for nf in fronts)
    except Exception as exc:
        step.say(f"NIC failed: {exc}")
        ok = False
    return ok, close
