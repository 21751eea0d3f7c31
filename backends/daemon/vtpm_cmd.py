"""`pvback vtpm-manager` (run the manager) and `pvback vtpm create|list|show|delete` (administer it over its
socket).  The commands print no key: create makes one inside the manager, and nothing ever asks for it back
except the vTPM backend's release."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from backends.daemon.errors import CliError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("vtpm-manager", help="run the vTPM manager: it alone holds the KEK and releases state keys")
    p.add_argument("--config", help="the manager's TOML file (default /etc/pvback/vtpm-manager.toml if present)")
    p.add_argument("--init", action="store_true",
                   help="make a new, empty store with a new KEK (refuses an existing store)")
    p.add_argument("--passphrase-fd", type=int, default=None,
                   help="read the passphrase (kek_source = passphrase) from this fd instead of the tty")

    p = sub.add_parser("vtpm", help="provision, list, show and delete vTPMs in the vTPM manager")
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    for name, text in (("create", "provision a vTPM: a new state key bound to a domain UUID and devid"),
                       ("list", "every provisioned vTPM"),
                       ("show", "one vTPM's binding"),
                       ("delete", "crypto-shred a vTPM: its key, and its state directory"),
                       ("rotate", "a new KEK: every state key re-wrapped under it (NV untouched)"),
                       ("transport-key", "this manager's public key, which other managers export vTPMs to"),
                       ("export", "a vTPM's key wrapped for another manager, with its (encrypted) state"),
                       ("import", "a vTPM exported for this manager: its key and its state")):
        o = ops.add_parser(name, help=text)
        o.add_argument("--socket", help="the manager's socket (default: [vtpm] manager_socket, else "
                                        "/run/pvback/vtpm-manager.sock)")
        o.add_argument("--config", help="pvback's TOML file ([vtpm] manager_socket and state_dir)")
        o.add_argument("--json", action="store_true", help="print JSON")
        if name in ("create", "show", "delete", "export"):
            o.add_argument("--domain-uuid", help="the guest's UUID as the toolstack writes it (/vm/<uuid>)")
            o.add_argument("--devid", type=int, default=0)
        if name in ("show", "delete", "export"):
            o.add_argument("--vtpm-uuid", help="name the vTPM by its own UUID instead")
        if name == "create":
            o.add_argument("--vtpm-uuid", help="the vTPM's UUID (the `uuid=` of xl's vtpm spec; new if omitted)")
            o.add_argument("--group", default="", help="a group/policy name recorded in the binding")
        if name == "export":
            o.add_argument("--to", required=True, help="the target manager's transport key (base64)")
            o.add_argument("--out", required=True, help="the bundle file to write (0600; holds no key in clear)")
        if name == "import":
            o.add_argument("bundle", help="a file `pvback vtpm export` wrote for this manager")
        if name == "delete":
            o.add_argument("--keep-state", action="store_true",
                           help="shred the key only (the state files stay, undecryptable)")


def cmd_vtpm_manager(args: argparse.Namespace) -> int:
    from backends.daemon.logs import setup_logging
    from backends.vtpmmgr.config import ManagerConfigError, load
    from backends.vtpmmgr.server import ManagerFatal, run_manager

    try:
        cfg = load(args.config)
    except ManagerConfigError as exc:
        raise CliError(str(exc)) from None
    setup_logging("info", "text")
    try:
        return asyncio.run(run_manager(cfg, init=args.init, passphrase_fd=args.passphrase_fd))
    except ManagerFatal as exc:
        raise CliError(str(exc)) from None


def _socket(args: argparse.Namespace, cfg: Any) -> str:
    from backends.vtpmmgr.config import ManagerConfig

    return str(args.socket or cfg.vtpm.manager_socket or ManagerConfig().socket)


def cmd_vtpm(args: argparse.Namespace, cfg: Any) -> int:
    from backends.drivers.tpm.keymgr import ManagerError, request

    msg: dict[str, Any] = {"op": args.op}
    if args.op == "rotate":
        try:
            answer = asyncio.run(request(_socket(args, cfg), msg, timeout=300.0))
        except ManagerError as exc:
            raise CliError(str(exc)) from None
        print(f"KEK rotated: {answer['records']} vTPM key(s) re-wrapped")
        return 0
    if args.op == "transport-key":
        try:
            answer = asyncio.run(request(_socket(args, cfg), msg))
        except ManagerError as exc:
            raise CliError(str(exc)) from None
        print(answer["public"])
        return 0
    if args.op == "import":
        return _import(args, cfg)
    if args.op == "export":
        msg["target"] = args.to
    if args.op not in ("list", "rotate"):
        if getattr(args, "vtpm_uuid", None) and args.op != "create":
            msg["vtpm_uuid"] = args.vtpm_uuid
        elif not args.domain_uuid:
            raise CliError("--domain-uuid is required" + ("" if args.op == "create" else " (or --vtpm-uuid)"))
        else:
            msg["domain_uuid"], msg["devid"] = args.domain_uuid, args.devid
    if args.op == "create":
        msg["group"] = args.group
        if args.vtpm_uuid:
            msg["vtpm_uuid"] = args.vtpm_uuid
    try:
        answer = asyncio.run(request(_socket(args, cfg), msg))
    except ManagerError as exc:
        raise CliError(str(exc)) from None
    if args.op == "export":
        return _export(args, cfg, answer["bundle"])
    if args.op == "delete" and not args.keep_state:
        vtpm_uuid = str(answer["record"]["vtpm_uuid"])
        state = Path(cfg.vtpm.state_dir) / vtpm_uuid
        if state.is_dir():
            shutil.rmtree(state)
    if args.json:
        json.dump(answer.get("records", answer.get("record")), sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    records = answer["records"] if args.op == "list" else [answer["record"]]
    if args.op == "list":
        print(f"{'DOMAIN UUID':36} {'DEVID':>5} {'VTPM UUID':36} {'GROUP':10} STATE")
    for r in records:
        if args.op == "list":
            print(f"{r['domain_uuid']:36} {r['devid']:>5} {r['vtpm_uuid']:36} {r['group'] or '-':10} "
                  f"{'created' if r['initialized'] else 'new'}")
        else:
            for k in ("domain_uuid", "devid", "vtpm_uuid", "group", "initialized"):
                print(f"{k}: {r[k]}")
    if args.op == "delete":
        print("key shredded" + ("" if args.keep_state else ", state removed"))
    return 0


def _export(args: argparse.Namespace, cfg: Any, bundle: dict[str, Any]) -> int:
    """The bundle plus the vTPM's state files as they are on disk (already encrypted with the state key)."""
    import base64
    import os

    state = Path(cfg.vtpm.state_dir) / str(bundle["vtpm_uuid"])
    files = {}
    if state.is_dir():
        for p in sorted(state.rglob("*")):
            if p.is_file() and p.name != ".lock":
                files[str(p.relative_to(state))] = base64.b64encode(p.read_bytes()).decode()
    bundle["state"] = files
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise CliError(f"{args.out} exists: refusing to overwrite it") from None
    with os.fdopen(fd, "w") as f:
        json.dump(bundle, f, indent=1, sort_keys=True)
    print(f"exported vTPM {bundle['vtpm_uuid']} (domain {bundle['domain_uuid']} devid {bundle['devid']}, "
          f"{len(files)} state file(s)) to {args.out}")
    return 0


def _import(args: argparse.Namespace, cfg: Any) -> int:
    import base64
    import os

    from backends.drivers.tpm.keymgr import ManagerError, request

    try:
        bundle = json.loads(Path(args.bundle).read_text())
        files = bundle.pop("state", {})
        target = Path(cfg.vtpm.state_dir) / str(bundle["vtpm_uuid"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CliError(f"{args.bundle} is not an export bundle: {exc}") from None
    if files and target.exists():
        raise CliError(f"{target} exists: this host already has a state for vTPM {bundle['vtpm_uuid']}")
    try:
        answer = asyncio.run(request(_socket(args, cfg), {"op": "import", "bundle": bundle}))
    except ManagerError as exc:
        raise CliError(str(exc)) from None
    for rel, data in files.items():
        path = (target / rel).resolve()
        if not path.is_relative_to(target.resolve()):
            raise CliError(f"the bundle names a file outside the vTPM's directory: {rel!r}")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(data))
    rec = answer["record"]
    print(f"imported vTPM {rec['vtpm_uuid']} (domain {rec['domain_uuid']} devid {rec['devid']}, "
          f"{len(files)} state file(s))")
    return 0
