"""netback's device class: the lifecycle callbacks the bus calls for each `backend/vif` device.

realize: read the toolstack's `mac`/`mtu`/`vifname`/`rate`, create the persistent tap `vif<domid>.<devid>` (or
re-attach the one a previous daemon left), plug it where `bridge` says (backends.net.switch: an OVS port through
OVSDB, a Linux bridge, or nothing), offer netback's features and, unless the toolstack runs a hotplug script
(backend `script`, libxl's), say `hotplug-status=connected` ourselves: the vif exists, is up and is on its switch.
The class has `hotplug_gate`, so Connected is only ever announced once that key says so, as Linux netback holds it
until its hotplug script has run.
connect: the frontend's keys strictly, one tap queue and one C pump per netif queue (rings mapped, event
channel(s) bound, split or not), the tap's offloads from what the frontend takes.  disconnect: stop the pumps,
unmap, unbind, let go of the tap's queues (the interface stays).  unrealize: delete the tap, unless the daemon
is restarting (`dev.restarting`): the next daemon re-attaches to the same interface and rings.
`rate` (watched) is the vif's TX credit, shared by its queues and changed live (csrc/netvif.h); the per-vif key
`pvback-allow-spoof` decides the anti-spoofing check at realize.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.drivers.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap, TapError, preload
from backends.net.commands import (  # `attach nic --queues` / `--allow-spoof`: our own backend keys
    ALLOW_SPOOF_KEY,
    MAX_QUEUES_KEY,
)
from backends.net.dataplane import RULES, NetDataplane, NetQueueConfig, VifControl, VifShared
from backends.net.proto import (
    HOST_MAC,
    BackendOffer,
    FrontendConfig,
    ProtocolError,
    Rate,
    format_mac,
    frontend_key_names,
    parse_frontend,
    parse_mac,
    parse_mtu,
    parse_rate,
    parse_uint,
    parse_xdp_headroom,
    probe_keys,
    vif_name,
)
from backends.net.switch import Attachment, SwitchPlug
from backends.xenbus.device import DeviceError
from backends.xenbus.state import XenbusState

if TYPE_CHECKING:
    from backends.net.config import NetConfig
    from backends.platform.base import EventChannel, GrantMapping
    from backends.xenbus.device import BackendDevice

log = logging.getLogger("pvback.net")

_FE_VALUE_MAX = 32  # a netfront key is a number or 0/1
HOTPLUG_STATUS = "hotplug-status"


def tap_offload(fe: FrontendConfig) -> int:
    """TUN_F_* bits: what the host may hand us for this frontend (partial checksums, TSO frames)."""
    if not fe.rx_csum:
        return 0
    v4, v6 = fe.rx_gso
    return TUN_F_CSUM | (TUN_F_TSO4 if v4 else 0) | (TUN_F_TSO6 if v6 else 0)


@dataclass
class NetVif:
    """Per-device state (BackendDevice.data)."""

    name: str  # the tap's interface name
    mac: bytes  # the guest's MAC (backend `mac`): the anti-spoofing source address
    mtu: int
    offer: BackendOffer
    rate: Rate | None = None
    # The queues' shared C state: the TX credit that enforces `rate` and the RX-stall count behind the carrier.
    shared: VifShared = field(default_factory=VifShared)
    check_mac: bool = True  # drop TX frames whose source MAC is not `mac` ([net] check_mac, per-vif key)
    switch: Attachment = field(default_factory=Attachment)  # where the tap is plugged (backends.net.switch)
    multicast_control: bool = False
    frontend: FrontendConfig | None = None
    tap: Tap | None = None
    queues: list[NetDataplane] = field(default_factory=list)
    control: VifControl | None = None  # ctrl ring, steering, multicast list (shared by the queues)
    xdp_headroom: int = 0  # what RX frames start after (connect, then each Reconfiguring)
    # At realize the backend state said Connected: a previous daemon served this vif (it was killed or
    # restarted), so its control state file is taken up at connect.
    recovering: bool = False
    state_file: Path | None = None
    offload: int = 0
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    dead: str | None = None
    # The queues' last counters once disconnected: a vif disabled for breaking a rule still shows which rule
    # (until it connects again and its new queues count from zero).
    last: list[dict[str, Any]] = field(default_factory=list)
    last_raw: list[dict[str, int]] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        out = []
        raw = []
        for dp in self.queues:
            s = dp.stats()
            if s:
                raw.append(s)
                out.append(metrics_view(s))
        if raw:
            self.last_raw = raw
        # Per-vif numbers (the pvback_device_status gauge and `pvback status`): the credit scheduler's waits
        # and the time TX spent throttled, summed over the queues, and the times the carrier went off.
        src = raw or self.last_raw
        status = {"tx_credit_waits": sum(s.get("tx_credit_waits", 0) for s in src),
                  "tx_throttled_ms": sum(s.get("tx_throttled_ns", 0) for s in src) // 1_000_000,
                  "rx_purges": sum(s.get("rx_purges", 0) for s in src),
                  "carrier_offs": self.shared.carrier_offs,
                  "rate_bytes_per_s": (self.rate.bytes * 1_000_000 // self.rate.usecs) if self.rate else 0}
        return {"queues": out or self.last, "net": self.summary(), "status": {**status, **self.switch.status()}}

    def summary(self) -> dict[str, Any]:
        fe = self.frontend
        return {"vif": self.name, "mac": format_mac(self.mac), "mtu": self.mtu, "queues": len(self.queues),
                "offloads": offload_names(self.offload), "split": bool(fe and any(q.split for q in fe.queues)),
                "rate": f"{self.rate.bytes},{self.rate.usecs}" if self.rate else "",
                "ctrl_ring": bool(fe and fe.ctrl), "multicast_control": self.multicast_control,
                "xdp_headroom": self.xdp_headroom}


def offload_names(flags: int) -> str:
    names = [n for bit, n in ((TUN_F_CSUM, "csum"), (TUN_F_TSO4, "tso4"), (TUN_F_TSO6, "tso6")) if flags & bit]
    return ",".join(names) or "none"


def metrics_view(s: dict[str, int]) -> dict[str, Any]:
    """One queue's C counters in the metrics endpoint's shape (backends.daemon.metrics): requests are packets
    and bytes by netif direction (tx: guest -> host, rx: host -> guest); errors are the slot-rule hits by rule
    name (every TX drop has one) plus the RX frames the frontend could not take; ring_full is the times a
    host frame waited for the frontend to post RX buffers."""
    errors = {name: s.get(f"rule_{name}", 0) for name in RULES[1:]}
    errors["rx_dropped"] = s.get("rx_dropped", 0)
    # The control plane (netctrl.c): ctrl ring requests answered with an error status, MCAST_ADDs refused.
    errors["ctrl"] = s.get("ctrl_errors", 0)
    errors["mcast_full"] = s.get("mcast_full", 0)
    requests = {"tx": s.get("tx_packets", 0), "rx": s.get("rx_packets", 0)}
    for op, key in (("ctrl", "ctrl_requests"), ("mcast_add", "mcast_add"), ("mcast_del", "mcast_del")):
        if s.get(key):
            requests[op] = s[key]
    return {
        "requests": requests,
        "bytes": {"tx": s.get("tx_bytes", 0), "rx": s.get("rx_bytes", 0)},
        "errors": {k: v for k, v in errors.items() if v},
        # handoff: frames steered to a queue whose hand-off ring was full; mcast_filtered: multicast frames the
        # frontend's list does not hold (multicast control on).
        "drops": {"tx": s.get("tx_dropped", 0), "rx": s.get("rx_dropped", 0),
                  "handoff": s.get("rx_handoff_drops", 0), "mcast_filtered": s.get("rx_mcast_filtered", 0)},
        # RX steering by the Toeplitz hash: frames this queue read and handed to another (steered_out), frames
        # handed to it (steered_in), frames that carried a HASH extra to the frontend.
        "shapes": {"steered_out": s.get("rx_steered", 0), "steered_in": s.get("rx_handoff_in", 0),
                   "rx_hash": s.get("rx_hash_extras", 0)},
        "ring_full": s.get("rx_stalls", 0),
    }


class NetDeviceClass:
    connect_states = frozenset({XenbusState.CONNECTED})  # Linux netback connects on the frontend's Connected
    hotplug_gate = True
    watch_backend_keys = ("rate",)
    watch_frontend_keys = ("request-multicast-control",)

    def __init__(self, cfg: NetConfig, type_names: tuple[str, ...] = ("vif",)) -> None:
        self.cfg = cfg
        self.type_names = type_names
        self.taps: dict[str, str] = {}  # interface name -> backend path of the device using it
        self.switch = SwitchPlug(cfg)
        preload()  # at the daemon's start, not in a realize that libxl times

    # -- realize / unrealize ----------------------------------------------------------------------------

    async def realize(self, dev: BackendDevice) -> None:
        try:
            mac = parse_mac(await dev.read_backend("mac"))
            mtu = parse_mtu(await dev.read_backend("mtu"))
            name = vif_name(dev.frontend_id, dev.devid, await dev.read_backend("vifname"))
            cap = await dev.read_backend(MAX_QUEUES_KEY)
            max_queues = parse_uint(cap, MAX_QUEUES_KEY, 1, 64, self.cfg.max_queues)
            # Per vif: `pvback attach nic --allow-spoof` writes 1 (a bridging or VRRP guest), 0 forces the check;
            # absent, [net] check_mac decides.
            allow = await dev.read_backend(ALLOW_SPOOF_KEY)
            check_mac = not parse_uint(allow, ALLOW_SPOOF_KEY, 0, 1, 0 if self.cfg.check_mac else 1)
        except ProtocolError as exc:
            raise DeviceError(f"bad toolstack keys: {exc}") from exc
        owner = self.taps.get(name)
        if owner is not None and owner != dev.backend_path:
            raise DeviceError(f"interface {name} is already the tap of {owner}")
        offer = BackendOffer(max_queues=min(max_queues, self.cfg.max_queues), gso=self.cfg.gso,
                             split_event_channels=self.cfg.split_event_channels, xdp_headroom=self.cfg.xdp_headroom)
        tap = Tap(name, mac=HOST_MAC, mtu=mtu, queues=1)
        try:
            info = await asyncio.to_thread(tap.open)
        except TapError as exc:
            raise DeviceError(f"cannot create the tap: {exc}") from exc
        tap.close()  # the interface stays; connect attaches one fd per negotiated queue
        script = await dev.read_backend("script")
        # -- switch (backends.net.switch): plug the tap where `bridge` says before saying connected ----------
        try:
            att = await self.switch.attach(dev, vif=name, mac=format_mac(mac), tap_created=info.created,
                                           hotplug_script=script)
        except DeviceError:
            if info.created:  # nothing of ours is left behind for a vif that never worked
                await asyncio.to_thread(self._remove_tap, name, mtu, dev)
            raise
        if offer.gso and not att.gso:  # no frame larger than the MTU may reach a switch that drops them
            offer = dataclasses.replace(offer, gso=False)
            dev.log.info("GSO not offered: bridge %s cannot carry frames above the MTU (netdev datapath without "
                         "userspace-tso-enable)", att.bridge, extra={"vif": name})
        # -- end switch ----------------------------------------------------------------------------------------
        self.taps[name] = dev.backend_path
        dev.data = NetVif(name=name, mac=mac, mtu=mtu, offer=offer, check_mac=check_mac, switch=att,
                          recovering=await dev.read_backend("state") in (str(int(XenbusState.CONNECTED)),
                                                                         str(int(XenbusState.RECONFIGURED))))
        # iface-id: the id the port was bound with, for `pvback status` and the toolstack (a later realize reads it
        # back as the override, so it stays stable).
        plugged = {"iface-id": att.iface_id} if att.kind == "ovs" else {}
        # libxl writes `script` for every vif and runs it once the backend is in InitWait; the script says
        # hotplug-status=connected when it has run (contrib/xen/vif-pvback).  Writing it here as well would let a
        # running netfront (xl network-attach) take the backend from InitWait to Connected before libxl has seen
        # InitWait: libxl then times out waiting for a state that has passed, the race libxl's empty
        # hotplug-status guards against with Linux netback.  Without a script (pvback attach nic, other
        # toolstacks) nobody else will: the tap is up and plugged.
        keys = {**probe_keys(offer), **plugged}
        if not script:
            keys[HOTPLUG_STATUS] = "connected"
        await dev.write_backend(keys)
        dev.log.info("realized", extra={"vif": name, "ifindex": info.ifindex, "tap_created": info.created,
                                        "mac": format_mac(mac), "mtu": mtu, "max_queues": offer.max_queues,
                                        "hotplug_script": script or ""})

    async def unrealize(self, dev: BackendDevice) -> None:
        vif: NetVif | None = dev.data
        if vif is None:
            return
        await self.disconnect(dev)
        await self.switch.detach(dev, vif.switch, keep=dev.restarting)  # the port goes before its tap
        if not dev.restarting:
            await asyncio.to_thread(self._remove_tap, vif.name, vif.mtu, dev)
        if self.taps.get(vif.name) == dev.backend_path:
            del self.taps[vif.name]
        dev.log.info("unrealized", extra={"vif": vif.name, "tap_kept": dev.restarting})
        dev.data = None

    @staticmethod
    def _remove_tap(name: str, mtu: int, dev: BackendDevice) -> None:
        try:
            Tap(name, mac=HOST_MAC, mtu=mtu).remove()
        except TapError as exc:
            dev.log.warning("cannot delete the tap: %s", exc, extra={"vif": name})

    # -- connect / disconnect ---------------------------------------------------------------------------

    async def _frontend_keys(self, dev: BackendDevice, max_queues: int) -> dict[str, str]:
        keys: dict[str, str] = {}
        nq_text = await dev.read_frontend("multi-queue-num-queues", max_len=_FE_VALUE_MAX)
        try:
            nq = parse_uint(nq_text, "multi-queue-num-queues", 1, max_queues, 1)
        except ProtocolError as exc:
            raise DeviceError(f"frontend keys: {exc}") from exc
        for k in frontend_key_names(nq):
            v = await dev.read_frontend(k, max_len=_FE_VALUE_MAX)
            if v is not None:
                keys[k] = v
        return keys

    async def connect(self, dev: BackendDevice) -> None:
        vif: NetVif = dev.data
        keys = await self._frontend_keys(dev, vif.offer.max_queues)
        try:
            fe = parse_frontend(keys, max_queues=vif.offer.max_queues)
        except ProtocolError as exc:
            raise DeviceError(f"frontend keys: {exc}") from exc
        if any(q.split for q in fe.queues) and not vif.offer.split_event_channels:
            raise DeviceError("frontend uses split event channels, which were not offered")
        if (fe.gso_tcpv4 or fe.gso_tcpv6) and not fe.sg:
            dev.log.info("frontend asks for GSO without feature-sg: GSO frames not sent to it")
        vif.frontend, vif.dead = fe, None
        vif.xdp_headroom = fe.xdp_headroom
        v4, v6 = fe.rx_gso
        qcfg = NetQueueConfig(frontend_domid=dev.frontend_id, mac=vif.mac, rx_headroom=fe.xdp_headroom,
                              rx_sg=fe.sg, rx_gso_tcpv4=v4, rx_gso_tcpv6=v6, rx_csum=fe.rx_csum,
                              check_mac=vif.check_mac, rx_drain_timeout_ms=self.cfg.rx_drain_timeout_ms,
                              vif=vif.shared, tx_csum_full=not vif.switch.gso, poll_us=self.cfg.poll_us)
        loop = asyncio.get_running_loop()

        def on_dead(message: str) -> None:
            # Linux disables the whole vif (xenvif_fatal_tx_err: carrier off) when one queue breaks a fatal rule.
            vif.dead = message
            task = loop.create_task(dev.fail(f"frontend broke netif: {message}"))
            vif.tasks.add(task)
            task.add_done_callback(vif.tasks.discard)

        tap = Tap(vif.name, mac=HOST_MAC, mtu=vif.mtu, queues=len(fe.queues))
        try:
            await asyncio.to_thread(tap.open)
            vif.tap = tap
            vif.offload = tap_offload(fe)
            tap.set_offload(vif.offload)
        except TapError as exc:
            await self.disconnect(dev)
            raise DeviceError(f"cannot attach the tap: {exc}") from exc
        platform = dev.platform
        try:
            # The control plane first: every queue joins it (steering needs them all; hand-off rings only when
            # a ctrl ring can select the hash), queue 0 serves the ctrl ring.
            vif.control = VifControl(len(fe.queues), dev.frontend_id, platform.gnt, handoff=fe.ctrl is not None)
            vif.control.set_multicast_control(fe.multicast_control and vif.offer.multicast_control)
            await self._state_file(dev, vif, fe)
            if fe.ctrl is not None and not vif.offer.ctrl_ring:
                raise ValueError("frontend set up a ctrl ring, which was not offered")
            for qi, q in enumerate(fe.queues):
                tx, ev_tx = dev.connect_ring([q.tx_ring_ref], q.event_channel_tx)
                rx: GrantMapping | None = None
                ev_rx: EventChannel | None = None
                cring: GrantMapping | None = None
                cev: EventChannel | None = None
                try:
                    rx = platform.map_grants(dev.frontend_id, [q.rx_ring_ref], writable=True)
                    if q.split:
                        ev_rx = platform.bind_interdomain(dev.frontend_id, q.event_channel_rx)
                    if qi == 0 and fe.ctrl is not None:
                        # A ctrl grant we cannot map, or a port we cannot bind, fails this vif (OSError below).
                        cring = platform.map_grants(dev.frontend_id, [fe.ctrl.ring_ref], writable=True)
                        cev = platform.bind_interdomain(dev.frontend_id, fe.ctrl.event_channel)
                    dp = NetDataplane(tx, rx, ev_tx, ev_rx, platform.gnt, tap.fds[qi], qcfg, on_dead=on_dead,
                                      name=f"{vif.name} q{qi}", vif=vif.control, index=qi,
                                      ctrl=(cring, cev) if cring is not None and cev is not None else None)
                except BaseException:
                    for m in (tx, rx, cring):
                        if m is not None:
                            m.unmap()
                    for e in (ev_tx, ev_rx, cev):
                        if e is not None:
                            e.close()
                    raise
                vif.queues.append(dp)
                dp.start(loop)
                # A daemon killed between publishing responses and notifying left the guest waiting for an
                # event nobody would send (restart recovery); a spurious event costs a frontend nothing.
                ev_tx.notify()
                if ev_rx is not None:
                    ev_rx.notify()
                if cev is not None:
                    cev.notify()
        except (OSError, ValueError) as exc:
            await self.disconnect(dev)
            raise DeviceError(f"cannot connect the rings: {exc}") from exc
        dev.log.info("connected", extra={"vif": vif.name, "queues": len(fe.queues),
                                         "split": any(q.split for q in fe.queues), "sg": fe.sg,
                                         "offloads": offload_names(vif.offload), "xdp_headroom": fe.xdp_headroom,
                                         "ctrl_ring": fe.ctrl is not None, "multicast_control": fe.multicast_control})

    async def disconnect(self, dev: BackendDevice) -> None:
        vif: NetVif | None = dev.data
        if vif is None:
            return
        queues, vif.queues = vif.queues, []
        if queues:
            vif.last_raw = [dp.stats() for dp in queues]
            vif.last = [metrics_view(s) for s in vif.last_raw]
        for dp in queues:
            await dp.stop()
        if vif.control is not None:  # after every pump stopped and C queue was freed: they pointed into it
            vif.control.close(discard=None if dev.restarting else vif.state_file)
            vif.control = None
            vif.state_file = None
        for t in list(vif.tasks):
            t.cancel()
        if vif.tap is not None:
            vif.tap.close()
            vif.tap = None
        dev.release_frontend_domain()

    async def _state_file(self, dev: BackendDevice, vif: NetVif, fe: FrontendConfig) -> None:
        """Keep the control state in <run_dir>/<vif>.ctrl; a recovering vif takes up what is there when it is
        this vif's: the same platform, device, rings and ports."""
        if not self.cfg.run_dir or vif.control is None:
            vif.recovering = False
            return
        path = Path(self.cfg.run_dir) / f"{vif.name}.ctrl"
        who = [dev.platform.xenstore_path(), dev.backend_path, str(dev.frontend_id),
               *(f"{q.tx_ring_ref},{q.rx_ring_ref},{q.event_channel_tx},{q.event_channel_rx}" for q in fe.queues),
               f"{fe.ctrl.ring_ref},{fe.ctrl.event_channel}" if fe.ctrl else "-"]
        ident = hashlib.sha256("|".join(who).encode()).digest()[:16]
        # Recovery connects straight from realize, before the bus writes a state: the key still says what the
        # previous daemon wrote.  A frontend that restarted meanwhile went through InitWait: afresh.
        connected = (str(int(XenbusState.CONNECTED)), str(int(XenbusState.RECONFIGURED)))
        load = vif.recovering and await dev.read_backend("state") in connected
        vif.recovering = False
        control = vif.control
        try:
            def open_state() -> bool:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                return control.use_state(path, ident, load=load)

            loaded = await asyncio.to_thread(open_state)
        except OSError as exc:
            dev.log.warning("control state kept in memory only (%s: %s)", path, exc, extra={"vif": vif.name})
            return
        vif.state_file = path
        if loaded:
            dev.log.info("control state taken up", extra={"vif": vif.name, "hash": control.hash_config()["alg"],
                                                          "mcast": control.mcast_count})

    # -- watched keys -----------------------------------------------------------------------------------

    async def key_changed(self, dev: BackendDevice, side: str, key: str, value: str | None) -> None:
        vif: NetVif | None = dev.data
        if vif is None:
            return
        if side == "backend" and key == "rate":
            try:
                vif.rate = parse_rate(value)
            except ProtocolError as exc:
                # Linux: a rate it cannot parse is a warning, and traffic is unlimited.
                vif.rate = None
                dev.log.warning("rate ignored: %s", exc, extra={"vif": vif.name})
            # Live: the queues' shared credit changes at once and queues waiting for credit look again now.
            vif.shared.set_rate(vif.rate.bytes if vif.rate else 0, vif.rate.usecs if vif.rate else 0)
            for dp in vif.queues:
                dp.queue.credit_kick()
            dev.log.info("rate %s", f"{vif.rate.bytes} bytes per {vif.rate.usecs} us" if vif.rate else "unlimited",
                         extra={"vif": vif.name})
        elif side == "frontend" and key == "request-multicast-control":
            # feature-dynamic-multicast-control: the frontend may turn the filter on and off while connected
            # (Linux xen_mcast_ctrl_changed; anything but "1" is off, as xenbus_read_unsigned's 0 default).
            vif.multicast_control = value == "1" and vif.offer.multicast_control
            if vif.control is not None:
                vif.control.set_multicast_control(vif.multicast_control)

    # -- Reconfiguring (the bus's generic hook) ------------------------------------------------------------

    async def reconfigure_frontend(self, dev: BackendDevice) -> None:
        """Linux netfront attaching or detaching an XDP program: it writes `xdp-headroom` and goes Reconfiguring;
        netback reads the headroom (read_xenbus_frontend_xdp) and answers Reconfigured.  The pumps keep
        running: each RX frame after this starts at the new offset."""
        vif: NetVif | None = dev.data
        if vif is None or not vif.queues:
            raise DeviceError("reconfigure: the vif is not connected")
        try:
            headroom = parse_xdp_headroom(await dev.read_frontend("xdp-headroom", max_len=_FE_VALUE_MAX))
        except ProtocolError as exc:
            raise DeviceError(f"frontend keys: {exc}") from exc
        if headroom and not vif.offer.xdp_headroom:
            raise DeviceError("frontend asks for xdp-headroom, which was not offered")
        for dp in vif.queues:
            dp.queue.set_rx_headroom(headroom)
        vif.xdp_headroom = headroom
        dev.log.info("reconfigured", extra={"vif": vif.name, "xdp_headroom": headroom})
