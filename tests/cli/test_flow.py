"""The operator's happy path as separate processes: sim, serve, a guest doing verified I/O, status while it
runs, the metrics endpoint moving with the guest's I/O, structured logs, the disk going with its domain; and
the demo."""

from __future__ import annotations

import re
import time

from tests.cli.conftest import Bed, metric, run, scrape, wait_until

XVDA = 51712
XVDB = 51728


def test_serve_status_metrics_and_detach(bed: Bed) -> None:
    bed.start_sim()
    serve, addr = bed.start_serve()
    assert "loop=uvloop" in serve.text()
    img = bed.image(size=16 << 20)
    guest, domid = bed.start_guest("--attach", str(img), "--workload", "verify", "--seconds", "5")
    guest.wait_log(r"connected: ", timeout=15)
    # "connected" is printed before the guest's first request: sample once its I/O has begun.
    dev = {"type": "qdisk", "domid": str(domid), "devid": str(XVDA)}

    def moved() -> str | None:
        text = scrape(addr)
        return text if metric(text, "pvback_bytes_total", **dev) > 0 else None

    before = wait_until(moved, 10, "the guest's first I/O in the metrics")
    assert metric(before, "pvback_device_state", type="qdisk", domid=str(domid), devid=str(XVDA)) == 4
    res = run("status", *bed.sim_args(), "--metrics", addr, "--interval", "1")
    after = scrape(addr)
    assert res.returncode == 0, res.stderr
    assert guest.popen.poll() is None, "the workload ended before status sampled it"

    # status: the domain, the device Connected on both sides, negotiated features, and throughput.
    out = res.stdout
    assert re.search(rf"^{domid}\s+guest\s+1\s+0\s+0\s*$", out, re.M), out  # DOMID NAME DISKS NICS TPMS
    row = next(ln for ln in out.splitlines() if ln.startswith("qdisk"))
    cols = row.split()
    assert cols[:6] == ["qdisk", str(domid), str(XVDA), "xvda", "Connected", "Connected"], row
    reqs, mb, errs, iops, mbs = int(cols[6]), float(cols[7]), int(cols[8]), int(cols[9]), float(cols[10])
    assert reqs > 0 and mb > 0 and errs == 0 and iops > 0 and mbs > 0, row
    assert f"aio:{img}" in row and "fe:multi-queue-num-queues=2" in row and "feature-persistent=1" in row

    # metrics: per-queue counters move with the guest's I/O.
    for name in ("pvback_requests_total", "pvback_bytes_total", "pvback_request_latency_seconds_count"):
        assert metric(after, name, **dev) > metric(before, name, **dev) > 0, name
    for direction in ("read", "write"):
        assert metric(after, "pvback_bytes_total", direction=direction, **dev) > 0
    for q in ("0", "1"):  # two queues negotiated, each counted on its own
        assert metric(after, "pvback_requests_total", queue=q, **dev) > 0
    assert metric(after, "pvback_errors_total", **dev) == 0
    assert "pvback_ring_full_total{" in after
    assert metric(after, "pvback_device_connects_total", **dev) == 1

    # A second disk of the same guest that the backend refuses fails alone; the first keeps serving.
    odd = bed.root / "odd.img"
    odd.write_bytes(b"\0" * 1000)
    res = run("attach", "disk", str(domid), str(odd), "--vdev", "xvdb", *bed.sim_args())
    assert res.returncode == 1 and "not a multiple of 512" in res.stderr, res.stderr
    assert metric(scrape(addr), "pvback_device_state", domid=str(domid), devid=str(XVDA)) == 4

    rc = guest.popen.wait(30)
    assert rc == 0 and "verified" in guest.text(), guest.text()

    # Structured logs: every state change carries domid and devid.
    states = [ln for ln in serve.text().splitlines() if "msg=\"state -> " in ln]
    assert any("CONNECTED" in ln for ln in states), serve.text()
    for ln in states:
        assert f"domid={domid}" in ln and re.search(rf"devid=({XVDA}|{XVDB}) ", ln), ln
    errors = [ln for ln in serve.text().splitlines() if "level=error" in ln]
    assert errors and all(f"domid={domid}" in ln and f"devid={XVDB}" in ln for ln in errors), errors

    # The guest has exited: its domain is gone, and with it the disk `pvback guest --attach` made.
    wait_until(lambda: bed.xs("exists", f"/local/domain/0/backend/qdisk/{domid}/{XVDA}") is False, 10,
               "the daemon to remove the dead domain's disk")
    res = run("status", *bed.sim_args(), "--metrics", addr)
    assert "no devices" in res.stdout, res.stdout
    # A scrape no longer lists the removed device.
    wait_until(lambda: f'devid="{XVDA}"' not in scrape(addr), 5, "the device to leave the metrics")
    assert serve.stop() == 0


def test_status_without_daemon_says_so(bed: Bed) -> None:
    bed.start_sim()
    res = run("status", *bed.sim_args(), "--metrics", "127.0.0.1:1")
    assert res.returncode == 0, res.stderr
    assert "DOMAINS" in res.stdout and "no devices" in res.stdout
    assert "metrics endpoint 127.0.0.1:1 unreachable" in res.stdout


def test_sim_daemon_prints_paths_and_stops_by_pid(bed: Bed) -> None:
    res = run("sim", "--daemon", "--sim-dir", str(bed.sim_dir))
    assert res.returncode == 0, res.stderr
    env = dict(ln.split("=", 1) for ln in res.stdout.split())
    assert env["XENSTORED_PATH"] == str(bed.xs_sock)
    assert env["PVBACK_SIM_BROKER"] == str(bed.sim_dir / "broker.sock")
    pid = int(env["PVBACK_SIM_PID"])
    try:
        assert bed.xs("get_domain_path", "0") == "/local/domain/0"
        # Debian's xenstore tools work against it through the printed path.
        import subprocess

        out = subprocess.run(["xenstore-ls", "/local/domain"], capture_output=True, text=True, timeout=10,
                             env={"XENSTORED_PATH": env["XENSTORED_PATH"], "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0 and "0 = " in out.stdout, out
    finally:
        import os
        import signal

        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not bed.xs_sock.exists() and not (bed.sim_dir / "sim.pid").exists(), 10,
               "the sim to remove its sockets")


def test_demo_under_a_minute() -> None:
    t0 = time.monotonic()
    res = run("demo", "--size-mib", "16", timeout=60)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert "DEMO PASSED" in res.stdout
    assert took < 60
    # The NIC part: the guest reached its peer through netback, status listed the vif, the detach took the tap
    # along, and the demo's network namespaces are gone.
    assert "guest pings the peer: 3/3 replies" in res.stdout, res.stdout
    assert re.search(r"^vif\s", res.stdout, re.M), res.stdout
    assert "pvback detach nic: OK" in res.stdout, res.stdout
    import subprocess

    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pvdemo-" not in left, left


def _open_files(pid: int) -> set[str]:
    import os

    fds = f"/proc/{pid}/fd"
    out = set()
    for fd in os.listdir(fds):
        try:
            out.add(os.readlink(f"{fds}/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return out


def test_a_dead_domain_takes_its_devices_along(bed: Bed) -> None:
    """When a guest's domain dies (@releaseDomain), the daemon lets go of its disks (pumps, mappings, the image)
    and removes the nodes `pvback attach` made, as libxl does for its own: status lists nothing, no image stays
    open, and the daemon does not pick the device up again."""
    import signal

    bed.start_sim()
    serve, addr = bed.start_serve()
    a, b = bed.image("a.img"), bed.image("b.img")
    guest, domid = bed.start_guest("--attach", str(a), "--workload", "idle", "--seconds", "600")
    guest.wait_log(r"connected: ", timeout=15)
    res = run("attach", "disk", str(domid), str(b), "--vdev", "xvdb", *bed.sim_args())
    assert res.returncode == 0, res.stderr
    assert bed.xs("read", f"/local/domain/0/backend/qdisk/{domid}/{XVDB}/pvback-attached") == b"1"
    wait_until(lambda: {str(a), str(b)} <= _open_files(serve.pid), 10, "the daemon to open both images")

    guest.signal(signal.SIGKILL)  # the domain dies without closing anything
    guest.popen.wait(10)
    for devid in (XVDA, XVDB):
        for path in (f"/local/domain/0/backend/qdisk/{domid}/{devid}", f"/local/domain/{domid}/device/vbd/{devid}"):
            wait_until(lambda p=path: bed.xs("exists", p) is False, 10, f"{path} to be removed")  # type: ignore[misc]
    wait_until(lambda: not {str(a), str(b)} & _open_files(serve.pid), 10, "the daemon to close both images")
    res = run("status", *bed.sim_args(), "--metrics", addr)
    assert res.returncode == 0 and "no devices" in res.stdout, res.stdout
    wait_until(lambda: f'domid="{domid}"' not in scrape(addr), 5, "the devices to leave the metrics")
    gone = [ln for ln in serve.text().splitlines() if f"frontend domain {domid} is gone" in ln]
    assert len(gone) == 2, serve.text()
    assert "level=error" not in serve.text(), serve.text()
    time.sleep(1.5)  # a re-created device would have re-opened an image by now
    assert not {str(a), str(b)} & _open_files(serve.pid)
    assert serve.stop() == 0
