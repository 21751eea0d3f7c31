"""Hostile tpmif frontends: each misbehaviour fails (or is answered in band by) that vTPM only, while another
guest's TPM keeps answering.  Every case writes the page by hand, as a malicious guest kernel could."""

from __future__ import annotations

import asyncio
import struct
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from backends.xenbus.toolstack import read_state, wait_for_state
from tests.system.conftest import SimProc
from tests.system.vtpmbed import GETRANDOM8, S, TpmBed, Vtpm, rc_of, tpm_bed

CONNECTED, CLOSING = S.CONNECTED, S.CLOSING


@pytest.fixture
def tbed(sim: SimProc, tmp_path: Path) -> Iterator[TpmBed]:
    with tpm_bed(sim, tmp_path) as bed:
        yield bed


def write_page(v: Vtpm, data: bytes, *, length: int | None = None, state: int = 1, locality: int = 0,
               nr_extra: int = 0, notify: bool = True) -> None:
    shr = v.front.shr
    shr[8:8 + len(data)] = data
    struct.pack_into("<I", shr, 0, len(data) if length is None else length)
    shr[5], shr[7] = locality, nr_extra
    shr[4] = state
    if notify:
        v.front.notify()


async def answer(v: Vtpm, timeout: float = 10.0) -> bytes:
    async with asyncio.timeout(timeout):
        while v.front.state != 2:
            await asyncio.sleep(0.005)
    return v.front.response()


async def fails_with(tbed: TpmBed, v: Vtpm, text: str) -> None:
    await wait_for_state(await tbed.dom0(), v.paths.backend, CLOSING, timeout=10.0)
    err = await (await tbed.dom0()).read_str(f"{v.paths.backend}/error")
    assert err is not None and text in err, err


async def case_bad_length(tbed: TpmBed, v: Vtpm) -> None:
    write_page(v, GETRANDOM8, length=5000)
    await fails_with(tbed, v, "runs past the page")


async def case_huge_length(tbed: TpmBed, v: Vtpm) -> None:
    write_page(v, GETRANDOM8, length=0xFFFFFFFF)
    await fails_with(tbed, v, "runs past the page")


async def case_short_length(tbed: TpmBed, v: Vtpm) -> None:
    write_page(v, GETRANDOM8, length=4)
    await fails_with(tbed, v, "shorter than a TPM header")


async def case_extra_pages(tbed: TpmBed, v: Vtpm) -> None:
    write_page(v, GETRANDOM8, nr_extra=3)
    await fails_with(tbed, v, "extra pages")


async def case_bad_state(tbed: TpmBed, v: Vtpm) -> None:
    write_page(v, GETRANDOM8, state=7)
    await fails_with(tbed, v, "not a tpmif state")


async def case_size_disagrees(tbed: TpmBed, v: Vtpm) -> None:
    write_page(v, struct.pack(">HII", 0x8001, 64, 0x17B) + b"\0\x08")  # header says 64, page 12
    assert rc_of(await answer(v)) == 0x142  # TPM_RC_COMMAND_SIZE, answered in band
    assert await tbed.getrandom_raw(v)


async def case_localities(tbed: TpmBed, v: Vtpm) -> None:
    for loc, want in ((4, 0x907), (2, 0x907), (3, 0x907), (1, 0), (0, 0)):
        write_page(v, GETRANDOM8, locality=loc)
        assert rc_of(await answer(v)) == want, loc
        v.front.shr[4] = 0


async def case_states_out_of_order(tbed: TpmBed, v: Vtpm) -> None:
    for state in (2, 0, 2, 0):  # the backend's states, written by the frontend while idle
        write_page(v, GETRANDOM8, state=state)
    await asyncio.sleep(0.2)
    assert v.front.state == 0 and await read_state(await tbed.dom0(), v.paths.backend) == CONNECTED
    write_page(v, GETRANDOM8)  # ... and while busy
    write_page(v, GETRANDOM8, state=0)
    await asyncio.sleep(0.3)
    assert await read_state(await tbed.dom0(), v.paths.backend) == CONNECTED
    assert await tbed.getrandom_raw(v)


async def case_submit_storm(tbed: TpmBed, v: Vtpm) -> None:
    write_page(v, GETRANDOM8)
    for _ in range(2000):
        v.front.notify()
    rsp = await answer(v)
    assert rc_of(rsp) == 0 and len(rsp) == 20
    await asyncio.sleep(0.1)
    assert await tbed.metric("pvback_requests_total", v.domid, op="command") == 1  # run once


async def case_cancel_storm(tbed: TpmBed, v: Vtpm) -> None:
    for _ in range(2000):
        v.front.cancel()
    async with asyncio.timeout(10):
        while v.front.state != 0:
            await asyncio.sleep(0.005)
    assert await tbed.getrandom_raw(v)


async def case_never_reads(tbed: TpmBed, v: Vtpm) -> None:
    for _ in range(50):  # submits, never reads an answer, submits again over it
        write_page(v, GETRANDOM8)
        await answer(v)
    assert await read_state(await tbed.dom0(), v.paths.backend) == CONNECTED
    assert await tbed.getrandom_raw(v)


CASES: dict[str, Callable[[TpmBed, Vtpm], Awaitable[None]]] = {
    "bad_length": case_bad_length, "huge_length": case_huge_length, "short_length": case_short_length,
    "extra_pages": case_extra_pages, "bad_state": case_bad_state, "size_disagrees": case_size_disagrees,
    "localities": case_localities, "states_out_of_order": case_states_out_of_order,
    "submit_storm": case_submit_storm, "cancel_storm": case_cancel_storm, "never_reads": case_never_reads,
}


@pytest.mark.system_timeout(120)
async def test_hostile_frontends_fail_only_their_vtpm(tbed: TpmBed) -> None:
    good = await tbed.tpm(name="good")
    hostile_uuid = str(uuidlib.uuid4())  # one vTPM state, attached to a new hostile guest per case
    stop = asyncio.Event()
    answered = 0

    async def keep_asking() -> None:
        nonlocal answered
        while not stop.is_set():
            await tbed.getrandom_raw(good)
            answered += 1
            await asyncio.sleep(0.01)

    asker = asyncio.ensure_future(keep_asking())
    try:
        for name, case in CASES.items():
            v = await tbed.tpm(uuid=hostile_uuid, name=name)
            before = answered
            await case(tbed, v)
            await asyncio.sleep(0.05)
            async with asyncio.timeout(5):  # the good guest's TPM keeps answering after each case
                while answered <= before + 1 and not asker.done():
                    await asyncio.sleep(0.01)
            assert not asker.done(), f"{name}: the good guest's TPM stopped answering"
            await tbed.detach_tpm(v)
    finally:
        stop.set()
        await asker
    assert await read_state(await tbed.dom0(), good.paths.backend) == CONNECTED
    assert await tbed.metric("pvback_errors_total", good.domid) == 0
