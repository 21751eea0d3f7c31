"""tpmif v2 protocol core with plain bytes: the page layout (checked against the C header's offsets, written
out here from xen/include/public/io/tpmif.h, not from the module's constants), the validation of a page copy
and the command state machine (cancel answered by IDLE, never FINISH; storms; restart note)."""

from __future__ import annotations

import struct

import pytest

from backends.vtpm import proto
from backends.vtpm.proto import (
    Answered12,
    CancelTpm,
    ClearNote,
    Command,
    Execute,
    Fail,
    Machine,
    Note,
    ProtocolError,
    Reject,
    Respond,
    State,
    Version,
)

GETRANDOM8 = bytes.fromhex("80010000000c0000017b0008")
ALL = frozenset({0, 1, 2, 3})


def page(data: bytes = GETRANDOM8, *, state: int = 1, locality: int = 0, pad: int = 0, nr_extra: int = 0,
         length: int | None = None) -> bytes:
    """struct vtpm_shared_page { u32 length; u8 state; u8 locality; u8 pad; u8 nr_extra_pages; u32 extra[]; }
    with the data at sizeof(*shr) + 4 * nr_extra_pages, as xen-tpmfront's shr_data_offset()."""
    b = bytearray(4096)
    struct.pack_into("<IBBBB", b, 0, len(data) if length is None else length, state, locality, pad, nr_extra)
    off = 8 + 4 * nr_extra
    b[off:off + len(data)] = data
    return bytes(b)


def test_layout_matches_the_header() -> None:
    assert (proto.OFF_LENGTH, proto.OFF_STATE, proto.OFF_LOCALITY, proto.OFF_PAD, proto.OFF_NR_EXTRA) == (0, 4, 5, 6, 7)
    assert proto.DATA_OFFSET == 8
    assert [s.value for s in State] == [0, 1, 2, 3]  # enum vtpm_shared_page_state order
    h = proto.read_header(page(state=3, locality=2, pad=1, nr_extra=0, length=12))
    assert (h.length, h.state, h.locality, h.pad, h.nr_extra_pages, h.data_offset) == (12, 3, 2, 1, 0, 8)


def test_good_command() -> None:
    c = proto.parse_command(page(), proto.read_header(page()), Version.TPM2, frozenset({0}))
    assert c == Command(data=GETRANDOM8, locality=0, ordinal=0x17B)


@pytest.mark.parametrize(("kw", "why"), [
    ({"length": 9}, "shorter than a TPM header"),
    ({"length": 0}, "shorter than a TPM header"),
    ({"length": 4089}, "runs past the page"),
    ({"length": 0xFFFFFFFF}, "runs past the page"),
    ({"nr_extra": 1}, "extra pages"),
    ({"nr_extra": 255}, "extra pages"),
])
def test_layout_violations_fail_the_device(kw: dict[str, int], why: str) -> None:
    p = page(length=kw.get("length"), nr_extra=kw.get("nr_extra", 0))
    with pytest.raises(ProtocolError, match=why):
        proto.parse_command(p, proto.read_header(p), Version.TPM2, ALL)


def test_whole_page_command_is_in_bounds() -> None:
    data = struct.pack(">HII", 0x8001, 4088, 0x17B) + bytes(4078)
    p = page(data)
    c = proto.parse_command(p, proto.read_header(p), Version.TPM2, ALL)
    assert isinstance(c, Command) and len(c.data) == 4088


def test_header_size_disagreeing_with_length_is_answered_in_band() -> None:
    bad = struct.pack(">HII", 0x8001, 64, 0x17B) + b"\0\x08"  # says 64, page says 12
    for version, rc in ((Version.TPM2, 0x142), (Version.TPM12, 0x19)):
        p = page(bad)
        r = proto.parse_command(p, proto.read_header(p), version, ALL)
        assert isinstance(r, Reject) and r.rc == rc


@pytest.mark.parametrize("loc", [1, 2, 3, 4, 5, 255])
def test_locality_outside_the_policy(loc: int) -> None:
    p = page(locality=loc)
    r = proto.parse_command(p, proto.read_header(p), Version.TPM2, frozenset({0}))
    assert isinstance(r, Reject) and r.rc == 0x907


def test_locality_4_never_even_if_configured() -> None:
    with pytest.raises(ValueError, match="never"):
        proto.parse_localities("0,4")
    assert proto.parse_localities("0, 2") == frozenset({0, 2})
    for bad in ("", "x", "10", "-1"):
        with pytest.raises(ValueError):
            proto.parse_localities(bad)
    p = page(locality=4)
    r = proto.parse_command(p, proto.read_header(p), Version.TPM2, ALL)
    assert isinstance(r, Reject)


def test_error_response_shape() -> None:
    assert proto.error_response(Version.TPM2, 0x101) == bytes.fromhex("80010000000a00000101")
    assert proto.error_response(Version.TPM12, 0x9) == bytes.fromhex("00c40000000a00000009")
    assert proto.response_code(bytes.fromhex("80010000000a00000101")) == 0x101


# -- the machine ------------------------------------------------------------------------------------------


def test_submit_answer_finish() -> None:
    m = Machine(Version.TPM2, frozenset({0}))
    [a] = m.on_page(page())
    assert isinstance(a, Execute) and a.command.data == GETRANDOM8
    assert m.on_answer(b"rsp") == [Respond(b"rsp", State.FINISH)]
    assert m.phase is proto.Phase.IDLE


def test_cancel_while_busy_answers_idle_never_finish() -> None:
    m = Machine(Version.TPM2, ALL)
    m.on_page(page())
    assert m.on_page(page(state=3)) == [CancelTpm()]
    assert m.on_page(page(state=3)) == []  # cancel storm: one cancel to the TPM
    assert m.on_answer(b"late answer") == [Respond(b"", State.IDLE)]


def test_cancel_seen_only_at_answer_time() -> None:
    m = Machine(Version.TPM2, ALL)
    m.on_page(page())
    assert m.on_answer(b"x", cancel_seen=True) == [Respond(b"", State.IDLE)]


def test_cancel_while_idle_is_acknowledged() -> None:
    m = Machine(Version.TPM2, ALL)
    assert m.on_page(page(state=3)) == [Respond(b"", State.IDLE)]


def test_states_out_of_order() -> None:
    m = Machine(Version.TPM2, ALL)
    assert m.on_page(page(state=2)) == []  # FINISH written by the frontend while idle: nothing to do
    assert m.on_page(page(state=0)) == []
    m.on_page(page())
    assert m.on_page(page()) == []  # a repeated event for the command being run (see below)
    assert m.on_page(page(state=2)) == [Note("frontend wrote FINISH while a command runs")]
    assert m.on_page(page(state=0)) == [Note("frontend wrote IDLE while a command runs")]
    [f] = Machine(Version.TPM2, ALL).on_page(page(state=4))
    assert isinstance(f, Fail)


def test_bad_page_fails_and_reject_is_answered() -> None:
    m = Machine(Version.TPM2, frozenset({0}))
    [f] = m.on_page(page(length=5000))
    assert isinstance(f, Fail) and m.phase is proto.Phase.IDLE
    note, rsp = m.on_page(page(locality=2))
    assert isinstance(note, Note) and rsp == Respond(proto.error_response(Version.TPM2, 0x907), State.FINISH)
    assert m.phase is proto.Phase.IDLE


def test_tpm_failure_and_oversized_answer() -> None:
    m = Machine(Version.TPM2, ALL)
    m.on_page(page())
    _n, r = m.on_answer(None)
    assert r == Respond(proto.error_response(Version.TPM2, 0x101), State.FINISH)
    m.on_page(page())
    _n, r = m.on_answer(bytes(4089))
    assert isinstance(r, Respond) and r.data == proto.error_response(Version.TPM2, 0x101)


def test_restart_note_never_runs_a_command_twice() -> None:
    m = Machine(Version.TPM2, ALL)
    _note, r = m.recover(page(pad=proto.NOTE_TAKEN))
    assert r == Respond(proto.error_response(Version.TPM2, 0x101), State.FINISH)
    assert m.phase is proto.Phase.IDLE
    # Not taken yet: the command runs.
    [a] = Machine(Version.TPM2, ALL).recover(page(pad=0))
    assert isinstance(a, Execute)
    # A finished page with a stale note: the note is cleared.
    assert Machine(Version.TPM2, ALL).recover(page(state=2, pad=1)) == [ClearNote()]
    assert Machine(Version.TPM2, ALL).recover(page(state=3, pad=1)) == [Respond(b"", State.IDLE)]


def test_frontend_keys() -> None:
    fe = proto.parse_frontend({"ring-ref": "8", "event-channel": "5", "feature-protocol-v2": "1"})
    assert (fe.ring_ref, fe.event_channel) == (8, 5)
    for keys in ({"ring-ref": "8", "event-channel": "5"},
                 {"ring-ref": "8", "event-channel": "5", "feature-protocol-v2": "2"},
                 {"ring-ref": "x", "event-channel": "5", "feature-protocol-v2": "1"},
                 {"ring-ref": "99999999999", "event-channel": "5", "feature-protocol-v2": "1"},
                 {"event-channel": "5", "feature-protocol-v2": "1"}):
        with pytest.raises(ProtocolError):
            proto.parse_frontend(keys)


def test_toolstack_keys() -> None:
    u = "1C9B4E2A-7F3D-4E55-9A1B-0123456789AB"
    assert proto.parse_uuid(u) == u.lower()
    for bad in (None, "", "not-a-uuid"):
        with pytest.raises(ProtocolError):
            proto.parse_uuid(bad)
    assert proto.parse_version(None, Version.TPM2) is Version.TPM2
    assert proto.parse_version("1.2", Version.TPM2) is Version.TPM12
    with pytest.raises(ProtocolError):
        proto.parse_version("3.0", Version.TPM2)
    assert proto.parse_resume("False") is False and proto.parse_resume("True") is True


def test_a_command_submitted_before_connect_is_run_once_without_a_note() -> None:
    """Linux xen-tpmfront submits its probe command before the backend connects: recover takes it at connect,
    then the event of its notify (or the one after bind) finds the page still in SUBMIT: no second run, no note."""
    m = Machine(Version.TPM2, ALL)
    assert m.recover(page()) == [Execute(Command(GETRANDOM8, 0, 0x17B))]
    assert m.on_page(page()) == []
    assert m.on_answer(b"\x80\x01" + bytes(8), cancel_seen=False)[-1] == Respond(b"\x80\x01" + bytes(8),
                                                                                    State.FINISH)


# The exact TPM 1.2 commands Linux 6.1's tpm1-cmd.c sends a xen-tpmfront chip (tpm1_getcap, tpm1_get_random).
GETCAP_TIS_TIMEOUT = struct.pack(">HIIIII", 0x00C1, 22, 0x65, 5, 4, 0x115)
GETCAP_TIS_DURATION = struct.pack(">HIIIII", 0x00C1, 22, 0x65, 5, 4, 0x120)
GETRANDOM12 = struct.pack(">HIII", 0x00C1, 14, 0x46, 32)


def test_tpm12_probe_on_a_tpm2_vtpm_is_answered_by_the_backend() -> None:
    m = Machine(Version.TPM2, ALL)
    [counted, resp] = m.on_page(page(GETCAP_TIS_TIMEOUT))
    assert counted == Answered12(0x65, "timeouts")
    assert isinstance(resp, Respond) and resp.state is State.FINISH
    # TPM_TAG_RSP_COMMAND, size, TPM_SUCCESS, respSize 16, timeouts A-D in µs (>= 1000: the kernel takes µs)
    tag, size, rc, n, a, b, c, d = struct.unpack(">HIIIIIII", resp.data)
    assert (tag, size, rc, n) == (0x00C4, 30, 0, 16) and size == len(resp.data)
    assert (a, b, c, d) == (750_000, 2_000_000, 750_000, 750_000)  # the kernel's TIS defaults (C: xen-tpmfront)
    [counted, resp] = m.on_page(page(GETCAP_TIS_DURATION))
    assert counted == Answered12(0x65, "durations") and isinstance(resp, Respond)
    tag, size, rc, n, short, medium, long_ = struct.unpack(">HIIIIII", resp.data)
    assert (tag, size, rc, n) == (0x00C4, 26, 0, 12)
    assert short >= 10_000 and short < medium < long_  # the kernel rescales a short under 10 ms (ms-reporting chips)
    # Everything else 1.2: TPM_DEACTIVATED, the code the kernel does not log.
    for cmd in (GETRANDOM12, struct.pack(">HIIIII", 0x00C1, 22, 0x65, 4, 4, 0x108), bytes.fromhex("00c2000000") +
                bytes.fromhex("0a00000099") + bytes(0)):
        out = m.on_page(page(cmd))
        assert isinstance(out[-1], Respond) and out[-1].data == struct.pack(">HII", 0x00C4, 10, 6), (cmd.hex(), out)
    # The machine stayed idle: the next TPM 2.0 command goes to the TPM.
    assert m.on_page(page()) == [Execute(Command(GETRANDOM8, 0, 0x17B))]


def test_tpm12_commands_reach_a_tpm12_vtpm() -> None:
    m = Machine(Version.TPM12, ALL)
    assert m.on_page(page(GETCAP_TIS_TIMEOUT)) == [Execute(Command(GETCAP_TIS_TIMEOUT, 0, 0x65))]
