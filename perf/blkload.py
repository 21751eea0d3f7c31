"""The benchmark's guest: an emulated domain whose blkfront handshake runs in Python and whose I/O loop runs in
C (csrc/blkfront_load.c), so what is measured is the backend and not the frontend's interpreter.

One process = one guest = one disk connection (queues and grant mode fixed by the handshake); it runs a list
of workloads on that connection and writes one JSON result per workload:

    python -m perf.blkload --sim-dir D --params aio:/dev/shm/x.img --queues 2 --persistent 1 \
        --workloads '[{"name": "rr4k_qd32", "rw": "randread", "bs": 4096, "qd": 32}]' --seconds 4 --out r.json

The device is created here with dom0's xenstore socket of the simulator (what `pvback attach` does), and
removed at the end.  CPU time: this process (getrusage around each C run) and the backend process (the sum
of its threads' /proc/<pid>/task/*/schedstat run times) when --backend-pid is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PAGE = 4096
MAX_DIRECT_SEGS = 11
RW_READ_PCT = {"randread": 100, "read": 100, "randwrite": 0, "write": 0, "randrw": 50, "rw": 50}


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # randread | randwrite | read | write | randrw | rw
    bs: int
    qd: int

    @property
    def random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def read_pct(self) -> int:
        return RW_READ_PCT[self.rw]

    @property
    def segs(self) -> int:
        return -(-self.bs // PAGE)


@dataclass
class LoadResult:
    name: str
    ops: int
    errors: int
    elapsed_s: float
    iops: float
    mb_s: float
    lat_mean_us: float
    lat_min_us: float
    lat_max_us: float
    p50_us: float
    p99_us: float
    p999_us: float
    notifies: int
    sleeps: int
    cpu_frontend_s: float
    cpu_backend_s: float | None
    hist_ns: list[tuple[int, int]] = field(default_factory=list)  # (bucket value ns, count), nonzero only


def thread_cpu_ns(pid: int) -> int:
    """CPU time (ns) `pid` has used, threads that already exited included: utime + stime of /proc/<pid>/stat.
    (Summing the live threads' schedstat is finer grained but loses the time of an I/O pool that exits in the
    window, e.g. the previous disk's, and then goes negative.)  Resolution: one clock tick (10 ms)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class LoadGenerator:
    """The C generator bound to a connected BlkFront: data pages granted once per request id."""

    def __init__(self, front: Any, guest: Any, max_qd: int, max_segs: int) -> None:
        from backends._guest_native import ffi
        from backends.blk.proto import Abi

        self.ffi = ffi
        self.front = front
        self.guest = guest
        self.abi = int(Abi.X86_64 if front.abi.name == "x86_64-abi" else Abi.X86_32)
        self.max_qd = max_qd
        self.max_segs = max_segs
        be = front.backend_id
        self.data_pages: list[int] = []
        self.refs: list[int] = []
        for _ in range(max_qd * max_segs):
            p = guest.alloc_page()
            self.data_pages.append(p)
            self.refs.append(guest.grant(p, be))
        self.ind_pages: list[int] = []
        self.ind_refs: list[int] = []
        if max_segs > MAX_DIRECT_SEGS:
            for _ in range(max_qd):
                p = guest.alloc_page()
                self.ind_pages.append(p)
                self.ind_refs.append(guest.grant(p, be, readonly=True))
        self.c_refs = ffi.new("uint32_t[]", self.refs)
        self.c_ind_refs = ffi.new("uint32_t[]", self.ind_refs or [0])
        self.c_ind_addrs = ffi.new("void *[]", [guest.page_address(p) for p in self.ind_pages] or [ffi.NULL])
        self.pages = ffi.new("struct pv_load_pages *")
        self.pages.data_refs = self.c_refs
        self.pages.segs_per_req = max_segs
        self.pages.ind_refs = self.c_ind_refs if self.ind_pages else ffi.NULL
        self.pages.ind_addrs = self.c_ind_addrs if self.ind_pages else ffi.NULL
        self.queues = ffi.new("struct pv_load_queue[]", len(front.queues))
        for i, q in enumerate(front.queues):
            # Made by the backend's module (the guest model's rings and ports): the same C objects, typed anew.
            self.queues[i].ring = ffi.cast("struct pv_front_ring *", q.ring.c)
            self.queues[i].evtchn = ffi.cast("struct pv_evtchn *", q.port.c)
        self.res = ffi.new("struct pv_load_result *")
        self.err = ffi.new("char[]", 256)

    def run(self, w: Workload, *, seconds: float, region_bytes: int, spin_us: int = 0, max_ops: int = 0,
            seed: int = 1, backend_pid: int | None = None, hostile: bool = False) -> LoadResult:
        from backends._guest_native import lib

        if w.qd > self.max_qd or w.segs > self.max_segs:
            raise ValueError(f"{w.name}: needs qd {w.qd} x {w.segs} pages, the generator has {self.max_qd} x "
                             f"{self.max_segs}")
        ffi = self.ffi
        cfg = ffi.new("struct pv_load_config *")
        cfg.abi = self.abi
        cfg.nqueues = len(self.front.queues)
        cfg.qd = w.qd
        cfg.bs = w.bs
        cfg.read_pct = w.read_pct
        cfg.random = int(w.random)
        cfg.region_bytes = region_bytes
        cfg.duration_ns = int(seconds * 1e9)
        cfg.max_ops = max_ops
        # Hostile: never sleep, and hammer the event channel while waiting (csrc/blkfront_load.h).
        cfg.spin_us = 3_600_000_000 if hostile else spin_us
        cfg.notify_spin = int(hostile)
        cfg.stall_ms = 20_000
        cfg.seed = seed
        cfg.block_read = int(len(self.front.queues) == 1)  # the parent bounds this process's run time
        fe0 = self_cpu_s()
        be0 = thread_cpu_ns(backend_pid) if backend_pid else 0
        rc = int(lib.pv_load_run(cfg, self.queues, self.pages, self.res, self.err, 256))
        be1 = thread_cpu_ns(backend_pid) if backend_pid else 0
        fe1 = self_cpu_s()
        if rc != 0:
            raise RuntimeError(f"{w.name}: load generator failed ({rc}): {ffi.string(self.err).decode()}")
        r = self.res
        ops = int(r.ops)
        el = int(r.elapsed_ns) / 1e9 or 1e-9
        hist = [(int(lib.pv_load_bucket_value(i)), int(r.hist[i])) for i in range(lib.PV_LOAD_HIST_BUCKETS)
                if r.hist[i]]
        return LoadResult(
            name=w.name, ops=ops, errors=int(r.errors), elapsed_s=el, iops=ops / el,
            mb_s=int(r.bytes) / el / 1e6,
            lat_mean_us=int(r.lat_sum_ns) / max(ops, 1) / 1e3,
            lat_min_us=int(r.lat_min_ns) / 1e3, lat_max_us=int(r.lat_max_ns) / 1e3,
            p50_us=int(lib.pv_load_percentile(r, 50.0)) / 1e3,
            p99_us=int(lib.pv_load_percentile(r, 99.0)) / 1e3,
            p999_us=int(lib.pv_load_percentile(r, 99.9)) / 1e3,
            notifies=int(r.notifies), sleeps=int(r.sleeps),
            cpu_frontend_s=fe1 - fe0,
            cpu_backend_s=(be1 - be0) / 1e9 if backend_pid else None,
            hist_ns=hist,
        )

    def release(self) -> None:
        """Revoke the grants (the backend has let go after disconnect) and free the pages."""
        for ref, page in zip(self.refs + self.ind_refs, self.data_pages + self.ind_pages, strict=True):
            for _ in range(500):
                try:
                    self.guest.revoke(ref)
                    break
                except OSError:
                    time.sleep(0.01)
            self.guest.free_page(page)
        self.refs, self.ind_refs, self.data_pages, self.ind_pages = [], [], [], []


async def session(args: argparse.Namespace, workloads: list[Workload]) -> list[LoadResult]:
    from backends.guests.blkfront import BlkFront
    from backends.guests.guest import Guest
    from backends.xenbus.state import XenbusState
    from backends.xenbus.toolstack import add_device, remove_device, wait_for_state
    from backends.xenstore.client import XenStoreClient

    max_qd = max(w.qd for w in workloads)
    max_segs = max(w.segs for w in workloads)
    per_queue = -(-max_qd // args.queues)
    order = 0
    while (((PAGE << order) - 64) // 112) < per_queue:
        order += 1
    npages = max_qd * max_segs + max_qd + (args.queues << order) + 1100  # + the BlkFront pools' first pages
    sim = Path(args.sim_dir)
    guest = Guest.in_sim(sim, name=args.name, mem_pages=npages, gnt_entries=npages + 64)
    assert guest.xenstore_sock is not None
    xs = await XenStoreClient.from_socket(guest.xenstore_sock)
    dom0 = await XenStoreClient.connect(str(sim / "xenstored.sock"))
    devid = 51712
    front: BlkFront | None = None
    gen: LoadGenerator | None = None
    added = False
    results: list[LoadResult] = []
    try:
        backend = {"params": args.params, "type": "qdisk", "mode": "w", "dev": "xvda", "device-type": "disk",
                   "removable": "0", "bootable": "1", "discard-enable": "0", **json.loads(args.backend_keys)}
        frontend = {"virtual-device": str(devid), "device-type": "disk", "trusted": "1"}
        paths = await add_device(dom0, backend_domid=0, frontend_domid=guest.domid, type_name="qdisk",
                                 devid=devid, backend=backend, frontend=frontend, frontend_type="vbd")
        added = True
        await wait_for_state(dom0, paths.backend, {XenbusState.INIT_WAIT}, timeout=15)
        front = BlkFront(guest, xs, devid, ring_page_order=order, queues=args.queues,
                         persistent=bool(args.persistent), timeout=15)
        info = await front.connect()
        if info.queues != args.queues or info.persistent != bool(args.persistent):
            raise RuntimeError(f"negotiated {info.queues} queues / persistent={info.persistent}, wanted "
                               f"{args.queues} / {bool(args.persistent)}")
        loop = asyncio.get_running_loop()
        for q in front.queues:  # the C loop owns the event fds from here on
            loop.remove_reader(q.port.fileno())
        gen = LoadGenerator(front, guest, max_qd, max_segs)
        region = min(info.size_bytes, args.region_mib << 20) if args.region_mib else info.size_bytes
        if args.start_file:
            # Several guests measured together: each says it is connected (START_FILE.ready.NAME), the runner
            # writes the common start time (time.time()) into START_FILE once all are, and all start then.
            start = Path(args.start_file)
            Path(f"{start}.ready.{args.name}").touch()
            while not start.exists():
                await asyncio.sleep(0.02)
            await asyncio.sleep(max(0.0, float(start.read_text()) - time.time()))
        for i, w in enumerate(workloads):
            if args.warmup > 0:
                gen.run(w, seconds=args.warmup, region_bytes=region, spin_us=args.spin_us, seed=1000 + i,
                        hostile=args.hostile)
            r = gen.run(w, seconds=args.seconds, region_bytes=region, spin_us=args.spin_us, seed=i + 1,
                        backend_pid=args.backend_pid, hostile=args.hostile)
            results.append(r)
            print(json.dumps({"progress": w.name, "iops": round(r.iops), "p50_us": r.p50_us}), flush=True)
        return results
    finally:
        if front is not None:
            with contextlib.suppress(Exception):
                await front.close()
        if gen is not None:
            gen.release()
        if front is not None:
            with contextlib.suppress(Exception):
                await front.release()
        if added:
            with contextlib.suppress(Exception):
                await remove_device(dom0, backend_domid=0, frontend_domid=guest.domid, type_name="qdisk",
                                    devid=devid, frontend_type="vbd", timeout=10)
        await dom0.close()
        await xs.close()
        guest.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.blkload", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--sim-dir", required=True)
    p.add_argument("--params", required=True, help="the backend's params (aio:/path, null:SIZE)")
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--persistent", type=int, choices=(0, 1), default=0)
    p.add_argument("--workloads", required=True, help="JSON list of {name, rw, bs, qd}")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--spin-us", type=int, default=0)
    p.add_argument("--region-mib", type=int, default=0, help="limit offsets to the first N MiB (0: whole disk)")
    p.add_argument("--backend-pid", type=int, default=None)
    p.add_argument("--name", default="bench-guest")
    p.add_argument("--backend-keys", default="{}", help="JSON object: more backend keys (e.g. the disk's limits)")
    p.add_argument("--start-file", default="",
                   help="start together with other guests: touch START_FILE.ready.NAME once connected, then wait "
                        "for START_FILE and start at the time.time() it holds")
    p.add_argument("--hostile", action="store_true",
                   help="spin on the ring and notify in a loop instead of sleeping (the noisy neighbour)")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workloads = [Workload(**w) for w in json.loads(args.workloads)]
    if not workloads:
        print("no workloads", file=sys.stderr)
        return 2
    results = asyncio.run(session(args, workloads))
    tmp = f"{args.out}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump([asdict(r) for r in results], f)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
