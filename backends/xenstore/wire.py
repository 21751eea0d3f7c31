"""The xenstore wire protocol (xen/include/public/io/xs_wire.h, docs/misc/xenstore.txt): framing, message
types, error names, permission strings and path rules.  Pure: no I/O, shared by the client and the server.
"""

from __future__ import annotations

import enum
import errno
import re
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<IIII")  # type, req_id, tx_id, len
HEADER_SIZE = HEADER.size
PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX, both directions
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048  # XENSTORE_REL_PATH_MAX

DOMAIN_PATH_PREFIX = "/local/domain/"
SPECIAL_INTRODUCE = "@introduceDomain"
SPECIAL_RELEASE = "@releaseDomain"


class XsType(enum.IntEnum):
    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20  # removed from the protocol; kept so the number is not reused by accident
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


TYPE_COUNT = 23

# The xsd_errors table, in xs_wire.h order.  Clients map a name missing from it to EINVAL, so a server
# must never send one that is not here (there is no EQUOTA: quota failures are ENOSPC or E2BIG).
ERROR_NAMES: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)
_ERROR_SET = frozenset(ERROR_NAMES)


def error_name(raw: bytes) -> str:
    """The error name in an XS_ERROR payload; unknown or malformed names read as EINVAL (as libxenstore)."""
    name = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return name if name in _ERROR_SET else "EINVAL"


def error_errno(name: str) -> int:
    return int(getattr(errno, name, errno.EINVAL))


def pack(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


def unpack_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    t, r, x, n = HEADER.unpack_from(buf, offset)
    return int(t), int(r), int(x), int(n)


def strings(*items: str | bytes) -> bytes:
    """NUL-terminated strings, concatenated (the payload form of every message but WRITE/READ)."""
    return b"".join((s.encode() if isinstance(s, str) else s) + b"\0" for s in items)


def split_strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of a payload; bytes after the last NUL are ignored (as cxenstored)."""
    parts = payload.split(b"\0")
    return parts[:-1]


# --- permissions -----------------------------------------------------------------------------------------

PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_BOTH = PERM_READ | PERM_WRITE
PERM_OWNER = 4  # never on the wire: what perm_for_conn grants owners and privileged connections

_ACCESS_TO_MASK = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_BOTH}
_MASK_TO_ACCESS = {v: k for k, v in _ACCESS_TO_MASK.items()}
DOMID_MAX = 0xFFFF


@dataclass(frozen=True)
class Perm:
    """One ACL entry.  In a node's list the first entry names the owner and the access of everyone not
    listed after it."""

    domid: int
    access: str  # "n" | "r" | "w" | "b"

    def __post_init__(self) -> None:
        if self.access not in _ACCESS_TO_MASK:
            raise ValueError(f"permission access must be one of n/r/w/b, not {self.access!r}")
        if not 0 <= self.domid <= DOMID_MAX:
            raise ValueError(f"domid out of range: {self.domid}")

    @property
    def mask(self) -> int:
        return _ACCESS_TO_MASK[self.access]

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @classmethod
    def parse(cls, text: str | bytes) -> Perm:
        s = text.decode("ascii", "replace") if isinstance(text, bytes) else text
        if len(s) < 2 or s[0] not in _ACCESS_TO_MASK or not s[1:].isdigit() or not s[1:].isascii():
            raise ValueError(f"bad permission string {s!r}")
        return cls(int(s[1:]), s[0])

    @classmethod
    def from_mask(cls, domid: int, mask: int) -> Perm:
        return cls(domid, _MASK_TO_ACCESS[mask & PERM_BOTH])


# --- paths -----------------------------------------------------------------------------------------------

_VALID_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*")


def valid_chars(path: str) -> bool:
    return _VALID_CHARS.fullmatch(path) is not None


def valid_abs_path(path: str) -> bool:
    """An absolute node path as docs/misc/xenstore.txt allows it: "/" or /seg(/seg)*, no "//", no trailing
    "/", only [A-Za-z0-9-/_@], at most ABS_PATH_MAX bytes."""
    if not path.startswith("/") or len(path) > ABS_PATH_MAX or not valid_chars(path):
        return False
    if path == "/":
        return True
    return not path.endswith("/") and "//" not in path


def valid_special_path(path: str) -> bool:
    return path.startswith("@") and len(path) <= REL_PATH_MAX and valid_chars(path) and "/" not in path


def parent_path(path: str) -> str:
    """Parent of an absolute path ("/" is its own parent)."""
    i = path.rfind("/")
    return "/" if i <= 0 else path[:i]


def join_path(parent: str, child: str) -> str:
    return "/" + child if parent == "/" else parent + "/" + child


def domain_path(domid: int) -> str:
    return f"{DOMAIN_PATH_PREFIX}{domid}"


def is_subpath(path: str, ancestor: str) -> bool:
    """path == ancestor or lies below it."""
    if ancestor == "/":
        return True
    return path == ancestor or (path.startswith(ancestor) and path[len(ancestor)] == "/")
