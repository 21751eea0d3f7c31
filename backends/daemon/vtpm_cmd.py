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
                       ("rotate", "a new KEK: every state key re-wrapped under it (NV untouched)")):
        o = ops.add_parser(name, help=text)
        o.add_argument("--socket", help="the manager's socket (default: [vtpm] manager_socket, else "
                                        "/run/pvback/vtpm-manager.sock)")
        o.add_argument("--config", help="pvback's TOML file ([vtpm] manager_socket and state_dir)")
        o.add_argument("--json", action="store_true", help="print JSON")
        if name in ("create", "show", "delete"):
            o.add_argument("--domain-uuid", help="the guest's UUID as the toolstack writes it (/vm/<uuid>)")
            o.add_argument("--devid", type=int, default=0)
        if name in ("show", "delete"):
            o.add_argument("--vtpm-uuid", help="name the vTPM by its own UUID instead")
        if name == "create":
            o.add_argument("--vtpm-uuid", help="the vTPM's UUID (the `uuid=` of xl's vtpm spec; new if omitted)")
            o.add_argument("--group", default="", help="a group/policy name recorded in the binding")
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
