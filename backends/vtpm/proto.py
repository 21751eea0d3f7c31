"""tpmif v2, pure: the shared page, its states, the checks a page passes before a command reaches the TPM, and
the per-device state machine (events in, actions out; no I/O).

The page (xen/include/public/io/tpmif.h, `struct vtpm_shared_page`):

    0  u32 length          request/response length in bytes
    4  u8  state           IDLE 0, SUBMIT 1, FINISH 2, CANCEL 3
    5  u8  locality        for the current request
    6  u8  pad
    7  u8  nr_extra_pages  extra pages for long packets; may be zero
    8  u32 extra_pages[nr_extra_pages], then the data

The data starts at 8 + 4 * nr_extra_pages (`sizeof(*shr) + 4n`, what Linux xen-tpmfront and mini-os compute;
the header comment's "16" is wrong).  Only the frontend writes SUBMIT/CANCEL, only the backend IDLE/FINISH.
Linux maps IDLE to "idle + cancelled" and FINISH to "idle + result": a cancelled command is answered with
IDLE, never FINISH.  No frontend ever used extra pages (Linux's page is zeroed and never sets them), and
mini-os ignores them: a page that asks for any is refused.

`pad` carries the backend's restart note: 1 while a command is taken (sent to the TPM) and 0 again once its
answer is written.  A daemon that restarts and finds SUBMIT with the note set cannot know whether the TPM ran
the command, so it answers with an error instead of running it a second time.  The frontend owns the page and
may clear the note: it can then only get its own command run twice on its own TPM.
"""

from __future__ import annotations

import enum
import re
import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import NamedTuple

PAGE_SIZE = 4096
SHARED_HEADER = struct.Struct("<IBBBB")  # length, state, locality, pad, nr_extra_pages
assert SHARED_HEADER.size == 8
OFF_LENGTH = 0
OFF_STATE = 4
OFF_LOCALITY = 5
OFF_PAD = 6
OFF_NR_EXTRA = 7
DATA_OFFSET = SHARED_HEADER.size  # with no extra pages
MAX_DATA = PAGE_SIZE - DATA_OFFSET

NOTE_TAKEN = 1  # `pad`: the backend took the command in the page (restart note)

# The TPM header both versions share: tag u16, size u32, ordinal/command code (or response code) u32, big endian.
TPM_HEADER = struct.Struct(">HII")
TPM_HEADER_SIZE = TPM_HEADER.size

MAX_LOCALITY = 4
FORBIDDEN_LOCALITY = 4  # the hardware's own (DRTM): never a guest's


class State(enum.IntEnum):
    IDLE = 0
    SUBMIT = 1
    FINISH = 2
    CANCEL = 3


_STATES = tuple(State)


class Version(enum.Enum):
    TPM2 = "2.0"
    TPM12 = "1.2"


# Response codes for the answers the backend gives itself (a TPM-shaped error the guest's stack understands).
@dataclass(frozen=True)
class Codes:
    rsp_tag: int
    size: int  # the command's size field disagrees with the length in the page
    locality: int  # locality not allowed for this guest
    failure: int  # the command may or may not have run (the daemon or the TPM restarted under it)


CODES = {
    # TPM_ST_NO_SESSIONS; TPM_RC_COMMAND_SIZE, TPM_RC_LOCALITY, TPM_RC_FAILURE (TPM 2.0 Part 2, 6.6)
    Version.TPM2: Codes(rsp_tag=0x8001, size=0x142, locality=0x907, failure=0x101),
    # TPM_TAG_RSP_COMMAND; TPM_BAD_PARAM_SIZE, TPM_BAD_LOCALITY, TPM_FAIL (TPM 1.2 Part 2, 16)
    Version.TPM12: Codes(rsp_tag=0x00C4, size=0x19, locality=0x3D, failure=0x09),
}


class ProtocolError(ValueError):
    """A frontend broke tpmif (page layout, keys): fails that device."""


def error_response(version: Version, rc: int) -> bytes:
    """A bare TPM response carrying `rc` (10 bytes), built field by field."""
    return TPM_HEADER.pack(CODES[version].rsp_tag, TPM_HEADER_SIZE, rc)


def response_code(rsp: bytes) -> int | None:
    if len(rsp) < TPM_HEADER_SIZE:
        return None
    return int(TPM_HEADER.unpack_from(rsp)[2])


# -- the page ---------------------------------------------------------------------------------------------


class Page(NamedTuple):
    """The header of one private copy of the shared page (the data stays in the copy).  A tuple: it is built
    for every event, and a frozen dataclass costs several times more to build."""

    length: int
    state: int  # raw byte: may be outside State
    locality: int
    pad: int
    nr_extra_pages: int

    @property
    def data_offset(self) -> int:
        return DATA_OFFSET + 4 * self.nr_extra_pages


def read_header(copy: bytes) -> Page:
    if len(copy) != PAGE_SIZE:
        raise ValueError(f"a page copy is {PAGE_SIZE} bytes, not {len(copy)}")
    return Page._make(SHARED_HEADER.unpack_from(copy, 0))


@dataclass(frozen=True, slots=True)
class Command:
    data: bytes
    locality: int
    ordinal: int


@dataclass(frozen=True, slots=True)
class Reject:
    """A command the backend answers itself with a TPM error (the guest can act on it)."""

    rc: int
    reason: str


def parse_command(copy: bytes, page: Page, version: Version, allowed: frozenset[int]) -> Command | Reject:
    """Validate a SUBMIT page (already copied into private memory).  Layout violations raise ProtocolError;
    a well-formed page whose command the TPM must not see gets a Reject."""
    length, _state, locality, _pad, nr_extra = page
    if nr_extra:
        raise ProtocolError(f"nr_extra_pages={nr_extra}: extra pages are not supported")
    off = DATA_OFFSET  # no extra pages
    if length < TPM_HEADER_SIZE:
        raise ProtocolError(f"length {length} is shorter than a TPM header")
    if length > PAGE_SIZE - off:
        raise ProtocolError(f"length {length} at offset {off} runs past the page")
    data = copy[off:off + length]
    _tag, size, ordinal = TPM_HEADER.unpack_from(data, 0)
    if size != length:
        return Reject(CODES[version].size, f"command size field {size} != shared length {length}")
    if locality >= MAX_LOCALITY or locality not in allowed:
        return Reject(CODES[version].locality, f"locality {locality} not allowed")
    return Command(data, locality, ordinal)


# -- TPM 1.2 commands to a TPM 2.0 vTPM (what Linux xen-tpmfront sends) -----------------------------------
#
# Linux's xen-tpmfront registers a TPM 1.2 chip whatever the backend runs (it never sets TPM_CHIP_FLAG_TPM2),
# so the guest kernel itself talks TPM 1.2 to a TPM 2.0 vTPM: at probe GetCapability(TIS_TIMEOUT) (then
# TIS_DURATION), then TPM_GetRandom twice when it registers the chip as a hwrng, and later sysfs reads or
# kernel TPM users.  swtpm --tpm2 answers each with a TPM 2.0 error (0x84), which the kernel logs as "A TPM
# error (132) occurred attempting to determine the timeouts" / "... get random" (seen in the real-Xen e2e,
# Debian 12's 6.1 kernel).  TPM 2.0 commands from user space through /dev/tpm0 pass untouched.  So for a TPM 2.0
# device the backend answers 1.2-tagged commands itself and swtpm never sees them:
# - GetCapability(TPM_CAP_PROPERTY, TIS_TIMEOUT / TIS_DURATION): the TPM 2.0 timeouts and durations (µs), so the
#   probe succeeds and the kernel keeps sane timeouts;
# - anything else: TPM_DEACTIVATED, the 1.2 code the kernel takes quietly (tpm_transmit_cmd logs every error but
#   TPM_DISABLED and TPM_DEACTIVATED): the guest's TPM 1.2 personality is "deactivated", its TPM 2.0 is whole.
# A 1.2 device (version=1.2) gets every command through to its swtpm --tpm (1.2).

TPM12_COMMAND_TAGS = frozenset({0x00C1, 0x00C2, 0x00C3})  # TPM_TAG_RQU_COMMAND, _AUTH1_, _AUTH2_
TPM12_RSP_COMMAND = 0x00C4
TPM12_ORD_GET_CAPABILITY = 0x65
TPM12_CAP_PROPERTY = 5
TPM12_CAP_PROP_TIS_TIMEOUT = 0x115
TPM12_CAP_PROP_TIS_DURATION = 0x120
TPM12_DEACTIVATED = 0x06
# Timeouts A-D: the TIS defaults the kernel itself uses for a 1.2 chip (750 ms, 2 s, 750 ms, 750 ms).  Not TPM
# 2.0's C = 200 ms: xen-tpmfront waits timeout_c for the page to be idle before each send, and with 200 ms the
# real-Xen e2e's second boot got "tpm_try_transmit: send(): error -62" (ETIME) under TCG.  Durations short/
# medium/long only bound the kernel's wait for 1.2 ordinals, which are answered here at once (TPM 2.0 ordinals
# get the kernel's own 2 minutes).  Not TPM 2.0's 20 ms short: the kernel's hwrng sends TPM_GetRandom (a short
# ordinal) every few seconds, and a dom0 under load (TCG, seen in the e2e with the NIC served too) does not
# always answer in 20 ms: the guest logged ETIME each time.  A generous bound costs nothing when answers are quick.
TPM2_TIMEOUTS_US = (750_000, 2_000_000, 750_000, 750_000)
TPM2_DURATIONS_US = (2_000_000, 20_000_000, 120_000_000)


def is_tpm12_command(data: bytes) -> bool:
    return len(data) >= TPM_HEADER_SIZE and TPM_HEADER.unpack_from(data)[0] in TPM12_COMMAND_TAGS


def tpm12_answer_on_tpm2(data: bytes) -> tuple[bytes, str]:
    """The backend's own answer to a TPM 1.2 command sent to a TPM 2.0 vTPM, and what it was (for metrics)."""
    _tag, _size, ordinal = TPM_HEADER.unpack_from(data)
    if ordinal == TPM12_ORD_GET_CAPABILITY and len(data) == TPM_HEADER_SIZE + 12:
        cap, sub_size, sub = struct.unpack_from(">III", data, TPM_HEADER_SIZE)
        if cap == TPM12_CAP_PROPERTY and sub_size == 4 and sub in (TPM12_CAP_PROP_TIS_TIMEOUT,
                                                                   TPM12_CAP_PROP_TIS_DURATION):
            values = TPM2_TIMEOUTS_US if sub == TPM12_CAP_PROP_TIS_TIMEOUT else TPM2_DURATIONS_US
            body = struct.pack(f">I{len(values)}I", 4 * len(values), *values)
            kind = "timeouts" if sub == TPM12_CAP_PROP_TIS_TIMEOUT else "durations"
            return TPM_HEADER.pack(TPM12_RSP_COMMAND, TPM_HEADER_SIZE + len(body), 0) + body, kind
    return TPM_HEADER.pack(TPM12_RSP_COMMAND, TPM_HEADER_SIZE, TPM12_DEACTIVATED), "deactivated"


def parse_localities(text: str) -> frozenset[int]:
    """`"0"`, `"0,1,2"`: the localities a guest may use; 4 is never allowed."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not re.fullmatch(r"[0-9]", part):
            raise ValueError(f"locality {part!r} is not a digit 0-3")
        n = int(part)
        if n >= FORBIDDEN_LOCALITY:
            raise ValueError(f"locality {n} is never allowed to a guest (0-3 only)")
        out.add(n)
    if not out:
        raise ValueError("no locality allowed")
    return frozenset(out)


# -- xenstore keys -----------------------------------------------------------------------------------------


def probe_keys() -> dict[str, str]:
    """Written at realize: Linux tpmfront refuses to connect without it ("vTPM protocol 2 required")."""
    return {"feature-protocol-v2": "1"}


def connect_keys() -> dict[str, str]:
    return {"ready": "1"}


@dataclass(frozen=True)
class FrontendConfig:
    ring_ref: int
    event_channel: int


_DEC = re.compile(r"[0-9]{1,10}")


def parse_frontend(keys: dict[str, str]) -> FrontendConfig:
    """What xen-tpmfront's setup_ring writes: ring-ref, event-channel, feature-protocol-v2=1 (mini-os tpmback
    refuses anything but exactly "1")."""
    if keys.get("feature-protocol-v2") != "1":
        raise ProtocolError(f"feature-protocol-v2 is {keys.get('feature-protocol-v2')!r}, must be '1'")
    out = []
    for key in ("ring-ref", "event-channel"):
        v = keys.get(key)
        if v is None:
            raise ProtocolError(f"{key} is missing")
        if not _DEC.fullmatch(v) or int(v) > 0xFFFFFFFF:
            raise ProtocolError(f"{key}={v!r} is not a 32-bit decimal number")
        out.append(int(v))
    return FrontendConfig(ring_ref=out[0], event_channel=out[1])


def parse_uuid(text: str | None) -> str:
    """The toolstack's `uuid` (libxl writes the vTPM's identity): canonical lower-case form."""
    if not text:
        raise ProtocolError("uuid is missing (libxl writes it; pvback attach tpm --uuid)")
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise ProtocolError(f"uuid {text[:60]!r} is not a UUID") from None


def parse_version(text: str | None, default: Version) -> Version:
    if text is None or text == "":
        return default
    for v in Version:
        if text == v.value:
            return v
    raise ProtocolError(f"version {text[:20]!r}: 2.0 or 1.2")


def parse_resume(text: str | None) -> bool:
    """libxl writes resume="False" (or "True" on a restore)."""
    return (text or "").strip().lower() in ("true", "1")


# -- the per-device machine --------------------------------------------------------------------------------


class Phase(enum.Enum):
    IDLE = "idle"  # nothing taken; the page is the frontend's
    BUSY = "busy"  # a command is with the TPM
    CANCELLING = "cancelling"  # ... and the frontend asked to cancel it


@dataclass(frozen=True, slots=True)
class Execute:
    command: Command


@dataclass(frozen=True, slots=True)
class CancelTpm:
    """Ask the TPM to cancel the running command (its answer is then dropped)."""


@dataclass(frozen=True, slots=True)
class Respond:
    """Write `data` (may be empty) with `state` (FINISH or IDLE) and notify."""

    data: bytes
    state: State


@dataclass(frozen=True, slots=True)
class Note:
    """Nothing for the frontend; count `reason` (storms, out-of-order states)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    message: str


@dataclass(frozen=True, slots=True)
class ClearNote:
    """Clear a restart note left behind by a daemon that died after writing an answer's state."""


@dataclass(frozen=True, slots=True)
class Answered12:
    """A TPM 1.2 command to a TPM 2.0 vTPM, answered by the backend (tpm12_answer_on_tpm2): count it."""

    ordinal: int
    kind: str  # "timeouts", "durations" or "deactivated"


Action = Execute | CancelTpm | Respond | Note | Fail | ClearNote | Answered12


class Machine:
    """One vTPM's command cycle.  `on_page` takes every event's private page copy; `on_answer` the TPM's answer
    (or None when the TPM failed under the command).  One command at a time: that is tpmif's contract."""

    def __init__(self, version: Version, allowed: frozenset[int]) -> None:
        self.version = version
        self.allowed = allowed
        self.phase = Phase.IDLE

    def recover(self, copy: bytes) -> list[Action]:
        """The first look at a page after a (re)connect.  SUBMIT with our note set: the command was taken by a
        previous daemon and may have run: answer with an error, never run it again."""
        page = read_header(copy)
        if page.state == State.SUBMIT and page.pad == NOTE_TAKEN:
            return [Note("restart: command may have run"),
                    Respond(error_response(self.version, CODES[self.version].failure), State.FINISH)]
        if page.state == State.CANCEL:
            return [Respond(b"", State.IDLE)]
        out: list[Action] = [ClearNote()] if page.pad and page.state != State.SUBMIT else []
        return out + self.on_page(copy)

    def on_page(self, copy: bytes) -> list[Action]:
        page = read_header(copy)
        if page.state > State.CANCEL:
            return [Fail(f"shared page state {page.state} is not a tpmif state")]
        state = _STATES[page.state]  # the members by value: State(n) is an enum lookup per event
        if self.phase is Phase.IDLE:
            if state is State.SUBMIT:
                try:
                    cmd = parse_command(copy, page, self.version, self.allowed)
                except ProtocolError as exc:
                    return [Fail(f"bad command page: {exc}")]
                if isinstance(cmd, Reject):
                    return [Note(f"rejected: {cmd.reason}"),
                            Respond(error_response(self.version, cmd.rc), State.FINISH)]
                if self.version is Version.TPM2 and is_tpm12_command(cmd.data):
                    answer, kind = tpm12_answer_on_tpm2(cmd.data)
                    return [Answered12(cmd.ordinal, kind), Respond(answer, State.FINISH)]
                self.phase = Phase.BUSY
                return [Execute(cmd)]
            if state is State.CANCEL:
                # Nothing running: acknowledge at once (mini-os does the same when idle).
                return [Respond(b"", State.IDLE)]
            return []  # IDLE/FINISH: the page is as we left it, or the frontend is idle
        if state is State.CANCEL and self.phase is Phase.BUSY:
            self.phase = Phase.CANCELLING
            return [CancelTpm()]
        if state is State.SUBMIT:
            # The page still holds the command being run: a repeated event for it, not a new command (the
            # frontend cannot submit another before our answer).  Linux xen-tpmfront causes one at each boot:
            # its probe submits before the backend has connected, recover takes that command at connect, and
            # the event of its notify arrives after.
            return []
        if state in (State.IDLE, State.FINISH):
            return [Note(f"frontend wrote {state.name} while a command runs")]
        return []  # CANCEL again while cancelling

    def on_answer(self, rsp: bytes | None, *, cancel_seen: bool = False) -> list[Action]:
        """The TPM answered (None: it died or timed out under the command).  `cancel_seen`: the page says CANCEL
        right now (a cancel whose event is not yet handled)."""
        if self.phase is Phase.IDLE:
            return []
        cancelled = self.phase is Phase.CANCELLING or cancel_seen
        self.phase = Phase.IDLE
        if cancelled:
            return [Respond(b"", State.IDLE)]
        if rsp is None:
            return [Note("tpm failed under the command"),
                    Respond(error_response(self.version, CODES[self.version].failure), State.FINISH)]
        if len(rsp) > MAX_DATA:
            return [Note("tpm answer larger than the page"),
                    Respond(error_response(self.version, CODES[self.version].failure), State.FINISH)]
        return [Respond(rsp, State.FINISH)]

