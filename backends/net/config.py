"""netback's configuration section, `[net]`, with every default documented here."""

from __future__ import annotations

from dataclasses import dataclass

# Backend directory types netback can serve: what libxl writes for `vif=[...]`.
NET_BACKEND_TYPES = ("vif",)
POLL_US_DEFAULT = 0  # see NetConfig.poll_us


@dataclass
class NetConfig:
    # Queues offered to a frontend (multi-queue-max-queues), one pump thread each.  Linux offers one per dom0
    # vCPU; more queues than cores only adds wakeups.  `pvback attach nic --queues` may offer fewer.
    max_queues: int = 2
    # Offer feature-gso-tcpv4/6: the guest hands us 64 KiB TCP frames and the host kernel segments them (the
    # tap takes them with a virtio_net_hdr).  Off: the guest segments (more packets, more CPU on both sides).
    gso: bool = True
    # Offer feature-split-event-channels (one channel per direction and queue, as Linux).
    split_event_channels: bool = True
    # Offer feature-xdp-headroom (the frontend may ask for room before each RX frame, up to 1024 bytes).
    xdp_headroom: bool = True
    # Drop (and count, reason "spoof") TX frames whose source MAC is not the vif's `mac`: what libxl's
    # vif-route rules or OVN port security enforce.  false: a guest may send with any source MAC (bridging
    # guests, VRRP).  A vif's own backend key `pvback-allow-spoof` (`pvback attach nic --allow-spoof` /
    # `--check-mac`) overrides this for that vif.
    check_mac: bool = True
    # A frame from the host that has waited this long for the guest to post receive buffers is dropped, with
    # what the tap queued meanwhile (counted: rx drops, ring_full), and the tap's carrier goes off until the guest
    # posts buffers again (the host drops for it instead of queueing); Linux's rx_drain_timeout_msecs and
    # rx-stall carrier-off.  0: wait for ever (the tap's own queue, txqueuelen frames, then drops on the host).
    rx_drain_timeout_ms: int = 10000
    # Microseconds a queue's pump keeps polling its event channels and tap (without sleeping) after a pass that
    # moved packets, before it sleeps in poll(): a single TCP flow's next batch or ACK usually comes within a
    # wake-up's latency (12-30 us here), which this saves on every hand-off.  Costs at most this much CPU per
    # busy period and nothing on an idle vif.  0 (default): sleep at once.  Measured on a loaded 2-vCPU host
    # (perf/RESULTS.md): 50 us halved the daemon's wake-ups per packet but cost 15-20 % more CPU per packet and
    # no throughput, since there the CPU share, not the hand-off, bounds a flow; worth it on a dom0 with idle
    # vCPUs only.
    poll_us: int = POLL_US_DEFAULT
    # Where each connected vif keeps its control state (the frontend's Toeplitz key/flags/mapping, its multicast
    # list) in a small mapped file, <run_dir>/<vif>.ctrl, 0600, locked while served: a daemon killed and restarted
    # takes it up, since the frontend will not send it again.  Removed when the vif disconnects.  "": in memory
    # only (a restart forgets it: RX steering falls back to the tap's queues, the multicast list is empty).
    run_dir: str = "/run/pvback/net"
    # -- the switch a vif is plugged into (backends.net.switch), from the toolstack's `bridge` key -----------
    # "auto": a Linux bridge of that name if there is one, else an Open vSwitch bridge through `ovsdb`;
    # "ovs" / "linux": only that kind; "none": ignore `bridge` (an external script= plugs the tap).
    switch: str = "auto"
    # The OVSDB server (unix:PATH or tcp:HOST:PORT): Debian's openvswitch-switch listens on this socket.
    ovsdb: str = "unix:/var/run/openvswitch/db.sock"
    # Seconds a port change may take until ovs-vswitchd applied it (vif-openvswitch's ovs-vsctl --timeout=30);
    # past it the vif fails with an error node.
    ovs_timeout: float = 30.0
    # Interface external_ids:iface-id when the backend dir has no `iface-id` key: OVN binds the logical port
    # of this name.  Fields: {vm_uuid} {vm_name} {domid} {devid} {vif}; a domain without a UUID gets {vif}.
    iface_id: str = "{vm_uuid}-{devid}"
    # Seconds to wait, after the port is applied, for ovn-controller to mark the Interface
    # external_ids:ovn-installed=true (its flows for the iface-id are in) before `hotplug-status=connected`: the
    # guest then boots onto a working logical port.  Past it the vif is connected anyway, with a warning (OVN
    # down must not keep guests off the network).  0: do not wait (no OVN).
    ovn_installed_timeout: float = 0.0


NET_CHOICES: dict[str, tuple[str, ...]] = {"switch": ("auto", "ovs", "linux", "none")}

# Accepted values of the integer keys, inclusive.
NET_RANGES: dict[str, tuple[int, int]] = {
    "max_queues": (1, 64),
    "rx_drain_timeout_ms": (0, 600_000),
    "poll_us": (0, 1_000),
}
