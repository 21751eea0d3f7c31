"""Switch ports on Open vSwitch through OVSDB: the `ovs` package's IDL, run in a thread of its own.

What Xen's `vif-openvswitch` does with `ovs-vsctl` (`del-port; add-port BR vif [tag] [trunks]; set interface
external-ids`) done as OVSDB transactions, without a subprocess.  The IDL's `commit_block()` and
`Poller.block()` block, so the IDL lives in one daemon thread (the pattern of ovsdbapp's `Connection`): callers
post requests and get a `concurrent.futures.Future` (an asyncio caller wraps it), the thread wakes on a pipe.

A port is reported plugged once vswitchd has applied the transaction (`cur_cfg` caught up with the `next_cfg`
the transaction incremented: `ovs-vsctl` without `--no-wait`), so its ofport is known.  The thread remembers
every port it plugged and puts back one that goes missing (ovsdb-server restarted on an empty database, an
operator's `del-port`): counted in `repairs`; reconnections to ovsdb-server are counted in `reconnects`.

A port that exists under the same name is adopted only if it is exactly ours (same bridge, tag, trunks, a
single system interface that vswitchd opened) and the tap was not re-created under it; otherwise it is
deleted and added again in two transactions, each waited for: ovs-userspace.md §3f found that a re-created
tap behind a port deleted and added in one transaction keeps vswitchd's stale socket.

The driver knows no netif and no xenstore: ports, tags and external_ids only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pvback.net.ovs")

DB_NAME = "Open_vSwitch"
COLUMNS: dict[str, list[str]] = {
    "Open_vSwitch": ["bridges", "next_cfg", "cur_cfg", "other_config"],
    "Bridge": ["name", "ports", "datapath_type"],
    "Port": ["name", "interfaces", "tag", "trunks", "external_ids"],
    "Interface": ["name", "type", "external_ids", "ofport", "error"],
}
MAX_VLAN = 4095  # Port.tag / Port.trunks range in vswitch.ovsschema
UNPLUG_TIMEOUT = 5.0


class OvsError(Exception):
    """An OVSDB request failed: the message says which port or bridge and why."""


@dataclass(frozen=True)
class OvsPort:
    """A system port (type "") on `bridge` whose single interface is the tap `name`."""

    bridge: str
    name: str
    tag: int | None = None
    trunks: tuple[int, ...] = ()
    external_ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BridgeInfo:
    name: str
    datapath_type: str  # "" means "system" (the kernel datapath)
    userspace_tso: bool  # Open_vSwitch other_config:userspace-tso-enable=true

    @property
    def carries_gso(self) -> bool:
        """OVS 3.1's netdev datapath drops a frame larger than the MTU unless userspace TSO is on."""
        return self.datapath_type not in ("netdev",) or self.userspace_tso


@dataclass(frozen=True)
class PortInfo:
    bridge: str
    name: str
    ofport: int | None
    tag: int | None
    trunks: tuple[int, ...]
    error: str
    adopted: bool = False  # an existing port of ours was kept


def fetch_schema(remote: str, timeout: float = 2.0) -> dict[str, Any]:
    """RFC 7047 `get_schema` from the server itself: no dependency on an installed vswitch.ovsschema, and the
    IDL then matches the server's version."""
    kind, _, where = remote.partition(":")
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr: Any = where
    elif kind == "tcp":
        host, _, port = where.rpartition(":")
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        addr = (host.strip("[]"), int(port))
    else:
        raise OvsError(f"OVSDB remote {remote!r}: only unix:PATH and tcp:HOST:PORT are supported")
    with s:
        s.settimeout(timeout)
        s.connect(addr)
        s.sendall(json.dumps({"method": "get_schema", "params": [DB_NAME], "id": 0}).encode())
        buf = b""
        dec = json.JSONDecoder()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("ovsdb-server closed the connection during get_schema")
            buf += chunk
            try:
                msg, _ = dec.raw_decode(buf.decode())
            except ValueError:
                continue
            if msg.get("error"):
                raise OvsError(f"get_schema: {msg['error']}")
            result: dict[str, Any] = msg["result"]
            return result


def _scalar(v: Any) -> Any:
    """Optional columns read back as a list of 0 or 1 values in the Python IDL."""
    if isinstance(v, list):
        return v[0] if v else None
    return v


@dataclass
class _Op:
    kind: str  # "plug", "unplug", "bridge", "port", "repair"
    fut: Future[Any] | None
    deadline: float
    port: OvsPort | None = None
    name: str = ""
    replace: bool = False
    phase: str = "start"  # plug: "start" -> ("del" ->) "add" -> done
    txn: Any = None
    want_cfg: int | None = None
    adopted: bool = False


class OvsdbSwitch:
    """One IDL connection to `remote`, served by its thread from `start()` to `close()`."""

    def __init__(self, remote: str, schema: dict[str, Any], *, timeout: float = 30.0,
                 probe_interval_ms: int = 5000) -> None:
        self.remote = remote
        self.schema = schema
        self.timeout = timeout
        self.probe_interval_ms = probe_interval_ms
        self.reconnects = 0
        self.repairs = 0
        self.port_repairs: dict[str, int] = {}  # by port name, kept after an unplug (a vif may come back)
        self.connected = False
        self._ports: dict[str, OvsPort] = {}  # what we plugged and keep plugged (thread-owned)
        self._requests: deque[_Op] = deque()
        self._new_waits: list[tuple[str, str, str, Future[bool], float]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._idl: Any = None
        self._ops: deque[_Op] = deque()
        # (interface, key, value, future, deadline): waits that must not hold up the transaction queue
        self._waits: list[tuple[str, str, str, Future[bool], float]] = []
        self._ever_connected = False
        self._reconciled_seqno = -1
        self._missing_logged: set[str] = set()

    # -- the caller's side (any thread) ---------------------------------------------------------------------

    def start(self) -> None:
        """Build the IDL here and serve it from a new thread.  Here, not in that thread: the IDL names itself
        with uuid.uuid1(), and libuuid keeps one file descriptor open per thread that ever called it (never
        closed when the thread ends), so a thread per connection would leak one fd per reconnection cycle."""
        import ovs.db.idl

        helper = ovs.db.idl.SchemaHelper(schema_json=self.schema)
        for table, cols in COLUMNS.items():
            helper.register_columns(table, cols)
        self._idl = ovs.db.idl.Idl(self.remote, helper, probe_interval=self.probe_interval_ms)
        self._thread = threading.Thread(target=self._main, name=f"ovsdb {self.remote}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The thread serves requests (False once closed, or if it died on a bug: see the log)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def close(self) -> None:
        """Stop the thread (pending requests fail) and close the connection.  The ports stay in the database."""
        with self._lock:
            self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._rfd = self._wfd = -1

    def plug(self, port: OvsPort, *, replace: bool = False) -> Future[PortInfo]:
        """Add (or adopt) the port; resolved once vswitchd applied it.  replace: never adopt an existing port
        of that name (the tap under it was just created)."""
        _check_port(port)
        return self._post(_Op("plug", Future(), 0.0, port=port, name=port.name, replace=replace))

    def unplug(self, name: str) -> Future[None]:
        """Forget the port and delete it from whichever bridge has it (absent: fine).  Resolved once the
        database has it deleted; bounded by UNPLUG_TIMEOUT (an unreachable ovsdb-server must not stall a
        detach: a port left behind is replaced by the next plug of that name)."""
        return self._post(_Op("unplug", Future(), 0.0, name=name), timeout=min(self.timeout, UNPLUG_TIMEOUT))

    def forget(self, name: str) -> Future[None]:
        """Stop keeping the port plugged, but leave it in the database (a daemon restarting over its vifs)."""
        return self._post(_Op("forget", Future(), 0.0, name=name))

    def bridge(self, name: str) -> Future[BridgeInfo | None]:
        return self._post(_Op("bridge", Future(), 0.0, name=name))

    def port(self, name: str) -> Future[PortInfo | None]:
        return self._post(_Op("port", Future(), 0.0, name=name))

    def wait_external_id(self, name: str, key: str, value: str, timeout: float) -> Future[bool]:
        """True once Interface `name` has external_ids:key=value (ovn-controller's `ovn-installed=true` once
        the port's flows are in), False if `timeout` seconds pass first."""
        fut: Future[bool] = Future()
        with self._lock:
            if self._stop or self._thread is None:
                fut.set_exception(OvsError("the OVSDB connection is closed"))
                return fut
            self._new_waits.append((name, key, value, fut, time.monotonic() + timeout))
        self._wake()
        return fut

    def _post(self, op: _Op, timeout: float | None = None) -> Future[Any]:
        assert op.fut is not None
        op.deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            if self._stop or self._thread is None:
                op.fut.set_exception(OvsError("the OVSDB connection is closed"))
                return op.fut
            self._requests.append(op)
        self._wake()
        return op.fut

    def _wake(self) -> None:
        try:
            os.write(self._wfd, b"x")
        except OSError:
            pass  # pipe full (a wake-up is pending anyway) or closed

    # -- the thread -----------------------------------------------------------------------------------------

    def _main(self) -> None:
        import ovs.poller

        try:
            while True:
                with self._lock:
                    stop = self._stop
                    self._ops.extend(self._requests)
                    self._requests.clear()
                    self._waits.extend(self._new_waits)
                    self._new_waits.clear()
                if stop:
                    break
                self._idl.run()
                self._track_connection()
                self._step()
                self._check_waits()
                self._expire()
                poller = ovs.poller.Poller()
                poller.fd_wait(self._rfd, ovs.poller.POLLIN)
                self._idl.wait(poller)
                if self._ops and self._ops[0].txn is not None:
                    self._ops[0].txn.wait(poller)
                poller.timer_wait(1000)
                deadlines = [o.deadline for o in self._ops] + [w[4] for w in self._waits]
                if deadlines:
                    poller.timer_wait(max(0, int((min(deadlines) - time.monotonic()) * 1000)))
                poller.block()
                try:
                    while os.read(self._rfd, 512):
                        pass
                except BlockingIOError:
                    pass
        except Exception:
            log.exception("OVSDB thread failed")
        finally:
            with self._lock:  # from here on, requests fail at once instead of waiting for a thread that is gone
                self._stop = True
                self._ops.extend(self._requests)
                self._requests.clear()
                self._waits.extend(self._new_waits)
                self._new_waits.clear()
            for op in self._ops:
                _fail(op, OvsError("the OVSDB connection is closed"))
            self._ops.clear()
            for *_, fut, _d in self._waits:
                if not fut.done():
                    fut.set_exception(OvsError("the OVSDB connection is closed"))
            self._waits.clear()
            if self._idl is not None:
                self._idl.close()
                self._idl = None

    def _track_connection(self) -> None:
        import ovs.db.idl

        up = self._idl.state == ovs.db.idl.Idl.IDL_S_MONITORING
        if up == self.connected:
            return
        self.connected = up
        if up:
            if self._ever_connected:
                self.reconnects += 1
                log.warning("reconnected to OVSDB %s (reconnect #%d): checking %d port(s)", self.remote,
                            self.reconnects, len(self._ports), extra={"ovsdb": self.remote})
            else:
                log.info("connected to OVSDB %s", self.remote, extra={"ovsdb": self.remote})
            self._ever_connected = True
            self._reconciled_seqno = -1
        else:
            log.warning("lost the OVSDB connection to %s", self.remote, extra={"ovsdb": self.remote})

    def _check_waits(self) -> None:
        now = time.monotonic()
        keep = []
        for w in self._waits:
            name, key, value, fut, deadline = w
            if fut.done():
                continue
            iface = next((i for i in self._idl.tables["Interface"].rows.values() if i.name == name), None) \
                if self.connected else None
            if iface is not None and dict(iface.external_ids).get(key) == value:
                fut.set_result(True)
            elif deadline <= now:
                fut.set_result(False)
            else:
                keep.append(w)
        self._waits = keep

    def _expire(self) -> None:
        now = time.monotonic()
        for op in list(self._ops):
            if op.fut is not None and op.deadline <= now:
                why = "ovsdb-server is not reachable" if not self.connected else \
                    "ovs-vswitchd did not apply the change (is it running?)" if op.want_cfg is not None else \
                    "no answer from ovsdb-server"
                _fail(op, OvsError(f"{op.kind} {op.name}: timed out after {self.timeout:g} s: {why}"))
                self._ops.remove(op)
            elif op.fut is None and op.deadline <= now:
                self._ops.remove(op)  # a repair that could not complete: the next reconcile tries again

    def _step(self) -> None:
        """Advance the head operation (one transaction at a time), then reconcile when idle."""
        while self._ops and self.connected:
            op = self._ops[0]
            if op.fut is not None and op.fut.cancelled():
                self._ops.popleft()
                continue
            try:
                done = self._advance(op)
            except OvsError as exc:
                _fail(op, exc)
                done = True
            if not done:
                return
            self._ops.popleft()
        if self.connected and not self._ops and self._reconciled_seqno != self._idl.change_seqno:
            self._reconciled_seqno = self._idl.change_seqno
            self._reconcile()

    def _advance(self, op: _Op) -> bool:
        """True when op is finished (its future resolved)."""
        import ovs.db.idl

        T = ovs.db.idl.Transaction
        if op.want_cfg is not None:
            if (self._root().cur_cfg or 0) < op.want_cfg:
                return False
            op.want_cfg = None
            return self._after_commit(op)
        if op.txn is None:
            if op.kind in ("bridge", "port", "forget"):
                _resolve(op, self._query(op))
                return True
            op.txn = self._build(op)
            if op.txn is None:
                return self._after_commit(op)
        status = op.txn.commit()
        if status == T.INCOMPLETE:
            return False
        txn, op.txn = op.txn, None
        if status == T.TRY_AGAIN:
            return False  # rebuilt from fresh rows at the next step
        if status == T.SUCCESS and op.kind == "unplug":
            # Deleted from the database is enough: the tap goes next anyway, and a dead vswitchd must not hold
            # up a detach (it drops the port when it comes back).
            return self._after_commit(op)
        if status == T.SUCCESS:
            op.want_cfg = txn.get_increment_new_value()
            return self._advance(op)
        if status == T.UNCHANGED:
            return self._after_commit(op)
        raise OvsError(f"{op.kind} {op.name}: transaction {status}: {txn.get_error() or 'no detail'}")

    def _query(self, op: _Op) -> Any:
        if op.kind == "bridge":
            br = self._bridge_row(op.name)
            if br is None:
                return None
            other = self._root().other_config or {}
            return BridgeInfo(br.name, br.datapath_type or "", other.get("userspace-tso-enable") == "true")
        if op.kind == "forget":
            self._ports.pop(op.name, None)
            return None
        return self._port_info(op.name)

    def _build(self, op: _Op) -> Any:
        """The transaction for the op's current phase, or None when nothing needs changing."""
        import ovs.db.idl

        br_row, port_row = self._find_port(op.name)
        if op.kind == "unplug":
            self._ports.pop(op.name, None)
            if port_row is None or br_row is None:
                return None
            txn = ovs.db.idl.Transaction(self._idl)
            txn.add_comment(f"pvback: del-port {op.name}")
            br_row.delvalue("ports", port_row.uuid)
            self._root().increment("next_cfg")
            return txn
        assert op.port is not None
        want = op.port
        target = self._bridge_row(want.bridge)
        if target is None:
            raise OvsError(f"bridge {want.bridge} does not exist in OVSDB {self.remote}")
        if op.phase == "start":
            if port_row is None:
                op.phase = "add"
            elif not op.replace and self._is_ours(br_row, port_row, want):
                op.phase, op.adopted = "adopt", True
            else:
                op.phase = "del"
        if op.phase == "adopt":
            iface = port_row.interfaces[0]
            ids = dict(want.external_ids)
            if dict(iface.external_ids) == ids and dict(port_row.external_ids) == ids:
                return None
            txn = ovs.db.idl.Transaction(self._idl)
            txn.add_comment(f"pvback: external_ids of {op.name}")
            iface.external_ids = ids
            port_row.external_ids = ids
            self._root().increment("next_cfg")
            return txn
        if op.phase == "del":
            if port_row is not None and br_row is not None:
                txn = ovs.db.idl.Transaction(self._idl)
                txn.add_comment(f"pvback: replace stale port {op.name}")
                br_row.delvalue("ports", port_row.uuid)
                self._root().increment("next_cfg")
                log.info("replacing the existing port %s on %s", op.name, br_row.name,
                         extra={"vif": op.name, "bridge": br_row.name})
                return txn
            op.phase = "add"
        if port_row is not None:
            raise OvsError(f"port {op.name} appeared on {br_row.name} while pvback was adding it")
        txn = ovs.db.idl.Transaction(self._idl)
        txn.add_comment(f"pvback: add-port {want.bridge} {want.name}")
        iface = txn.insert(self._idl.tables["Interface"])
        iface.name = want.name
        iface.type = ""
        iface.external_ids = dict(want.external_ids)
        port = txn.insert(self._idl.tables["Port"])
        port.name = want.name
        port.interfaces = [iface]
        port.external_ids = dict(want.external_ids)
        if want.tag is not None:
            port.tag = want.tag
        if want.trunks:
            port.trunks = list(want.trunks)
        target.addvalue("ports", port.uuid)
        self._root().increment("next_cfg")
        return txn

    def _after_commit(self, op: _Op) -> bool:
        """Called when the op's transaction was applied (or nothing needed applying)."""
        if op.kind == "unplug":
            _resolve(op, None)
            return True
        assert op.port is not None
        if op.phase == "del":  # the stale port's delete was applied: now the add, as a second transaction
            op.phase = "add"
            return self._advance(op)
        info = self._port_info(op.name)
        if info is None or info.bridge != op.port.bridge:
            if op.kind == "repair":
                return True
            raise OvsError(f"port {op.name} vanished from {op.port.bridge} right after it was added")
        if op.kind == "repair":
            self.repairs += 1
            self.port_repairs[op.name] = self.port_repairs.get(op.name, 0) + 1
            log.warning("put back the missing port %s on %s (repair #%d, ofport %s)", op.name, op.port.bridge,
                        self.repairs, info.ofport, extra={"vif": op.name, "bridge": op.port.bridge})
            return True
        if info.error or info.ofport is None or info.ofport < 0:
            raise OvsError(f"ovs-vswitchd cannot open {op.name} on {op.port.bridge}: "
                           f"{info.error or 'no ofport assigned'}")
        self._ports[op.name] = op.port
        _resolve(op, PortInfo(info.bridge, info.name, info.ofport, info.tag, info.trunks, info.error, op.adopted))
        return True

    def _reconcile(self) -> None:
        for name, want in self._ports.items():
            br_row, port_row = self._find_port(name)
            if port_row is not None and br_row is not None and br_row.name == want.bridge:
                self._missing_logged.discard(name)
                continue
            if self._bridge_row(want.bridge) is None:
                if name not in self._missing_logged:
                    self._missing_logged.add(name)
                    log.error("port %s is missing and its bridge %s does not exist: put back once it does",
                              name, want.bridge, extra={"vif": name, "bridge": want.bridge})
                continue
            self._missing_logged.discard(name)
            self._ops.append(_Op("repair", None, time.monotonic() + self.timeout, port=want, name=name,
                                 replace=True))
        if self._ops:
            self._step()

    # -- rows -----------------------------------------------------------------------------------------------

    def _root(self) -> Any:
        return next(iter(self._idl.tables["Open_vSwitch"].rows.values()))

    def _bridge_row(self, name: str) -> Any:
        for br in self._idl.tables["Bridge"].rows.values():
            if br.name == name:
                return br
        return None

    def _find_port(self, name: str) -> tuple[Any, Any]:
        """(bridge, port) of the port called `name` that a bridge holds; (None, None) if none does."""
        for br in self._idl.tables["Bridge"].rows.values():
            for p in br.ports:
                if p.name == name:
                    return br, p
        return None, None

    def _is_ours(self, br: Any, port: Any, want: OvsPort) -> bool:
        ifaces = list(port.interfaces)
        if br.name != want.bridge or len(ifaces) != 1:
            return False
        iface = ifaces[0]
        ofport = _scalar(iface.ofport)
        return (iface.name == want.name and iface.type == "" and _scalar(port.tag) == want.tag
                and tuple(sorted(port.trunks)) == tuple(sorted(want.trunks))
                and ofport is not None and ofport > 0 and not _scalar(iface.error))

    def _port_info(self, name: str) -> PortInfo | None:
        br, port = self._find_port(name)
        if port is None:
            return None
        iface = next((i for i in port.interfaces if i.name == name), None)
        ofport = _scalar(iface.ofport) if iface is not None else None
        error = (_scalar(iface.error) or "") if iface is not None else "no interface"
        return PortInfo(br.name, name, ofport, _scalar(port.tag), tuple(sorted(port.trunks)), error)


def _check_port(port: OvsPort) -> None:
    if not port.bridge or not port.name:
        raise OvsError("a port needs a bridge and a name")
    for v in ([port.tag] if port.tag is not None else []) + list(port.trunks):
        if not 0 <= v <= MAX_VLAN:
            raise OvsError(f"VLAN {v} outside 0..{MAX_VLAN}")


def _resolve(op: _Op, value: Any) -> None:
    if op.fut is not None and not op.fut.done():
        op.fut.set_result(value)


def _fail(op: _Op, exc: BaseException) -> None:
    if op.fut is not None and not op.fut.done():
        op.fut.set_exception(exc)
    elif op.fut is None:
        log.warning("%s %s failed: %s", op.kind, op.name, exc, extra={"vif": op.name})


__all__ = ["BridgeInfo", "OvsError", "OvsPort", "OvsdbSwitch", "PortInfo", "fetch_schema"]
