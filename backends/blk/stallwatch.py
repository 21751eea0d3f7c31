"""Recovery from a lost event channel notification, in either direction, for a connected disk's queues.

The ring protocol relies on every notification arriving: a frontend that published requests and saw the
backend ask to be told (req_event) sends one event, and a backend that published responses the frontend asked
to hear of (rsp_event) sends one.  If one goes missing anywhere (hypervisor, kernel driver, our pump), both
sides wait for the other forever and the guest's I/O hangs with nothing logged.  The disk's 1-second monitor
looks at each queue's ring (pv_blk_queue_ring_state) and acts only when nothing moved for `patience` looks:

- requests on the ring that the queue could take (free request slots, no flush waiting for earlier
  requests, not held back by the disk's I/O limit) and did not: the pump is nudged, as an event would have;
- responses published past the frontend's rsp_event that it has not picked up: it is notified again (a
  spurious event costs a frontend a look at its ring).

Each recovery is counted (`pvback status`: stall_kicks, stall_notifies) and warned about at most once per
`warn_interval` seconds per device: a recovery that ever happens says a notification went missing, which is a
bug somewhere to be found, not noise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.blk.dataplane import BlkDataplane
    from backends.xenbus.device import BackendDevice

_HALF = 1 << 31


def _ahead(a: int, b: int) -> int:
    """How far ring index `a` is past `b` (free-running 32-bit indices), 0 if it is not."""
    d = (a - b) & 0xFFFFFFFF
    return d if d < _HALF else 0


@dataclass
class StallWatch:
    warn_interval: float
    # Looks in a row that must find a queue's ring unchanged before acting: with the 1-second monitor, about two
    # seconds, so that a guest that is merely slow to run (a loaded host) is not taken for a lost event.
    patience: int = 2
    kicks: int = 0
    notifies: int = 0
    _last: dict[int, dict[str, int]] = field(default_factory=dict)
    _still: dict[int, int] = field(default_factory=dict)
    _acted: dict[int, dict[str, int]] = field(default_factory=dict)  # the state each queue was last helped in
    _last_warning: float = -float("inf")

    def forget(self) -> None:
        """A new connection: its rings start afresh (the counts are the device's and stay)."""
        self._last.clear()
        self._still.clear()
        self._acted.clear()

    def check(self, dev: BackendDevice, queues: list[BlkDataplane]) -> None:
        for qi, dp in enumerate(queues):
            if dp.queue.closed:
                continue
            st = dp.queue.ring_state()
            prev, self._last[qi] = self._last.get(qi), st
            self._still[qi] = self._still.get(qi, 0) + 1 if st == prev else 0
            if self._still[qi] < self.patience or self._acted.get(qi) == st:
                continue  # it moved lately (or was already helped in this very state)
            unconsumed = _ahead(st["req_prod"], st["req_cons"])
            if unconsumed and st["free_reqs"] and not st["fence"] and not st["throttled"]:
                self._acted[qi] = st
                self.kicks += 1
                dp.queue.nudge()
                self._warn(dev, "queue %d: %d request(s) waited on the ring with no event for %d s: looked again "
                                "(a notification from the frontend went missing)", qi, unconsumed, st)
            unseen = _ahead(st["rsp_prod"] + 1, st["rsp_event"])  # rsp_event - 1 is the one it waits for
            if unseen:
                self._acted[qi] = st
                self.notifies += 1
                try:
                    dp.queue.notify()
                except OSError as exc:
                    dev.log.warning("cannot notify the frontend", extra={"queue": qi, "error": str(exc)})
                self._warn(dev, "queue %d: %d response(s) the frontend asked to hear of stayed unread for %d s: "
                                "notified it again (a notification to the frontend went missing, or the guest "
                                "did not run)", qi, unseen, st)

    def _warn(self, dev: BackendDevice, msg: str, qi: int, n: int, st: dict[str, int]) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last_warning < self.warn_interval:
            return
        self._last_warning = now
        dev.log.warning(msg, qi, n, self._still[qi], extra={"ring": " ".join(f"{k}={v}" for k, v in st.items()),
                                           "stall_kicks": self.kicks, "stall_notifies": self.notifies})
