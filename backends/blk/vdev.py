"""Virtual device names -> xenstore device ids (docs/misc/vbd-interface.txt in the Xen tree)."""

from __future__ import annotations

import re

_XVD = re.compile(r"^xvd([a-z]+)([0-9]*)$")


class VdevError(ValueError):
    pass


def _disk_index(letters: str) -> int:
    n = 0
    for c in letters:
        n = n * 26 + (ord(c) - ord("a") + 1)
    return n - 1


def vdev_to_devid(vdev: str) -> int:
    """`xvda` -> 51712, `xvdb` -> 51728, `xvdq` -> extended form, or a plain number."""
    if vdev.isdigit():
        devid = int(vdev)
        if not 0 < devid < 1 << 30:
            raise VdevError(f"device id {vdev} is out of range")
        return devid
    m = _XVD.match(vdev)
    if not m:
        raise VdevError(f"{vdev!r} is not a virtual disk name (expected xvdX, xvdXN or a number)")
    disk = _disk_index(m.group(1))
    part = int(m.group(2) or 0)
    if disk < 16 and part < 16:
        return (202 << 8) | (disk << 4) | part
    if disk >= 1 << 20 or part >= 256:
        raise VdevError(f"{vdev!r} is out of range")
    return (1 << 28) | (disk << 8) | part
