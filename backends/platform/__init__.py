"""L2: the platform seam.  `open_platform()` picks real Xen or the emulated platform once at start-up."""

from __future__ import annotations

import os

from backends.platform.base import Platform, PlatformError

_XENSTORE_CANDIDATES = ("/var/run/xenstored/socket", "/dev/xen/xenbus")


def xen_present() -> bool:
    """Real Xen: the gntdev node and a reachable xenstore (daemon socket, XENSTORED_PATH or xenbus)."""
    if not os.path.exists("/dev/xen/gntdev"):
        return False
    env = os.environ.get("XENSTORED_PATH")
    return any(os.path.exists(p) for p in ((env,) if env else ()) + _XENSTORE_CANDIDATES)


def open_platform(kind: str = "auto", sim_dir: str | None = None) -> Platform:
    """"xen", "emulated", or "auto" (Xen when present, else the emulated platform in `sim_dir`)."""
    if kind == "auto":
        kind = "xen" if xen_present() else "emulated"
    if kind == "xen":
        from backends.platform.xen import XenPlatform

        return XenPlatform()
    if kind == "emulated":
        from backends.platform.emulated import EmulatedPlatform

        return EmulatedPlatform(sim_dir)
    raise PlatformError(f"unknown platform {kind!r} (expected auto, xen or emulated)")


__all__ = ["Platform", "PlatformError", "open_platform", "xen_present"]
