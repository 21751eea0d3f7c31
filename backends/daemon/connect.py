"""Reaching the platform an operator pointed a command at, with one clear line for every way that can fail.

Used by `serve` and by the toolstack commands, so both pick the platform the same way: real Xen when
/dev/xen/gntdev and a xenstore are present, else the emulated platform of the configured sim directory.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from backends.daemon.config import Config
from backends.daemon.errors import CliError

if TYPE_CHECKING:
    from backends.xenstore.client import XenStoreClient

XEN_DEV_DIR = Path("/dev/xen")
# A xenstored answers GET_DOMAIN_PATH in microseconds; seconds of silence means it is not one (or is wedged).
PROBE_TIMEOUT_S = 3.0


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        from backends.platform import xen_present

        return "xen" if xen_present() else "emulated"
    return kind


def check_xen_nodes(dev_dir: Path = XEN_DEV_DIR) -> None:
    """Before the C layer tries them: say which node is missing or forbidden, and what to do about it."""
    for name in ("gntdev", "evtchn"):
        node = dev_dir / name
        if not node.exists():
            raise CliError(
                f"platform xen: {node} is missing: this machine is not a Xen domain (or the xen-gntdev/"
                "xen-evtchn modules are not loaded); use the emulated platform (`pvback sim`, --platform emulated)"
            )
        if not os.access(node, os.R_OK | os.W_OK):
            raise CliError(f"no permission on {node}: run pvback as root (or give its user access to /dev/xen/*)")


def sim_socket(sim_dir: str, name: str) -> Path:
    path = Path(sim_dir) / name
    if not path.exists():
        raise CliError(
            f"no emulated platform in {sim_dir} ({path} missing): start it with `pvback sim --sim-dir {sim_dir}`"
        )
    return path


def xenstore_path(cfg: Config) -> str:
    """The xenstore a toolstack command talks to, on the platform `cfg` selects."""
    kind = resolve_kind(cfg.platform.kind)
    if kind == "emulated":
        return str(sim_socket(cfg.platform.sim_dir, "xenstored.sock"))
    from backends.platform.base import PlatformError
    from backends.platform.xen import find_xenstore

    try:
        return find_xenstore()
    except PlatformError as exc:
        raise CliError(f"platform xen: {exc}") from exc


async def connect_xenstore(path: str, timeout: float = PROBE_TIMEOUT_S) -> XenStoreClient:
    """Connect and prove the peer speaks the xenstore protocol, so a wrong socket fails with a clear line."""
    from backends.xenstore.client import XenStoreClient, XenStoreError

    try:
        _open_probe(path, timeout)
        xs = await asyncio.wait_for(XenStoreClient.connect(path), timeout)
    except PermissionError as exc:
        raise CliError(f"{path}: permission denied: run pvback as root (or give its user access)") from exc
    except TimeoutError as exc:
        raise CliError(f"cannot connect to xenstore at {path}: no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise CliError(f"cannot connect to xenstore at {path}: {exc.strerror or exc}") from exc
    try:
        home = await asyncio.wait_for(xs.get_domain_path(0), timeout)
        if not home.startswith("/local/domain/"):
            raise ValueError(f"GET_DOMAIN_PATH answered {home[:40]!r}")
    except TimeoutError as exc:
        await xs.close()
        raise CliError(f"{path} is not a xenstored: no reply within {timeout:g} s (check the socket path)") from exc
    except (XenStoreError, OSError, ValueError, EOFError) as exc:
        await xs.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(f"{path} is not a xenstored: bad reply ({why}); check the socket path") from exc
    return xs


def _open_probe(path: str, timeout: float) -> None:
    """Open and close `path` once: the client folds every failure into ENOENT, an operator needs to know
    whether it is missing, refused or forbidden."""
    st = os.stat(path)
    if stat.S_ISSOCK(st.st_mode):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.connect(path)
    else:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY))


def probe_broker(path: Path, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One `hello` with a deadline: the broker client itself would wait forever on a wedged peer."""
    from backends.platform.broker_client import probe

    try:
        probe(str(path), timeout)
    except PermissionError as exc:
        raise CliError(f"{path}: permission denied: run pvback as root (or give its user access)") from exc
    except TimeoutError as exc:
        raise CliError(f"{path} is not an emulated platform broker: no reply within {timeout:g} s") from exc
    except OSError as exc:
        raise CliError(f"{path} is not an emulated platform broker ({exc.strerror or exc}): "
                       f"start `pvback sim` there") from exc
    except ValueError as exc:
        raise CliError(f"{path} is not an emulated platform broker: bad reply; start `pvback sim` there") from exc
