"""`pvback`: the command line.

Every operator error ends in one line on stderr that says what is wrong and how to fix it, and a non-zero exit
status; commands that create state undo what they did when they fail half-way.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from backends.daemon.config import (
    DEFAULT_SIM_DIR,
    Config,
    ConfigError,
    check_backend_types,
    check_listen,
    load_config,
)
from backends.daemon.devtypes import load_device_types
from backends.daemon.errors import CliError
from backends.xenbus.registry import CommandError

__all__ = ["CliError", "build_parser", "main"]


def _sim_dir_default() -> str:
    return os.environ.get("PVBACK_SIM_DIR") or DEFAULT_SIM_DIR


def _add_platform_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file (default /etc/pvback/pvback.toml if present)")
    p.add_argument("--platform", choices=("auto", "xen", "emulated"), help="override [platform] kind")
    p.add_argument("--sim-dir", help=f"emulated platform directory (default $PVBACK_SIM_DIR, the config's, or "
                                     f"{DEFAULT_SIM_DIR})")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line settings, as "section.key" -> value; they win over the file, on reload too."""
    out: dict[str, Any] = {}
    if getattr(args, "platform", None):
        out["platform.kind"] = args.platform
    sim_dir = getattr(args, "sim_dir", None) or os.environ.get("PVBACK_SIM_DIR")
    if sim_dir:
        out["platform.sim_dir"] = sim_dir
    if getattr(args, "metrics", None) is not None and args.command == "serve":
        check_listen("--metrics", args.metrics)
        out["serve.metrics_listen"] = args.metrics
    if getattr(args, "types", None):
        types = [t.strip() for t in args.types.split(",") if t.strip()]
        check_backend_types("--types", types)
        out["serve.backend_types"] = types
    return out


def _config(args: argparse.Namespace) -> Config:
    from backends.daemon.serve import apply_overrides

    cfg = load_config(args.config)
    apply_overrides(cfg, _overrides(args))
    return cfg


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line like every other operator error (argparse prints its usage block)."""

    def error(self, message: str) -> NoReturn:
        parts = self.prog.split()
        head, rest = " ".join(parts[:2]), " ".join(parts[2:])  # "pvback attach", "disk"
        raise UsageError(f"{head}: {rest + ': ' if rest else ''}{message} (see `{self.prog} --help`)")


class UsageError(Exception):
    pass


def _kind_parsers(sub: Any, command: str, help_text: str, *, has: str = "") -> Iterator[
        tuple[argparse.ArgumentParser, Any]]:
    """`pvback COMMAND KIND DOMID ...`: one sub-parser per device type that has commands (and the optional
    command field `has`)."""
    p = sub.add_parser(command, help=help_text)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for dt in load_device_types():
        if dt.commands is not None and (not has or getattr(dt.commands, has) is not None):
            k = kinds.add_parser(dt.kind, help=f"a {dt.kind} ({dt.name})")
            k.add_argument("domid", type=int)
            yield k, dt


def _add_device_args(k: argparse.ArgumentParser, dt: Any) -> None:
    k.add_argument("--type", dest="backend_type", choices=dt.backend_types, default=None,
                   help=f"backend directory type (default {dt.backend_types[0]})")
    k.add_argument("--backend-domid", type=int, default=0)
    _add_platform_args(k)


def _guest_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of guests from 1 to 64")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pvback", description="Userspace Xen PV backends")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("serve", help="run the backend daemon")
    _add_platform_args(p)
    p.add_argument("--metrics", help="HOST:PORT for the Prometheus endpoint ('' disables)")
    p.add_argument("--types", help="comma-separated backend types to serve (default: the config's, or each "
                                    "device type's own)")

    p = sub.add_parser("sim", help="run the emulated Xen platform (xenstored + grant/event broker)")
    p.add_argument("--sim-dir", default=None, help=f"directory for the sockets (default $PVBACK_SIM_DIR or "
                                                  f"{DEFAULT_SIM_DIR})")
    p.add_argument("--daemon", action="store_true", help="detach and return once the sockets are ready")

    for k, dt in _kind_parsers(sub, "attach", "create a device for a domain, as the toolstack does"):
        dt.commands.add_attach_arguments(k)
        _add_device_args(k, dt)
        k.add_argument("--no-wait", action="store_true", help="do not wait for the backend to reach InitWait")
        k.add_argument("--timeout", type=float, default=10.0,
                       help="seconds to wait for a backend to take the device (libxl waits 10)")
    for k, dt in _kind_parsers(sub, "detach", "remove a device (online=0, wait for Closed, remove the nodes)"):
        dt.commands.add_detach_arguments(k)
        _add_device_args(k, dt)
        k.add_argument("--timeout", type=float, default=10.0)

    for k, dt in _kind_parsers(sub, "limit", "set a device's I/O limits (applied live; see the device type's docs)",
                               has="limit_keys"):
        dt.commands.add_detach_arguments(k)
        dt.commands.add_limit_arguments(k)
        _add_device_args(k, dt)

    p = sub.add_parser("status", help="domains, devices, states, negotiated features and throughput")
    p.add_argument("--metrics", default=None, help="HOST:PORT of a running daemon's metrics endpoint")
    p.add_argument("--watch", type=float, default=0.0, help="refresh every N seconds (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=1.0,
                   help="one-shot: seconds between the two metrics samples throughput is computed from (0: none)")
    _add_platform_args(p)

    p = sub.add_parser("guest", help="start an emulated guest with a blkfront and run a verified workload")
    p.add_argument("--sim-dir", default=None, help="emulated platform directory (default $PVBACK_SIM_DIR or "
                                                   f"{DEFAULT_SIM_DIR})")
    p.add_argument("--name", default="guest")
    p.add_argument("--attach", metavar="TARGET", help="also attach this image as xvda (as `pvback attach`)")
    p.add_argument("--vdev", default="xvda")
    p.add_argument("--workload", default="verify", choices=("verify", "randrw", "idle", "hold"),
                   help="verify/randrw: random verified I/O; idle: connect only; hold: the domain alone, no "
                        "frontend (for toolstack work)")
    p.add_argument("--seconds", type=float, default=5.0, help="how long the workload runs (hold: 0 = forever)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="seconds to wait for a disk to be attached (0: wait until interrupted)")

    p = sub.add_parser("demo", help="the emulated platform, a guest with a disk, pvback serving it, verified I/O")
    p.add_argument("--dir", help="work directory (default: a new temporary one)")
    p.add_argument("--size-mib", type=int, default=64)

    p = sub.add_parser("bench", help="the benchmark matrix against fio, nbdkit and the null driver (blk), the "
                                     "vTPM latency and scale benchmark (tpm), or netback vs a veth pair (net)")
    p.add_argument("what", nargs="?", choices=["blk", "tpm", "net"], default="blk",
                   help="blk (default): the block matrix; tpm: vTPM command latency vs swtpm direct, and N vTPMs; "
                        "net: iperf3 TCP and 64-byte UDP through netback vs a veth pair, 1 and 2 queues")
    p.add_argument("--quick", action="store_true", help="one short run per cell")
    p.add_argument("--reps", type=int, default=None, metavar="N",
                   help="blk matrix: repetitions per cell (default 5, --quick 1); a target is judged on >= 3")
    p.add_argument("--workloads", default=None, metavar="W,W",
                   help="blk matrix: only these workloads (e.g. rr4k_qd32,sr64k_qd8), on every store")
    p.add_argument("--stores", default=None, metavar="S,S", help="blk matrix: only these stores (tmpfs, disk)")
    p.add_argument("--variants", default=None, metavar="V,V",
                   help="blk matrix: only these blk variants (e.g. 2q-persist,1q-copy)")
    p.add_argument("--no-latency", action="store_true", help="blk matrix: skip the QD1 placement section")
    p.add_argument("--out", default="perf/results", help="directory for JSON and PNG output")
    p.add_argument("--guests", type=_guest_count, nargs="+", default=None, metavar="N",
                   help="instead of the matrix: N guests (each its own process and disk) on one daemon, for each N "
                        "given (e.g. 1 2 4 8 16 32): scaling vs fio, fairness, a capped and a hostile guest")
    p.add_argument("--placement", choices=["shared", "split"], default="shared",
                   help="--guests only: shared (default): the daemon and the guests on every CPU; split: the daemon "
                        "on the first CPU, the guests on the others (dom0 and guests on vCPUs of their own, as "
                        "under Xen)")
    p.add_argument("--switch", choices=["ovs", "ovn"], default=None,
                   help="net only: netback's vif on a software switch vs veth ports on it (ovs: a private Open "
                        "vSwitch, netdev datapath, with and without userspace TSO; ovn: TCP between two OVN hosts "
                        "over Geneve, pvback's vifs at both ends)")

    from backends.daemon.vtpm_cmd import add_parsers as add_vtpm_parsers

    add_vtpm_parsers(sub)

    # Takes QEMU's arguments verbatim (xl's device_model_override): main() hands them over before argparse.
    sub.add_parser("dm-stub", help="stand in for QEMU as xl's device model of PV guests with qdisk disks",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["dm-stub"]:
        from backends.daemon.dm_stub import main as dm_stub_main

        return dm_stub_main(raw[1:])
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return _dispatch(args)
    except (CliError, ConfigError, CommandError) as exc:
        print(f"pvback {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `pvback status --watch | head`: the reader left; say nothing more (and not at exit either).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _dispatch(args: argparse.Namespace) -> int:
    from backends.daemon.logs import setup_logging

    if args.command == "vtpm-manager":
        from backends.daemon.vtpm_cmd import cmd_vtpm_manager

        return cmd_vtpm_manager(args)
    if args.command == "serve":
        cfg = _config(args)
        setup_logging(cfg.serve.log_level, cfg.serve.log_format)
        from backends.daemon.serve import run_daemon

        return _platform_errors(lambda: run_daemon(cfg, args.config, _overrides(args)))
    # The one-line error is the operator's message; library warnings on the way there would only repeat it.
    setup_logging(os.environ.get("PVBACK_LOG_LEVEL", "critical"))
    if args.command in ("sim", "guest") and args.sim_dir is None:
        args.sim_dir = _sim_dir_default()
    if args.command == "sim":
        return _cmd_sim(args)
    if args.command in ("attach", "detach", "limit", "status"):
        from backends.daemon import toolstack_cmds

        fn = getattr(toolstack_cmds, f"cmd_{args.command}")
        return int(_platform_errors(lambda: fn(args, _config(args))))
    if args.command == "vtpm":
        from backends.daemon.vtpm_cmd import cmd_vtpm

        return cmd_vtpm(args, load_config(args.config))
    if args.command == "guest":
        from backends.daemon.guest_cmd import cmd_guest

        return int(cmd_guest(args))
    if args.command == "demo":
        setup_logging("warning")
        from backends.daemon.demo import cmd_demo

        return int(cmd_demo(args))
    if args.command == "bench":
        from backends.daemon.bench_cmd import cmd_bench

        return int(cmd_bench(args))
    raise CliError(f"unknown command {args.command}")


def _platform_errors(fn: Any) -> int:
    from backends.platform.base import PlatformError

    try:
        return int(fn())
    except PlatformError as exc:
        raise CliError(str(exc)) from exc
    except PermissionError as exc:
        raise CliError(f"{exc.filename or exc}: permission denied: run pvback as root") from exc


def _cmd_sim(args: argparse.Namespace) -> int:
    from backends.daemon.loop import run
    from backends.sim.runner import SimAlreadyRunning, SimPaths, run_sim

    if args.daemon:
        return _daemonize_sim(args.sim_dir)
    try:
        run(run_sim(args.sim_dir))
    except SimAlreadyRunning as exc:
        raise CliError(f"{exc}; stop it first or use another --sim-dir") from exc
    except OSError as exc:
        where = SimPaths(Path(args.sim_dir)).directory
        raise CliError(f"cannot start the emulated platform in {where}: {exc}") from exc
    return 0


def _daemonize_sim(sim_dir: str) -> int:
    """Start a detached `pvback sim` and return once it serves its sockets (its own pid in sim.pid)."""
    import subprocess
    import time

    from backends.sim.runner import SimAlreadyRunning, SimPaths, check_not_running

    paths = SimPaths(Path(sim_dir).absolute())
    try:
        paths.directory.mkdir(parents=True, exist_ok=True)
        check_not_running(paths)
    except SimAlreadyRunning as exc:
        raise CliError(f"{exc}; stop it first or use another --sim-dir") from exc
    except OSError as exc:
        raise CliError(f"cannot use {paths.directory} as the sim directory: {exc.strerror or exc}") from exc
    log_path = paths.directory / "sim.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backends.daemon.cli", "sim", "--sim-dir", str(paths.directory)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            raise CliError(f"the emulated platform exited: {lines[-1] if lines else '(no output)'} (log {log_path})")
        try:
            ready = int(paths.pid_file.read_text().strip()) == proc.pid
        except (OSError, ValueError):
            ready = False
        if ready:
            print(f"XENSTORED_PATH={paths.xenstored}")
            print(f"PVBACK_SIM_BROKER={paths.broker}")
            print(f"PVBACK_SIM_DIR={paths.directory}")
            print(f"PVBACK_SIM_PID={proc.pid}")
            return 0
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise CliError(f"the emulated platform did not come up within 10 s (log: {log_path})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
