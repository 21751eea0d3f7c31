"""A guest process and a backend process (separate address spaces) exchange requests over the emulated
platform: a granted ring page, an event channel, grant copies in both directions with sub-page segments.

The guest publishes its ring ref and port over a pipe (the test relays its first stdout line to the
backend's stdin), since xenstore is not involved here.  Every request carries a grant ref to a data page:
the backend copies `len` bytes in from [in_off, in_off+len), transforms them, and copies them out to
[out_off, out_off+len); the guest checks every byte, then revokes the grant (which must succeed: the
backend's copies are over).  A few requests are deliberately bad (revoked or out-of-range refs) and must get
the right GNTST status without disturbing the rest.  Both processes report fd counts, live mappings and
bound ports at the end.

Run as a script (`python test_process_exchange.py guest|backend SIM_DIR N`) for the two roles.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import random
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REQ = struct.Struct("<QIHHHH")  # id, ref, in_off, out_off, len, op
RSP = struct.Struct("<Qh")  # id, status
SLOT = 32
OP_XFER, OP_STOP = 0, 1
DATA_PAGES = 32
BAD_EVERY = 401  # every BAD_EVERY-th request uses a ref the backend must be refused
ROOT = Path(__file__).resolve().parents[2]


def transform(data: bytes | bytearray, rid: int) -> bytes:
    k = rid & 0xFF
    return bytes(b ^ k for b in reversed(data))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_readable(fd: int, what: str) -> None:
    if not select.select([fd], [], [], 20)[0]:
        raise TimeoutError(f"no event for {what}")


def guest_main(sim_dir: str, total: int) -> dict[str, Any]:
    from backends.guests.guest import Guest
    from backends.native.events import NativeEventChannel
    from backends.native.ring import FrontRing

    fds_before = fd_count()
    rng = random.Random(1234)
    g = Guest.in_sim(sim_dir, name="xfer-guest", mem_pages=DATA_PAGES + 2)
    ring_page = g.alloc_page()
    ring_ref = g.grant(ring_page, 0)
    ring = FrontRing(g.page_view(ring_page), 1, SLOT)
    port = g.alloc_unbound(0)
    print(json.dumps({"domid": g.domid, "ring_ref": ring_ref, "port": port.port}), flush=True)

    free_pages = [g.alloc_page() for _ in range(DATA_PAGES)]
    outstanding: dict[int, tuple[int, int, int, int, bytes, bool]] = {}  # id -> page, ref, out_off, len, in, bad
    next_id = sent = verified = refused = 0
    revoked_ref = g.reserve_ref()
    stop_sent = stopped = False
    ring_busy_errno = 0
    while not stopped:
        batch: list[bytes] = []
        while free_pages and sent < total and len(batch) < ring.free_slots():
            rid = next_id
            next_id += 1
            page = free_pages.pop()
            n = rng.randint(1, 2048)
            in_off = rng.randint(0, 2048 - n)
            out_off = 2048 + rng.randint(0, 2048 - n)
            data = rng.randbytes(n)
            view = g.page_view(page)
            view[:] = b"\xee" * 4096
            view[in_off : in_off + n] = data
            bad = rid % BAD_EVERY == BAD_EVERY - 1
            if bad and rid % 2:
                g.grant(page, 0, ref=revoked_ref)
                g.revoke(revoked_ref)  # granted, then taken back: the backend must be refused
            ref = (revoked_ref if rid % 2 else g.gnt_entries + 7) if bad else g.grant(page, 0)
            outstanding[rid] = (page, ref, out_off, n, data, bad)
            batch.append(REQ.pack(rid, ref, in_off, out_off, n, OP_XFER))
            sent += 1
        if sent == total and not outstanding and not stop_sent and ring.free_slots():
            try:  # the backend still has the ring mapped: Xen refuses this revoke, and so must we
                g.revoke(ring_ref)
            except OSError as exc:
                ring_busy_errno = exc.errno or -1
            batch.append(REQ.pack(1 << 63, 0, 0, 0, 0, OP_STOP))
            stop_sent = True
        if batch:
            assert ring.put(batch, SLOT) == len(batch)
            if ring.push():
                port.notify()
        progress = bool(batch)
        while True:
            rsps = ring.consume(RSP.size)
            progress = progress or bool(rsps)
            for raw in rsps:
                rid, status = RSP.unpack(raw)
                if rid == 1 << 63:
                    stopped = True
                    continue
                page, ref, out_off, n, data, bad = outstanding.pop(rid)
                view = g.page_view(page)
                if bad:
                    want = -1 if ref == revoked_ref else -3  # GNTST_general_error / GNTST_bad_gntref
                    assert status == want, (rid, status, want)
                    assert bytes(view[2048:]) == b"\xee" * 2048, "a refused copy wrote guest memory"
                    refused += 1
                else:
                    assert status == 0, (rid, status)
                    assert bytes(view[out_off : out_off + n]) == transform(data, rid), f"request {rid} corrupted"
                    assert view[2048:out_off] == b"\xee" * (out_off - 2048), "backend wrote outside the segment"
                    assert view[out_off + n :] == b"\xee" * (4096 - out_off - n)
                    g.revoke(ref)  # the backend's copies are over, so this must not be EBUSY
                    verified += 1
                free_pages.append(page)
            if not ring.final_check():
                break
        if not stopped and not progress:
            wait_readable(port.fileno(), "responses")
            port.pending()
    # The backend unmaps the ring after answering "stop"; until then revoking it must fail with EBUSY.
    deadline = time.monotonic() + 20
    busy = 0
    while True:
        try:
            g.revoke(ring_ref)
            break
        except OSError:
            busy += 1
            assert time.monotonic() < deadline, "backend never unmapped the ring"
            time.sleep(0.001)
    port.close()
    leftover_grants = len(g.granted)
    g.close()
    # Page views keep the guest's mmap (and its fd) alive until they go.
    del ring, port, g, view
    gc.collect()
    return {
        "verified": verified,
        "refused": refused,
        "leftover_grants": leftover_grants,
        "live_channels": NativeEventChannel.live,
        "fd_delta": fd_count() - fds_before,
        "ring_revoke_busy": busy,
        "ring_revoke_errno_while_mapped": ring_busy_errno,
    }


def backend_main(sim_dir: str) -> dict[str, Any]:
    from backends.native.events import NativeEventChannel
    from backends.native.ring import BackRing
    from backends.platform.base import CopySegment
    from backends.platform.emulated import EmulatedPlatform

    fds_before = fd_count()
    hello = json.loads(sys.stdin.readline())
    domid, ring_ref = int(hello["domid"]), int(hello["ring_ref"])
    plat = EmulatedPlatform(sim_dir)
    plat.open_domain(domid)
    ring_map = plat.map_grants(domid, [ring_ref], True)
    back = BackRing(ring_map.address, 1, SLOT)
    ch = plat.bind_interdomain(domid, int(hello["port"]))
    local = bytearray(back.size * 2048)
    served = batches = copy_segments = 0
    statuses: dict[int, int] = {}
    stop = False
    while not stop:
        wait_readable(ch.fileno(), "requests")
        ch.pending()
        while True:
            reqs = [REQ.unpack(r[: REQ.size]) for r in back.consume()]
            if reqs:
                batches += 1
                xfers = [(i, r) for i, r in enumerate(reqs) if r[5] == OP_XFER]
                # One copy batch in, one out: the shape the C data path uses.
                ins = [CopySegment(domid, r[1], r[2], r[4], local, i * 2048) for i, r in xfers]
                st_in = plat.grant_copy(ins)
                outs = []
                for (i, r), st in zip(xfers, st_in, strict=True):
                    if st == 0:
                        local[i * 2048 : i * 2048 + r[4]] = transform(local[i * 2048 : i * 2048 + r[4]], r[0])
                        outs.append(CopySegment(domid, r[1], r[3], r[4], local, i * 2048, to_guest=True))
                st_out = iter(plat.grant_copy(outs))
                copy_segments += len(ins) + len(outs)
                rsps = []
                for (_i, r), st in zip(xfers, st_in, strict=True):
                    status = st if st != 0 else next(st_out)
                    statuses[status] = statuses.get(status, 0) + 1
                    rsps.append(RSP.pack(r[0], status))
                    served += 1
                for r in reqs:
                    if r[5] == OP_STOP:
                        rsps.append(RSP.pack(r[0], 0))
                        stop = True
                if back.respond(rsps, SLOT):
                    ch.notify()
            if not back.final_check():
                break
        ch.unmask()  # only after the ring is drained
    ring_map.unmap()
    mappings_after_unmap = plat.live_mappings
    ch.close()
    ports_after_close = plat.bound_ports
    plat.close_domain(domid)
    plat.close()
    del ring_map, back, ch, plat
    gc.collect()
    return {
        "served": served,
        "batches": batches,
        "copy_segments": copy_segments,
        "statuses": statuses,
        "live_mappings": mappings_after_unmap,
        "bound_ports": ports_after_close,
        "live_channels": NativeEventChannel.live,
        "fd_delta": fd_count() - fds_before,
    }


def test_guest_and_backend_processes_exchange_requests(broker: object, sim_dir: Path) -> None:
    total = 3000
    cmd = [sys.executable, __file__]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    guest = subprocess.Popen(
        [*cmd, "guest", str(sim_dir), str(total)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    backend = subprocess.Popen(
        [*cmd, "backend", str(sim_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert guest.stdout is not None and backend.stdin is not None
        hello = guest.stdout.readline()
        assert hello, guest.stderr.read() if guest.stderr else "guest died"
        backend.stdin.write(hello)
        backend.stdin.flush()
        b_out, b_err = backend.communicate(timeout=90)
        g_rest, g_err = guest.communicate(timeout=90)
    finally:
        for p in (guest, backend):
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - t0
    assert backend.returncode == 0, (b_err, g_err)
    assert guest.returncode == 0, g_err
    g = json.loads(g_rest.strip().splitlines()[-1])
    b = json.loads(b_out.strip().splitlines()[-1])
    bad_rids = [r for r in range(total) if r % BAD_EVERY == BAD_EVERY - 1]
    bad, bad_revoked = len(bad_rids), sum(r % 2 for r in bad_rids)
    print(f"\n{total} requests in {elapsed:.2f}s (process start-up included), {b['batches']} batches; {g} {b}")
    assert g["verified"] == total - bad and g["refused"] == bad
    assert b["served"] == total
    assert b["statuses"] == {"0": total - bad, "-1": bad_revoked, "-3": bad - bad_revoked}
    assert b["batches"] < total, "requests were never batched"
    for side in (g, b):
        assert side["fd_delta"] == 0, side
        assert side["live_channels"] == 0, side
    assert b["live_mappings"] == 0 and b["bound_ports"] == 0
    assert g["leftover_grants"] == 0
    assert g["ring_revoke_errno_while_mapped"] == errno.EBUSY


if __name__ == "__main__":
    role = sys.argv[1]
    result = guest_main(sys.argv[2], int(sys.argv[3])) if role == "guest" else backend_main(sys.argv[2])
    print(json.dumps(result), flush=True)
