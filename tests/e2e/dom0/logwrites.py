"""Read and replay a dm-log-writes log: what made it to storage at each flush the guest's disk saw.

dm-log-writes (drivers/md/dm-log-writes.c) records every write that completed on the device it sits on, and
logs a FLUSH entry right after every write that completed before the flush was submitted; replaying the log up
to a FLUSH entry gives the device as a power cut right after that flush would have left it.  xfstests ships a
replayer (src/log-writes/replay-log), but no Debian package does, so this is one, small, for the e2e's dom0.

On-disk layout (log device), all little endian, `sectorsize` = the logical block size of the logged device:
  byte 0:               struct log_write_super {u64 magic, u64 version, u64 nr_entries, u32 sectorsize}
  then nr_entries times: one sectorsize block holding struct log_write_entry {u64 sector, u64 nr_sectors,
                        u64 flags, u64 data_len} (for a MARK followed by data_len bytes of mark text in the same
                        block), then, unless DISCARD or MARK, nr_sectors * sectorsize bytes of written data.
`sector` and `nr_sectors` count sectorsize units.  The kernel rewrites the super (nr_entries) after FUA and MARK
entries and when the target is removed, so a log read after `dmsetup remove` is complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
_SUPER = struct.Struct("<QQQI")
_ENTRY = struct.Struct("<QQQQ")


class LogError(Exception):
    pass


@dataclass(frozen=True)
class Entry:
    index: int
    offset: int  # bytes into the logged device
    length: int  # bytes
    flags: int
    data_at: int  # bytes into the log device (meaningful only for writes)
    mark: str = ""

    @property
    def is_write(self) -> bool:
        return self.length > 0 and not self.flags & (DISCARD | MARK)


@dataclass(frozen=True)
class Log:
    path: Path
    sectorsize: int
    entries: list[Entry]

    def data(self, entry: Entry) -> bytes:
        with self.path.open("rb") as f:
            f.seek(entry.data_at)
            data = f.read(entry.length)
        if len(data) != entry.length:
            raise LogError(f"entry {entry.index}: log ends inside its data")
        return data

    @property
    def flushes(self) -> list[Entry]:
        return [e for e in self.entries if e.flags & FLUSH]


def read_log(path: Path) -> Log:
    with path.open("rb") as f:
        raw = f.read(_SUPER.size)
        if len(raw) < _SUPER.size:
            raise LogError(f"{path}: shorter than a super block")
        magic, version, nr_entries, sectorsize = _SUPER.unpack(raw)
        if magic != MAGIC:
            raise LogError(f"{path}: magic {magic:#x}, a dm-log-writes log has {MAGIC:#x}")
        if version != VERSION:
            raise LogError(f"{path}: log version {version}, this reader knows {VERSION}")
        if sectorsize not in (512, 1024, 2048, 4096):
            raise LogError(f"{path}: sector size {sectorsize}")
        entries = []
        pos = sectorsize
        for index in range(nr_entries):
            f.seek(pos)
            block = f.read(sectorsize)
            if len(block) < _ENTRY.size:
                raise LogError(f"{path}: log ends at entry {index} of {nr_entries}")
            sector, nr_sectors, flags, data_len = _ENTRY.unpack_from(block)
            pos += sectorsize
            mark = ""
            if flags & MARK:
                mark = block[_ENTRY.size:_ENTRY.size + data_len].decode(errors="replace")
            entries.append(Entry(index, sector * sectorsize, nr_sectors * sectorsize, flags, pos, mark))
            if not flags & (DISCARD | MARK):
                pos += nr_sectors * sectorsize
    return Log(path, sectorsize, entries)


class Replay:
    """The logged device rebuilt in a file (sparse, zeros where nothing was written), entry by entry.

    DISCARD is replayed as zeros: the data device under the test's dm-log-writes is a loop device over a file,
    which punches holes for discards, so discarded ranges read back as zeros there too."""

    def __init__(self, log: Log, target: Path, size: int) -> None:
        self.log = log
        self.target = target
        self.size = size
        self.applied = 0  # entries replayed so far
        with target.open("wb") as f:
            f.truncate(size)

    def advance(self, upto: int) -> None:
        """Replay entries [applied, upto)."""
        with self.log.path.open("rb") as src, self.target.open("r+b") as dst:
            for entry in self.log.entries[self.applied:upto]:
                if entry.offset + entry.length > self.size:
                    raise LogError(f"entry {entry.index} ends at byte {entry.offset + entry.length}, beyond the "
                                   f"{self.size}-byte device")
                if entry.flags & DISCARD:
                    os.pwrite(dst.fileno(), bytes(entry.length), entry.offset)
                elif entry.is_write:
                    src.seek(entry.data_at)
                    data = src.read(entry.length)
                    if len(data) != entry.length:
                        raise LogError(f"entry {entry.index}: log ends inside its data")
                    os.pwrite(dst.fileno(), data, entry.offset)
        self.applied = max(self.applied, upto)

    def read(self, offset: int, length: int) -> bytes:
        with self.target.open("rb") as f:
            return os.pread(f.fileno(), length, offset)

    def flush_points(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Entry, bool]]:
        """Replays up to and including each FLUSH entry in [start, stop); yields (flush number counted from 1 over
        the whole log, the entry, whether anything was written or discarded since the previous flush point)."""
        stop = len(self.log.entries) if stop is None else stop
        number = sum(1 for e in self.log.entries[:start] if e.flags & FLUSH)
        self.advance(start)
        changed = True
        for entry in self.log.entries[start:stop]:
            if entry.length and not entry.flags & MARK:
                changed = True
            if entry.flags & FLUSH:
                number += 1
                self.advance(entry.index + 1)
                yield number, entry, changed
                changed = False


def check_ordered_rounds(log: Log, replay: Replay, tag_base: int, tag_size: int, tags: list[bytes],
                         flush_counts: list[int], sentinel: bytes) -> str:
    """Round i of the guest wrote tags[i] at tag_base + i * tag_size, then fsync'ed, and only then started round
    i + 1; flush_counts[i] is how many flushes the guest's disk had completed (its diskstats) once round i's fsync
    returned.  After the last round the guest wrote `sentinel` in the next block without an fsync: it lands in
    the log after the last round's flush and before whatever used the disk next (and its flushes).  Checks, over
    the log up to the sentinel: at the k-th FLUSH the tags present are 0..m-1 with nothing missing in between
    and no tag damaged, and tag i is there by FLUSH number flush_counts[i] (shifted by the flushes the log holds
    beyond the guest's count, which the backend may add), so every tag by the last flush.  Returns a summary;
    raises LogError on a violation."""
    n = len(tags)
    if len(flush_counts) != n:
        raise LogError(f"{len(flush_counts)} flush counts for {n} rounds")
    at = tag_base + n * tag_size
    end = next((e.index for e in log.entries if e.is_write and e.offset == at and e.length == tag_size), None)
    if end is None:
        raise LogError(f"the guest's end-of-rounds block (byte {at}) is not in the log")
    if log.data(log.entries[end]) != sentinel:
        raise LogError(f"log entry {end} at the end-of-rounds block holds {log.data(log.entries[end])[:40]!r}")
    lo, hi = tag_base, tag_base + n * tag_size
    stray = next((e for e in log.entries[:end] if e.length and not e.flags & MARK
                  and (e.offset < lo or e.offset + e.length > hi)), None)
    if stray is not None:
        raise LogError(f"log entry {stray.index} (bytes {stray.offset}+{stray.length}) touches the disk outside the "
                       "tag blocks during the rounds: the rounds were not the disk's only writer")
    flushes = [e for e in log.entries[:end] if e.flags & FLUSH]
    guest = flush_counts[-1]
    if len(flushes) < guest:
        raise LogError(f"the guest completed {guest} flushes during its {n} rounds, the log holds only "
                       f"{len(flushes)} flushes for them: flushes were acknowledged without reaching the disk")
    extra = len(flushes) - guest
    due = {i: flush_counts[i] + extra for i in range(n)}  # tag i must be durable by this flush number
    last_seen = 0
    for number, entry, _changed in replay.flush_points(0, end):
        present = []
        for i, tag in enumerate(tags):
            got = replay.read(tag_base + i * tag_size, tag_size)
            if got == tag:
                present.append(i)
            elif got != bytes(tag_size):
                raise LogError(f"at flush #{number} (log entry {entry.index}) tag block {i} holds neither zeros "
                               f"nor its tag: {got[:40]!r}")
        m = len(present)
        if present != list(range(m)):
            raise LogError(f"at flush #{number} (log entry {entry.index}) tags {present} are on the disk: a later "
                           f"round's write is there, an earlier one's is not")
        if m < last_seen:
            raise LogError(f"at flush #{number} tag {m} vanished (it was on the disk at an earlier flush)")
        last_seen = m
        late = [i for i in range(n) if due[i] <= number and i not in present]
        if late:
            raise LogError(f"at flush #{number} (log entry {entry.index}) tag {late[0]} is missing, but the guest's "
                           f"fsync of round {late[0]} had returned after its flush #{flush_counts[late[0]]}"
                           + (f" (+{extra} flushes the backend added)" if extra else "")
                           + ": a write acknowledged before an acknowledged flush was not on the disk")
    if last_seen != n:
        raise LogError(f"only tags 0..{last_seen - 1} of {n} are on the disk at the last flush of the rounds")
    return (f"{len(flushes)} flushes for {n} rounds (guest counted {guest}), every tag on the disk by the flush "
            f"that acknowledged its round{f' (+{extra} the backend added)' if extra else ''}")


EXT4_MAGIC_AT = 1024 + 0x38  # s_magic in the primary super block
EXT4_COMPAT_AT = 1024 + 0x5C  # s_feature_compat
COMPAT_HAS_JOURNAL = 0x4


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LogError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from exc


def _tail(cp: subprocess.CompletedProcess[str], n: int = 4) -> str:
    return " | ".join((cp.stdout + cp.stderr).strip().splitlines()[-n:])


def check_fs_replay(log: Log, replay: Replay, file_shas: list[str], workdir: Path) -> str:
    """The guest made an ext4 (with a journal) on the disk, then wrote files /f0../f<n-1> one by one, each
    fsync'ed before the next was started (file_shas: their sha256).  At every flush point once mkfs has written
    the super block (mke2fs writes the primary super block last): the journal replayed (`e2fsck -E journal_only`,
    as a mount would), `e2fsck -fn` is clean, and the files with their right content are f0..f<m-1> with m never
    shrinking; at the last flush point every file is there.  Flush points with no write since the previous one
    are the same disk and not checked twice.  Returns a summary; raises LogError on a violation."""
    n = len(file_shas)
    copy = workdir / "lwfs-point.img"
    dumps = workdir / "lwfs-files"
    cmds = workdir / "lwfs-debugfs.cmds"
    cmds.write_text("".join(f"dump /f{k} {dumps}/f{k}\n" for k in range(n)))
    seen_fs = False
    checked = points = last_m = 0
    journal = False
    for number, entry, changed in replay.flush_points():
        head = replay.read(0, 2048)
        if head[EXT4_MAGIC_AT:EXT4_MAGIC_AT + 2] != b"\x53\xef":
            if seen_fs:
                raise LogError(f"at flush #{number} (log entry {entry.index}) the ext4 super block is gone")
            continue
        if not seen_fs:
            journal = bool(int.from_bytes(head[EXT4_COMPAT_AT:EXT4_COMPAT_AT + 4], "little") & COMPAT_HAS_JOURNAL)
            if not journal:
                raise LogError("the guest's ext4 has no journal (has_journal not set): its mke2fs.conf is not "
                               "Debian's")
        seen_fs = True
        points += 1
        if not changed:
            continue
        checked += 1
        where = f"at flush #{number} (log entry {entry.index})"
        shutil.copyfile(replay.target, copy)
        cp = _run(["e2fsck", "-fy", "-E", "journal_only", str(copy)])
        if cp.returncode not in (0, 1):  # 1: the journal was replayed
            raise LogError(f"{where} replaying the journal failed (e2fsck exit {cp.returncode}): {_tail(cp)}")
        cp = _run(["e2fsck", "-fn", str(copy)])
        if cp.returncode != 0:
            raise LogError(f"{where} the filesystem is not consistent (e2fsck -fn exit {cp.returncode}): "
                           f"{_tail(cp)}")
        shutil.rmtree(dumps, ignore_errors=True)
        dumps.mkdir()
        _run(["debugfs", "-f", str(cmds), str(copy)])
        present = []
        for k in range(n):
            f = dumps / f"f{k}"
            if f.exists() and hashlib.sha256(f.read_bytes()).hexdigest() == file_shas[k]:
                present.append(k)
        m = len(present)
        if present != list(range(m)):
            intact = " ".join(f"f{k}" for k in present)
            raise LogError(f"{where} the files intact are {intact}: a later file survived an earlier fsync'ed one")
        if m < last_m:
            raise LogError(f"{where} f{m} is no longer intact, it was at an earlier flush")
        last_m = m
    copy.unlink(missing_ok=True)
    shutil.rmtree(dumps, ignore_errors=True)
    if not seen_fs:
        raise LogError("no flush point holds an ext4 super block: the guest's mkfs never reached the disk")
    if last_m != n:
        raise LogError(f"at the last flush point only f0..f{last_m - 1} of {n} files are intact")
    return (f"{points} flush points with the filesystem ({checked} distinct), each clean after journal replay "
            f"with an intact prefix of the {n} fsync'ed files, all of them by the last")
