"""`pvback vtpm-manager`'s own configuration file (default /etc/pvback/vtpm-manager.toml), one `[manager]`
section with every default documented here.  It is a file of its own, not a section of pvback.toml: the
manager is a separate process, usually under its own user, and reads nothing of the daemon's.  Unknown keys and
wrong types are errors, as in pvback.toml.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/pvback/vtpm-manager.toml")
KEK_SOURCES = ("file", "passphrase", "tpm")


class ManagerConfigError(ValueError):
    pass


@dataclass
class ManagerConfig:
    # The manager's store: the KEK check, the wrapped state keys and their bindings.  Created 0700; the
    # manager refuses to use it when anyone else can read it.
    state_dir: str = "/var/lib/pvback/vtpm-manager"
    # The socket the vTPM backend and `pvback vtpm ...` talk to (mode 0660).
    socket: str = "/run/pvback/vtpm-manager.sock"
    # Drop to this user (and its group) once the socket, xenstore and the KEK are open; "" stays as started.
    user: str = ""
    # Peer uids (SO_PEERCRED) allowed to ask for keys: the uid `pvback serve` runs as.
    release_uids: list[int] = field(default_factory=lambda: [0])
    # Peer uids allowed to create, list, show, delete, rotate, export and import.
    admin_uids: list[int] = field(default_factory=lambda: [0])
    # The domain the vTPM backend runs in (its backend directories are /local/domain/<this>/backend/vtpm).
    backend_domid: int = 0
    # xenstored's socket or xenbus device; "" finds it as libxenstore does (XENSTORED_PATH, then defaults).
    xenstore: str = ""
    # Where the KEK comes from: "file" (kek_file, readable only by the manager), "passphrase" (read at start-up
    # from a tty or --passphrase-fd, stretched with scrypt), "tpm" (sealed to the host's TPM 2.0, see tpm_*).
    kek_source: str = "file"
    # The KEK file for kek_source = "file": 32 random bytes, owned by the manager's user, mode 0600 or 0400.
    kek_file: str = "/etc/pvback/vtpm-kek"
    # Host TPM for kek_source = "tpm": a tpm2-tools TCTI ("device:/dev/tpmrm0"; tests: "swtpm:path=...").
    tpm_tcti: str = "device:/dev/tpmrm0"
    # PCRs the sealed KEK is bound to (tpm2-tools selection syntax); a change of any of them refuses the KEK.
    tpm_pcrs: str = "sha256:0,2,4,7"
    # Give a key to a device nobody provisioned (a new record bound to the device's domain UUID and devid).
    # Off: an unknown identity is refused, and `pvback vtpm create` provisions it.
    auto_provision: bool = False
    # The group name auto-provisioned records get.
    default_group: str = ""


def _check(key: str, value: Any, default: Any) -> Any:
    where = f"[manager] {key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ManagerConfigError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 31:
            raise ManagerConfigError(f"{where}: expected a non-negative integer, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ManagerConfigError(f"{where}: expected a string, got {value!r}")
        if key == "kek_source" and value not in KEK_SOURCES:
            raise ManagerConfigError(f"{where}: {value!r} is not one of {', '.join(KEK_SOURCES)}")
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                  for v in value):
            raise ManagerConfigError(f"{where}: expected a list of uids, got {value!r}")
    return value


def parse(data: dict[str, Any], source: str = "<string>") -> ManagerConfig:
    cfg = ManagerConfig()
    known = {f.name for f in dataclasses.fields(ManagerConfig)}
    for section, body in data.items():
        if section != "manager" or not isinstance(body, dict):
            raise ManagerConfigError(f"{source}: only a [manager] table is allowed, not {section!r}")
        for key, value in body.items():
            if key not in known:
                raise ManagerConfigError(f"{source}: unknown key [manager] {key} (known: {', '.join(sorted(known))})")
            setattr(cfg, key, _check(key, value, getattr(cfg, key)))
    return cfg


def load(path: str | Path | None) -> ManagerConfig:
    if path is None:
        if not DEFAULT_PATH.exists():
            return ManagerConfig()
        path = DEFAULT_PATH
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ManagerConfigError(f"cannot read {p}: {exc.strerror}") from exc
    try:
        return parse(tomllib.loads(text), str(p))
    except tomllib.TOMLDecodeError as exc:
        raise ManagerConfigError(f"{p}: not valid TOML: {exc}") from exc
