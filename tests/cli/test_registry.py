"""A device type registered from a test package (tests/cli/toytype) is served by the daemon, attached and
detached by the CLI, configured from the file, shown by `pvback status` and counted by the metrics endpoint,
with no change outside that package: the registry is the only way in."""

from __future__ import annotations

import re

from tests.cli.conftest import Bed, metric, run, scrape, wait_until

TOY = {"PVBACK_DEVICE_MODULES": "tests.cli.toytype.devtype"}


def test_a_device_type_from_a_test_package_is_served(bed: Bed) -> None:
    bed.start_sim()
    cfg = bed.root / "pvback.toml"
    cfg.write_text('[serve]\nbackend_types = ["qdisk", "toy"]\n\n[toy]\ngreeting = "hi"\nmax_word = 8\n')
    serve = bed.spawn("serve", "serve", *bed.sim_args(), "--config", str(cfg), "--metrics", "127.0.0.1:0",
                      extra_env=TOY)
    addr = serve.wait_log(r"msg=serving metrics=(\S+)").group(1)
    assert "types=qdisk,toy" in serve.text()
    _guest, domid = bed.start_guest("--workload", "hold", "--seconds", "0")

    res = run("attach", "toy", str(domid), "bob", "--number", "3", *bed.sim_args(), extra_env=TOY)
    assert res.returncode == 0, res.stderr
    be, fe = f"/local/domain/0/backend/toy/{domid}/3", f"/local/domain/{domid}/device/toy/3"
    assert res.stdout.strip() == be
    assert bed.xs("read", f"{be}/feature-toy") == b"1" and bed.xs("read", f"{be}/state") == b"2"

    # The guest's side, as a frontend would do it: a word, then Initialised.
    bed.xs("write", f"{fe}/word", "there")
    bed.xs("write", f"{fe}/state", "3")
    wait_until(lambda: bed.xs("read", f"{be}/state") == b"4", 10, "the toy backend to say Connected")
    assert bed.xs("read", f"{be}/greeting") == b"hi there"

    out = run("status", *bed.sim_args(), "--metrics", addr, "--interval", "0", extra_env=TOY).stdout
    assert re.search(rf"^{domid}\s+guest\s+0\s+0\s+0\s+1\s*$", out, re.M), out  # DOMID NAME DISKS NICS TPMS TOYS
    row = next(ln for ln in out.splitlines() if ln.startswith("toy "))
    assert row.split()[:5] == ["toy", str(domid), "3", "Connected", "Initialised"], row  # no `dev` key
    assert "bob" in row and "greeting=hi there" in row and "fe:word=there" in row, row
    text = scrape(addr)
    assert metric(text, "pvback_device_state", type="toy", domid=str(domid), devid="3") == 4
    assert metric(text, "pvback_requests_total", type="toy", op="connect") == 1

    # A word longer than the configured max fails this device alone.
    bed.xs("write", f"{fe}/state", "1")
    wait_until(lambda: bed.xs("read", f"{be}/state") == b"2", 10, "the toy backend to go back to InitWait")
    bed.xs("write", f"{fe}/word", "far-too-long")
    bed.xs("write", f"{fe}/state", "3")
    wait_until(lambda: b"12 bytes long" in (bed.xs("read", f"{be}/error") or b""), 10, "the toy's error node")

    bed.xs("write", f"{fe}/state", "6")  # the frontend answers the failed device's Closing
    res = run("detach", "toy", str(domid), "3", *bed.sim_args(), "--timeout", "5", extra_env=TOY)
    assert res.returncode == 0, res.stderr
    assert bed.xs("exists", be) is False and bed.xs("exists", fe) is False
    errors = [ln for ln in serve.text().splitlines() if "level=error" in ln]
    assert len(errors) == 1 and "frontend key word is 12 bytes long" in errors[0], errors
    assert serve.stop() == 0


def test_without_the_module_the_type_is_unknown(bed: Bed) -> None:
    res = run("attach", "toy", "1", "bob")
    assert res.returncode == 2 and "invalid choice: 'toy'" in res.stderr
    res = run("serve", "--types", "toy", "--platform", "emulated", "--sim-dir", str(bed.sim_dir))
    assert res.returncode == 1 and "unknown backend type 'toy'" in res.stderr, res.stderr
