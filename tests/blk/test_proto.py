"""backends.blk.proto: params/mode parsing, backend keys, frontend ring keys with strict ranges."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.blk import proto
from backends.blk.proto import Abi, BackendLimits, DiskTarget, ProtocolError
from backends.drivers.storage import StorageCaps


@pytest.mark.parametrize(
    ("params", "type_name", "want"),
    [
        ("/img/a.raw", None, DiskTarget(kind="file", path="/img/a.raw")),
        ("aio:/img/a.raw", "qdisk", DiskTarget(kind="file", path="/img/a.raw")),
        ("raw:/img/a.raw", None, DiskTarget(kind="file", path="/img/a.raw")),
        ("file:/img/a.raw", None, DiskTarget(kind="file", path="/img/a.raw")),
        ("aio:raw:/img/a.raw", None, DiskTarget(kind="file", path="/img/a.raw")),
        ("/dev/vg/disk", "phy", DiskTarget(kind="file", path="/dev/vg/disk")),
        ("qcow2:/img/b.qcow2", "qdisk", DiskTarget(kind="image", format="qcow2", path="/img/b.qcow2")),
        ("nbd:unix:/run/nbd.sock", None, DiskTarget(kind="nbd", socket="/run/nbd.sock")),
        ("nbd:unix:/run/nbd.sock:exportname=d1", None, DiskTarget(kind="nbd", socket="/run/nbd.sock", export="d1")),
        ("nbd:localhost:10809", None, DiskTarget(kind="nbd", host="localhost", port=10809)),
        ("nbd://127.0.0.1:10810/exp", None, DiskTarget(kind="nbd", host="127.0.0.1", port=10810, export="exp")),
        ("nbd://[::1]/e", None, DiskTarget(kind="nbd", host="::1", port=10809, export="e")),
        ("null:64M", None, DiskTarget(kind="null", size=64 << 20)),
        ("null:1GiB", None, DiskTarget(kind="null", size=1 << 30)),
        ("null:4096", None, DiskTarget(kind="null", size=4096)),
    ],
)
def test_params(params: str, type_name: str | None, want: DiskTarget) -> None:
    assert proto.parse_params(params, type_name) == want


@pytest.mark.parametrize(
    "params",
    ["", None, "aio:relative/path", "vhdx:/x", "null:1000", "null:0", "null:lots", "nbd:unix:rel.sock",
     "nbd:unix:/s:bogus=1", "nbd:host:99999", "nbd://:1/x", "/img\nx", "raw", "x" * 5000],
)  # fmt: skip
def test_params_refused(params: str | None) -> None:
    with pytest.raises(ProtocolError):
        proto.parse_params(params)


def test_phy_needs_absolute_path() -> None:
    with pytest.raises(ProtocolError):
        proto.parse_params("sda", "phy")


def test_mode() -> None:
    assert proto.parse_mode("r") is True and proto.parse_mode("w") is False
    for bad in (None, "", "rw", "W", "w!"):
        with pytest.raises(ProtocolError):
            proto.parse_mode(bad)


def test_keys_from_caps() -> None:
    caps = StorageCaps(size_bytes=10 << 30, logical_sector_size=4096, physical_sector_size=4096, can_discard=True,
                       discard_granularity=4096)  # fmt: skip
    limits = BackendLimits(max_ring_page_order=4, max_queues=2)
    assert proto.probe_keys(limits) == {
        "max-ring-page-order": "4",
        "multi-queue-max-queues": "2",
        "feature-persistent": "1",
        "feature-max-indirect-segments": "256",
    }
    k = proto.connect_keys(caps, limits)
    assert k["sectors"] == str((10 << 30) // 512)  # 512-byte units even with 4 KiB sectors (2024 spec)
    assert k["sector-size"] == "4096" and k["physical-sector-size"] == "4096" and k["info"] == "0"
    assert k["feature-flush-cache"] == "1" and k["feature-barrier"] == "1" and k["feature-discard"] == "1"
    assert k["discard-granularity"] == "4096" and k["discard-alignment"] == "0" and k["discard-secure"] == "0"
    ro = proto.connect_keys(StorageCaps(size_bytes=1 << 20, readonly=True, can_discard=True), limits, cdrom=True)
    assert ro["info"] == str(proto.VDISK_READONLY | proto.VDISK_CDROM)
    assert ro["feature-discard"] == "0" and ro["feature-flush-cache"] == "0" and "discard-granularity" not in ro
    off = proto.connect_keys(caps, BackendLimits(discard_enable=False))
    assert off["feature-discard"] == "0"


def test_limits_validated() -> None:
    for kw in ({"max_ring_page_order": 11}, {"max_queues": 0}, {"max_indirect_segments": 5000}):
        with pytest.raises(ProtocolError):
            BackendLimits(**kw)  # type: ignore[arg-type]


def test_frontend_single_queue_single_page() -> None:
    fe = proto.parse_frontend({"ring-ref": "8", "event-channel": "5", "protocol": "x86_64-abi"})
    assert fe.abi == Abi.X86_64 and fe.nr_ring_pages == 1 and not fe.persistent
    assert fe.queues == (proto.QueueRings((8,), 5),)


def test_frontend_default_protocol_is_x86_32() -> None:
    assert proto.parse_frontend({"ring-ref": "8", "event-channel": "5"}).abi == Abi.X86_32


def test_frontend_multi_page_multi_queue() -> None:
    keys = {"multi-queue-num-queues": "2", "ring-page-order": "2", "protocol": "x86_32-abi",
            "feature-persistent": "1", "feature-large-sector-size": "1"}  # fmt: skip
    for q in range(2):
        keys[f"queue-{q}/event-channel"] = str(10 + q)
        for i in range(4):
            keys[f"queue-{q}/ring-ref{i}"] = str(100 * q + i)
    fe = proto.parse_frontend(keys, max_ring_page_order=4, max_queues=4)
    assert fe.ring_page_order == 2 and fe.persistent and fe.ignored == ("feature-large-sector-size",)
    assert fe.queues == (proto.QueueRings((0, 1, 2, 3), 10), proto.QueueRings((100, 101, 102, 103), 11))
    assert not proto.parse_frontend(keys, max_ring_page_order=4, max_queues=4, backend_persistent=False).persistent
    # one queue keeps its keys at the top level even when the count key is present (Linux)
    one = proto.parse_frontend({"multi-queue-num-queues": "1", "ring-page-order": "0", "ring-ref0": "3",
                                "event-channel": "4"})  # fmt: skip
    assert one.queues == (proto.QueueRings((3,), 4),)


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"ring-ref": "8"},
        {"ring-ref": "-1", "event-channel": "5"},
        {"ring-ref": " 8", "event-channel": "5"},
        {"ring-ref": "0x8", "event-channel": "5"},
        {"ring-ref": "4294967296", "event-channel": "5"},
        {"ring-ref": "8", "event-channel": "0"},
        {"ring-ref": "8", "event-channel": "131072"},
        {"ring-ref": "8", "event-channel": "5", "protocol": "arm-abi"},
        {"ring-ref": "8", "event-channel": "5", "feature-persistent": "yes"},
        {"ring-page-order": "5", "event-channel": "5"},
        {"ring-page-order": "1", "ring-ref0": "1", "event-channel": "5"},
        {"multi-queue-num-queues": "0", "ring-ref": "8", "event-channel": "5"},
        {"multi-queue-num-queues": "2", "ring-ref": "8", "event-channel": "5"},
        {"ring-ref": "٣", "event-channel": "5"},
    ],
)
def test_frontend_refused(keys: dict[str, str]) -> None:
    with pytest.raises(ProtocolError):
        proto.parse_frontend(keys, max_ring_page_order=4, max_queues=1)


@given(st.text(max_size=12))
def test_parse_uint_never_accepts_garbage(text: str) -> None:
    try:
        n = proto.parse_uint(text, "x", 0, 2**32 - 1)
    except ProtocolError:
        return
    assert text.isascii() and text.isdigit() and int(text) == n


def test_abi_sizes() -> None:
    assert (Abi.X86_64.slot_size, Abi.X86_64.rsp_size, Abi.X86_32.slot_size, Abi.X86_32.rsp_size) == (112, 16, 108, 12)


def test_params_errors_are_params_errors() -> None:
    with pytest.raises(proto.ParamsError):
        proto.parse_params("vhdx:/x")
    with pytest.raises(proto.ParamsError):
        proto.parse_mode("x")
    assert proto.parse_params("null:1M").path is None
