"""The files an operator installs from contrib/: the systemd unit drives the daemon the way it is built."""

from __future__ import annotations

import shlex
from pathlib import Path

from backends.daemon.cli import build_parser
from backends.daemon.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]


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
