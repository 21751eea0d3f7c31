/* netback's per-vif control plane, shared by the vif's queues: the ctrl ring with the Toeplitz hash (key,
 * flags, mapping table), RX steering by that hash, the frontend's multicast list and the RX filter it drives.
 * Linux: drivers/net/xen-netback/hash.c, interface.c (xenvif_select_queue, xenvif_start_xmit's multicast
 * check), netback.c (process_ctrl_request, xenvif_mcast_add/del), rx.c (the HASH and XDP RX extras).
 *
 * Threads.  Every queue has its pump thread.  The ctrl ring is served by queue 0's pump (one more pump source
 * of that queue), so the hash configuration has a single writer; the multicast list is written by the TX
 * path of whichever queue carries the MCAST_ADD/DEL (a mutex serialises those writers: they are control
 * requests, rare, never on the data path).  Readers (every queue's RX path) never lock: each configuration is
 * published under a sequence counter and a queue copies it into private memory only when the counter moved
 * (one atomic load per RX batch otherwise).
 *
 * Steering.  A multi-queue tap picks a queue per flow itself; once the frontend selects the Toeplitz hash,
 * the queue is the mapping table's (Linux's xenvif_select_queue).  A frame read by the pump of queue A that
 * belongs to queue B is copied, vnet header included, into B's hand-off ring: a bounded multi-producer /
 * single-consumer ring of PV_NETCTRL_HANDOFF_SLOTS frames (lock-free: a sequence number per cell), with an
 * eventfd that B's pump polls.  Producers signal once per batch.  A full ring drops the frame (counted in the
 * producer's handoff_drops): the guest's queue B is slow, as a full tap queue would drop it too.
 */
#ifndef PVBACK_NETCTRL_H
#define PVBACK_NETCTRL_H

#include <stddef.h>
#include <stdint.h>

#include "netif.h"
#include "platform.h"
#include "ring.h"

#define PV_NETCTRL_MAX_KEY 40        /* XEN_NETBK_MAX_HASH_KEY_SIZE */
#define PV_NETCTRL_MAX_MAPPING 128   /* XEN_NETBK_MAX_HASH_MAPPING_SIZE */
#define PV_NETCTRL_MCAST_MAX 64      /* XEN_NETBK_MCAST_MAX */
#define PV_NETCTRL_MAX_QUEUES 64
#define PV_NETCTRL_HANDOFF_SLOTS 32  /* frames in flight to one queue from the others (a power of two) */
#define PV_NETCTRL_FRAME_MAX (10u + 65536u + 256u) /* one tap read: vnet header + the largest frame */
#define PV_NETIF_EXTRA_TYPE_XDP 5    /* io/netif.h (newer): the RX headroom, after GSO and HASH */
#define PV_NET_ECTRL 4               /* the ctrl ring failed (runaway req_prod): the vif must be disabled */

/* The frontend's hash configuration (what SET_HASH_* wrote). */
struct pv_net_hash {
    uint32_t alg;   /* PV_NETIF_CTRL_HASH_ALGORITHM_* */
    uint32_t flags; /* PV_NETIF_CTRL_HASH_TYPE_* */
    uint32_t size;  /* mapping entries in use; 0: hash % queues */
    uint8_t key[PV_NETCTRL_MAX_KEY];
    uint32_t mapping[PV_NETCTRL_MAX_MAPPING];
};

struct pv_net_mcast {
    uint32_t n;
    uint8_t addr[PV_NETCTRL_MCAST_MAX][6];
};

/* What the queues read, published under the two sequence counters.  It may live in a file mapping the caller
 * provides (pv_netctrl_use_state), so that a daemon killed and restarted serves the frontend's hash and
 * multicast list as it had set them: the frontend will not send them again. */
#define PV_NETCTRL_STATE_MAGIC 0x6e657463u /* "netc" */
struct pv_netctrl_state {
    uint32_t magic;
    uint8_t ident[16]; /* the caller's identity of the vif: state of another vif is never loaded */
    uint32_t hash_seq;
    struct pv_net_hash hash;
    uint32_t mcast_seq;
    struct pv_net_mcast mcast;
};

/* Counters of one queue (the ctrl ring's on queue 0). */
struct pv_netctrl_stats {
    uint64_t rx_steered;        /* frames this queue read from the tap and handed to another queue */
    uint64_t rx_handoff_in;     /* frames other queues handed to this one */
    uint64_t rx_handoff_drops;  /* frames dropped because the target queue's hand-off ring was full */
    uint64_t rx_mcast_filtered; /* multicast frames not in the frontend's list (control on) */
    uint64_t rx_hash_extras;    /* RX frames that carried a HASH extra */
    uint64_t mcast_add;
    uint64_t mcast_del;
    uint64_t mcast_full;        /* MCAST_ADD refused: the list holds 64 addresses (Linux -ENOSPC) */
    uint64_t ctrl_requests;
    uint64_t ctrl_errors;       /* answered with a status other than SUCCESS */
};

struct pv_netctrl_meta {
    uint32_t hash;
    uint8_t htype; /* PV_NETIF_CTRL_HASH_TYPE_* of the hash, 0: none */
};

struct pv_netctrl;

/* A queue's private view of its vif (embedded in the queue; zeroed = no vif: no steering, no filter). */
struct pv_netctrl_q {
    struct pv_netctrl *vif;
    uint32_t index;
    uint32_t hash_seq, mcast_seq;
    struct pv_net_hash hash; /* private copies, refreshed when the vif's counters move */
    struct pv_net_mcast mcast;
    uint8_t mcast_control;
    uint64_t kick; /* queues this batch handed frames to (signalled once at its end) */
    struct pv_netctrl_meta meta; /* the current frame's hash */
    struct pv_netctrl_stats st;
    /* The Toeplitz hash by table (netctrl.c), built from tab_key. */
    uint8_t tab_ready;
    uint8_t tab_key[PV_NETCTRL_MAX_KEY];
    uint32_t tab[36][256];
};

/* ---- the vif (Python-facing) -------------------------------------------------------------------------- */

struct pv_netctrl *pv_netctrl_create(uint32_t nr_queues, uint32_t frontend_domid, struct pv_gnt *gnt,
                                     uint8_t handoff, char *err, size_t errlen);
void pv_netctrl_destroy(struct pv_netctrl *v);
/* Publish into `mem` (len >= sizeof(struct pv_netctrl_state)) from now on, before any queue joins.  With `load`,
 * a valid state of the same `ident` found there is taken up (restart recovery): returns 1; else `mem` is
 * initialised afresh: 0.  -EINVAL for bad arguments. */
int pv_netctrl_use_state(struct pv_netctrl *v, void *mem, size_t len, const uint8_t ident[16], uint8_t load);
/* The frontend's request-multicast-control (it may change it any time: feature-dynamic-multicast-control). */
void pv_netctrl_set_mcast_control(struct pv_netctrl *v, uint8_t on);
/* The ctrl ring page (mapped) and its event channel (may be NULL in tests).  Before queue 0 joins. */
int pv_netctrl_attach_ctrl(struct pv_netctrl *v, void *ctrl_sring, struct pv_evtchn *ev);
/* One pass over the ctrl ring, as queue 0's pump does per event: returns requests answered or -PV_NET_ECTRL. */
int32_t pv_netctrl_ctrl_run(struct pv_netctrl *v);
void pv_netctrl_get_hash(struct pv_netctrl *v, struct pv_net_hash *out);
uint32_t pv_netctrl_mcast_count(struct pv_netctrl *v);
uint32_t pv_netctrl_ctrl_errors(struct pv_netctrl *v);

/* ---- pure helpers (tests) ----------------------------------------------------------------------------- */

/* The Toeplitz hash of an Ethernet frame as Linux's xenvif_set_skb_hash takes it: IPv4/IPv6 addresses, plus
 * the TCP ports when the flags enable the TCP type and the frame is (unfragmented) TCP.  Returns the hash type
 * (0: the frame gets no hash) and sets *hash. */
uint8_t pv_netctrl_frame_hash(const struct pv_net_hash *h, const uint8_t *frame, uint32_t len, uint32_t *hash);
/* Which of `nr_queues` queues the hash picks (xenvif_select_queue with a hash algorithm set). */
uint32_t pv_netctrl_pick(const struct pv_net_hash *h, uint32_t hash, uint32_t nr_queues);

/* ---- the data path's hooks (netback.c) ---------------------------------------------------------------- */

void pv_netctrl_q_join(struct pv_netctrl_q *c, struct pv_netctrl *v, uint32_t index);
/* Once per RX batch: pick up a new hash configuration or multicast list. */
void pv_netctrl_q_refresh(struct pv_netctrl_q *c);
/* A frame (vnet header + frame) read from this queue's tap: the queue it belongs to, or -1 when the multicast
 * filter drops it (counted).  Sets c->meta. */
int32_t pv_netctrl_rx_steer(struct pv_netctrl_q *c, const uint8_t *buf, uint32_t total);
/* Hand a frame to queue `dest`.  0, or -1 when its ring is full (dropped, counted). */
int pv_netctrl_handoff_push(struct pv_netctrl_q *c, uint32_t dest, const uint8_t *buf, uint32_t total);
/* The next frame handed to this queue, copied to `out` (PV_NETCTRL_FRAME_MAX bytes); sets c->meta.
 * Returns its length, 0 when there is none. */
uint32_t pv_netctrl_handoff_pop(struct pv_netctrl_q *c, uint8_t *out);
/* Drop what was handed to this queue (a stalled queue's purge).  Returns the frames dropped. */
uint32_t pv_netctrl_handoff_purge(struct pv_netctrl_q *c);
/* This queue's counters (queue 0's include the ctrl ring's). */
void pv_netctrl_q_stats(const struct pv_netctrl_q *c, struct pv_netctrl_stats *out);
/* Signal the queues this batch handed frames to. */
void pv_netctrl_kick(struct pv_netctrl_q *c);
/* The eventfd the pump polls for frames handed to this queue, -1 without hand-off. */
int pv_netctrl_handoff_fd(const struct pv_netctrl_q *c);
/* Read (reset) that eventfd. */
void pv_netctrl_handoff_ack(const struct pv_netctrl_q *c);
/* The RX extras of a frame after its first response, in Linux's order (GSO, HASH, XDP): fills `out`, returns
 * how many (each but the last with XEN_NETIF_EXTRA_FLAG_MORE). */
uint32_t pv_netctrl_rx_extras(struct pv_netctrl_q *c, uint8_t gso_type, uint16_t gso_size, uint16_t headroom,
                              struct pv_netif_extra_info out[3]);
/* An MCAST_ADD / MCAST_DEL packet (Linux: ADD wins when both are there): the status of its first slot. */
int16_t pv_netctrl_tx_mcast(struct pv_netctrl_q *c, const struct pv_netif_tx_pkt *pkt);
/* Queue 0's pump sources for the ctrl ring: its event channel and a self-kick eventfd (a request storm is
 * served in bounded rounds).  Fills up to 2 fds/handlers; returns how many. */
uint32_t pv_netctrl_ctrl_sources(struct pv_netctrl *v, int fds[2], int32_t (*handlers[2])(void *));

/* ---- on a queue (netback.c) ---------------------------------------------------------------------------- */

struct pv_net_queue;
/* Before the pump runs: the queue becomes queue `index` of `v` (hand-off source; queue 0 also serves the ctrl
 * ring).  0, or -errno. */
int pv_net_queue_join_ctrl(struct pv_net_queue *q, struct pv_netctrl *v, uint32_t index);
/* Where RX frames start in the first buffer from now on (Reconfiguring with a new xdp-headroom). */
int pv_net_queue_set_rx_headroom(struct pv_net_queue *q, uint16_t headroom);
void pv_net_queue_get_ctrl_stats(const struct pv_net_queue *q, struct pv_netctrl_stats *out);

#endif
