"""Per-request cost of the C data path (kick + complete), driven from Python one batch at a time.

    .venv/bin/python -m tests.blk.bench [iterations]

Each iteration queues 32 4 KiB reads (one full 1-page ring), pushes, makes one kick, and consumes the 32
responses: Python runs per batch, C per request.  Engines: null (framework cost) and an inline tmpfs file.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from backends.blk.proto import Abi
from backends.drivers.storage import FileDriver, NullDriver, StorageDriver

from . import wire
from .harness import Rig

BATCH = 32
DISK = 64 << 20


def run(driver: StorageDriver, iterations: int, *, persistent: bool = False) -> float:
    """Requests per second through kick+respond for batches of 32 4 KiB reads."""
    caps = driver.capabilities()
    rig = Rig(driver.engine(), abi=Abi.X86_64, sectors=caps.sectors, persistent=persistent)
    try:
        slots = [wire.rw(2, 0, i, 8 * i, [(rig.data_refs[i], 0, 7)]) for i in range(BATCH)]
        front, q = rig.front, rig.q
        warm = max(10, iterations // 10)
        t0 = 0.0
        for it in range(iterations + warm):
            if it == warm:
                t0 = time.perf_counter()
            front.put(slots, 112)
            front.push()
            q.kick()
            got = len(front.consume(16))
            while got < BATCH:  # threaded engines only
                q.complete()
                got += len(front.consume(16))
        dt = time.perf_counter() - t0
        st = q.stats()
        assert st["errors"] == 0 and st["responses"] == (iterations + warm) * BATCH
        return iterations * BATCH / dt
    finally:
        rig.close()


def tmpfs_image() -> Path:
    p = Path("/dev/shm") / f"pvback-bench-{os.getpid()}.img"
    with open(p, "wb") as f:
        f.truncate(DISK)
    with open(p, "r+b") as f:
        f.write(os.urandom(BATCH * 4096))
    return p


def main(iterations: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with NullDriver(DISK) as d:
        out["null/copy"] = run(d, iterations)
        out["null/persistent"] = run(d, iterations, persistent=True)
    img = tmpfs_image()
    try:
        with FileDriver(img, mode="inline") as d:
            out["tmpfs-inline/copy"] = run(d, iterations)
            out["tmpfs-inline/persistent"] = run(d, iterations, persistent=True)
    finally:
        img.unlink()
    return out


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    for name, rps in main(n).items():
        print(f"{name:26s} {rps / 1e3:8.0f} k req/s  {1e6 / rps:6.2f} us/req  (batch {BATCH} x 4 KiB reads)")
