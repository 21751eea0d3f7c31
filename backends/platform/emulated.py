"""The emulated Xen platform, backend side: guest memory and event channels come from the sim's broker.

Grant rules are enforced in C (csrc/gnt_emu.c) on the guests' own grant tables, so a backend running here
is refused exactly what Xen would refuse it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from backends.native import struct_pv_gnt
from backends.native.events import NativeEventChannel, open_emulated
from backends.native.grants import EmulatedGrantTable
from backends.platform.base import (
    CopySegment,
    EventChannel,
    GrantMapping,
    Platform,
    PlatformError,
    PlatformFeatures,
)
from backends.platform.broker_client import BrokerClient, close_fds

DEFAULT_SIM_DIR = "/run/pvback-sim"
DOMID_FIRST_RESERVED = 0x7FF0


def sim_dir_default() -> str:
    return os.environ.get("PVBACK_SIM_DIR", DEFAULT_SIM_DIR)


class EmulatedPlatform(Platform):
    """A backend domain (dom0 by default) of the emulated platform in `sim_dir`."""

    name = "emulated"

    def __init__(self, sim_dir: str | None = None, *, backend_domid: int = 0) -> None:
        self.sim_dir = Path(sim_dir or sim_dir_default())
        try:
            self._broker = BrokerClient(str(self.sim_dir / "broker.sock"))
        except OSError as exc:
            raise PlatformError(f"emulated platform not running in {self.sim_dir} (start `pvback sim`): {exc}") from exc
        try:
            self._broker.request("hello", domid=backend_domid)
            self._table: EmulatedGrantTable | None = EmulatedGrantTable(backend_domid)
        except BaseException:
            self._broker.close()
            raise
        self.backend_domid = backend_domid
        self.features = PlatformFeatures(grant_copy=True, map_multiple=True)
        self._domains: dict[int, int] = {}  # domid -> open_domain references
        self._channels: set[NativeEventChannel] = set()

    @property
    def table(self) -> EmulatedGrantTable:
        if self._table is None:
            raise PlatformError("the emulated platform is closed")
        return self._table

    @property
    def gnt(self) -> struct_pv_gnt:
        return self.table.c

    def open_domain(self, domid: int) -> None:
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid} is not a guest")
        if domid in self._domains:
            self._domains[domid] += 1
            return
        reply, fds = self._broker.request("map_domain", domid=domid)
        try:
            if len(fds) != 3:
                raise OSError(errno.EPROTO, f"broker sent {len(fds)} fds for map_domain")
            # fds[2]: the pin table the broker also holds, so it can release our grants if we die.
            self.table.attach(domid, fds[0], int(reply["mem_pages"]), fds[1], int(reply["gnt_entries"]), fds[2])
        finally:
            close_fds(fds)
        self._domains[domid] = 1

    def close_domain(self, domid: int) -> None:
        refs = self._domains.get(domid)
        if refs is None:
            raise ValueError(f"d{domid} is not open")
        if refs > 1:
            self._domains[domid] = refs - 1
            return
        self.table.detach(domid)  # OSError(EBUSY) while mapped: the reference stays, retry after unmapping
        del self._domains[domid]

    def map_grants(self, domid: int, refs: list[int], writable: bool) -> GrantMapping:
        return self.table.map(domid, refs, writable)

    def grant_copy(self, segments: list[CopySegment]) -> list[int]:
        return self.table.copy(segments)

    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        reply, fds = self._broker.request("bind_interdomain", domid=domid, remote_port=remote_port)
        if len(fds) != 2:
            close_fds(fds)
            raise OSError(errno.EPROTO, f"broker sent {len(fds)} fds for bind_interdomain")
        ch = open_emulated(fds[0], fds[1], int(reply["port"]), domid, remote_port, on_close=self._unbound)
        self._channels.add(ch)
        return ch

    def _unbound(self, ch: NativeEventChannel) -> None:
        self._channels.discard(ch)
        # No wait for the reply: close paths run in event-loop callbacks, possibly on the broker's own loop.
        self._broker.send_nowait("unbind", port=ch.local_port)

    def xenstore_path(self) -> str:
        return str(self.sim_dir / "xenstored.sock")

    @property
    def live_mappings(self) -> int:
        return 0 if self._table is None else self._table.live_mappings

    @property
    def bound_ports(self) -> int:
        return len(self._channels)

    @property
    def open_domains(self) -> dict[int, int]:
        return dict(self._domains)

    def close(self) -> None:
        for ch in list(self._channels):
            ch.close()
        if self._table is not None:
            self._table.close()  # drops any mapping still held, then every attached domain
            self._table = None
        self._domains.clear()
        # Last: the broker takes a closed connection for a dead backend and releases what its pins held.
        self._broker.close()
