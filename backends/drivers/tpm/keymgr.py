"""The vTPM manager's wire protocol and its client: what the vTPM backend (and `pvback vtpm ...`) use to ask
`pvback vtpm-manager` for a vTPM's state key.  Knows no tpmif and no xenstore: a request names the device by
its backend path, and the manager checks everything else itself.

One request per connection on a unix stream socket: one JSON object and a newline each way.  Binary values
(the key) travel base64 inside the JSON.  The manager answers `{"ok": true, ...}` or `{"ok": false, "error":
"..."}`; a refusal is final (the same request would be refused again), while a manager that is not there is
retried by the caller (ManagerUnavailable).

The key is returned in a bytearray so that its holder can zero it once swtpm has it; it is never logged and
never put in an exception's text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 20  # an export of a large vTPM state fits; anything longer is a broken peer
KEY_BYTES = 32  # AES-256-CBC for swtpm's state (`--key ...,mode=aes-256-cbc`)


class ManagerError(Exception):
    """The manager could not be asked or gave a malformed answer."""


class ManagerUnavailable(ManagerError):
    """Nobody listens on the manager's socket (down, restarting, not started yet): worth retrying."""


class ManagerRefused(ManagerError):
    """The manager answered and said no; its reason is the message.  Not worth retrying as is."""


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManagerError(f"not a JSON message: {exc}") from None
    if not isinstance(msg, dict):
        raise ManagerError("a message must be a JSON object")
    return msg


def b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode()


def unb64(text: object, what: str) -> bytearray:
    if not isinstance(text, str):
        raise ManagerError(f"{what}: expected base64 text")
    try:
        return bytearray(base64.b64decode(text, validate=True))
    except ValueError:
        raise ManagerError(f"{what}: not base64") from None


async def request(sock_path: str, msg: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """One request, one answer; ManagerRefused when the answer says no."""
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(sock_path, limit=MAX_MESSAGE)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ManagerUnavailable(f"the vTPM manager is not listening on {sock_path} "
                                         f"({exc.strerror or exc})") from None
            try:
                writer.write(encode(msg))
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise ManagerUnavailable(f"the vTPM manager on {sock_path} did not answer in {timeout} s") from None
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise ManagerUnavailable(f"the vTPM manager on {sock_path} dropped the connection: {exc}") from None
    except OSError as exc:
        raise ManagerError(f"cannot reach the vTPM manager on {sock_path}: {exc.strerror or exc}") from None
    if not line.endswith(b"\n"):
        raise ManagerUnavailable(f"the vTPM manager on {sock_path} closed without answering")
    answer = decode(line)
    if answer.get("ok") is not True:
        raise ManagerRefused(str(answer.get("error") or "refused (no reason given)"))
    return answer


@dataclass
class Release:
    """A released state key and what the manager knows about the vTPM it belongs to."""

    key: bytearray
    vtpm_uuid: str
    domain_uuid: str
    # The manager has seen this vTPM's state created: a missing state is then lost, never made anew.
    initialized: bool

    def wipe(self) -> None:
        self.key[:] = bytes(len(self.key))


async def release_key(sock_path: str, backend_path: str, *, timeout: float = 10.0) -> Release:
    answer = await request(sock_path, {"op": "release", "backend": backend_path}, timeout=timeout)
    key = unb64(answer.get("key"), "key")
    if len(key) != KEY_BYTES:
        raise ManagerError(f"the manager answered a key of {len(key)} bytes, not {KEY_BYTES}")
    return Release(key=key, vtpm_uuid=str(answer.get("vtpm_uuid", "")),
                   domain_uuid=str(answer.get("domain_uuid", "")), initialized=bool(answer.get("initialized")))


async def mark_initialized(sock_path: str, backend_path: str, *, timeout: float = 10.0) -> None:
    """Tell the manager that this device's state now exists (created encrypted with its key)."""
    await request(sock_path, {"op": "initialized", "backend": backend_path}, timeout=timeout)
