"""The pure backend state machine, driven with plain observations (no xenstore, no asyncio)."""

from __future__ import annotations

from backends.xenbus.state import (
    Action,
    BackendMachine,
    Connect,
    Disconnect,
    Observation,
    Phase,
    Realize,
    Reconfigure,
    ReportError,
    SetState,
    Unrealize,
    XenbusState,
)

S = XenbusState
BLK = frozenset({S.INITIALISED, S.CONNECTED})
NET = frozenset({S.CONNECTED})


class Harness:
    """Feeds observations like the bus does: the backend key reflects what the machine last wrote."""

    def __init__(self, connect_states: frozenset[XenbusState] = BLK, *, reconfigurable: bool = False) -> None:
        self.m = BackendMachine(connect_states, reconfigurable=reconfigurable)
        self.backend = S.INITIALISING
        self.online = True

    def _apply(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            if isinstance(a, SetState):
                self.backend = a.state
        return actions

    def see(self, fe: XenbusState) -> list[Action]:
        return self._apply(self.m.observe(Observation(fe, self.backend, self.online)))

    def fail(self, msg: str, action: Action | None = None) -> list[Action]:
        return self._apply(self.m.failed_with(msg, action))


def test_normal_connect_and_close() -> None:
    h = Harness()
    assert h.see(S.INITIALISING) == [Realize(), SetState(S.INIT_WAIT)]
    assert h.see(S.INITIALISING) == []  # spurious watch: nothing twice
    assert h.see(S.INITIALISED) == [Connect(), SetState(S.CONNECTED)]
    assert h.see(S.CONNECTED) == []  # Initialised then Connected is one connection, not two
    assert h.see(S.CLOSING) == [SetState(S.CLOSING)]
    assert h.see(S.CLOSED) == [Disconnect(), SetState(S.CLOSED)]
    assert h.see(S.CLOSED) == []
    assert h.m.phase is Phase.LIVE


def test_net_waits_for_connected() -> None:
    h = Harness(NET)
    h.see(S.INITIALISING)
    assert h.see(S.INITIALISED) == []
    assert h.see(S.CONNECTED) == [Connect(), SetState(S.CONNECTED)]


def test_frontend_skips_initwait() -> None:
    h = Harness()
    assert h.see(S.INITIALISED) == [Realize(), Connect(), SetState(S.CONNECTED)]


def test_reboot_reconnect_from_closed() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    h.see(S.CLOSED)
    assert h.see(S.INITIALISING) == [SetState(S.INIT_WAIT)]
    assert h.see(S.INITIALISED) == [Connect(), SetState(S.CONNECTED)]


def test_coalesced_reconnect_disconnects_first() -> None:
    # Closing/Closed/Initialising were missed: the frontend is seen Initialised again while we are Closing.
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    h.see(S.CLOSING)
    assert h.see(S.INITIALISED) == [Disconnect(), Connect(), SetState(S.CONNECTED)]


def test_frontend_reset_without_closing() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    assert h.see(S.INITIALISING) == [Disconnect(), SetState(S.INIT_WAIT)]


def test_unknown_counts_as_closed() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    assert h.see(S.UNKNOWN) == [Disconnect(), SetState(S.CLOSED)]


def test_restart_recovery_reconnects_connected_frontend() -> None:
    h = Harness()
    h.backend = S.CONNECTED  # left by the previous bus
    assert h.see(S.CONNECTED) == [Realize(), Connect(), SetState(S.CONNECTED)]


def test_unplug_connected_waits_for_frontend() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    h.online = False
    assert h.see(S.CONNECTED) == [SetState(S.CLOSING)]
    assert h.see(S.CLOSING) == []
    assert h.see(S.CLOSED) == [Disconnect(), Unrealize(), SetState(S.CLOSED)]
    assert h.m.finished
    assert h.see(S.INITIALISING) == []  # finished: the toolstack removes the dir next
    # A failing unrealize is reported, and Closed is still announced so libxl does not time out.
    assert h.fail("close failed", Unrealize()) == [ReportError("close failed"), SetState(S.CLOSED)]


def test_unplug_libxl_style_state_written_by_toolstack() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    h.online, h.backend = False, S.CLOSING  # libxl writes online=0 and state=5 itself
    assert h.see(S.CONNECTED) == []
    assert h.see(S.CLOSED) == [Disconnect(), Unrealize(), SetState(S.CLOSED)]


def test_toolstack_closing_over_a_connected_frontend_is_no_reconnect() -> None:
    """libxl destroying a hung guest: it writes state=5 over our Connected, online stays 1 (its QEMU path for
    a dying guest's qdisk), and the frontend cannot answer.  No reconnect (its keys are being deleted); the
    rings stay served until the frontend closes or its domain goes."""
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    h.backend = S.CLOSING
    assert h.see(S.CONNECTED) == []
    assert h.see(S.CONNECTED) == []
    assert h.m.connected
    assert h.see(S.CLOSING) == []
    assert h.see(S.CLOSED) == [Disconnect(), SetState(S.CLOSED)]
    assert h.see(S.INITIALISING) == [SetState(S.INIT_WAIT)]  # a later reconnect is the usual one
    assert h.see(S.INITIALISED) == [Connect(), SetState(S.CONNECTED)]


def test_unplug_idle_frontend_closes_at_once() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.online = False
    assert h.see(S.INITIALISING) == [Unrealize(), SetState(S.CLOSED)]


def test_offline_before_realize() -> None:
    h = Harness()
    h.online = False
    assert h.see(S.INITIALISING) == [SetState(S.CLOSED)]
    assert h.m.finished


def test_connect_failure_closes_and_does_not_retry() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.INITIALISED)
    assert h.fail("bad ring-ref", Connect()) == [ReportError("bad ring-ref"), Disconnect(), SetState(S.CLOSING)]
    assert h.see(S.INITIALISED) == []  # still the same frontend: no second try
    assert h.see(S.CONNECTED) == []
    assert h.see(S.CLOSED) == [SetState(S.CLOSED)]
    # The frontend restarts: the failure is forgiven, it may try again.
    assert h.see(S.INITIALISING) == [SetState(S.INIT_WAIT)]
    assert h.see(S.INITIALISED) == [Connect(), SetState(S.CONNECTED)]


def test_realize_failure_is_final() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    assert h.fail("no such file", Realize()) == [ReportError("no such file"), Unrealize(), SetState(S.CLOSING)]
    assert h.see(S.INITIALISED) == []
    assert h.see(S.CLOSED) == [SetState(S.CLOSED)]
    assert h.see(S.INITIALISING) == []
    assert h.m.removed() == []  # unrealize already ran


def test_failed_disconnect_is_not_retried() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    h.see(S.CLOSED)  # [Disconnect, Closed]; say the Disconnect raised
    assert h.fail("stuck", Disconnect()) == [ReportError("stuck"), SetState(S.CLOSING)]
    assert h.see(S.CLOSED) == [SetState(S.CLOSED)]


def test_removed_and_stop() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    assert h.m.removed() == [Disconnect(), Unrealize()]
    assert h.m.removed() == []
    h2 = Harness()
    h2.see(S.INITIALISING)
    h2.see(S.CONNECTED)
    assert h2.m.stop(close=False) == [Disconnect(), Unrealize()]  # xenstore untouched for a restart
    h3 = Harness()
    h3.see(S.INITIALISING)
    h3.see(S.CONNECTED)
    assert h3.m.closing_for_stop() == [SetState(S.CLOSING)]
    assert h3.m.stop(close=True) == [Disconnect(), Unrealize(), SetState(S.CLOSED)]


def test_reconfiguring_is_ignored() -> None:
    h = Harness()
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    assert h.see(S.RECONFIGURING) == []
    assert h.m.connected


def test_hotplug_gate_announces_connected_once_plugged() -> None:
    m = BackendMachine(NET, hotplug_gate=True)
    assert m.observe(Observation(S.INITIALISING, S.INITIALISING, True, plugged=False)) == \
        [Realize(), SetState(S.INIT_WAIT)]
    assert m.observe(Observation(S.CONNECTED, S.INIT_WAIT, True, plugged=False)) == [Connect()]
    assert m.observe(Observation(S.CONNECTED, S.INIT_WAIT, True, plugged=False)) == []  # no reconnect
    assert m.observe(Observation(S.CONNECTED, S.INIT_WAIT, True, plugged=True)) == [SetState(S.CONNECTED)]
    assert m.observe(Observation(S.CONNECTED, S.CONNECTED, True, plugged=True)) == []
    # Restart recovery of a plugged device announces at once; of an unplugged one, not before it is plugged.
    m = BackendMachine(NET, hotplug_gate=True)
    assert m.observe(Observation(S.CONNECTED, S.INIT_WAIT, True, plugged=False)) == [Realize(), Connect()]
    assert m.observe(Observation(S.CONNECTED, S.INIT_WAIT, True, plugged=True)) == [SetState(S.CONNECTED)]
    # Without the gate, `plugged` means nothing.
    h = Harness(NET)
    h.see(S.INITIALISING)
    assert h.m.observe(Observation(S.CONNECTED, S.INIT_WAIT, True, plugged=False)) == [Connect(), SetState(S.CONNECTED)]


def test_reconfiguring_round_trip_keeps_the_connection() -> None:
    """Linux netfront attaching XDP: Reconfiguring -> we re-read (class hook) and answer Reconfigured -> the
    frontend is Connected again -> so are we, with no disconnect/connect in between."""
    h = Harness(NET, reconfigurable=True)
    h.see(S.INITIALISING)
    assert h.see(S.CONNECTED) == [Connect(), SetState(S.CONNECTED)]
    assert h.see(S.RECONFIGURING) == [Reconfigure(), SetState(S.RECONFIGURED)]
    assert h.see(S.RECONFIGURING) == []  # spurious watch: the hook runs once
    assert h.see(S.CONNECTED) == [SetState(S.CONNECTED)]
    assert h.see(S.CONNECTED) == []
    assert h.see(S.RECONFIGURING) == [Reconfigure(), SetState(S.RECONFIGURED)]  # again (XDP detached)
    assert h.see(S.CLOSING) == [SetState(S.CLOSING)]
    assert h.see(S.CLOSED) == [Disconnect(), SetState(S.CLOSED)]


def test_reconfiguring_ignored_without_the_hook_or_before_connect() -> None:
    h = Harness(NET)  # a class without reconfigure_frontend: the frontend waits, nothing breaks
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    assert h.see(S.RECONFIGURING) == []
    assert h.backend is S.CONNECTED
    h2 = Harness(NET, reconfigurable=True)
    h2.see(S.INITIALISING)
    assert h2.see(S.RECONFIGURING) == []  # never connected: nothing to reconfigure
    assert h2.backend is S.INIT_WAIT


def test_restart_finds_frontend_reconfiguring() -> None:
    h = Harness(NET, reconfigurable=True)
    h.backend = S.CONNECTED  # the killed daemon had not answered yet
    assert h.see(S.RECONFIGURING) == [Realize(), Connect(), SetState(S.RECONFIGURED)]
    assert h.see(S.CONNECTED) == [SetState(S.CONNECTED)]
    h2 = Harness(NET, reconfigurable=True)
    h2.backend = S.RECONFIGURED  # it had answered: nothing to write again
    assert h2.see(S.RECONFIGURING) == [Realize(), Connect()]


def test_failed_reconfigure_closes() -> None:
    h = Harness(NET, reconfigurable=True)
    h.see(S.INITIALISING)
    h.see(S.CONNECTED)
    h.see(S.RECONFIGURING)
    assert h.fail("bad xdp-headroom", Reconfigure()) == [ReportError("bad xdp-headroom"), Disconnect(),
                                                          SetState(S.CLOSING)]
    assert h.see(S.CONNECTED) == []  # failed: no reconnect until the frontend restarts
