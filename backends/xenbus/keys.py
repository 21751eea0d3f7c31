"""The grammar of xenstore keys every device type's protocol reads (pure, no I/O): strict unsigned decimals and
0/1 flags, and where a multi-queue frontend puts each queue's keys.  Refusals are `ProtocolError`s whose
message goes into the device's `error` node; each device package re-exports the class as its own."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A toolstack or frontend value we refuse; the message is meant for the device's `error` node."""


def parse_uint(value: str | None, what: str, lo: int, hi: int, default: int | None = None) -> int:
    """Decimal digits only (no sign, space, hex or leading '+'), within [lo, hi]."""
    if value is None:
        if default is None:
            raise ProtocolError(f"{what} missing")
        return default
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise ProtocolError(f"{what} {value[:32]!r} is not an unsigned decimal")
    n = int(value)
    if not lo <= n <= hi:
        raise ProtocolError(f"{what} {n} not in {lo}..{hi}")
    return n


def parse_bool(value: str | None, what: str, default: bool = False) -> bool:
    if value is None:
        return default
    if value in ("0", "1"):
        return value == "1"
    raise ProtocolError(f"{what} {value[:32]!r} is neither 0 nor 1")


def frontend_queue_dirs(num_queues: int) -> list[str]:
    """Key prefixes of each queue: "" for a single queue (keys at the top level), else "queue-N/" (Linux)."""
    return [""] if num_queues == 1 else [f"queue-{i}/" for i in range(num_queues)]
