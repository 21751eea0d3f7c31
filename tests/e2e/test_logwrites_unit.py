"""The dm-log-writes reader/replayer the real-Xen e2e runs in dom0 (tests/e2e/dom0/logwrites.py), on logs built
here in the kernel's format: it finds what a correct backend leaves at each flush, and it catches the ways a
wrong one breaks durability (a write that lands after the flush that acknowledged it, a lost write, a flush
acknowledged without reaching the disk, an fsync'ed file missing)."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

import pytest

from tests.e2e.dom0 import logwrites
from tests.e2e.dom0.logwrites import DISCARD, FLUSH, MARK, LogError

SECTOR = 512
TAG = 4096
TAG_BASE = 1 << 20
DEV_SIZE = 2 << 20

# (byte offset, data or None, flags, length for a discard)
Op = tuple[int, bytes | None, int, int]


def write_log(path: Path, ops: list[Op], sectorsize: int = SECTOR) -> None:
    """A log as drivers/md/dm-log-writes.c lays it out (super, then entry block + data per entry)."""
    with path.open("wb") as f:
        f.write(struct.pack("<QQQI", logwrites.MAGIC, 1, len(ops), sectorsize).ljust(sectorsize, b"\0"))
        for off, data, flags, length in ops:
            mark = b""
            if flags & MARK:
                mark, data = data or b"", None
            n = len(data) // sectorsize if data is not None else length // sectorsize
            f.write((struct.pack("<QQQQ", off // sectorsize, n, flags, len(mark)) + mark).ljust(sectorsize, b"\0"))
            if data is not None:
                f.write(data)


def tag(i: int) -> bytes:
    return f"PVBACK-LW-TAG {i:02d} seed\n".encode().ljust(TAG, b"\0")


def W(i: int) -> Op:
    return (TAG_BASE + i * TAG, tag(i), 0, 0)


F: Op = (0, None, FLUSH, 0)


SENTINEL = b"PVBACK-LW-END seed\n".ljust(TAG, b"\0")


def END(n: int) -> Op:
    return (TAG_BASE + n * TAG, SENTINEL, 0, 0)


def rounds(tmp_path: Path, ops: list[Op], counts: list[int]) -> str:
    """The rounds' log `ops`, then the end-of-rounds block and a later user of the disk with its own flush."""
    write_log(tmp_path / "log", [*ops, END(len(counts)), F, (0, os.urandom(4096), 0, 0), F])
    log = logwrites.read_log(tmp_path / "log")
    replay = logwrites.Replay(log, tmp_path / "replay", DEV_SIZE)
    return logwrites.check_ordered_rounds(log, replay, TAG_BASE, TAG, [tag(i) for i in range(len(counts))], counts,
                                          SENTINEL)


def test_reads_the_kernel_layout(tmp_path: Path) -> None:
    data = os.urandom(3 * SECTOR)
    write_log(tmp_path / "log", [(4096, data, 0, 0), (0, None, FLUSH, 0), (8192, None, DISCARD, 4096),
                                 (0, b"dm-log-writes-end", MARK, 0)])
    log = logwrites.read_log(tmp_path / "log")
    assert [(e.offset, e.length, e.flags) for e in log.entries] == [(4096, 3 * SECTOR, 0), (0, 0, FLUSH),
                                                                    (8192, 4096, DISCARD), (0, 0, MARK)]
    assert log.data(log.entries[0]) == data
    assert log.entries[3].mark == "dm-log-writes-end"
    replay = logwrites.Replay(log, tmp_path / "dev", 16384)
    replay.advance(len(log.entries))
    assert replay.read(4096, 3 * SECTOR) == data


def test_a_log_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "log").write_bytes(bytes(4096))
    with pytest.raises(LogError, match="magic"):
        logwrites.read_log(tmp_path / "log")


def test_ordered_rounds_pass(tmp_path: Path) -> None:
    assert rounds(tmp_path, [W(0), F, W(1), F, W(2), F, W(3), F], [1, 2, 3, 4]) == (
        "4 flushes for 4 rounds (guest counted 4), every tag on the disk by the flush that acknowledged its round")


def test_flushes_the_backend_adds_are_allowed(tmp_path: Path) -> None:
    rounds(tmp_path, [F, W(0), F, W(1), F, F], [1, 2])


def test_the_rounds_end_at_the_end_block(tmp_path: Path) -> None:
    write_log(tmp_path / "log", [W(0), F, W(1), F])
    log = logwrites.read_log(tmp_path / "log")
    with pytest.raises(LogError, match="end-of-rounds block"):
        logwrites.check_ordered_rounds(log, logwrites.Replay(log, tmp_path / "replay", DEV_SIZE), TAG_BASE, TAG,
                                       [tag(0), tag(1)], [1, 2], SENTINEL)


def test_a_write_landing_after_its_flush_is_caught(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="tag 0 is missing"):
        rounds(tmp_path, [F, W(0), F, W(1), F, W(2), F, W(3)], [1, 2, 3, 4])


def test_a_lost_write_is_caught(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="tag 1 is missing"):
        rounds(tmp_path, [W(0), F, F, W(2), F], [1, 2, 3])


def test_a_flush_that_never_reached_the_disk_is_caught(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="only 2 flushes"):
        rounds(tmp_path, [W(0), F, W(1), W(2), F], [1, 2, 3])


def _fs_log(tmp_path: Path, files: list[bytes], swap: bool = False) -> tuple[list[Op], list[str]]:
    """mke2fs (with a journal) then one file after the other written by debugfs, each step logged as the
    blocks it changed followed by a flush; `swap` logs file 2's step before file 1's."""
    img = tmp_path / "fs.img"
    with img.open("wb") as f:
        f.truncate(DEV_SIZE * 4)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "has_journal", str(img)], check=True,
                   capture_output=True)
    steps: list[list[Op]] = []
    prev = bytes(DEV_SIZE * 4)

    def step() -> None:
        nonlocal prev
        cur = img.read_bytes()
        ops: list[Op] = [(off, cur[off:off + 1024], 0, 0) for off in range(0, len(cur), 1024)
                         if cur[off:off + 1024] != prev[off:off + 1024]]
        steps.append([*ops, F])
        prev = cur

    step()
    for k, body in enumerate(files):
        (tmp_path / "src").write_bytes(body)
        subprocess.run(["debugfs", "-w", "-R", f"write {tmp_path / 'src'} f{k}", str(img)], check=True,
                       capture_output=True)
        step()
    if swap:
        steps[2], steps[3] = steps[3], steps[2]
    return [op for s in steps for op in s], [hashlib.sha256(b).hexdigest() for b in files]


def _check_fs(tmp_path: Path, ops: list[Op], shas: list[str]) -> str:
    write_log(tmp_path / "log", ops)
    log = logwrites.read_log(tmp_path / "log")
    replay = logwrites.Replay(log, tmp_path / "replay", DEV_SIZE * 4)
    return logwrites.check_fs_replay(log, replay, shas, tmp_path)


def test_fs_replay_pass(tmp_path: Path) -> None:
    ops, shas = _fs_log(tmp_path, [os.urandom(20000) for _ in range(3)])
    assert "4 flush points with the filesystem" in _check_fs(tmp_path, ops, shas)


def test_fs_replay_catches_an_fsynced_file_missing(tmp_path: Path) -> None:
    ops, shas = _fs_log(tmp_path, [os.urandom(20000) for _ in range(3)], swap=True)
    with pytest.raises(LogError):
        _check_fs(tmp_path, ops, shas)


def test_fs_replay_wants_every_file_at_the_end(tmp_path: Path) -> None:
    ops, shas = _fs_log(tmp_path, [os.urandom(20000) for _ in range(2)])
    with pytest.raises(LogError, match=r"only f0\.\.f1 of 3"):
        _check_fs(tmp_path, ops, [*shas, hashlib.sha256(b"never written").hexdigest()])
