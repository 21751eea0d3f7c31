"""qcow2 through a private qemu-nbd child: data lands in the image (checked with qemu-img), the child is owned."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from backends.drivers.storage.base import StorageError
from backends.drivers.storage.qemu_nbd import QemuNbdDriver, parse_image_target
from tests.nbd.conftest import Harness, discard_op, flush_op, read_op, write_op

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-utils is not installed")
SIZE = 16 << 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_parse_image_target() -> None:
    assert parse_image_target("qcow2:/a/b.qcow2") == ("qcow2", "/a/b.qcow2")
    for bad in ("qcow2:", "nbd:unix:/x", "/plain/path", "bogus:/x"):
        with pytest.raises(StorageError):
            parse_image_target(bad)


def test_qcow2_read_write_discard(workdir: Path) -> None:
    img = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)], check=True)
    drv = QemuNbdDriver(f"qcow2:{img}")
    drv.open()
    pid = drv.pid
    assert pid is not None and _alive(pid)
    try:
        caps = drv.capabilities()
        assert caps.size_bytes == SIZE and caps.can_discard and caps.needs_flush and not caps.readonly
        h = Harness(drv.engine().c)
        rng = random.Random(5)
        model = bytearray(SIZE)
        for n in (512, 4096, 65536, 1 << 20):
            off = 512 * rng.randrange((SIZE - n) // 512)
            data = rng.randbytes(n)
            assert h.run([write_op(off, data, sync=n == 65536)]) == [0]
            model[off : off + n] = data
        # Discard a written cluster-aligned range: qcow2 with discard=unmap reads it back as zeros.
        model[4 << 20 : 5 << 20] = rng.randbytes(1 << 20)
        assert h.run([write_op(4 << 20, bytes(model[4 << 20 : 5 << 20]))]) == [0]
        assert h.run([discard_op(4 << 20, 1 << 20), flush_op()]) == [0, 0]
        model[4 << 20 : 5 << 20] = bytes(1 << 20)
        reads = [read_op(off, 1 << 20) for off in range(0, SIZE, 1 << 20)]
        assert h.run(reads) == [0] * len(reads)
        assert b"".join(bytes(o.buf or b"") for o in reads) == model
        h.close()
    finally:
        drv.close()
    assert not _alive(pid), "qemu-nbd outlived close()"
    raw = workdir / "expected.raw"
    raw.write_bytes(model)
    # The image itself holds the data (and qemu-img can still open it: no lock left behind).
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(img), str(raw)], check=True)
    subprocess.run(["qemu-img", "check", "-q", str(img)], check=True)


def test_not_a_qcow2_image(workdir: Path) -> None:
    img = workdir / "junk.qcow2"
    img.write_bytes(b"this is not a qcow2 header" * 100)
    with pytest.raises(StorageError, match="qemu-nbd"):
        QemuNbdDriver(f"qcow2:{img}").open()


def test_missing_image(workdir: Path) -> None:
    with pytest.raises(StorageError, match="no such file"):
        QemuNbdDriver(f"qcow2:{workdir}/nope.qcow2").open()
