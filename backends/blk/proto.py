"""blkif protocol facts and parsing, pure: no I/O, no xenstore, no C.

- `parse_params(params, type_name)`: what the toolstack wrote in `params`/`type` -> a `DiskTarget`.
- `parse_mode(mode)`: `r`/`w` -> read-only flag.
- `probe_keys(...)` / `connect_keys(...)`: backend keys computed from a driver's capabilities.
- `parse_frontend(keys, ...)`: the frontend's ring keys (single/multi-page, single/multi-queue, protocol,
  feature-persistent) with strict ranges; every refusal is a `ProtocolError` with a message for the `error`
  node.

Sector units follow the 2024 blkif specification (Xen commit 221f2748e8da): `sectors` and all sector fields in
requests are 512-byte units; `sector-size` is only the logical block size requests must be aligned to.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from backends.drivers.storage.nbd_target import NBD_SCHEMES, NbdTarget, NbdTargetError, parse_nbd_target

# The key grammar every device type shares, re-exported as blk's own.
from backends.xenbus.keys import ProtocolError as ProtocolError
from backends.xenbus.keys import frontend_queue_dirs as frontend_queue_dirs
from backends.xenbus.keys import parse_bool as parse_bool
from backends.xenbus.keys import parse_uint as parse_uint

# Operations (io/blkif.h)
OP_READ = 0
OP_WRITE = 1
OP_WRITE_BARRIER = 2
OP_FLUSH_DISKCACHE = 3
OP_RESERVED_1 = 4
OP_DISCARD = 5
OP_INDIRECT = 6
OP_NAMES = {
    OP_READ: "read",
    OP_WRITE: "write",
    OP_WRITE_BARRIER: "barrier",
    OP_FLUSH_DISKCACHE: "flush",
    OP_RESERVED_1: "reserved1",
    OP_DISCARD: "discard",
    OP_INDIRECT: "indirect",
}

MAX_SEGMENTS_PER_REQUEST = 11
MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGS_PER_INDIRECT_FRAME = 512
DISCARD_SECURE = 1

RSP_OKAY = 0
RSP_ERROR = -1
RSP_EOPNOTSUPP = -2

VDISK_CDROM = 1
VDISK_REMOVABLE = 2
VDISK_READONLY = 4

SECTOR = 512

# Backend limits we advertise by default.
DEFAULT_MAX_INDIRECT_SEGMENTS = 256  # Linux blkback's MAX_INDIRECT_SEGMENTS: 1 MiB requests, one indirect page
DEFAULT_MAX_RING_PAGE_ORDER = 4  # 16 pages = 512 slots (QEMU's default)
MAX_RING_PAGE_ORDER_LIMIT = 10  # the C ring accepts at most 1024 pages
DEFAULT_MAX_PERSISTENT_GRANTS = 1056  # Linux blkback's max_persistent_grants
EVTCHN_MAX_PORT = (1 << 17) - 1  # FIFO ABI: 2^17 ports
GRANT_REF_MAX = (1 << 32) - 1

# Slot/response sizes per ABI (sizeof the ring union; T in reference/xen-layouts.txt)
SLOT_SIZE = {"x86_64": 112, "x86_32": 108}
RSP_SIZE = {"x86_64": 16, "x86_32": 12}


class Abi(enum.IntEnum):
    """Values are csrc/blkif.h's PV_BLKIF_ABI_*."""

    X86_32 = 1
    X86_64 = 2

    @property
    def slot_size(self) -> int:
        return SLOT_SIZE["x86_32" if self is Abi.X86_32 else "x86_64"]

    @property
    def rsp_size(self) -> int:
        return RSP_SIZE["x86_32" if self is Abi.X86_32 else "x86_64"]


PROTOCOLS = {"x86_32-abi": Abi.X86_32, "x86_64-abi": Abi.X86_64}
# When the frontend writes no `protocol`, Linux blkback on x86 assumes x86_32 (BLKIF_PROTOCOL_DEFAULT in
# common.h); QEMU assumes the host's native ABI.  We follow Linux: the frontends that omit the key are the old
# 32-bit PV kernels that predate it, and a 64-bit frontend always writes it.
DEFAULT_PROTOCOL = Abi.X86_32


class ParamsError(ProtocolError):
    """`params`/`type`/`mode` (what the toolstack or operator wrote) cannot be served."""


# ---- params / type / mode -------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^([0-9]{1,20})([KMGT]?)(i?B)?$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
RAW_FORMATS = frozenset({"aio", "raw", "file", "phy"})
NBD_FORMATS = frozenset({"qcow2", "qcow", "vhd", "vmdk", "qed", "vdi"})  # served through qemu-nbd later
MAX_PARAMS_LEN = 4096


@dataclass(frozen=True)
class DiskTarget:
    """Where a disk's data lives.

    kind: "file" (raw file or block device at `path`), "image" (a `format` image at `path`, to be served
    over NBD), "nbd" (an NBD server: `socket` or `host`/`port`, `export`; `nbd` is it as the driver takes
    it), "null" (`size` bytes, no data).
    """

    kind: str
    path: str | None = None  # only for "file" and "image"
    format: str = "raw"
    socket: str = ""
    host: str = ""
    port: int = 0
    export: str = ""
    size: int = 0

    @property
    def nbd(self) -> NbdTarget:
        if self.kind != "nbd":
            raise ParamsError(f"a {self.kind!r} disk has no NBD server")
        if self.socket:
            return NbdTarget(socket_path=self.socket, export=self.export)
        return NbdTarget(host=self.host, port=self.port, export=self.export)


def parse_size(text: str) -> int:
    """`4096`, `64M`, `1G`, `2GiB` (binary multiples) -> bytes."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ParamsError(f"bad size {text!r}")
    return int(m.group(1)) * _SIZE_MULT[m.group(2).upper()]


def _check_text(value: str, what: str) -> None:
    if len(value) > MAX_PARAMS_LEN:
        raise ParamsError(f"{what} longer than {MAX_PARAMS_LEN} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ParamsError(f"{what} holds control characters")


def _abs_path(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise ParamsError(f"{what}: {path!r} is not an absolute path")
    return path


def _parse_nbd(params: str) -> DiskTarget:
    # The NBD driver's grammar, not a second one: what blk accepts is what the driver will connect to.
    try:
        t = parse_nbd_target(params)
    except NbdTargetError as exc:
        raise ParamsError(str(exc)) from exc
    if t.socket_path is not None:
        return DiskTarget(kind="nbd", socket=t.socket_path, export=t.export)
    assert t.host is not None
    return DiskTarget(kind="nbd", host=t.host, port=t.port, export=t.export)


def parse_params(params: str | None, type_name: str | None = None) -> DiskTarget:
    """Interpret `params` (and `type`) as libxl writes them for qdisk/phy backends.

    Accepted: `/path`, `aio:/path`, `raw:/path`, `file:/path`, `phy:/path` (raw file or block device);
    `qcow2:/path` and other image formats (kind "image": served over NBD); `nbd:unix:/sock[:exportname=X]`,
    `nbd:host:port[:exportname=X]`, `nbd://host[:port]/export`; `null:SIZE`.  With `type` = `phy` the whole
    value is a path.
    """
    if params is None or params == "":
        raise ParamsError("params is empty")
    _check_text(params, "params")
    if type_name == "phy":
        return DiskTarget(kind="file", path=_abs_path(params, "params"))
    if params.startswith("/"):
        return DiskTarget(kind="file", path=params)
    fmt, colon, rest = params.partition(":")
    if not colon:
        raise ParamsError(f"params {params!r}: expected FORMAT:PATH or an absolute path")
    if fmt.lower() in NBD_SCHEMES:
        return _parse_nbd(params)
    fmt = fmt.lower()
    if fmt in RAW_FORMATS:
        # libxl may stack prefixes ("aio:raw:/path" from old configs)
        inner, c2, rest2 = rest.partition(":")
        if c2 and inner.lower() in RAW_FORMATS:
            rest = rest2
        return DiskTarget(kind="file", path=_abs_path(rest, "params"))
    if fmt in NBD_FORMATS:
        return DiskTarget(kind="image", format=fmt, path=_abs_path(rest, "params"))
    if fmt == "null":
        size = parse_size(rest)
        if size <= 0 or size % SECTOR:
            raise ParamsError(f"null size {size} is not a positive multiple of {SECTOR}")
        return DiskTarget(kind="null", size=size)
    raise ParamsError(f"params {params!r}: unsupported format {fmt!r}")


def parse_mode(mode: str | None) -> bool:
    """`mode` -> read-only?  libxl writes `r` or `w`."""
    if mode == "r":
        return True
    if mode == "w":
        return False
    raise ParamsError(f"mode {mode!r} is neither 'r' nor 'w'")


# ---- backend keys -----------------------------------------------------------------------------------------


class DiskCaps(Protocol):
    """What the keys need from a storage driver (backends.drivers.storage.StorageCaps fits)."""

    @property
    def size_bytes(self) -> int: ...
    @property
    def logical_sector_size(self) -> int: ...
    @property
    def physical_sector_size(self) -> int: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def can_discard(self) -> bool: ...
    @property
    def can_secure_discard(self) -> bool: ...
    @property
    def discard_granularity(self) -> int: ...
    @property
    def discard_alignment(self) -> int: ...
    @property
    def needs_flush(self) -> bool: ...


@dataclass(frozen=True)
class BackendLimits:
    """What this backend offers whatever the disk (tunables of the daemon)."""

    max_ring_page_order: int = DEFAULT_MAX_RING_PAGE_ORDER
    max_queues: int = 1
    max_indirect_segments: int = DEFAULT_MAX_INDIRECT_SEGMENTS
    persistent: bool = True
    discard_enable: bool = True  # the toolstack's `discard-enable` (default 1)

    def __post_init__(self) -> None:
        if not 0 <= self.max_ring_page_order <= MAX_RING_PAGE_ORDER_LIMIT:
            raise ProtocolError(f"max_ring_page_order {self.max_ring_page_order} not in 0..{MAX_RING_PAGE_ORDER_LIMIT}")
        if not 1 <= self.max_queues <= 256:
            raise ProtocolError(f"max_queues {self.max_queues} not in 1..256")
        if not 0 <= self.max_indirect_segments <= MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_INDIRECT_FRAME:
            raise ProtocolError(f"max_indirect_segments {self.max_indirect_segments} out of range")


def disk_features(caps: DiskCaps, limits: BackendLimits) -> dict[str, bool]:
    """Which optional operations the data path must accept (the same facts as the keys below)."""
    writable = not caps.readonly
    discard = writable and caps.can_discard and limits.discard_enable
    return {
        "flush": writable and caps.needs_flush,
        "barrier": writable and caps.needs_flush,
        "discard": discard,
        "secure_discard": discard and caps.can_secure_discard,
    }


def probe_keys(limits: BackendLimits) -> dict[str, str]:
    """Keys written before the frontend connects (at realize): ring and queue limits."""
    keys = {
        "max-ring-page-order": str(limits.max_ring_page_order),
        "multi-queue-max-queues": str(limits.max_queues),
        "feature-persistent": "1" if limits.persistent else "0",
    }
    if limits.max_indirect_segments:
        keys["feature-max-indirect-segments"] = str(limits.max_indirect_segments)
    return keys


def connect_keys(
    caps: DiskCaps, limits: BackendLimits, *, cdrom: bool = False, removable: bool = False
) -> dict[str, str]:
    """Keys written when going Connected: geometry, info and the operations the disk supports."""
    if caps.logical_sector_size not in (512, 1024, 2048, 4096):
        raise ProtocolError(f"sector size {caps.logical_sector_size} not supported")
    feats = disk_features(caps, limits)
    info = (VDISK_READONLY if caps.readonly else 0) | (VDISK_CDROM if cdrom else 0)
    info |= VDISK_REMOVABLE if removable else 0
    keys = {
        "sectors": str(caps.size_bytes // SECTOR),
        "info": str(info),
        "sector-size": str(caps.logical_sector_size),
        "physical-sector-size": str(max(caps.physical_sector_size, caps.logical_sector_size)),
        "feature-flush-cache": "1" if feats["flush"] else "0",
        "feature-barrier": "1" if feats["barrier"] else "0",
        "feature-discard": "1" if feats["discard"] else "0",
    }
    if feats["discard"]:
        # Both granularity and alignment: older blkfronts need both present (QEMU's 2021 fix).
        keys["discard-granularity"] = str(caps.discard_granularity or caps.logical_sector_size)
        keys["discard-alignment"] = str(caps.discard_alignment)
        keys["discard-secure"] = "1" if feats["secure_discard"] else "0"
    return keys


# ---- frontend keys ----------------------------------------------------------------------------------------


def parse_protocol(value: str | None) -> Abi:
    if value is None or value == "":
        return DEFAULT_PROTOCOL
    try:
        return PROTOCOLS[value]
    except KeyError:
        raise ProtocolError(f"unsupported protocol {value[:32]!r}") from None


@dataclass(frozen=True)
class QueueRings:
    ring_refs: tuple[int, ...]
    event_channel: int


@dataclass(frozen=True)
class FrontendConfig:
    abi: Abi
    ring_page_order: int
    queues: tuple[QueueRings, ...]
    persistent: bool
    # keys a frontend may write that we deliberately ignore (e.g. feature-large-sector-size, deprecated 2024)
    ignored: tuple[str, ...] = field(default=())

    @property
    def nr_ring_pages(self) -> int:
        return 1 << self.ring_page_order


def parse_frontend(
    keys: Mapping[str, str],
    *,
    max_ring_page_order: int = DEFAULT_MAX_RING_PAGE_ORDER,
    max_queues: int = 1,
    backend_persistent: bool = True,
) -> FrontendConfig:
    """Parse the frontend's ring keys.

    `keys` maps every present key of the frontend directory to its value, queue subkeys as
    "queue-N/ring-ref".  Rules (Linux blkback's connect_ring): `multi-queue-num-queues` absent = 1 queue,
    else 1..max_queues; one queue keeps its keys at the top level even when the count key is present.
    `ring-page-order` (read at the top level) absent = one page named `ring-ref`, else 0..max and pages
    `ring-ref0..N-1` in each queue's directory.  Grant refs are u32; ports 1..2^17-1.
    """
    num_queues = parse_uint(keys.get("multi-queue-num-queues"), "multi-queue-num-queues", 1, max_queues, 1)
    order_text = keys.get("ring-page-order")
    order = parse_uint(order_text, "ring-page-order", 0, max_ring_page_order, 0)
    queues: list[QueueRings] = []
    for prefix in frontend_queue_dirs(num_queues):
        if order_text is None:
            refs: tuple[int, ...] = (parse_uint(keys.get(prefix + "ring-ref"), prefix + "ring-ref", 0, GRANT_REF_MAX),)
        else:
            refs = tuple(
                parse_uint(keys.get(f"{prefix}ring-ref{i}"), f"{prefix}ring-ref{i}", 0, GRANT_REF_MAX)
                for i in range(1 << order)
            )
        port = parse_uint(keys.get(prefix + "event-channel"), prefix + "event-channel", 1, EVTCHN_MAX_PORT)
        queues.append(QueueRings(refs, port))
    persistent = backend_persistent and parse_bool(keys.get("feature-persistent"), "feature-persistent")
    ignored = tuple(k for k in ("feature-large-sector-size",) if k in keys)
    return FrontendConfig(
        abi=parse_protocol(keys.get("protocol")),
        ring_page_order=order,
        queues=tuple(queues),
        persistent=persistent,
        ignored=ignored,
    )
