"""Per-disk I/O limits, pure: the backend keys that set them, the values an operator may give, and parsing.

A disk may be capped in requests per second and in bytes per second, each a token bucket (csrc/blklimit.h)
shared by the disk's queues; the buckets hold `burst` milliseconds of their rate, so a disk that was idle
may run at full speed for that long.  Requests over the cap wait on the ring (the guest sees a full ring and
slows down; nothing fails).

Where a disk's limits come from, last wins:
- `[blk]` `iops_limit`, `bps_limit`, `limit_burst_ms`: every disk's defaults;
- the disk's backend keys `pvback-iops-limit`, `pvback-bps-limit`, `pvback-limit-burst-ms` (what
  `pvback limit disk DOMID VDEV --iops N --bps N --burst MS` writes; a toolstack may write them too).  They
  are watched: a change applies to the running disk at once.  An empty or absent key means "the default";
  0 means "no cap".  A key the backend cannot parse is logged and the default applies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from backends.xenbus.keys import ProtocolError

KEY_IOPS = "pvback-iops-limit"
KEY_BPS = "pvback-bps-limit"
KEY_BURST = "pvback-limit-burst-ms"
LIMIT_KEYS = (KEY_IOPS, KEY_BPS, KEY_BURST)

# The C data path's bounds (csrc/blklimit.h).
MAX_IOPS = 100_000_000
MAX_BPS = 1_000_000_000_000
MAX_BURST_MS = 60_000
DEFAULT_BURST_MS = 100

_SIZE = re.compile(r"([0-9]{1,15})([kmgt]i?)?b?", re.I)
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}  # fmt: skip


@dataclass(frozen=True)
class IoLimits:
    iops: int = 0  # requests per second; 0: no cap
    bps: int = 0  # bytes per second; 0: no cap
    burst_ms: int = DEFAULT_BURST_MS

    @property
    def capped(self) -> bool:
        return bool(self.iops or self.bps)

    def describe(self) -> str:
        if not self.capped:
            return "unlimited"
        parts = []
        if self.iops:
            parts.append(f"{self.iops} IOPS")
        if self.bps:
            parts.append(f"{self.bps} B/s")
        return " + ".join(parts) + f", burst {self.burst_ms} ms"


def parse_count(text: str, what: str, maximum: int, *, sizes: bool = False) -> int:
    """A non-negative integer, with SI (k, M, G, T) or binary (Ki, Mi, ...) suffixes when `sizes`; "0",
    "none" and "unlimited" mean no cap.  ProtocolError naming `what` and the accepted range otherwise."""
    t = text.strip()
    if t.lower() in ("none", "unlimited"):
        return 0
    m = _SIZE.fullmatch(t) if sizes else re.fullmatch(r"[0-9]{1,15}", t)
    if m is None:
        form = "an integer with an optional k/M/G/T or Ki/Mi/Gi/Ti suffix" if sizes else "an integer"
        raise ProtocolError(f"{what} {text!r}: not {form} (0 or 'none': no cap)")
    value = int(m.group(1)) * _UNITS[(m.group(2) or "").lower()] if sizes else int(t)
    if value > maximum:
        raise ProtocolError(f"{what} {text!r}: at most {maximum}")
    return value


def parse_burst(text: str) -> int:
    t = text.strip()
    if not re.fullmatch(r"[0-9]{1,15}", t):
        raise ProtocolError(f"burst {text!r}: not an integer number of milliseconds")
    value = int(t)
    if value > MAX_BURST_MS:
        raise ProtocolError(f"burst {text!r}: at most {MAX_BURST_MS} ms")
    return value


def limits_from_keys(values: Mapping[str, str | None], default: IoLimits) -> IoLimits:
    """The disk's limits from its backend keys (absent or empty: the default).  ProtocolError for garbage."""

    def get(key: str) -> str | None:
        v = values.get(key)
        return v if v is not None and v.strip() != "" else None

    iops_t, bps_t, burst_t = get(KEY_IOPS), get(KEY_BPS), get(KEY_BURST)
    return IoLimits(
        iops=default.iops if iops_t is None else parse_count(iops_t, KEY_IOPS, MAX_IOPS),
        bps=default.bps if bps_t is None else parse_count(bps_t, KEY_BPS, MAX_BPS, sizes=True),
        burst_ms=default.burst_ms if burst_t is None else parse_burst(burst_t),
    )
