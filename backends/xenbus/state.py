"""The xenbus backend lifecycle as a pure state machine: observations in, actions out, no I/O.

`BackendMachine` knows nothing about xenstore or asyncio.  The bus (device.py) reads the frontend state, the
backend `state` and `online` keys, feeds them in as one `Observation`, and carries out the returned actions
in order.  When an action fails the bus reports it with `failed()` and carries out those actions instead of
the rest of the list.  Tests drive it with plain lists.

Decisions are taken from the observed state, never from edges (watches fire spuriously and coalesce
transitions, reference §4.10): the same observation twice yields no actions the second time, and connect is
always preceded by a disconnect when something is connected, so a missed intermediate state cannot leak a
mapping.  Frontend Unknown (dir removed, state unreadable) counts as Closed (QEMU xen-bus, Durrant 2019).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class XenbusState(enum.IntEnum):
    """io/xenbus.h; written to `<dir>/state` as decimal strings."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    @property
    def label(self) -> str:
        """The name without io/xenbus.h's XenbusState prefix, as xl and the Xen docs print it: InitWait."""
        return "".join(part.capitalize() for part in self.name.split("_"))


S = XenbusState
_GONE = frozenset({S.CLOSED, S.UNKNOWN})
# Frontend states in which it may hold the rings or be using them: an unplug must wait for it to close.
_FRONTEND_ACTIVE = frozenset({S.INITIALISED, S.CONNECTED, S.CLOSING, S.RECONFIGURING, S.RECONFIGURED})


# --- actions (out) -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Realize:
    """Call DeviceClass.realize (parse backend keys, open the driver, write probe features)."""


@dataclass(frozen=True)
class Connect:
    """Call DeviceClass.connect (read frontend keys, map rings, bind events, start pumps)."""


@dataclass(frozen=True)
class Disconnect:
    """Call DeviceClass.disconnect (stop pumps, unbind, unmap)."""


@dataclass(frozen=True)
class Reconfigure:
    """Call DeviceClass.reconfigure_frontend: the connected frontend changed its keys and waits in
    Reconfiguring (Linux netfront attaching XDP: a new `xdp-headroom`)."""


@dataclass(frozen=True)
class Unrealize:
    """Call DeviceClass.unrealize (close the driver); the device is finished after this."""


@dataclass(frozen=True)
class SetState:
    state: XenbusState


@dataclass(frozen=True)
class ReportError:
    """Write the `error` nodes (backend dir and the domain's error/ tree)."""

    message: str


Action = Realize | Connect | Disconnect | Reconfigure | Unrealize | SetState | ReportError


# --- observations (in) ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    frontend: XenbusState  # UNKNOWN when the frontend dir or its state key is absent
    backend: XenbusState  # what the backend `state` key holds now (the toolstack may have written it)
    online: bool  # backend `online` key; absent counts as online=0 only when explicitly "0"
    plugged: bool = True  # backend `hotplug-status` is "connected" (only looked at by gated classes)


class Phase(enum.Enum):
    NEW = "new"  # realize not run yet
    LIVE = "live"  # realized, following the frontend
    DEAD = "dead"  # realize failed: only closes, never connects again
    UNPLUGGED = "unplugged"  # unrealized after online=0; waits for the toolstack to remove the dir
    STOPPED = "stopped"  # unrealized because the backend dir went away or the bus stopped


class BackendMachine:
    """One device's lifecycle.  `connect_states` is the DeviceClass's (blk: Initialised+Connected, net:
    Connected).  `hotplug_gate`: after connecting, hold Connected back until the device is plugged
    (`hotplug-status=connected` in the backend dir, as Linux netback's hotplug_status_changed waits for the
    vif script), so a frontend never sends on a NIC that is not in its switch yet."""

    def __init__(self, connect_states: frozenset[XenbusState], *, hotplug_gate: bool = False,
                 reconfigurable: bool = False) -> None:
        self.connect_states = connect_states
        self.hotplug_gate = hotplug_gate
        # The class can take new frontend keys while connected (Reconfiguring -> Reconfigured -> Connected);
        # without it a frontend in Reconfiguring is left waiting, as before.
        self.reconfigurable = reconfigurable
        self.phase = Phase.NEW
        self.backend = S.UNKNOWN  # last backend state written or observed
        self.connected = False  # DeviceClass.connect completed and disconnect not yet run
        self.failed = False  # an error was reported; do not connect until the frontend restarts
        # The toolstack wrote Closing over our Connected while the frontend stayed connected (libxl removing the
        # device of a guest that did not close it): until the frontend closes, keep serving, never reconnect.
        self.toolstack_closing = False

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.UNPLUGGED, Phase.STOPPED)

    # -- helpers that keep the bookkeeping next to the action they stand for

    def _set(self, out: list[Action], state: XenbusState) -> None:
        self.toolstack_closing = False
        if self.backend != state:
            out.append(SetState(state))
            self.backend = state

    def _disconnect(self, out: list[Action]) -> None:
        if self.connected:
            out.append(Disconnect())
            self.connected = False

    def _unrealize(self, out: list[Action], phase: Phase) -> None:
        self._disconnect(out)
        if self.phase is Phase.LIVE:
            out.append(Unrealize())
        self.phase = phase

    # -- inputs

    def observe(self, ob: Observation) -> list[Action]:
        out: list[Action] = []
        if self.finished:
            return out
        if self.connected and self.backend in (S.CONNECTED, S.RECONFIGURED) and ob.backend is S.CLOSING:
            self.toolstack_closing = True
        self.backend = ob.backend
        fe = ob.frontend
        if self.phase is Phase.NEW:
            if not ob.online:
                self._set(out, S.CLOSED)
                self.phase = Phase.UNPLUGGED
                return out
            out.append(Realize())
            self.phase = Phase.LIVE
            reconfiguring = fe is S.RECONFIGURING and self.reconfigurable
            if fe in self.connect_states or reconfiguring:
                # Restart recovery: a frontend that is already connected keeps its rings; reconnect to them
                # instead of announcing InitWait, which a connected frontend would ignore.  One caught in
                # Reconfiguring gets its answer after the connect (which read its keys afresh).
                out.append(Connect())
                self.connected = True
                if reconfiguring:
                    self._set(out, S.RECONFIGURED)
                elif self._may_announce(ob):
                    out.append(SetState(S.CONNECTED))
                    self.backend = S.CONNECTED
            else:
                self._set(out, S.INIT_WAIT)
            return out

        if not ob.online:
            return self._unplug(out, fe)
        if fe in _GONE:
            self._disconnect(out)
            self._set(out, S.CLOSED)
        elif fe is S.CLOSING:
            self._set(out, S.CLOSING)
        elif fe in (S.INITIALISING, S.INIT_WAIT):
            # The frontend (re)started.  From Closed this is the documented reconnect; from any other state it
            # is a frontend that reset without closing (a missed Closed, a crashed guest kexec-ing): drop what
            # we hold and offer the features again.
            if self.phase is Phase.LIVE:
                self._disconnect(out)
                self.failed = False
                self._set(out, S.INIT_WAIT)
        elif fe is S.RECONFIGURING:
            # A connected frontend asks us to re-read its keys without tearing the rings down (Linux netback's
            # frontend_changed: read the XDP headroom, answer Reconfigured).  The data path keeps running.
            if (self.reconfigurable and self.phase is Phase.LIVE and not self.failed and self.connected
                    and self.backend in (S.CONNECTED, S.RECONFIGURED)):
                if self.backend is S.CONNECTED:
                    out.append(Reconfigure())
                    self._set(out, S.RECONFIGURED)
        elif fe in self.connect_states and self.toolstack_closing:
            # libxl asks the frontend to close by writing our state (for a dying guest's qdisk it writes no
            # online=0): a frontend that cannot answer (a hung guest being destroyed) stays Connected.  Its
            # rings stay served until it closes or its domain is gone; a reconnect would read the keys the
            # toolstack is deleting and fail the device.
            pass
        elif fe in self.connect_states and self.backend is S.RECONFIGURED and self.connected and not self.failed:
            # The frontend took our Reconfigured and is Connected again: so are we, without a reconnect.  (Linux
            # netback leaves its state at Reconfigured; Connected is what every frontend expects to see of a
            # working backend and what `xl network-list` reports.)
            self._set(out, S.CONNECTED)
        elif fe in self.connect_states:
            if self.phase is not Phase.LIVE or self.failed:
                pass
            elif self.connected and self.hotplug_gate and self.backend is not S.CONNECTED:
                # Connected, waiting to be plugged: announce once it is, never reconnect meanwhile.
                if ob.plugged:
                    self._set(out, S.CONNECTED)
            elif not (self.connected and self.backend is S.CONNECTED):
                self._disconnect(out)
                out.append(Connect())
                self.connected = True
                if self._may_announce(ob):
                    self._set(out, S.CONNECTED)
        # Reconfigured from the frontend, or a connect state this class waits past (net ignores Initialised):
        # nothing.
        return out

    def _may_announce(self, ob: Observation) -> bool:
        return not self.hotplug_gate or ob.plugged

    def _unplug(self, out: list[Action], fe: XenbusState) -> list[Action]:
        if fe in _FRONTEND_ACTIVE and self.phase is Phase.LIVE:
            # Ask the frontend to let go; it answers with Closing/Closed and we finish then.
            self._set(out, S.CLOSING)
            return out
        # Release the driver before announcing Closed: libxl destroys the device (and the admin may reuse the
        # image) as soon as it sees Closed.
        self._unrealize(out, Phase.UNPLUGGED)
        self._set(out, S.CLOSED)
        return out

    def failed_with(self, message: str, action: Action | None = None) -> list[Action]:
        """`action` (or a check the bus made, when None) failed: report it and close this device.

        Carrying out the returned list must not feed failures back in (the bus logs them): a class whose
        disconnect keeps failing would otherwise loop."""
        out: list[Action] = [ReportError(message)]
        if self.phase is Phase.UNPLUGGED:
            out.append(SetState(S.CLOSED))  # a failed unrealize must not leave libxl waiting for Closed
        if self.finished:
            return out
        self.failed = True
        if isinstance(action, Realize) or self.phase is Phase.NEW:
            # Let the class release whatever a half-done realize opened, then never connect this device.
            if self.phase is Phase.LIVE:
                out.append(Unrealize())
            self.phase = Phase.DEAD
        elif self.phase is Phase.LIVE and not isinstance(action, Unrealize | Disconnect):
            # Also after a failed connect: disconnect is idempotent and undoes a half-done connect.
            out.append(Disconnect())
        self.connected = False
        self._set(out, S.CLOSING)
        return out

    def removed(self) -> list[Action]:
        """The backend dir is gone (the toolstack destroyed the device)."""
        out: list[Action] = []
        if self.phase is not Phase.STOPPED:
            self._unrealize(out, Phase.STOPPED)
        return out

    def stop(self, *, close: bool) -> list[Action]:
        """The bus is stopping.  close=False leaves xenstore as it is so a new bus reconnects (restart)."""
        out: list[Action] = []
        if self.finished:
            self.phase = Phase.STOPPED
            return out
        self._unrealize(out, Phase.STOPPED)
        if close:
            self._set(out, S.CLOSED)
        return out

    def closing_for_stop(self) -> list[Action]:
        """First half of a graceful close: ask a connected frontend to close before `stop(close=True)`."""
        out: list[Action] = []
        if self.phase is Phase.LIVE and self.backend is S.CONNECTED:
            self._set(out, S.CLOSING)
        return out
