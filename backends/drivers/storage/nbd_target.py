"""The NBD target grammar, in one place: the NBD driver and blk's `params` parsing both use `parse_nbd_target`.

Pure (no I/O, no C), so blk's protocol module can import it without loading the C module.

  nbd:unix:/SOCKET[:exportname=NAME]     QEMU's legacy syntax; the socket path ends at its first ':'
  nbd:HOST:PORT[:exportname=NAME]        HOST: a name, an IPv4 address or a [bracketed IPv6] address
  nbd://HOST[:PORT][/NAME]               the NBD URI standard (doc/uri.md of the NBD project); PORT 10809
  nbd+unix:///[NAME]?socket=/SOCKET      (nbd+unix://?socket=/SOCKET works too)

Schemes are lower case.  In the legacy forms NAME is everything after `exportname=` (colons included), taken
literally; in the URI forms NAME and SOCKET are percent-decoded (`+` is not a space), so a socket path with
a ':' in it needs the nbd+unix form.  IPv6 zones: `[fe80::1%eth0]` (legacy), `[fe80::1%25eth0]` (URI).

Refused, each with a one-line `NbdTargetError`: relative socket paths, userinfo, empty ports, ports outside
1..65535 or not in ASCII digits, query parameters other than nbd+unix's single `socket`, fragments, bad
percent-escapes, TLS and vsock schemes (pvback speaks neither), control characters anywhere, export names
over the protocol's 4096 bytes.  `format_nbd_target` writes the URI form, which parses back to an equal
target.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

DEFAULT_PORT = 10809
MAX_EXPORT_NAME = 4096  # the protocol's own limit, in bytes
MAX_HOST = 255
# Every URI scheme the NBD project defines: blk sends all of them here so the refusal names the real reason.
NBD_SCHEMES = frozenset({"nbd", "nbd+unix", "nbds", "nbds+unix", "nbd+vsock", "nbds+vsock"})
FORMS = "nbd:unix:/SOCKET, nbd:HOST:PORT, nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=/SOCKET"

_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")
_ZONE = re.compile(r"[A-Za-z0-9._-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# What quote() leaves alone in the path and the query value; everything else is escaped, so '?', '#', '&',
# '%' and ':' in names never read as delimiters when the text is parsed back.
_PATH_SAFE = "/"
_QUERY_SAFE = "/"


class NbdTargetError(ValueError):
    """A target that is not in the grammar above; the message is one line and says what is wrong."""


@dataclass(frozen=True)
class NbdTarget:
    """An NBD server and export: a unix socket (`socket_path`) or TCP (`host`, `port`), never both.

    Checked on construction, so any NbdTarget formats to text that parses back to it.
    """

    export: str = ""
    socket_path: str | None = None
    host: str | None = None  # as written, without brackets ("::1", "fe80::1%eth0")
    port: int = DEFAULT_PORT  # unused for a unix socket, and kept at DEFAULT_PORT there

    def __post_init__(self) -> None:
        why = _fields_error(self.export, self.socket_path, self.host, self.port)
        if why:
            raise NbdTargetError(f"NBD target {_shown(repr(self))}: {why}")

    def describe(self) -> str:
        where = f"unix:{self.socket_path}" if self.socket_path is not None else f"{self.host}:{self.port}"
        return f"{where} export {self.export!r}"


def _fields_error(export: str, socket_path: str | None, host: str | None, port: int) -> str | None:
    if (socket_path is None) == (host is None):
        return "give either a unix socket path or a host, not both or neither"
    if socket_path is not None:
        if not socket_path.startswith("/"):
            return f"socket path {_shown(socket_path)} is not absolute"
        if _CONTROL.search(socket_path):
            return "the socket path holds control characters"
        if port != DEFAULT_PORT:
            return "a unix socket target has no port"
    if host is not None:
        why = _host_error(host)
        if why:
            return why
        if not 0 < port < 65536:
            return f"port {port!r} not in 1..65535"
    return _export_error(export)


def _host_error(host: str) -> str | None:
    if not host:
        return "no host"
    if ":" in host:
        addr, _, zone = host.partition("%")
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            return f"{_shown(host)} is not an IPv6 address"
        if "%" in host and not _ZONE.fullmatch(zone):
            return f"bad IPv6 zone {_shown(zone)}"
        return None
    if len(host) > MAX_HOST or not _HOSTNAME.fullmatch(host):
        return f"bad host {_shown(host)} (a name, an IPv4 address or a [bracketed] IPv6 address)"
    return None


def _export_error(export: str) -> str | None:
    if _CONTROL.search(export):
        return "the export name holds control characters"
    try:
        size = len(export.encode())
    except UnicodeEncodeError:
        return "the export name is not valid Unicode"
    if size > MAX_EXPORT_NAME:
        return f"export name of {size} bytes (the protocol's limit is {MAX_EXPORT_NAME})"
    return None


def parse_nbd_target(text: str) -> NbdTarget:
    """Parse one of the forms in the module docstring; NbdTargetError on anything else."""
    try:
        return _parse(text)
    except _Refused as exc:
        raise NbdTargetError(f"NBD target {_shown(text)}: {exc}") from None


def format_nbd_target(target: NbdTarget) -> str:
    """The URI form of `target` (canonical: the port always written, names percent-encoded)."""
    name = urllib.parse.quote(target.export, safe=_PATH_SAFE)
    if target.socket_path is not None:
        return f"nbd+unix:///{name}?socket={urllib.parse.quote(target.socket_path, safe=_QUERY_SAFE)}"
    assert target.host is not None
    host = f"[{target.host.replace('%', '%25')}]" if ":" in target.host else target.host
    return f"nbd://{host}:{target.port}/{name}"


class _Refused(Exception):
    """Internal: the reason, without the text (parse_nbd_target adds it)."""


def _target(
    *, export: str = "", socket_path: str | None = None, host: str | None = None, port: int = DEFAULT_PORT
) -> NbdTarget:
    # The field rules checked here too, so their refusal names the text rather than the dataclass.
    why = _fields_error(export, socket_path, host, port)
    if why:
        raise _Refused(why)
    return NbdTarget(export=export, socket_path=socket_path, host=host, port=port)


def _shown(text: str, limit: int = 80) -> str:
    # Quoted, escaped (one line whatever the text holds) and cut: messages end up in xenstore and logs.
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _parse(text: str) -> NbdTarget:
    if _CONTROL.search(text):
        raise _Refused("holds control characters")
    if text.startswith("nbd:unix:"):
        return _legacy_unix(text[len("nbd:unix:") :])
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "nbd":
        return _uri_tcp(rest)
    if sep and scheme == "nbd+unix":
        return _uri_unix(rest)
    if text.startswith("nbd:"):
        return _legacy_tcp(text[len("nbd:") :])
    head = text.partition(":")[0]
    if head.lower() in NBD_SCHEMES:
        if head != head.lower():
            raise _Refused(f"the scheme is written in lower case ({_shown(head.lower())})")
        if head.startswith("nbds"):
            raise _Refused("NBD over TLS (nbds) is not supported")
        if head.endswith("vsock"):
            raise _Refused("NBD over vsock is not supported")
    raise _Refused(f"not an NBD target: expected {FORMS}")


# ---- legacy forms -----------------------------------------------------------------------------------------


def _legacy_unix(rest: str) -> NbdTarget:
    path, colon, option = rest.partition(":")
    if not path.startswith("/"):
        raise _Refused(f"socket path {_shown(path)} is not absolute")
    hint = "a socket path holding ':' needs nbd+unix:///NAME?socket=PATH"
    export = _legacy_option(option, "socket path", hint) if colon else ""
    return _target(socket_path=path, export=export)


def _legacy_tcp(rest: str) -> NbdTarget:
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise _Refused("no ']' after the IPv6 address")
        host = rest[1:close]
        if ":" not in host:
            raise _Refused(f"{_shown(host)} in brackets is not an IPv6 address")
        tail = rest[close + 1 :]
        if not tail.startswith(":"):
            raise _Refused("expected ':PORT' after the IPv6 address")
        tail = tail[1:]
    else:
        host, colon, tail = rest.partition(":")
        if not colon:
            raise _Refused("expected nbd:HOST:PORT[:exportname=NAME]")
        if not host:
            raise _Refused("no host")
    port_text, colon, option = tail.partition(":")
    port = _port(port_text)
    export = _legacy_option(option, "port", "") if colon else ""
    return _target(host=host, port=port, export=export)


def _legacy_option(option: str, after: str, hint: str) -> str:
    if not option.startswith("exportname="):
        raise _Refused(f"expected ':exportname=NAME' after the {after}" + (f" ({hint})" if hint else ""))
    return option[len("exportname=") :]


def _port(text: str) -> int:
    if not text:
        raise _Refused("empty port")
    digits = text.lstrip("0")
    if not (text.isascii() and text.isdigit()) or len(digits) > 5 or not 0 < int(digits or "0") < 65536:
        raise _Refused(f"bad port {_shown(text)} (1..65535)")
    return int(digits)


# ---- URI forms --------------------------------------------------------------------------------------------


def _uri_parts(rest: str) -> tuple[str, str, str | None]:
    """authority, export name (decoded), query (None without '?')."""
    if "#" in rest:
        raise _Refused("an NBD URI has no fragment")
    rest, qmark, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    return authority, _unquote(path, "export name"), query if qmark else None


def _uri_tcp(rest: str) -> NbdTarget:
    authority, export, query = _uri_parts(rest)
    if query is not None:
        raise _Refused("nbd:// takes no query parameters (the TLS ones belong to nbds://, which pvback lacks)")
    if "@" in authority:
        raise _Refused("an NBD URI has no user information")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _Refused("no ']' after the IPv6 address")
        host = _uri_ipv6(authority[1:close])
        tail = authority[close + 1 :]
        if tail and not tail.startswith(":"):
            raise _Refused(f"unexpected {_shown(tail)} after the IPv6 address")
        port = _port(tail[1:]) if tail else DEFAULT_PORT
    else:
        host, colon, port_text = authority.partition(":")
        if not host:
            raise _Refused("no host")
        port = _port(port_text) if colon else DEFAULT_PORT
    return _target(host=host, port=port, export=export)


def _uri_ipv6(inner: str) -> str:
    # RFC 6874: a zone is written %25ZONE inside the brackets.
    addr, pct, zone = inner.partition("%25")
    if "%" in addr or ":" not in addr:
        raise _Refused(f"[{inner}] is not an IPv6 address (a zone is written %25ZONE)")
    return f"{addr}%{zone}" if pct else addr


def _uri_unix(rest: str) -> NbdTarget:
    authority, export, query = _uri_parts(rest)
    if authority:
        raise _Refused("nbd+unix takes no host: write nbd+unix:///NAME?socket=/PATH")
    params: dict[str, str] = {}
    for item in query.split("&") if query else []:
        key, eq, value = item.partition("=")
        key = _unquote(key, "query")
        if not eq or key in params:
            raise _Refused(f"bad or repeated query parameter {_shown(key)}")
        if key != "socket":
            raise _Refused(f"unsupported query parameter {_shown(key)} (nbd+unix takes only socket=)")
        params[key] = _unquote(value, "socket path")
    if "socket" not in params:
        raise _Refused("nbd+unix needs ?socket=/PATH")
    return _target(socket_path=params["socket"], export=export)


def _unquote(text: str, what: str) -> str:
    if _BAD_ESCAPE.search(text):
        raise _Refused(f"bad percent-escape in the {what}")
    try:
        value = urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise _Refused(f"the {what} is not UTF-8 once percent-decoded") from None
    if _CONTROL.search(value):
        raise _Refused(f"the {what} holds control characters")
    return value
