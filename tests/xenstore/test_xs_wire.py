"""The pure protocol helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.xenstore.wire import (
    ERROR_NAMES,
    HEADER_SIZE,
    Perm,
    XsType,
    error_name,
    is_subpath,
    pack,
    parent_path,
    split_strings,
    strings,
    unpack_header,
    valid_abs_path,
    valid_special_path,
)


def test_header_layout() -> None:
    msg = pack(XsType.WRITE, 0x01020304, 7, b"/a\0v")
    assert msg[:HEADER_SIZE] == bytes.fromhex("0b000000040302010700000004000000")
    assert unpack_header(msg) == (11, 0x01020304, 7, 4)


def test_error_table_is_xs_wire_order() -> None:
    assert ERROR_NAMES[0] == "EINVAL" and ERROR_NAMES[-1] == "EPERM" and len(ERROR_NAMES) == 16
    assert error_name(b"EAGAIN\0") == "EAGAIN"
    assert error_name(b"EQUOTA\0") == "EINVAL"
    assert error_name(b"\xff\xfe") == "EINVAL"


@given(st.lists(st.binary(min_size=0, max_size=20).filter(lambda b: b"\0" not in b), max_size=6))
def test_strings_roundtrip(items: list[bytes]) -> None:
    assert split_strings(strings(*items)) == items


def test_perm_strings() -> None:
    assert Perm.parse("r5") == Perm(5, "r")
    assert str(Perm(0, "n")) == "n0"
    for bad in ("", "r", "x1", "r-1", "r1a", "b99999", "r\u0661"):
        with pytest.raises(ValueError):
            Perm.parse(bad)


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/", True),
        ("/local/domain/1/device-x_y@z", True),
        ("", False),
        ("local", False),
        ("/a/", False),
        ("//a", False),
        ("/a//b", False),
        ("/a b", False),
        ("/a\0b", False),
        ("/é", False),
        ("/" + "a" * 3071, True),
        ("/" + "a" * 3072, False),
    ],
)
def test_valid_abs_path(path: str, ok: bool) -> None:
    assert valid_abs_path(path) is ok


def test_special_and_tree_helpers() -> None:
    assert valid_special_path("@releaseDomain")
    assert not valid_special_path("@a/b")
    assert not valid_special_path("/x")
    assert parent_path("/a/b") == "/a" and parent_path("/a") == "/" and parent_path("/") == "/"
    assert is_subpath("/a/b", "/a") and is_subpath("/a", "/a") and is_subpath("/x", "/")
    assert not is_subpath("/ab", "/a")
