"""The daemon under signals, as systemd sends them: SIGHUP reloads (a bad file is refused and changes nothing),
SIGTERM drains, exits 0 and leaves devices Connected for the next daemon, which resumes the guest's I/O."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.cli.conftest import Bed, metric, run, scrape, wait_until

XVDA = 51712
XVDB = 51728


def test_sighup_valid_then_invalid_config(bed: Bed) -> None:
    bed.start_sim()
    conf = bed.root / "pvback.toml"
    conf.write_text('[serve]\nbackend_types = ["qdisk"]\n')
    serve, addr = bed.start_serve("--config", str(conf))
    img = bed.image(size=8 << 20)
    guest, domid = bed.start_guest("--attach", str(img), "--workload", "verify", "--seconds", "5")
    guest.wait_log(r"connected: ", timeout=15)
    _holder, other = bed.start_guest("--workload", "hold", "--seconds", "0", name="holder")

    fds_before = _sockets(serve.pid)
    # Valid: serve vbd too, and offer new connections a single queue.  The connected guest keeps its two.
    conf.write_text('[serve]\nbackend_types = ["qdisk", "vbd"]\nlog_format = "json"\n[blk]\nmax_queues = 1\n')
    mark = len(serve.text())
    serve.signal(signal.SIGHUP)
    serve.wait_log(r'"msg": "reloaded".*"changed": "serve,blk".*"types": "qdisk,vbd"', after=mark)
    res = run("attach", "disk", str(other), str(bed.image("b.img")), "--type", "vbd", "--vdev", "xvdb",
              "--timeout", "5", *bed.sim_args())
    assert res.returncode == 0, res.stderr  # nobody would have taken a vbd device before the reload
    assert bed.xs("read_str", f"/local/domain/0/backend/vbd/{other}/{XVDB}/multi-queue-max-queues") == "1"
    assert metric(scrape(addr), "pvback_device_state", type="vbd", domid=str(other)) == 2  # InitWait
    # The command-line --metrics kept its port over the file's default.
    assert f'"metrics": "{addr}"' in serve.text()[mark:]
    # The new log format took effect: JSON records, a state change carrying the device's domid and devid.
    records = [json.loads(ln) for ln in serve.text()[mark:].splitlines() if ln.startswith("{")]
    init_wait = [r for r in records if r["msg"] == "state -> INIT_WAIT"]
    assert init_wait and init_wait[0]["domid"] == other and init_wait[0]["devid"] == XVDB, records

    # Invalid: refused with the reason, nothing changes, the daemon keeps serving.
    conf.write_text('[serve]\nbackend_types = ["qdisk", "vbd"]\n[blk]\nmax_queus = 1\n')
    mark = len(serve.text())
    serve.signal(signal.SIGHUP)
    line = serve.wait_log(r".*reload refused.*", after=mark).group(0)
    assert '"level": "error"' in line and "unknown key [blk] max_queus" in line, line
    conf.write_text("[serve\n")
    mark = len(serve.text())
    serve.signal(signal.SIGHUP)
    assert "not valid TOML" in serve.wait_log(r".*reload refused.*", after=mark).group(0)
    assert serve.popen.poll() is None
    text = scrape(addr)
    assert metric(text, "pvback_device_state", type="vbd", domid=str(other)) == 2
    assert metric(text, "pvback_device_state", type="qdisk", domid=str(domid)) == 4

    # Reloads do not leak xenstore connections (each used to open a new one and keep the old).
    for _ in range(3):
        mark = len(serve.text())
        serve.signal(signal.SIGHUP)
        serve.wait_log(r"reload refused", after=mark)
    conf.write_text('[serve]\nbackend_types = ["qdisk"]\n')  # drop vbd again: its bus stops, qdisk's stays
    mark = len(serve.text())
    serve.signal(signal.SIGHUP)
    serve.wait_log(r"msg=reloaded .*types=qdisk ", after=mark)
    assert _sockets(serve.pid) <= fds_before + 1  # +1: a metrics scrape may still be closing

    # The guest's verified I/O ran through every reload undisturbed.
    assert guest.popen.wait(30) == 0, guest.text()
    assert "verified" in guest.text()
    assert serve.stop() == 0


def _sockets(pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    return sum(1 for fd in os.listdir(fd_dir) if os.readlink(f"{fd_dir}/{fd}").startswith("socket:"))


def test_sigterm_drains_leaves_connected_and_a_new_daemon_resumes(bed: Bed) -> None:
    bed.start_sim()
    serve, addr = bed.start_serve()
    img = bed.image(size=8 << 20)
    guest, domid = bed.start_guest("--attach", str(img), "--workload", "verify", "--seconds", "6")
    guest.wait_log(r"connected: ", timeout=15)
    time.sleep(1.5)  # into the random verified phase: requests are in flight when the signal lands
    assert metric(scrape(addr), "pvback_requests_total", domid=str(domid)) > 0

    t0 = time.monotonic()
    assert serve.stop(timeout=15) == 0
    stop_s = time.monotonic() - t0
    assert "msg=drained devices=1" in serve.text()
    be = f"/local/domain/0/backend/qdisk/{domid}/{XVDA}"
    assert bed.xs("read_str", f"{be}/state") == "4"  # Connected: the frontend never saw a close
    assert bed.xs("read_str", f"/local/domain/{domid}/device/vbd/{XVDA}/state") == "4"
    assert guest.popen.poll() is None

    serve2, addr2 = bed.start_serve(name="serve2")
    serve2.wait_log(r"state -> CONNECTED", timeout=10)
    # The guest's I/O after the restart goes through the new daemon.
    wait_until(lambda: metric(scrape(addr2), "pvback_requests_total", domid=str(domid)) > 0, 5,
               "requests through the new daemon")
    assert guest.popen.poll() is None, "the workload ended before the new daemon served it"
    assert guest.popen.wait(30) == 0, guest.text()
    assert "verified" in guest.text()
    assert serve2.stop() == 0
    assert stop_s < 10, f"SIGTERM took {stop_s:.1f} s"
