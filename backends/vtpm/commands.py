"""`pvback attach tpm DOMID [--uuid U] [--version 1.2|2.0]` / `detach tpm DOMID [DEVID]`: the keys libxl writes
for `vtpm=["backend=...,uuid=..."]` (uuid, resume="False"), plus the TPM version pvback serves.  The xenstore
work itself is the daemon's (generic over device types)."""

from __future__ import annotations

import argparse
import uuid as uuidlib

from backends.vtpm.proto import ProtocolError, parse_uuid
from backends.xenbus.registry import AttachSpec, CommandError, Commands
from backends.xenbus.toolstack import ATTACHED_MARK

MAX_DEVID = 255


def tpm_spec(devid: int, uuid: str | None, version: str | None) -> AttachSpec:
    if not 0 <= devid <= MAX_DEVID:
        raise CommandError(f"--devid {devid}: must be 0..{MAX_DEVID} (libxl numbers vTPMs from 0)")
    try:
        # libxl generates one when the config names none; so do we (the vTPM's identity from then on).
        ident = parse_uuid(uuid) if uuid is not None else str(uuidlib.uuid4())
    except ProtocolError as exc:
        raise CommandError(f"--uuid {uuid!r} is not a UUID (e.g. {uuidlib.uuid4()})") from exc
    backend = {"uuid": ident, "resume": "False", ATTACHED_MARK: "1"}
    if version is not None:
        backend["version"] = version
    return AttachSpec(devid=devid, backend=backend, frontend={})


def _add_attach(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uuid", help="the vTPM's identity (its state directory); a new one when omitted")
    p.add_argument("--version", choices=("2.0", "1.2"), help="TPM version (default: [vtpm] default_version)")
    p.add_argument("--devid", type=int, default=0)


def _add_detach(p: argparse.ArgumentParser) -> None:
    p.add_argument("devid", type=int, nargs="?", default=0)


COMMANDS = Commands(
    add_attach_arguments=_add_attach,
    attach_spec=lambda args: tpm_spec(args.devid, args.uuid, args.version),
    add_detach_arguments=_add_detach,
    detach_devid=lambda args: int(args.devid),
    describe=lambda args: f"tpm {args.devid}",
)
