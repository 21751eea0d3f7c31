/* The emulated guest's netfront data path, in C: one queue's bridge between a tap of the guest's network
 * namespace and its netif TX/RX rings, so a measurement sees the backend and not the frontend's interpreter.
 *
 * The caller (backends/guests/netfront.py) does the xenstore handshake, grants the pages and hands over the
 * front rings, their event channel(s), the tap fd and the granted pages.  pv_nf_run() is the queue's loop,
 * run by one thread until stop_fd is readable:
 *
 *   TX (guest -> backend): frames are read from the tap (IFF_VNET_HDR) straight into granted pages of the TX
 *   pool (one readv per frame: the header into private memory, the frame into up to 17 pages, so no copy on
 *   the guest side), each page becomes one slot, the vnet header's GSO becomes a GSO extra-info slot and
 *   NEEDS_CSUM / DATA_VALID become csum_blank / data_validated; a batch is pushed at once and the backend is
 *   notified as the ring rules say.  TX responses give the pages back (the slot id is the page's index).
 *   Reading stops while the pool or the ring cannot take a largest frame; the ring's rsp_event wakes us.
 *
 *   RX (backend -> guest): every RX buffer (one granted page each) is kept posted; responses are consumed in
 *   batches (a packet: first response, its extra-info slots, then more_data fragments; netfront maps a
 *   response to the buffer posted in the same ring slot, ids are ignored as Linux netfront does), each packet
 *   is written to the tap with one writev (a vnet header built from csum_blank / data_validated and the GSO
 *   extra, then the buffers in place), and the buffers are posted again, one push per batch.
 *
 * No policy: sizes, pools and offloads are the caller's.  Concurrency: one thread per queue; the stats may
 * be read from another thread while it runs (plain u64 counters, torn reads are not a concern on x86-64).
 */
#ifndef PVBACK_NETFRONT_IO_H
#define PVBACK_NETFRONT_IO_H

#include <stdint.h>

#include "platform.h"
#include "ring.h"

#define PV_NF_EINVAL 1  /* bad configuration (message in err) */
#define PV_NF_ERING 2   /* the backend broke the ring protocol (message in err) */
#define PV_NF_EEVTCHN 3 /* notify/poll failed */
#define PV_NF_ETAP 4    /* the tap failed */

#define PV_NF_MAX_TX_PAGES_PER_FRAME 17 /* 64 KiB + 10 bytes of vnet header rounded up to pages */

struct pv_nf_queue {
    struct pv_front_ring *tx;
    struct pv_front_ring *rx;
    struct pv_evtchn *ev_tx;
    struct pv_evtchn *ev_rx;   /* == ev_tx for a frontend with one channel */
    int tap_fd;                /* non-blocking, IFF_VNET_HDR with a 10-byte header */
    uint32_t ntx;              /* TX pool: page addresses and their read-only grants; slot id = index (a
                                * pool under 17 pages carries only frames that fit in it: larger dropped) */
    void *const *tx_addrs;
    const uint32_t *tx_refs;
    uint32_t nrx;              /* RX buffers: page addresses and their writable grants */
    void *const *rx_addrs;
    const uint32_t *rx_refs;
    uint32_t batch;            /* frames read from the tap before one push (0: 64) */
    uint32_t spin_us;          /* look at the rings this long before sleeping in poll() (0: never spin) */
};

struct pv_nf_stats {
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t tx_gso;
    uint64_t tx_csum_blank;
    uint64_t tx_dropped;    /* frames the tap gave that netif cannot carry (too big, unknown GSO) */
    uint64_t tx_errors;     /* TX responses with an error status */
    uint64_t tx_full;       /* times reading stopped for want of pool pages or ring slots */
    uint64_t tx_notifies;
    uint64_t tap_reads;     /* readv calls (the last of a batch is the EAGAIN) */
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t rx_gso;
    uint64_t rx_errors;     /* packets answered with an error status or malformed */
    uint64_t rx_notifies;
    uint64_t tap_writes;
    uint64_t wakeups;       /* poll() returns */
    uint64_t spin_hits;     /* work found while spinning, a poll() saved */
    uint64_t loops;         /* passes over both directions */
};

/* Runs the queue until stop_fd is readable: returns 0, or -PV_NF_* with a message in err.  The RX buffers
 * are posted at the start; the rings must be fresh (nothing in flight).  `st` is updated as it goes. */
int pv_nf_run(const struct pv_nf_queue *q, int stop_fd, struct pv_nf_stats *st, char *err, uint32_t errlen);

#endif
