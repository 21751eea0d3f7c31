"""A persistent, multi-queue tap with a virtio-net header: the host side of one guest NIC.

Created with pyroute2 (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE, TUNSETPERSIST), its MAC, MTU and
link state set through rtnetlink; then one file descriptor per data-path queue is attached with TUNSETIFF.
Persistent, so a daemon that is SIGKILLed and restarted attaches to the same interface (same ifindex): the
host's routes, bridge or OVS port stay valid (ovs-userspace.md §3f: a re-created tap leaves OVS's socket
stale).  `remove()` deletes it (unplug).  The driver knows no protocol: offloads are TUN_F_* bits.

Every read and write on the fds carries a 10-byte `struct virtio_net_hdr` (little-endian) before the frame.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from typing import Any

TUN_DEV = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
VNET_HDR_LEN = 10
MAX_QUEUES = 256  # IFF_MULTI_QUEUE's limit (MAX_TAP_QUEUES)


class TapError(OSError):
    """The tap cannot be created, configured or attached."""


@dataclass(frozen=True)
class TapInfo:
    name: str
    ifindex: int
    mac: str
    mtu: int
    created: bool  # False: an existing tap (a restarted daemon) was attached again


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode("ascii"), flags)


class Tap:
    """`open()` creates (or finds) the tap and attaches `queues` non-blocking fds; `close()` lets go of them
    (the tap stays); `remove()` also deletes the interface."""

    def __init__(self, name: str, *, mac: str, mtu: int, queues: int = 1) -> None:
        if not 1 <= queues <= MAX_QUEUES:
            raise ValueError(f"queues {queues} not in 1..{MAX_QUEUES}")
        if not name or len(name) > 15:
            raise ValueError(f"bad interface name {name!r}")
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.queues = queues
        self.fds: list[int] = []
        self.info: TapInfo | None = None

    @staticmethod
    def _ipr() -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    def open(self) -> TapInfo:
        """Create or find the tap, set MAC/MTU/up, attach the queues.  Blocking (a few ms): call it off the
        event loop.  TapError if anything fails (nothing is left attached)."""
        if not os.path.exists(TUN_DEV):
            # A dom0 without udev (or a minimal one) has no node until the module is loaded; pyroute2 would only
            # say "No such file or directory".
            raise TapError(errno.ENOENT, f"tap {self.name}: no {TUN_DEV} (load the tun module: modprobe tun)")
        try:
            with self._ipr() as ipr:
                found = ipr.link_lookup(ifname=self.name)
                created = not found
                if created:
                    ipr.link("add", ifname=self.name, kind="tuntap", mode="tap",
                             ifr={"no_pi": 1, "vnet_hdr": 1, "multi_queue": 1})
                    found = ipr.link_lookup(ifname=self.name)
                if not found:
                    raise TapError(errno.ENODEV, f"tap {self.name} vanished after creation")
                index = int(found[0])
                self._attach()
                ipr.link("set", index=index, address=self.mac, mtu=self.mtu)
                ipr.link("set", index=index, state="up")
        except TapError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            why = exc.strerror or str(exc)
            raise TapError(exc.errno or errno.EIO, f"tap {self.name}: {why}") from exc
        except Exception as exc:  # pyroute2's NetlinkError is an Exception with a code
            self.close()
            code = int(getattr(exc, "code", 0) or errno.EIO)
            raise TapError(code, f"tap {self.name}: {exc}") from exc
        self.info = TapInfo(self.name, index, self.mac, self.mtu, created)
        return self.info

    def _attach(self) -> None:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
        for _ in range(self.queues):
            fd = os.open(TUN_DEV, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(self.name, flags))
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EINVAL:
                    raise TapError(errno.EINVAL, f"{self.name} exists but is not a multi-queue tap with a vnet "
                                   "header (delete it or choose another vifname)") from exc
                raise
            self.fds.append(fd)

    def set_offload(self, flags: int) -> None:
        """TUN_F_* bits: what frames the host may hand us (partial checksums, TSO).  Always set on attach: the
        bits live on the persistent device and outlive the fds (ovs-userspace.md §3e)."""
        if not self.fds:
            raise TapError(errno.EBADF, f"tap {self.name} is not attached")
        try:
            fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, flags)
        except OSError as exc:
            raise TapError(exc.errno or errno.EIO, f"tap {self.name}: TUNSETOFFLOAD {flags:#x}: {exc}") from exc

    def close(self) -> None:
        """Detach every fd (the interface stays, without carrier).  Idempotent."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def remove(self) -> None:
        """Detach and delete the interface.  Idempotent; an absent tap is fine."""
        self.close()
        try:
            with self._ipr() as ipr:
                found = ipr.link_lookup(ifname=self.name)
                if found:
                    ipr.link("del", index=int(found[0]))
        except Exception as exc:
            raise TapError(errno.EIO, f"cannot delete tap {self.name}: {exc}") from exc
        self.info = None


def tap_exists(name: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def preload() -> None:
    """Import pyroute2 now rather than in the first tap's creation: the import takes seconds on a slow dom0 (4 s
    measured under QEMU/TCG), and libxl gives a vif's backend 10 s from its creation to reach InitWait."""
    import pyroute2  # noqa: F401
