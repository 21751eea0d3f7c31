/* The network data path of one netif queue: a TX ring, an RX ring, one or two event channels and one fd of a
 * multi-queue tap opened with IFF_VNET_HDR.  Batch-shaped, no Python per packet: the pump (pv_net_queue_run)
 * wakes on the event channel(s) and the tap and makes one pass per wakeup.
 *
 * TX (guest -> host): every published slot is copied out once (ring.c), parsed and validated on the copy
 * (netif.c, Linux netback's rules), the whole batch of packets is grant-copied into one linear buffer with
 * one grant-copy call (headers are contiguous whatever the slot split: XSA-423/432), then every slot is
 * answered into zeroed slots (with the restart note) and the frontend is notified when the ring rules say so
 * (the copies have ended: the guest may reuse its pages while we write), then each frame is written to the
 * tap behind a virtio_net_hdr that hands csum_blank / GSO to the host kernel (which segments and checksums).
 *
 * RX (host -> guest): frames are read from the tap with their virtio_net_hdr into a batch buffer, each is
 * given the frontend's posted buffers (responses land in the slots of the requests they consume: netfront
 * ignores ids), a GSO extra-info slot after the first response where the frame is GSO, csum_blank /
 * data_validated from the header, one grant-copy call per batch, then responses and a notify as the ring
 * rules say.  A frame that finds too few posted buffers is held and the tap is not polled until the frontend
 * posts more (req_event is set for that): the host's tap queue, not us, then bounds the backlog.  A stall
 * longer than rx_drain_timeout_ms (a timerfd in the pump) drops the held frame and what the tap queued
 * (counted in rx_dropped and rx_purges), as Linux's rx_drain_timeout purges a queue nobody drains; then the
 * tap is polled again (the next frame may stall again).  With a vif object (netvif.h) the queue also counts
 * as stalled: the tap's carrier goes off until the guest posts an RX buffer, so the host drops frames for a
 * guest that takes none instead of queueing them for us.
 *
 * TX credit (`rate`, netvif.h): a packet the vif has no credit for stops the pass with its slots put back on
 * the ring (req_cons rewound to its first slot), and TX sleeps until a timerfd fires at the next refill;
 * events meanwhile are acknowledged and ignored (Linux: the credit timer is pending).
 *
 * A fatal TX rule (netif.h) or a runaway req_prod kills the queue: the run call returns -PV_NET_EDEAD and
 * the device disables the vif from the control path (XSA-90: never inline).
 *
 * The pump may poll its sources without sleeping for cfg.poll_us after a pass that moved packets (pump.h).
 *
 * Concurrency: a queue is driven by one thread, its pump.  Stats may be read from another thread.
 */
#ifndef PVBACK_NETBACK_H
#define PVBACK_NETBACK_H

#include <stddef.h>
#include <stdint.h>

#include "netvif.h"
#include "netif.h"
#include "platform.h"
#include "ring.h"

#define PV_NET_EDEAD 1   /* the frontend broke a fatal rule: the vif must be disabled */
#define PV_NET_EEVTCHN 2 /* the event channel failed */
#define PV_NET_ETAP 3    /* the tap failed (deleted under us) */

#define PV_VNET_HDR_LEN 10
#define PV_VNET_F_NEEDS_CSUM 1
#define PV_VNET_F_DATA_VALID 2
#define PV_VNET_GSO_NONE 0
#define PV_VNET_GSO_TCPV4 1
#define PV_VNET_GSO_TCPV6 4
#define PV_VNET_GSO_ECN 0x80

struct pv_net_queue_config {
    uint32_t frontend_domid;
    int tap_fd;            /* dup'ed by create; must be non-blocking, IFF_VNET_HDR with a 10-byte header */
    uint16_t rx_headroom;  /* xdp-headroom: where the first RX buffer's data starts */
    uint8_t rx_sg;         /* frontend feature-sg: frames may span several RX buffers */
    uint8_t rx_gso_tcpv4;  /* frontend takes GSO extras (the tap offloads say what the host sends) */
    uint8_t rx_gso_tcpv6;
    uint8_t rx_csum;       /* frontend takes csum_blank frames */
    uint8_t check_mac;     /* drop TX frames whose source MAC is not `mac` (anti-spoofing) */
    uint8_t mac[6];
    uint32_t rx_drain_timeout_ms; /* a frame held this long for want of posted buffers is dropped, with what
                                   * the tap queued meanwhile (Linux rx_drain_timeout_msecs); 0: never */
    struct pv_net_vif *vif; /* what the vif's queues share (netvif.h: `rate`, carrier); NULL: no rate, no
                             * carrier changes (tests driving one queue) */
    uint8_t tx_csum_full;  /* the host side loses partial checksums and drops frames above the MTU (an OVS netdev
                            * bridge without userspace TSO): csum_blank frames are written with their checksum
                            * finished, GSO frames (not offered then) are dropped as "tap" */
    uint32_t poll_us;      /* after a pass that moved packets, keep polling the sources (no sleep) this long:
                            * the frontend's next batch or the peer's ACK then costs no wake-up; 0: sleep at once */
};

struct pv_net_stats {
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t tx_dropped; /* parsed but not delivered (rules, grant, checksum, spoofing, tap) */
    uint64_t tx_gso;
    uint64_t tx_csum_blank;
    uint64_t tx_zero_frags;
    uint64_t tx_mcast; /* multicast control requests (answered, not filtered yet) */
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t rx_dropped; /* frames the frontend could not take (too big without SG, bad offload) */
    uint64_t rx_gso;
    uint64_t rx_stalls; /* times a frame waited for posted buffers */
    uint64_t rx_purges; /* stalls that outlasted rx_drain_timeout_ms: the held and queued frames dropped (and
                         * the tap's carrier off until the guest posts buffers again, with a vif) */
    uint64_t rules[PV_NETIF_NR_REASONS]; /* hits per PV_NETIF_E_* rule */
    uint64_t tx_events;
    uint64_t rx_events;
    uint64_t tap_wakeups;
    uint64_t grant_copy_calls;
    uint64_t grant_copy_segs;
    uint64_t tx_notifies;
    uint64_t rx_notifies;
    uint64_t tx_credit_waits;  /* times a packet waited for TX credit (`rate`) */
    uint64_t tx_throttled_ns;  /* time TX spent waiting for credit */
    uint32_t dead_reason; /* the fatal PV_NETIF_E_* that killed the queue (0: alive) */
};

struct pv_net_queue;

/* tx_sring / rx_sring: the mapped ring pages (one each).  evtchn_rx == evtchn_tx (or NULL) for a frontend
 * with one channel.  evtchn_tx may be NULL (tests: no notifications).  gnt must outlive the queue. */
struct pv_net_queue *pv_net_queue_create(void *tx_sring, void *rx_sring, const struct pv_net_queue_config *cfg,
                                         struct pv_gnt *gnt, struct pv_evtchn *evtchn_tx,
                                         struct pv_evtchn *evtchn_rx, char *err, size_t errlen);
void pv_net_queue_destroy(struct pv_net_queue *q);

/* One pass of each direction (what the pump does per wakeup).  Return packets handled, or -PV_NET_*. */
int32_t pv_net_queue_tx(struct pv_net_queue *q);
int32_t pv_net_queue_rx(struct pv_net_queue *q);
/* The pump: both directions once, then serve the event channel(s) and the tap until stop_fd is readable (0),
 * or -PV_NET_EDEAD / -PV_NET_EEVTCHN / -PV_NET_ETAP. */
int32_t pv_net_queue_run(struct pv_net_queue *q, int stop_fd);
int pv_net_queue_dead(const struct pv_net_queue *q);
/* Make a queue waiting for TX credit look again now (after pv_net_vif_set_rate): safe from any thread. */
void pv_net_queue_credit_kick(struct pv_net_queue *q);
void pv_net_queue_get_stats(const struct pv_net_queue *q, struct pv_net_stats *out);

/* Where the L4 header of an Ethernet frame starts and what it is (IPv4 without fragments, IPv6 with the
 * usual extension headers, one 802.1Q tag at most).  Returns 0 and sets *l4off, *proto (6 TCP / 17 UDP),
 * *hdr_end (end of the TCP/UDP header), *v6; -1 if there is no TCP/UDP header to checksum. */
int pv_net_l4(const uint8_t *frame, uint32_t len, uint32_t *l4off, uint8_t *proto, uint32_t *hdr_end, uint8_t *v6);

#endif
