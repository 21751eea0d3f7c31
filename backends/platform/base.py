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
from dataclasses import dataclass
from typing import Protocol

from backends.native import CData, struct_pv_evtchn, struct_pv_gnt

# The value types of grant operations belong to the layer that performs them; re-exported as the platform's.
from backends.native.grants import CopySegment, GrantError, GrantStatus

__all__ = ["CopySegment", "EventChannel", "GrantError", "GrantMapping", "GrantStatus", "Platform", "PlatformError",
           "PlatformFeatures"]


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
    # Device nodes opened again while serving (after a daemon has dropped root, its user needs access).
    reopened_nodes: tuple[str, ...] = ()

    @property
    @abc.abstractmethod
    def gnt(self) -> struct_pv_gnt:
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

    @property
    @abc.abstractmethod
    def live_mappings(self) -> int:
        """Pages currently mapped through this platform's grant handle (leak checks)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class GrantMapping(Protocol):
    """Pages of a foreign domain mapped into this process (backends.native.grants.NativeGrantMapping)."""

    npages: int
    writable: bool

    @property
    def address(self) -> CData:
        """`void *` cdata of the start of the range."""

    def buffer(self) -> memoryview:
        """The mapped bytes (read-only mappings fault on write: never write through those)."""

    def unmap(self) -> None:
        """Idempotent."""

    def __enter__(self) -> GrantMapping: ...

    def __exit__(self, *exc: object) -> None: ...


class EventChannel(Protocol):
    """One bound interdomain port with its own pollable fd (backends.native.events.NativeEventChannel)."""

    local_port: int
    remote_domid: int
    remote_port: int

    @property
    def c(self) -> struct_pv_evtchn:
        """The `struct pv_evtchn *` for C data paths."""

    def fileno(self) -> int: ...

    def notify(self) -> None: ...

    def pending(self) -> bool:
        """Acknowledge a delivered event; True if there was one.  Delivery stays masked until unmask()."""

    def unmask(self) -> None:
        """Re-enable delivery; call only after the ring is drained (the lateeoi rule, XSA-332)."""

    def close(self) -> None:
        """Unbind; idempotent."""
