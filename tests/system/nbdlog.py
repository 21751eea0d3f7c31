"""Durability from the storage's point of view: nbdkit's log filter output parsed into NBD commands with their
positions in the log, and a checker that holds a guest's record of writes and flushes against it.

nbdkit-log-filter (nbdkit 1.32) writes one line when a command enters the filter and one when it returns:

    2026-12-06 06:37:52.119154 connection=1 Write id=1 offset=0x1000 count=0x200 fua=0 ...
    2026-12-06 06:37:52.119190 connection=1 ...Write id=1 return=0
    2026-12-06 06:37:52.119263 connection=1 Flush id=2 ...
    2026-12-06 06:37:52.119883 connection=1 ...Flush id=2 return=0

`id` is unique per connection.  Positions are byte offsets into the log file rather than timestamps: the
filter writes each line into the file before it passes the command on (call) or back (return), so the order of
lines is the causal order, and the size of the file observed by the guest after it saw a completion bounds
everything storage did before that completion.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

# A call line ends with " ..."; a return line has "..." glued to the action.  Lines of other shapes (Ready,
# Preconnect, Connect, Disconnect) carry no command.
_CALL = re.compile(r"^\S+ \S+ connection=(\d+) (\w+) id=(\d+)((?: \w+=\S+)*) \.\.\.$")
_RETURN = re.compile(r"^\S+ \S+ connection=(\d+) \.\.\.(\w+) id=(\d+) return=(-?\d+)")
_ARG = re.compile(r"(\w+)=(\S+)")

WRITE = "write"
FLUSH = "flush"
BARRIER = "barrier"  # BLKIF_OP_WRITE_BARRIER: data that is itself a fence


@dataclass(frozen=True)
class NbdCmd:
    conn: int
    id: int
    action: str  # as nbdkit names it: "Write", "Flush", "Read", "Trim", ...
    offset: int
    count: int
    fua: bool
    start: int  # byte offset of the call line
    end: int = -1  # byte offset just past the return line; -1 if it never returned
    ret: int | None = None

    @property
    def ok(self) -> bool:
        return self.end >= 0 and self.ret == 0


def parse_log(text: bytes) -> list[NbdCmd]:
    """Every command in a log-filter file, in the order of their call lines.  A trailing partial line (nbdkit
    still writing it) is ignored."""
    cmds: dict[tuple[int, int], NbdCmd] = {}
    pos = 0
    for raw in text.splitlines(keepends=True):
        start, pos = pos, pos + len(raw)
        if not raw.endswith(b"\n"):
            break
        line = raw.decode("ascii", errors="replace").rstrip("\n")
        if m := _CALL.match(line):
            key = (int(m[1]), int(m[3]))
            if key in cmds:
                raise ValueError(f"log byte {start}: connection {key[0]} reuses id {key[1]}")
            args = dict(_ARG.findall(m[4]))
            cmds[key] = NbdCmd(key[0], key[1], m[2], int(args.get("offset", "0"), 0),
                               int(args.get("count", "0"), 0), args.get("fua", "0") == "1", start)
        elif m := _RETURN.match(line):
            key = (int(m[1]), int(m[3]))
            call = cmds.get(key)
            if call is None or call.action != m[2] or call.end >= 0:
                raise ValueError(f"log byte {start}: return of {m[2]} id {key[1]} without a matching call")
            cmds[key] = replace(call, end=pos, ret=int(m[4]))
    return sorted(cmds.values(), key=lambda c: c.start)


@dataclass
class GuestOp:
    """One request as the guest saw it.  seq: one counter for every submit and every completion the guest
    observed; pos: the log file's size when the guest submitted / right after it saw the completion."""

    kind: str  # WRITE | FLUSH | BARRIER
    offset: int = 0  # bytes; each data request owns [offset, offset + length) alone
    length: int = 0
    submit_seq: int = -1
    submit_pos: int = -1
    ack_seq: int = -1
    ack_pos: int = -1

    @property
    def fence(self) -> bool:
        return self.kind in (FLUSH, BARRIER)

    @property
    def data(self) -> bool:
        return self.kind in (WRITE, BARRIER)

    def describe(self, index: int) -> str:
        where = f" of {self.length} B at {self.offset:#x}" if self.data else ""
        return f"guest {self.kind} #{index}{where} (submitted at seq {self.submit_seq}, acked at {self.ack_seq})"


@dataclass
class Landing:
    """Where a guest data request reached storage: its NBD write(s)."""

    pieces: list[NbdCmd]
    end: int  # the latest return position among the pieces
    fua: bool  # every piece was written with FUA


@dataclass
class Report:
    violations: list[str]
    landings: dict[int, Landing]  # guest op index -> its NBD writes
    fences_checked: int
    obligations: int  # (fence, earlier acked write) pairs checked
    broken_fences: set[int]  # guest op indices of the fences some violation names
    acked_early: set[int]  # guest data requests acknowledged before storage returned them

    def summary(self, limit: int = 8) -> str:
        head = "\n".join(self.violations[:limit])
        more = f"\n... and {len(self.violations) - limit} more" if len(self.violations) > limit else ""
        return f"{len(self.violations)} durability violations:\n{head}{more}"


def _landing(i: int, op: GuestOp, writes: Sequence[NbdCmd], violations: list[str],
             acked_early: set[int]) -> Landing | None:
    lo, hi = op.offset, op.offset + op.length
    pieces = [w for w in writes if w.offset < hi and w.offset + w.count > lo]
    what = op.describe(i)
    if not pieces:
        violations.append(f"{what}: no NBD write reached storage for it")
        return None
    bad = [w for w in pieces if w.offset < lo or w.offset + w.count > hi]
    if bad:
        violations.append(f"{what}: NBD write(s) cross its region, the mapping is ambiguous: {bad}")
        return None
    covered = lo
    for w in sorted(pieces, key=lambda w: w.offset):
        if w.offset > covered:
            break
        covered = max(covered, w.offset + w.count)
    if covered < hi:
        violations.append(f"{what}: NBD writes cover only up to {covered:#x}")
        return None
    failed = [w for w in pieces if not w.ok]
    if failed:
        violations.append(f"{what}: NBD write(s) did not return success: {failed}")
        return None
    land = Landing(pieces, max(w.end for w in pieces), all(w.fua for w in pieces))
    if land.end > op.ack_pos:
        acked_early.add(i)
        violations.append(f"{what}: acknowledged to the guest (log byte {op.ack_pos}) before its NBD write "
                          f"returned (log byte {land.end})")
    return land


def check(ops: Sequence[GuestOp], cmds: Sequence[NbdCmd]) -> Report:
    """Every write acknowledged before a flush was submitted must be on storage before that flush completes:
    its NBD write(s) returned before an NBD flush started that itself returned before the guest saw the flush
    acknowledged.  A barrier is such a flush whose own data must also be durable at its acknowledgement
    (written with FUA, or followed by such an NBD flush).  Also checked: every guest data request maps to NBD
    writes that tile exactly its region and returned before the guest saw it acknowledged."""
    violations: list[str] = []
    unfinished = [op.describe(i) for i, op in enumerate(ops) if op.ack_seq < 0 or op.ack_pos < 0]
    if unfinished:
        raise ValueError(f"the record holds requests that never completed: {unfinished[:3]}")
    writes = [c for c in cmds if c.action == "Write"]
    landings: dict[int, Landing] = {}
    acked_early: set[int] = set()
    broken: set[int] = set()
    for i, op in enumerate(ops):
        if op.data:
            land = _landing(i, op, writes, violations, acked_early)
            if land is not None:
                landings[i] = land
    # A guest flush is satisfied for write W iff some successful NBD flush N has N.start >= W's return and
    # N.end <= the flush's acknowledgement; the candidate with the latest start decides for every W at once.
    nbd_flushes = sorted((c for c in cmds if c.action == "Flush" and c.ok), key=lambda c: c.end)
    ends = [c.end for c in nbd_flushes]
    latest_start = []
    best = -1
    for c in nbd_flushes:
        best = max(best, c.start)
        latest_start.append(best)
    acked = sorted((op.ack_seq, i) for i, op in enumerate(ops) if op.data and i in landings)
    fences = 0
    obligations = 0
    for fi, f in enumerate(ops):
        if not f.fence:
            continue
        fences += 1
        k = bisect.bisect_right(ends, f.ack_pos)
        start = latest_start[k - 1] if k else -1
        due = [i for seq, i in acked if seq < f.submit_seq]
        if f.kind == BARRIER and fi in landings and not landings[fi].fua:
            due.append(fi)  # its own data, unless FUA made it durable on its own
        obligations += len(due)
        for wi in due:
            land = landings[wi]
            if land.end > start:
                broken.add(fi)
                violations.append(
                    f"{f.describe(fi)}, acked at log byte {f.ack_pos}: {ops[wi].describe(wi)} returned from storage "
                    f"at log byte {land.end}, and no NBD flush started after that and returned before the ack "
                    f"(the latest such flush starts at byte {start})")
    return Report(violations, landings, fences, obligations, broken, acked_early)
