"""The one small interface between device backends and the machine they run on.

Two implementations: `backends.platform.xen` (libxengnttab/libxenevtchn loaded at run time, the system
xenstored) and `backends.platform.emulated` (guest memfds + v1 grant tables enforced like Xen, eventfd port
pairs, pvback's own xenstored).  Nothing above this layer knows which one runs.

The data paths never call through Python per request: `Platform.gnt` is a `struct pv_gnt *` ops table and
`EventChannel.c` a `struct pv_evtchn *` (csrc/platform.h) that C code uses directly.  The Python methods here
are for set-up (ring mapping, binding) and for tests.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.xenstore.client import XenStoreClient


class GrantStatus(enum.IntEnum):
    """GNTST_* from xen/include/public/grant_table.h."""

    OKAY = 0
    GENERAL_ERROR = -1
    BAD_DOMAIN = -2
    BAD_GNTREF = -3
    BAD_HANDLE = -4
    BAD_VIRT_ADDR = -5
    BAD_DEV_ADDR = -6
    NO_DEVICE_SPACE = -7
    PERMISSION_DENIED = -8
    BAD_PAGE = -9
    BAD_COPY_ARG = -10
    ADDRESS_TOO_BIG = -11
    EAGAIN = -12
    NO_SPACE = -13


class GrantError(OSError):
    """A grant operation failed with a GNTST_* status."""

    def __init__(self, status: int, what: str) -> None:
        try:
            name = GrantStatus(status).name
        except ValueError:
            name = f"status {status}"
        super().__init__(f"{what}: {name}")
        self.status = status


class PlatformError(RuntimeError):
    """The platform cannot be opened or used (no /dev/xen, no broker socket, no permission...)."""


@dataclass(frozen=True)
class PlatformFeatures:
    grant_copy: bool  # GNTTABOP_copy available (else map+memcpy+unmap)
    map_multiple: bool  # several refs can be mapped into one contiguous range (multi-page rings)


class Platform(abc.ABC):
    """Grant tables, event channels, the xenstore connection and feature flags of one backend domain."""

    name: str  # "xen" or "emulated"
    backend_domid: int
    features: PlatformFeatures

    @property
    @abc.abstractmethod
    def gnt(self) -> Any:
        """The `struct pv_gnt *` ops table for C data paths."""

    @abc.abstractmethod
    def open_domain(self, domid: int) -> None:
        """Make `domid`'s grants reachable (emulated: fetch its memory from the broker; Xen: nothing).
        Reference counted: every open_domain is paired with close_domain."""

    @abc.abstractmethod
    def close_domain(self, domid: int) -> None:
        """Drop one reference taken by open_domain."""

    @abc.abstractmethod
    def map_grants(self, domid: int, refs: list[int], writable: bool) -> GrantMapping:
        """Map `refs` into one contiguous range, all or nothing; raises GrantError."""

    @abc.abstractmethod
    def grant_copy(self, segments: list[CopySegment]) -> list[int]:
        """Run GNTTABOP_copy-like segments; returns one GNTST status per segment."""

    @abc.abstractmethod
    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        """Bind a local port to `remote_port` of `domid`; raises OSError."""

    @abc.abstractmethod
    def xenstore_path(self) -> str:
        """Where this platform's xenstored listens (socket or /dev/xen/xenbus)."""

    @abc.abstractmethod
    async def open_xenstore(self) -> XenStoreClient:
        """A new privileged xenstore connection for this backend domain."""

    @property
    @abc.abstractmethod
    def live_mappings(self) -> int:
        """Pages currently mapped through this platform's grant handle (leak checks)."""

    @abc.abstractmethod
    def close(self) -> None: ...


@dataclass
class CopySegment:
    """One GNTTABOP_copy segment between a local buffer and a foreign grant.

    `to_guest` True copies local -> grant (a read served to the guest), False grant -> local.
    `local` is a writable buffer (or cdata pointer) of at least `length` bytes at `local_offset`.
    """

    domid: int
    ref: int
    offset: int
    length: int
    local: Any
    local_offset: int = 0
    to_guest: bool = False


class GrantMapping(abc.ABC):
    """Pages of a foreign domain mapped into this process."""

    npages: int
    writable: bool

    @property
    @abc.abstractmethod
    def address(self) -> Any:
        """`void *` cdata of the start of the range."""

    @abc.abstractmethod
    def buffer(self) -> memoryview:
        """The mapped bytes (read-only mappings fault on write: never write through those)."""

    @abc.abstractmethod
    def unmap(self) -> None:
        """Idempotent."""

    def __enter__(self) -> GrantMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmap()


class EventChannel(abc.ABC):
    """One bound interdomain port with its own pollable fd (add it to the event loop as a reader)."""

    local_port: int
    remote_domid: int
    remote_port: int

    @property
    @abc.abstractmethod
    def c(self) -> Any:
        """The `struct pv_evtchn *` for C data paths."""

    @abc.abstractmethod
    def fileno(self) -> int: ...

    @abc.abstractmethod
    def notify(self) -> None: ...

    @abc.abstractmethod
    def pending(self) -> bool:
        """Acknowledge a delivered event; True if there was one.  Delivery stays masked until unmask()."""

    @abc.abstractmethod
    def unmask(self) -> None:
        """Re-enable delivery; call only after the ring is drained (the lateeoi rule, XSA-332)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unbind; idempotent."""
