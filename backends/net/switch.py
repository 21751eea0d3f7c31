"""Where a vif's tap is plugged: the toolstack's `bridge` key, read as Xen's `vif-openvswitch` reads it, and
the switch it names — an Open vSwitch bridge (a port through OVSDB: backends.drivers.net.ovsdb), a Linux bridge
(the tap enslaved, as libxl's `vif-bridge`), or nothing (no key: the tap stays unbridged).

`bridge` syntax (vif-openvswitch): `BR`, `BR.VLAN` (access port, tag VLAN), `BR:T1:T2` (trunk port),
`BR.VLAN:T1:T2` (both columns set, as the script does).  The OVS port and its interface carry the external_ids
that OVN, XenServer and the Xen script agree on (netback-ovs-vtpm.md §2.1): attached-mac (the guest's MAC),
xen-vm-name, xen-vm-uuid, vm-id (the domain UUID), iface-status=active and iface-id (OVN binds the logical
port of that name: by default the domain UUID and the devid, stable across reboots and migration; the backend
key `iface-id` or `[net] iface_id` override it).

Nothing here touches a ring: the device class calls `attach` in realize (before `hotplug-status=connected`) and
`detach` in unrealize.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends.drivers.net import linuxbridge
from backends.drivers.net.ovsdb import BridgeInfo, OvsdbSwitch, OvsError, OvsPort, PortInfo, fetch_schema
from backends.net.proto import ProtocolError
from backends.xenbus.device import DeviceError
from backends.xenstore.client import XenStoreError

if TYPE_CHECKING:
    from backends.net.config import NetConfig
    from backends.xenbus.device import BackendDevice

log = logging.getLogger("pvback.net")

_BRIDGE = re.compile(r"^([^.:]+)(?:\.([0-9]+))?(?::([0-9]+(?::[0-9]+)*))?$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_ID_FIELDS = ("vm_uuid", "vm_name", "domid", "devid", "vif")
MAX_VLAN = 4095
MAX_NAME = 255  # a domain name as an external_ids value
IFNAMSIZ = 15


@dataclass(frozen=True)
class BridgeSpec:
    name: str
    tag: int | None = None
    trunks: tuple[int, ...] = ()

    def __str__(self) -> str:
        tag = f".{self.tag}" if self.tag is not None else ""
        return self.name + tag + "".join(f":{t}" for t in self.trunks)


def parse_bridge(text: str) -> BridgeSpec:
    """The `bridge` key, strictly (vif-openvswitch's `^([^.:]+)(\\.([0-9]+))?(:([0-9]+(:[0-9]+)*))?$`), plus
    what the script leaves to ovs-vsctl to refuse: VLANs in 0..4095 and a name that can be an interface."""
    m = _BRIDGE.match(text)
    if m is None:
        raise ProtocolError(f"bridge {text!r}: expected BR, BR.VLAN, BR:T1[:T2...] or BR.VLAN:T1[:T2...]")
    name = m[1]
    if len(name) > IFNAMSIZ or any(c.isspace() or c == "/" or not c.isprintable() for c in name):
        raise ProtocolError(f"bridge {text!r}: {name!r} cannot be an interface name")
    vlans = ([int(m[2])] if m[2] is not None else []) + ([int(t) for t in m[3].split(":")] if m[3] else [])
    bad = [v for v in vlans if v > MAX_VLAN]
    if bad:
        raise ProtocolError(f"bridge {text!r}: VLAN {bad[0]} outside 0..{MAX_VLAN}")
    trunks = tuple(int(t) for t in m[3].split(":")) if m[3] else ()
    return BridgeSpec(name, int(m[2]) if m[2] is not None else None, trunks)


def default_iface_id(template: str, **fields: str) -> str:
    """`[net] iface_id` with its fields filled; a field the domain does not have (no UUID in xenstore) makes
    the id the vif's name, which is unique on this host at least."""
    try:
        out = template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ProtocolError(f"[net] iface_id {template!r}: {exc} (fields: {', '.join(_ID_FIELDS)})") from exc
    needs = [f for f in _ID_FIELDS if "{" + f + "}" in template]
    if any(not fields.get(f) for f in needs):
        return fields["vif"]
    return out


def external_ids(*, mac: str, vm_name: str, vm_uuid: str, iface_id: str) -> dict[str, str]:
    """The keys on the Interface and the Port (netback-ovs-vtpm.md §2.1).  A name or UUID the domain does not
    have is left out rather than written empty."""
    ids = {"attached-mac": mac, "iface-id": iface_id, "iface-status": "active"}
    if vm_name:
        ids["xen-vm-name"] = vm_name
    if vm_uuid:
        ids["xen-vm-uuid"] = vm_uuid
        ids["vm-id"] = vm_uuid
    return ids


@dataclass
class Attachment:
    """Where a vif is plugged (NetVif.switch)."""

    kind: str = "none"  # "ovs", "linux" or "none"
    bridge: str = ""
    port: str = ""
    tag: int | None = None
    trunks: tuple[int, ...] = ()
    iface_id: str = ""
    ofport: int | None = None
    gso: bool = True  # the switch carries frames larger than the MTU (TSO/GSO to and from the guest)
    counters: Callable[[], dict[str, int]] | None = field(default=None, repr=False, compare=False)

    def status(self) -> dict[str, int]:
        """Numbers for the metrics endpoint (pvback_device_status) and `pvback status`."""
        out = {"ovs_ofport": self.ofport} if self.ofport is not None else {}
        return {**out, **(self.counters() if self.counters is not None else {})}

    def summary(self) -> dict[str, Any]:
        return {"switch": self.kind, "bridge": self.bridge, "port": self.port,
                "ofport": self.ofport if self.ofport is not None else "",
                "tag": str(self.tag) if self.tag is not None else "", "trunks": ",".join(map(str, self.trunks)),
                "iface_id": self.iface_id}


class SwitchPlug:
    """One per device class: plugs and unplugs vifs; owns the OVSDB connection while any vif is on OVS."""

    def __init__(self, cfg: NetConfig) -> None:
        self.cfg = cfg
        self.ovs: OvsdbSwitch | None = None
        self._users: set[str] = set()  # vifs plugged into OVS (the connection lives while one is)

    async def _switch(self) -> OvsdbSwitch:
        if self.ovs is not None and not self.ovs.alive:  # its thread died (logged): start a new connection
            dead, self.ovs = self.ovs, None
            dead.close()
        if self.ovs is None:
            try:
                schema = await asyncio.to_thread(fetch_schema, self.cfg.ovsdb)
            except (OSError, ValueError, KeyError) as exc:
                raise OvsError(f"cannot reach OVSDB at {self.cfg.ovsdb}: {exc}") from exc
            if self.ovs is None:  # another vif's realize may have connected meanwhile
                sw = OvsdbSwitch(self.cfg.ovsdb, schema, timeout=self.cfg.ovs_timeout)
                try:
                    sw.start()  # on the event loop's thread: see OvsdbSwitch.start
                except ImportError as exc:
                    sw.close()
                    raise OvsError(f"the Python package `ovs` (OVSDB IDL) is not installed: {exc}") from exc
                self.ovs = sw
        return self.ovs

    def _release(self, vif: str) -> None:
        self._users.discard(vif)
        if not self._users and self.ovs is not None:
            ovs, self.ovs = self.ovs, None
            ovs.close()

    async def _kind(self, spec: BridgeSpec) -> str:
        mode = self.cfg.switch
        if mode in ("ovs", "linux"):
            return mode
        if await asyncio.to_thread(linuxbridge.is_linux_bridge, spec.name):
            return "linux"
        kind, _, where = self.cfg.ovsdb.partition(":")
        if kind != "unix" or os.path.exists(where):
            return "ovs"
        raise DeviceError(f"bridge {spec.name}: no Linux bridge of that name and no OVSDB at {self.cfg.ovsdb}")

    async def attach(self, dev: BackendDevice, *, vif: str, mac: str, tap_created: bool,
                     hotplug_script: str | None = None) -> Attachment:
        text = await dev.read_backend("bridge")
        if not text or self.cfg.switch == "none":
            if text:
                dev.log.info("bridge %s ignored ([net] switch = \"none\")", text, extra={"vif": vif})
            return Attachment()
        try:
            spec = parse_bridge(text)
        except ProtocolError as exc:
            raise DeviceError(f"bad toolstack keys: {exc}") from exc
        try:
            kind = await self._kind(spec)
        except DeviceError as exc:
            if not hotplug_script:
                raise
            # libxl writes bridge=xenbr0 for a vif line that names none, and runs its hotplug script: a host
            # without that bridge (a routed or addressed vif) is the script's to handle, as with vif-bridge.
            dev.log.warning("%s: the tap stays unplugged; the hotplug script %s has the last word", exc,
                            hotplug_script, extra={"vif": vif})
            return Attachment()
        if kind == "linux":
            if spec.tag is not None or spec.trunks:
                raise DeviceError(f"bridge {spec}: VLAN tags and trunks need an Open vSwitch bridge "
                                  f"({spec.name} is a Linux bridge)")
            try:
                await asyncio.to_thread(linuxbridge.enslave, spec.name, vif)
            except linuxbridge.BridgeError as exc:
                raise DeviceError(f"Linux bridge: {exc.strerror}") from exc
            dev.log.info("plugged into Linux bridge %s", spec.name, extra={"vif": vif, "bridge": spec.name})
            return Attachment("linux", spec.name, vif)
        return await self._attach_ovs(dev, spec, vif=vif, mac=mac, tap_created=tap_created,
                                      hotplug_script=hotplug_script)

    async def _attach_ovs(self, dev: BackendDevice, spec: BridgeSpec, *, vif: str, mac: str,
                          tap_created: bool, hotplug_script: str | None = None) -> Attachment:
        vm_name, vm_uuid = await domain_identity(dev)
        override = await dev.read_backend("iface-id")
        try:
            if override is not None:
                if not override or len(override) > MAX_NAME or not override.isprintable():
                    raise ProtocolError(f"iface-id {override!r}: expected 1..{MAX_NAME} printable characters")
                iface_id = override
            else:
                iface_id = default_iface_id(self.cfg.iface_id, vm_uuid=vm_uuid, vm_name=vm_name,
                                            domid=str(dev.frontend_id), devid=str(dev.devid), vif=vif)
        except ProtocolError as exc:
            raise DeviceError(str(exc)) from exc
        ids = external_ids(mac=mac, vm_name=vm_name, vm_uuid=vm_uuid, iface_id=iface_id)
        self._users.add(vif)
        br: BridgeInfo | None = None
        try:
            sw = await self._switch()
            br = await asyncio.wrap_future(sw.bridge(spec.name))
            if br is None and hotplug_script:
                # As without OVSDB (attach): libxl's default bridge=xenbr0 on a host whose OVS has no such bridge
                # (a routed or addressed vif beside OVS-bridged ones) is the hotplug script's to handle.
                self._release(vif)
                dev.log.warning("bridge %s: no such OVS bridge in %s nor Linux bridge; the tap stays unplugged, "
                                "the hotplug script %s has the last word", spec.name, self.cfg.ovsdb, hotplug_script,
                                extra={"vif": vif})
                return Attachment()
            if br is None:
                raise OvsError(f"bridge {spec.name} does not exist (no such OVS bridge in {self.cfg.ovsdb} and no "
                               "Linux bridge of that name)")
            port = OvsPort(spec.name, vif, spec.tag, spec.trunks, ids)
            info: PortInfo = await asyncio.wrap_future(sw.plug(port, replace=tap_created))
        except OvsError as exc:
            if br is not None:  # a port that was added but never applied (vswitchd down) is not left behind
                with contextlib.suppress(OvsError):
                    await asyncio.wrap_future(sw.unplug(vif))
            self._release(vif)
            raise DeviceError(f"Open vSwitch: {exc}") from exc
        if self.cfg.ovn_installed_timeout > 0:
            t = self.cfg.ovn_installed_timeout
            try:
                seen = await asyncio.wrap_future(sw.wait_external_id(vif, "ovn-installed", "true", t))
            except OvsError as exc:
                self._release(vif)
                raise DeviceError(f"Open vSwitch: {exc}") from exc
            if not seen:
                dev.log.warning("ovn-installed not set on %s within %g s (iface-id %s): connected anyway", vif, t,
                                iface_id, extra={"vif": vif, "iface_id": iface_id})
        dev.log.info("plugged into OVS bridge %s", spec.name,
                     extra={"vif": vif, "bridge": spec.name, "ofport": info.ofport, "tag": spec.tag,
                            "trunks": ",".join(map(str, spec.trunks)), "iface_id": iface_id,
                            "adopted": info.adopted, "datapath": br.datapath_type or "system",
                            "gso": br.carries_gso})

        def counters() -> dict[str, int]:
            # The connection's reconnects (shared by its vifs) and this port's repairs.
            return {"ovsdb_reconnects": sw.reconnects, "ovs_port_repairs": sw.port_repairs.get(vif, 0),
                    "ovsdb_connected": int(sw.connected)}

        return Attachment("ovs", spec.name, vif, spec.tag, spec.trunks, iface_id, info.ofport, br.carries_gso,
                          counters)

    async def detach(self, dev: BackendDevice, att: Attachment, *, keep: bool) -> None:
        """Unplug (the port leaves the switch); `keep`: a restarting daemon leaves the port for its successor."""
        if att.kind == "ovs" and self.ovs is not None:
            try:
                fut = self.ovs.forget(att.port) if keep else self.ovs.unplug(att.port)
                await asyncio.wrap_future(fut)
            except OvsError as exc:
                dev.log.warning("cannot remove the OVS port: %s", exc, extra={"vif": att.port})
            finally:
                self._release(att.port)
        elif att.kind == "linux" and not keep:
            try:
                await asyncio.to_thread(linuxbridge.release, att.port)
            except linuxbridge.BridgeError as exc:
                dev.log.warning("%s", exc.strerror, extra={"vif": att.port})


async def domain_identity(dev: BackendDevice) -> tuple[str, str]:
    """(name, UUID) of the frontend's domain as the toolstack wrote them: /local/domain/N/name, and the UUID
    under /local/domain/N/vm (libxl: /vm/<uuid>, with a `uuid` node).  "" when absent or malformed."""
    base = f"/local/domain/{dev.frontend_id}"

    async def read(path: str) -> str:
        try:
            return await dev.xs.read_str(path) or ""
        except XenStoreError:  # unreadable (EACCES, not UTF-8): treated as absent
            return ""

    name = await read(f"{base}/name")
    if len(name) > MAX_NAME or not name.isprintable():
        name = ""
    uuid = ""
    vm = await read(f"{base}/vm")
    if vm.startswith("/") and len(vm) <= 256:
        uuid = await read(f"{vm.rstrip('/')}/uuid") or vm.rstrip("/").rpartition("/")[2]
    if not _UUID.match(uuid):
        uuid = ""
    return name, uuid.lower()
