"""The files an operator installs from contrib/: the systemd unit drives the daemon the way it is built."""

from __future__ import annotations

import shlex
from pathlib import Path

from backends.daemon.cli import build_parser
from backends.daemon.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
REPEATABLE = {"DeviceAllow"}  # list settings systemd accumulates


def _unit(path: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        if key in REPEATABLE and key in current:
            current[key] += "\n" + value
            continue
        assert key not in current, f"{key} set twice"
        current[key] = value
    return sections


def test_systemd_unit_matches_the_daemon() -> None:
    unit = _unit(ROOT / "contrib" / "systemd" / "pvback.service")
    svc = unit["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert Path(argv[0]).name == "pvback"
    args = build_parser().parse_args(argv[1:])  # the unit's command line is one the CLI accepts
    assert args.command == "serve" and args.config == "/etc/pvback/pvback.toml"
    assert "-HUP $MAINPID" in svc["ExecReload"]  # SIGHUP = reload
    assert svc["KillSignal"] == "SIGTERM"  # SIGTERM = drain, leave devices Connected
    # systemd must give the drain its time before it escalates to SIGKILL.
    assert float(svc["TimeoutStopSec"]) > Config().serve.drain_timeout_s
    assert svc["Restart"] == "on-failure"
    assert unit["Unit"]["ConditionPathExists"] == "/dev/xen/gntdev"
    assert "multi-user.target" in unit["Install"]["WantedBy"]
    # The shipped config file is valid and is the defaults (tests/daemon checks every key).
    assert load_config(ROOT / "contrib" / "pvback.toml").serve == Config().serve
    assert load_config(ROOT / "contrib" / "pvback.toml").daemon == Config().daemon


def test_systemd_unit_is_least_privilege() -> None:
    """Root at start (the daemon drops in-process; test_leastpriv runs it with this bounding set), nothing more
    than that start-up needs, and every directory the default config writes is writable under ProtectSystem."""
    svc = _unit(ROOT / "contrib" / "systemd" / "pvback.service")["Service"]
    assert svc["User"] == "root" and svc["AmbientCapabilities"] == ""
    bounding = set(svc["CapabilityBoundingSet"].split())
    assert bounding == {"CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN"}, bounding
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                       ("ProtectHome", "yes"), ("DevicePolicy", "closed"), ("SystemCallFilter", "@system-service"),
                       ("RestrictAddressFamilies", "AF_UNIX AF_NETLINK AF_INET AF_INET6")]:
        assert svc[key] == value, key
    allowed = svc["DeviceAllow"].splitlines()
    assert sorted(allowed) == sorted(f"{node} rw" for node in
                                     ("/dev/xen/gntdev", "/dev/xen/evtchn", "/dev/xen/xenbus", "/dev/net/tun"))
    writable = [f"/var/lib/{svc['StateDirectory']}/", f"/run/{svc['RuntimeDirectory']}/"]
    assert svc["RuntimeDirectoryPreserve"] == "yes"  # vif control state and swtpm run files outlive a restart
    from backends.daemon.devtypes import load_device_types

    cfg = Config()
    for dt in load_device_types():
        for d in dt.privileges(cfg.section(dt.name)).dirs:
            assert any(d.startswith(w) for w in writable), (dt.name, d)
    # The dedicated user the daemon looks for is the one sysusers.d creates.
    from backends.daemon.privdrop import DEFAULT_USER

    users = [ln.split() for ln in (ROOT / "contrib" / "sysusers.d" / "pvback.conf").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert users[0][:2] == ["u", DEFAULT_USER]
