"""The NBD target grammar (backends/drivers/storage/nbd_target.py): each form, its refusals, the round trip
through `format_nbd_target`, and blk's `params` agreeing with the driver on every string."""

from __future__ import annotations

import subprocess
import sys
import urllib.parse

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from backends.blk import proto
from backends.drivers.storage.base import StorageError
from backends.drivers.storage.nbd import NbdDriver, parse_target
from backends.drivers.storage.nbd_target import (
    DEFAULT_PORT,
    NbdTarget,
    NbdTargetError,
    format_nbd_target,
    parse_nbd_target,
)

ACCEPTED = [
    # legacy unix
    ("nbd:unix:/run/x.sock", NbdTarget(socket_path="/run/x.sock")),
    ("nbd:unix:/run/x.sock:exportname=d1", NbdTarget(socket_path="/run/x.sock", export="d1")),
    ("nbd:unix:/run/x.sock:exportname=", NbdTarget(socket_path="/run/x.sock")),
    ("nbd:unix:/s:exportname=a:b:exportname=c", NbdTarget(socket_path="/s", export="a:b:exportname=c")),
    ("nbd:unix:/s:exportname=%20", NbdTarget(socket_path="/s", export="%20")),  # legacy names are literal
    # legacy TCP
    ("nbd:localhost:10809", NbdTarget(host="localhost")),
    ("nbd:127.0.0.1:1:exportname=a:b", NbdTarget(host="127.0.0.1", port=1, export="a:b")),
    ("nbd:h:00080", NbdTarget(host="h", port=80)),
    ("nbd:[::1]:10810", NbdTarget(host="::1", port=10810)),
    ("nbd:[fe80::1%eth0]:10810:exportname=e", NbdTarget(host="fe80::1%eth0", port=10810, export="e")),
    ("nbd:unix.example:1", NbdTarget(host="unix.example", port=1)),
    # URI TCP
    ("nbd://h", NbdTarget(host="h")),
    ("nbd://h/", NbdTarget(host="h")),
    ("nbd://Host.Example:65535/a/b", NbdTarget(host="Host.Example", port=65535, export="a/b")),
    ("nbd://h//x", NbdTarget(host="h", export="/x")),
    ("nbd://h/vol%201%3Fq%23f", NbdTarget(host="h", export="vol 1?q#f")),
    ("nbd://h/%C3%A9", NbdTarget(host="h", export="\u00e9")),
    ("nbd://[::1]", NbdTarget(host="::1")),
    ("nbd://[2001:db8::2]:7/e", NbdTarget(host="2001:db8::2", port=7, export="e")),
    ("nbd://[fe80::1%25eth0]/e", NbdTarget(host="fe80::1%eth0", export="e")),
    # URI unix
    ("nbd+unix:///exp?socket=/tmp/s.sock", NbdTarget(socket_path="/tmp/s.sock", export="exp")),
    ("nbd+unix://?socket=/tmp/s.sock", NbdTarget(socket_path="/tmp/s.sock")),
    ("nbd+unix:///?socket=/run/a:b.sock", NbdTarget(socket_path="/run/a:b.sock")),  # a colon in the path
    ("nbd+unix:///e?socket=/run/a%26b+c.sock", NbdTarget(socket_path="/run/a&b+c.sock", export="e")),
]


@pytest.mark.parametrize(("text", "want"), ACCEPTED)
def test_accepted(text: str, want: NbdTarget) -> None:
    assert parse_nbd_target(text) == want
    assert parse_nbd_target(format_nbd_target(want)) == want


REFUSED = [
    ("", "not an NBD target"),
    ("garbage", "not an NBD target"),
    ("/run/x.sock", "not an NBD target"),
    ("nbd:", "expected nbd:HOST:PORT"),
    ("nbd:host", "expected nbd:HOST:PORT"),
    ("NBD:unix:/s", "lower case"),
    ("Nbd://h/x", "lower case"),
    ("nbds://h/x", "TLS"),
    ("nbd+vsock://2/x", "vsock"),
    # unix socket paths
    ("nbd:unix:", "not absolute"),
    ("nbd:unix:rel.sock", "not absolute"),
    ("nbd:unix:/run/a:b.sock", "nbd+unix"),  # the legacy path ends at its first colon
    ("nbd:unix:/s:", "exportname"),
    ("nbd:unix:/s:export=x", "exportname"),
    ("nbd+unix:///x?socket=rel", "not absolute"),
    ("nbd+unix:///x", "needs ?socket"),
    ("nbd+unix:///x?socket=", "not absolute"),
    ("nbd+unix:///x?socket=/a&socket=/b", "repeated"),
    ("nbd+unix:///x?socket=/a&tls=on", "unsupported query"),
    ("nbd+unix:///x?socket", "bad or repeated"),
    ("nbd+unix://host/x?socket=/s", "no host"),
    # hosts
    ("nbd::10809", "no host"),
    ("nbd://", "no host"),
    ("nbd://:1/x", "no host"),
    ("nbd://::1/x", "no host"),
    ("nbd:h@x:1", "bad host"),
    ("nbd://user@h/x", "user information"),
    ("nbd://h%41/x", "bad host"),
    ("nbd://[::1/x", "']'"),
    ("nbd://[host]/x", "not an IPv6"),
    ("nbd://[1.2.3.4]/x", "not an IPv6"),
    ("nbd://[::1]x/e", "unexpected"),
    ("nbd://[fe80::1%eth0]/e", "zone"),
    ("nbd:[::1]", "':PORT'"),
    ("nbd:[::1", "']'"),
    ("nbd:[nothex::zz]:1", "not an IPv6"),
    # ports
    ("nbd:h:", "empty port"),
    ("nbd://h:/x", "empty port"),
    ("nbd:h:0", "bad port"),
    ("nbd:h:65536", "bad port"),
    ("nbd:h:99999", "bad port"),
    ("nbd:h:-1", "bad port"),
    ("nbd:h:+1", "bad port"),
    ("nbd:h:abc", "bad port"),
    ("nbd://h:0/x", "bad port"),
    ("nbd://h:notaport/x", "bad port"),
    ("nbd://h:\uff11\uff12/x", "bad port"),  # fullwidth digits pass str.isdigit()
    ("nbd:h:1" + "0" * 5000, "bad port"),
    # what follows the address
    ("nbd:h:1:", "exportname"),
    ("nbd:h:1:bogus=1", "exportname"),
    ("nbd://h/x?tls=on", "no query"),
    ("nbd://h/x?", "no query"),
    ("nbd://h/x#frag", "fragment"),
    # export names and characters
    ("nbd://h/%zz", "percent-escape"),
    ("nbd://h/%f", "percent-escape"),
    ("nbd://h/%ff", "UTF-8"),
    ("nbd://h/a%00b", "control"),
    ("nbd://h/a%0Ab", "control"),
    ("nbd:unix:/s\n", "control"),
    ("nbd:h:1:exportname=a\x00", "control"),
    ("nbd:unix:/s:exportname=" + "x" * 4097, "4096"),
    ("nbd://h/" + "%C3%A9" * 2049, "4096"),
]


@pytest.mark.parametrize(("text", "why"), REFUSED)
def test_refused(text: str, why: str) -> None:
    with pytest.raises(NbdTargetError) as ei:
        parse_nbd_target(text)
    msg = str(ei.value)
    assert why in msg and "\n" not in msg and len(msg) < 400, msg


def test_blk_and_driver_refuse_the_same_way() -> None:
    """blk's ParamsError and the driver's StorageError carry the grammar's message (blk checks length and
    control characters of every `params` first, in its own words)."""
    for text, why in REFUSED:
        if text.partition(":")[0].lower() not in ("nbd", "nbd+unix", "nbds", "nbd+vsock"):
            continue
        with pytest.raises(proto.ParamsError) as pe:
            proto.parse_params(text)
        if len(text) <= proto.MAX_PARAMS_LEN and why != "control":
            assert why in str(pe.value)
        with pytest.raises(StorageError) as ei:
            parse_target(text)
        assert why in str(ei.value)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"socket_path": "/s", "host": "h"},
        {"socket_path": "rel"},
        {"socket_path": "/s", "port": 1},
        {"host": "h", "port": 0},
        {"host": "h", "port": 65536},
        {"host": "a b"},
        {"host": "[::1]"},
        {"host": "h", "export": "\x00"},
        {"host": "h", "export": "\udc80"},
    ],
)
def test_nbd_target_checks_its_fields(fields: dict[str, object]) -> None:
    with pytest.raises(NbdTargetError):
        NbdTarget(**fields)  # type: ignore[arg-type]


def test_driver_takes_a_target_or_its_text() -> None:
    target = NbdTarget(socket_path="/run/x.sock", export="e")
    assert NbdDriver(target).target is target
    assert NbdDriver("nbd+unix:///e?socket=/run/x.sock").target == target
    with pytest.raises(StorageError):
        NbdDriver("nbd:unix:relative.sock")


def test_blk_hands_the_driver_the_parsed_target() -> None:
    disk = proto.parse_params("nbd://[::1]:10810/vol%201")
    assert disk == proto.DiskTarget(kind="nbd", host="::1", port=10810, export="vol 1")
    assert disk.nbd == NbdTarget(host="::1", port=10810, export="vol 1")
    assert proto.parse_params("nbd+unix:///e?socket=/s").nbd == NbdTarget(socket_path="/s", export="e")
    with pytest.raises(proto.ParamsError):
        _ = proto.parse_params("null:1M").nbd


def test_blk_proto_stays_free_of_the_c_module() -> None:
    code = "import sys, backends.blk.proto; assert 'backends._native' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- properties -------------------------------------------------------------------------------------------

_names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)
_hostnames = st.from_regex(r"[A-Za-z0-9._-]{1,30}", fullmatch=True)
_ipv6 = st.ip_addresses(v=6).map(str)
_ipv6_zoned = st.tuples(_ipv6, st.from_regex(r"[A-Za-z0-9._-]{1,8}", fullmatch=True)).map(lambda t: f"{t[0]}%{t[1]}")
_paths = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40).map(lambda p: "/" + p)
_ports = st.integers(1, 65535)

targets = st.one_of(
    st.builds(NbdTarget, socket_path=_paths, export=_names),
    st.builds(NbdTarget, host=st.one_of(_hostnames, _ipv6, _ipv6_zoned), port=_ports, export=_names),
)


@given(targets)
def test_every_target_round_trips(target: NbdTarget) -> None:
    text = format_nbd_target(target)
    assert parse_nbd_target(text) == target
    disk = proto.parse_params(text)
    assert disk.kind == "nbd" and disk.nbd == target


def _legacy(target: NbdTarget) -> str | None:
    """The legacy spelling of `target`, where it has one."""
    suffix = f":exportname={target.export}" if target.export else ""
    if target.socket_path is not None:
        return None if ":" in target.socket_path else f"nbd:unix:{target.socket_path}{suffix}"
    assert target.host is not None
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"nbd:{host}:{target.port}{suffix}"


@given(targets)
def test_the_legacy_spelling_means_the_same(target: NbdTarget) -> None:
    text = _legacy(target)
    if text is not None:
        assert parse_nbd_target(text) == target


# Strings near the grammar: a scheme, then pieces that matter to it, then anything.
_pieces = st.sampled_from(
    ["unix:", "/", "/s", ":", "exportname=", "[", "]", "::1", "%25", "%2", "%C3%A9", "%00", "?", "socket=",
     "&", "#", "@", "h", "10809", "0", "\uff11", " ", "+", "\n", "e"]
)  # fmt: skip
_near = st.tuples(
    st.sampled_from(["nbd:", "nbd://", "nbd+unix://", "nbd:unix:", "NBD:", "nbds://", "nbd+vsock://", "nbd+unix:"]),
    st.lists(st.one_of(_pieces, st.text(max_size=4)), max_size=8),
).map(lambda t: t[0] + "".join(t[1]))


@given(st.one_of(_near, targets.map(format_nbd_target), targets.map(_legacy).filter(bool)))
@example("nbd://h/x?tls=1")
@example("nbd:h:1:exportname=a:b")
@example("nbd+unix:///x?socket=/s")
def test_blk_and_driver_agree(text: str | None) -> None:
    assert text is not None
    try:
        want: NbdTarget | None = parse_nbd_target(text)
    except NbdTargetError:
        want = None
    try:
        got: NbdTarget | None = proto.parse_params(text).nbd
    except proto.ParamsError:
        got = None
    assert got == want
    if want is not None:
        assert parse_nbd_target(format_nbd_target(want)) == want
        assert urllib.parse.urlsplit(format_nbd_target(want)).scheme in ("nbd", "nbd+unix")


@given(st.text(max_size=60))
def test_garbage_is_refused_or_parsed_never_crashes(text: str) -> None:
    try:
        target = parse_nbd_target(text)
    except NbdTargetError as exc:
        assert "\n" not in str(exc)
        return
    assert parse_nbd_target(format_nbd_target(target)) == target


def test_default_port() -> None:
    assert parse_nbd_target("nbd://h/x").port == DEFAULT_PORT == 10809
