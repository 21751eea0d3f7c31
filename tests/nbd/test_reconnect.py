"""Reconnect: a server killed mid-workload loses its cache; the replay log must restore every acknowledged write.

nbdkit's memory plugin keeps nothing across a restart, which is the worst case for us: a server whose volatile
cache dies with the connection.  The test plays the storage's part of the contract itself: what was flushed
before the kill is durable, so it writes that state (and only that) into the new server before letting the
engine reconnect.  Everything acknowledged after that flush exists only in the engine's replay log.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from backends.drivers.storage.nbd import STATE_DISCONNECTED, STATE_FAILED, NbdDriver
from backends.native import lib
from tests.nbd.conftest import (
    Harness,
    Nbdkit,
    Op,
    disjoint,
    flush_op,
    needs_nbdkit,
    random_extent,
    read_op,
    write_op,
)

pytestmark = [needs_nbdkit, pytest.mark.timeout(60)]
SIZE = 8 << 20


async def settle(h: Harness, ops: list[Op], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        h.harvest()
        if all(o.result is not None for o in ops):
            return
        if loop.time() > end:
            raise TimeoutError(f"{sum(o.result is None for o in ops)} of {len(ops)} ops still pending")
        await asyncio.sleep(0.002)


def write_batch(rng: random.Random, n: int, taken: list[tuple[int, int]], hi: int = 256 << 10) -> list[Op]:
    ops: list[Op] = []
    while len(ops) < n:
        off, ln = random_extent(rng, SIZE, 4096, hi)
        if disjoint(taken, off, ln):
            taken.append((off, ln))
            ops.append(write_op(off, rng.randbytes(ln)))
    return ops


def apply(model: bytearray, ops: list[Op]) -> None:
    for o in ops:
        if o.op in (lib.PV_IO_WRITE, lib.PV_IO_WRITE_SYNC):
            assert o.result == 0 and o.buf is not None
            model[o.offset : o.offset + o.length] = o.buf


def nbdcopy(src: str, dst: str) -> None:
    subprocess.run(["nbdcopy", src, dst], check=True, timeout=30)


def test_kill_mid_workload_replays_acknowledged_writes(workdir: Path) -> None:
    asyncio.run(_kill_mid_workload(workdir))


async def _kill_mid_workload(workdir: Path) -> None:
    rng = random.Random(2024)
    # The delay filter keeps the last batch's writes inside the server when it is killed.
    srv1 = Nbdkit(workdir, ["--filter=delay", "memory", f"size={SIZE}", "delay-write=40ms"], name="srv1")
    srv2: Nbdkit | None = None
    drv = NbdDriver(srv1.uri, reconnect_deadline=20, backoff_initial=0.02, backoff_max=0.2)
    drv.open()  # inside the loop: the reconnect supervisor starts with it
    h = Harness(drv.engine().c)
    model = bytearray(SIZE)
    after_flush: list[Op] = []  # every write the counterfactual (no replay) server would still see
    try:
        # A: some writes, then a flush: the durable state.
        ops = write_batch(rng, 24, [])
        h.submit(ops)
        await settle(h, ops)
        apply(model, ops)
        fl = flush_op()
        h.submit([fl])
        await settle(h, [fl])
        assert fl.result == 0
        durable = bytes(model)
        assert drv.stats()["log_entries"] == 0  # the flush emptied the replay log

        # B: acknowledged but not flushed: only the replay log keeps these.
        acked_b: list[Op] = []
        for _ in range(3):
            ops = write_batch(rng, 12, [])
            h.submit(ops)
            await settle(h, ops)
            apply(model, ops)
            acked_b += ops
        st = drv.stats()
        assert st["log_entries"] == len(acked_b)

        # C: a batch in flight when the server dies.  (No flush here: nbdkit would answer it at once, making
        # B durable on a server whose "storage" this test cannot keep.)
        taken: list[tuple[int, int]] = []
        in_flight = write_batch(rng, 12, taken)
        h.submit(in_flight)
        await asyncio.sleep(0.01)
        srv1.kill()
        h.harvest()
        unanswered = sum(o.result is None for o in in_flight)
        assert unanswered, "the kill was meant to catch writes in flight"
        for _ in range(200):
            if drv.stats()["state"] == STATE_DISCONNECTED:
                break
            await asyncio.sleep(0.005)
        assert drv.stats()["state"] == STATE_DISCONNECTED

        # D: the workload goes on while the server is away: ops queue, nothing fails.
        queued = write_batch(rng, 6, taken)
        read_ranges: list[Op] = []
        while len(read_ranges) < 4:
            off, ln = random_extent(rng, SIZE, 4096, 128 << 10)
            if disjoint(taken, off, ln):
                taken.append((off, ln))
                read_ranges.append(read_op(off, ln))
        queued += [*read_ranges, flush_op()]
        h.submit(queued)
        await asyncio.sleep(0.1)
        h.harvest()
        assert all(o.result is None for o in queued), "ops completed while no server existed"

        # The new server gets exactly the durable state (what storage must keep), on a side path; then it
        # takes the old socket's place, and the engine finds it there.
        (workdir / "durable.raw").write_bytes(durable)
        srv2 = Nbdkit(workdir, ["memory", f"size={SIZE}"], name="srv2")
        await asyncio.to_thread(nbdcopy, str(workdir / "durable.raw"), srv2.uri)
        os.rename(srv2.sock, srv1.sock)
        srv2.sock = srv1.sock

        await settle(h, in_flight + queued)
        assert [o.result for o in in_flight + queued] == [0] * len(in_flight + queued)
        expected_reads = bytes(model)  # the reads touched nothing written since A/B
        for o in read_ranges:
            assert bytes(o.buf or b"") == expected_reads[o.offset : o.offset + o.length]
        apply(model, in_flight)
        apply(model, queued)
        after_flush += in_flight + queued
        st = drv.stats()
        assert st["reconnects"] == 1
        for _ in range(200):  # the supervisor counts once its worker thread has returned
            if drv.reconnects:
                break
            await asyncio.sleep(0.005)
        assert drv.reconnects == 1
        assert st["replayed_writes"] >= len(acked_b)
        assert st["resent_commands"] >= unanswered + len(queued)

        # E: the workload continues on the new server.
        for _ in range(3):
            ops = write_batch(rng, 8, [])
            h.submit(ops)
            await settle(h, ops)
            apply(model, ops)
            after_flush += ops

        # Every acknowledged byte is there: through the engine, and read independently with nbdcopy.
        reads = [read_op(off, 1 << 20) for off in range(0, SIZE, 1 << 20)]
        h.submit(reads)
        await settle(h, reads)
        assert b"".join(bytes(o.buf or b"") for o in reads) == model
        await asyncio.to_thread(nbdcopy, srv2.uri, str(workdir / "after.raw"))
        assert (workdir / "after.raw").read_bytes() == model

        # The check has teeth: without the replay, the server would hold the durable state plus the
        # writes sent after the kill, which differs from what the guest was told.
        counterfactual = bytearray(durable)
        apply(counterfactual, after_flush)
        assert counterfactual != model
    finally:
        h.harvest()
        drv.close()
        h.close()
        srv1.stop()
        if srv2 is not None:
            srv2.stop()


def test_server_gone_past_deadline_fails_ops(workdir: Path) -> None:
    asyncio.run(_gone(workdir))


async def _gone(workdir: Path) -> None:
    srv = Nbdkit(workdir, ["--filter=delay", "memory", f"size={SIZE}", "delay-write=200ms"])
    drv = NbdDriver(srv.uri, reconnect_deadline=0.4, backoff_initial=0.02, backoff_max=0.1)
    drv.open()
    h = Harness(drv.engine().c)
    try:
        ops = write_batch(random.Random(1), 4, [])
        h.submit(ops)
        await asyncio.sleep(0.02)
        srv.kill()
        await settle(h, ops, timeout=10)
        assert [o.result for o in ops] == [-errno.EIO] * 4
        assert drv.stats()["state"] == STATE_FAILED
        assert drv.failure is not None and "gone for more than" in str(drv.failure)
        late = read_op(0, 4096)
        h.submit([late])
        h.harvest()
        assert late.result == -errno.EIO  # failed at once, not queued
    finally:
        drv.close()
        h.close()


def test_log_stays_bounded(workdir: Path, nbdkit_factory: Any) -> None:
    """Past its bound the log issues a flush and holds new writes until it completes."""
    srv = nbdkit_factory(["memory", f"size={SIZE}"])
    limit = 256 << 10
    drv = NbdDriver(srv.uri, log_limit=limit)
    drv.open()
    h = Harness(drv.engine().c)
    try:
        model = bytearray(SIZE)
        rng = random.Random(3)
        peak = 0
        for _ in range(16):
            ops = write_batch(rng, 8, [], hi=64 << 10)
            assert h.run(ops) == [0] * len(ops)
            apply(model, ops)
            peak = max(peak, drv.stats()["log_bytes"])
        st = drv.stats()
        assert st["bound_flushes"] > 0
        assert peak <= limit + 8 * (64 << 10)
        reads = [read_op(off, 1 << 20) for off in range(0, SIZE, 1 << 20)]
        assert h.run(reads) == [0] * len(reads)
        assert b"".join(bytes(o.buf or b"") for o in reads) == model
    finally:
        drv.close()
        h.close()
