"""A tap enslaved to a Linux bridge with rtnetlink (pyroute2): what libxl's default `vif-bridge` script does
with `ip link set dev vif master BR`, without a subprocess.  Blocking (a few ms): call it off the event loop.
The driver knows no netif: interface names only."""

from __future__ import annotations

import errno
from typing import Any


class BridgeError(OSError):
    """The bridge is missing, is not a Linux bridge, or the tap cannot join it."""


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _kind(ipr: Any, index: int) -> str:
    link = ipr.link("get", index=index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def is_linux_bridge(name: str) -> bool:
    """True if an interface called `name` exists here and is a Linux bridge (an OVS kernel-datapath bridge is
    kind "openvswitch", a netdev-datapath one a tap: neither counts)."""
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
        return bool(found) and _kind(ipr, int(found[0])) == "bridge"


def enslave(bridge: str, port: str) -> int:
    """Make `port` a port of the Linux bridge `bridge` (idempotent); returns the bridge's ifindex."""
    try:
        with _ipr() as ipr:
            br = ipr.link_lookup(ifname=bridge)
            if not br:
                raise BridgeError(errno.ENODEV, f"bridge {bridge} does not exist")
            if _kind(ipr, int(br[0])) != "bridge":
                raise BridgeError(errno.EINVAL, f"{bridge} is not a Linux bridge")
            dev = ipr.link_lookup(ifname=port)
            if not dev:
                raise BridgeError(errno.ENODEV, f"interface {port} does not exist")
            ipr.link("set", index=int(dev[0]), master=int(br[0]))
            ipr.link("set", index=int(dev[0]), state="up")
            return int(br[0])
    except BridgeError:
        raise
    except Exception as exc:  # pyroute2's NetlinkError carries an errno in .code
        code = int(getattr(exc, "code", 0) or errno.EIO)
        raise BridgeError(code, f"cannot add {port} to bridge {bridge}: {exc}") from exc


def release(port: str) -> None:
    """Take `port` out of whatever bridge holds it (absent interface: nothing to do)."""
    try:
        with _ipr() as ipr:
            dev = ipr.link_lookup(ifname=port)
            if dev:
                ipr.link("set", index=int(dev[0]), master=0)
    except Exception as exc:
        code = int(getattr(exc, "code", 0) or errno.EIO)
        raise BridgeError(code, f"cannot take {port} out of its bridge: {exc}") from exc
