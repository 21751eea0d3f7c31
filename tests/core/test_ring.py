"""Property tests of backends/native/ring.py (FrontRing/BackRing over csrc/ring.c) on an mmap'd page.

A hypothesis state machine interleaves the frontend's and backend's calls at random and checks them against a
plain model: FIFO order, nothing lost or duplicated, never more outstanding than the ring size, the notify /
final-check contract (no lost wake-ups), zeroed response slots.  Separate tests play a hostile peer.
"""

from __future__ import annotations

import gc
import mmap
import struct
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from backends.native.ring import PAGE_SIZE, RING_HEADER_SIZE, BackRing, FrontRing, RingOverflowError, ring_size

U32 = 0xFFFFFFFF
SLOT_SIZES = (112, 108, 12, 8, 16)  # blkif x86_64 / x86_32, netif tx, netif rx, netif control
PAGE_COUNTS = (1, 2, 4)
# Start indices: zero, just below 2^32 (the run crosses the wrap), around the sign bit, anywhere.
starts = st.one_of(
    st.just(0),
    st.integers(U32 - 300, U32),
    st.integers(0x7FFFFF00, 0x80000010),
    st.integers(0, U32),
)


def header(mm: mmap.mmap) -> tuple[int, int, int, int]:
    """(req_prod, req_event, rsp_prod, rsp_event) as the peer sees them."""
    return struct.unpack_from("<4I", mm, 0)


def set_req_prod(mm: mmap.mmap, value: int) -> None:
    struct.pack_into("<I", mm, 0, value & U32)


def set_rsp_prod(mm: mmap.mmap, value: int) -> None:
    struct.pack_into("<I", mm, 8, value & U32)


def payload(seq: int, size: int, tag: int) -> bytes:
    """A slot body that names its sequence number and cannot be confused with another slot's."""
    head = seq.to_bytes(8, "little")
    return head + bytes((seq * 31 + i * 7 + tag) & 0xFF for i in range(size - 8))


class RingMachine(RuleBasedStateMachine):
    mm: mmap.mmap
    front: FrontRing
    back: BackRing

    @initialize(slot=st.sampled_from(SLOT_SIZES), pages=st.sampled_from(PAGE_COUNTS), start=starts)
    def setup(self, slot: int, pages: int, start: int) -> None:
        self.slot = slot
        self.rsp_size = max(8, slot // 2)
        self.mm = mmap.mmap(-1, pages * PAGE_SIZE)
        self.mm.write(b"\xa5" * len(self.mm))  # slots start dirty: nothing may rely on zeroed memory
        self.front = FrontRing(self.mm, pages, slot, start_idx=start)
        self.back = BackRing(self.mm, pages, slot, start_idx=start)
        self.size = ring_size(pages, slot)
        assert self.size == self.front.size == self.back.size
        assert self.size == 1 << ((pages * PAGE_SIZE - RING_HEADER_SIZE) // slot).bit_length() - 1
        self.start = start
        self.next_seq = 0
        self.queued: list[bytes] = []  # put, not pushed
        self.published: deque[bytes] = deque()  # pushed, not consumed by the back
        self.in_flight: deque[bytes] = deque()  # consumed by the back, not answered
        self.answered: deque[bytes] = deque()  # responses the front has not consumed yet
        self.rsp_unpushed = 0  # of `answered`, how many the back has written but not pushed
        self.received: list[int] = []  # seq numbers of responses, in the order the front got them
        self.back_asleep = False
        self.front_asleep = False
        self.total_put = 0

    # ---- frontend -------------------------------------------------------------------------------------------

    @rule(n=st.integers(1, 40))
    def put(self, n: int) -> None:
        outstanding = len(self.queued) + len(self.published) + len(self.in_flight) + len(self.answered)
        reqs = [payload(self.next_seq + i, self.slot, 1) for i in range(n)]
        done = self.front.put(reqs, self.slot)
        assert done == min(n, self.size - outstanding)
        assert self.front.free_slots() == self.size - outstanding - done
        self.queued += reqs[:done]
        self.next_seq += done
        self.total_put += done

    @rule()
    def push_requests(self) -> None:
        notify = self.front.push()
        added = len(self.queued)
        self.published.extend(self.queued)
        self.queued.clear()
        if added == 0:
            assert not notify, "a push that adds nothing must not kick"
        elif self.back_asleep:
            assert notify, "backend went to sleep (final check False) and new work did not ask for a notify"
            self.back_asleep = False
        if notify:
            self.back_asleep = False
        assert header(self.mm)[0] == (self.start + self.total_put) & U32

    @rule(max_slots=st.integers(1, 40))
    def consume_responses(self, max_slots: int) -> None:
        visible = len(self.answered) - self.rsp_unpushed
        got = self.front.consume(self.rsp_size, max_slots)
        want = [self.answered.popleft() for _ in range(min(max_slots, visible))]
        assert got == want
        self.received += [int.from_bytes(r[:8], "little") for r in got]

    @rule()
    def front_final_check(self) -> None:
        more = self.front.final_check()
        assert more == (len(self.answered) - self.rsp_unpushed > 0)
        self.front_asleep = not more

    # ---- backend --------------------------------------------------------------------------------------------

    @rule(max_slots=st.integers(1, 40))
    def consume_requests(self, max_slots: int) -> None:
        assert self.back.pending() == len(self.published)
        got = self.back.consume(max_slots)
        want = [self.published.popleft() for _ in range(min(max_slots, len(self.published)))]
        assert got == want, "requests out of order, lost or duplicated"
        self.in_flight.extend(got)

    @precondition(lambda self: len(self.in_flight) > 0)
    @rule(data=st.data())
    def respond(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, len(self.in_flight)))
        reqs = [self.in_flight.popleft() for _ in range(n)]
        rsps = [payload(int.from_bytes(r[:8], "little"), self.rsp_size, 2) for r in reqs]
        first = self.back.rsp_prod_pvt
        notify = self.back.respond(rsps, self.rsp_size)
        # Responses go into zeroed slots: no request byte is handed back beyond the response (XSA-216).
        for i, rsp in enumerate(rsps):
            off = RING_HEADER_SIZE + ((first + i) & (self.size - 1)) * self.slot
            assert self.mm[off : off + self.slot] == rsp + bytes(self.slot - self.rsp_size)
        # respond() also publishes everything written before it.
        self.answered.extend(rsps)
        self.rsp_unpushed = 0
        if self.front_asleep:
            assert notify, "frontend went to sleep (final check False) and a response did not ask for a notify"
        if notify:
            self.front_asleep = False

    @rule()
    def back_final_check(self) -> None:
        more = self.back.final_check()
        assert more == (len(self.published) > 0)
        self.back_asleep = not more
        if not more:
            assert header(self.mm)[1] == (self.back.req_cons + 1) & U32, "req_event not re-armed"

    # ---- invariants -----------------------------------------------------------------------------------------

    @invariant()
    def bounded(self) -> None:
        if not hasattr(self, "back"):
            return
        assert (self.back.req_cons - self.back.rsp_prod_pvt) & U32 <= self.size
        outstanding = len(self.queued) + len(self.published) + len(self.in_flight) + len(self.answered)
        assert outstanding <= self.size
        assert self.received == list(range(len(self.received))), "responses out of order, lost or duplicated"

    def teardown(self) -> None:
        if not hasattr(self, "back"):
            return
        # Drain: every request ever put gets exactly one response, in order.
        self.push_requests()
        while self.published:
            self.consume_requests(self.size)
        if self.in_flight:
            rsps = [payload(int.from_bytes(r[:8], "little"), self.rsp_size, 2) for r in self.in_flight]
            self.back.respond(rsps, self.rsp_size)
            self.answered.extend(rsps)
            self.in_flight.clear()
        self.consume_responses(self.size)
        assert self.received == list(range(self.total_put))
        assert not self.front.final_check() and not self.back.final_check()
        # The rings pin the mapping: it can only be closed once they are gone.
        with pytest.raises(BufferError):
            self.mm.close()
        del self.front, self.back
        gc.collect()
        self.mm.close()


RingMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRingMachine = RingMachine.TestCase


# ---- hostile peers ----------------------------------------------------------------------------------------


def _pair(slot: int, pages: int, start: int) -> tuple[mmap.mmap, FrontRing, BackRing]:
    mm = mmap.mmap(-1, pages * PAGE_SIZE)
    return mm, FrontRing(mm, pages, slot, start_idx=start), BackRing(mm, pages, slot, start_idx=start)


def _fill(front: FrontRing, back: BackRing, n_consume: int, n_answer: int) -> None:
    """Leave `n_consume` requests consumed by the back, `n_answer` of them answered."""
    front.put([bytes(front.slot_size)] * n_consume, front.slot_size)
    front.push()
    assert len(back.consume()) == n_consume
    if n_answer:
        back.respond([b"r"] * n_answer, 1)


@settings(max_examples=80, deadline=None)
@given(
    slot=st.sampled_from(SLOT_SIZES),
    start=starts,
    ahead=st.integers(1, U32 // 2),
    data=st.data(),
)
def test_bogus_req_prod_kills_the_ring(slot: int, start: int, ahead: int, data: st.DataObject) -> None:
    mm, front, back = _pair(slot, 1, start)
    size = back.size
    n = data.draw(st.integers(0, size))
    _fill(front, back, n, data.draw(st.integers(0, n)))
    # More requests than the ring can hold beyond what was answered: hostile or broken.
    set_req_prod(mm, back.rsp_prod_pvt + size + ahead)
    req_cons = back.req_cons
    with pytest.raises(RingOverflowError):
        back.consume()
    assert back.req_cons == req_cons, "nothing may be consumed from a bogus ring"
    # The ring stays dead, even once req_prod looks sane again; every entry point says so at once.
    set_req_prod(mm, back.req_cons)
    for call in (back.consume, back.pending, back.final_check):
        with pytest.raises(RingOverflowError):
            call()
    assert back.req_cons == req_cons


@settings(max_examples=80, deadline=None)
@given(slot=st.sampled_from(SLOT_SIZES), start=starts, data=st.data())
def test_req_prod_moving_backwards(slot: int, start: int, data: st.DataObject) -> None:
    mm, front, back = _pair(slot, 1, start)
    size = back.size
    n = data.draw(st.integers(1, size))
    answered = data.draw(st.integers(0, n))
    _fill(front, back, n, answered)
    back_by = data.draw(st.integers(1, size + 8))
    prod = (back.req_cons - back_by) & U32
    set_req_prod(mm, prod)
    outstanding = (back.req_cons - back.rsp_prod_pvt) & U32
    if (prod - back.rsp_prod_pvt) & U32 > size:
        # Behind what was already answered: that many requests cannot exist.
        with pytest.raises(RingOverflowError):
            back.consume()
    else:
        # Within the window: io/ring.h bounds the count by the free response slots, so a confused frontend
        # can make us re-read stale slots but never more than the ring holds.
        got = back.consume()
        assert len(got) == size - outstanding
        assert (back.req_cons - back.rsp_prod_pvt) & U32 == size


@settings(max_examples=80, deadline=None)
@given(slot=st.sampled_from(SLOT_SIZES), start=starts, extra=st.integers(1, U32 // 2), data=st.data())
def test_response_overflow_on_the_front(slot: int, start: int, extra: int, data: st.DataObject) -> None:
    mm, front, _ = _pair(slot, 1, start)
    n = data.draw(st.integers(0, front.size))
    front.put([bytes(slot)] * n, slot)
    front.push()
    # More responses than requests outstanding: a hostile or broken backend.
    set_rsp_prod(mm, start + n + extra)
    with pytest.raises(RingOverflowError):
        front.consume(8)
    # Nothing was taken, and a sane rsp_prod works again.
    set_rsp_prod(mm, start + n)
    assert len(front.consume(8)) == n


@pytest.mark.parametrize("slot", SLOT_SIZES)
def test_consume_copies_each_slot_once(slot: int) -> None:
    mm, front, back = _pair(slot, 1, U32 - 2)
    reqs = [payload(i, slot, 3) for i in range(5)]
    assert front.put(reqs, slot) == 5
    front.push()
    got = back.consume()
    assert got == reqs
    # The frontend rewrites the slots after the backend took them: the private copies do not change, and
    # the backend does not see the slots again.
    for i in range(5):
        off = RING_HEADER_SIZE + ((U32 - 2 + i) & (back.size - 1)) * slot
        mm[off : off + slot] = b"\xee" * slot
    assert got == reqs
    assert back.consume() == []
    assert not back.final_check()


def test_ring_size_rejects_what_does_not_fit() -> None:
    mm = mmap.mmap(-1, PAGE_SIZE)
    with pytest.raises(ValueError):
        BackRing(mm, 1, PAGE_SIZE)
    with pytest.raises(ValueError):
        FrontRing(mm, 1, 0)
    assert [ring_size(p, 112) for p in (1, 2, 4, 8, 16)] == [32, 64, 128, 256, 512]
