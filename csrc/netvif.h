/* What the queues of one vif share: the TX credit (`rate`) and the count of queues whose guest RX stalled
 * (the tap's carrier).  One object per vif, created by the device before its queues and outliving them.
 *
 * TX credit: the toolstack's `rate` key (BYTES,USECS), enforced as Linux netback's credit scheduler
 * (drivers/net/xen-netback: tx_credit_exceeded, tx_add_credit, the credit timer).  Every USECS the vif gains
 * BYTES of credit; a guest packet larger than what is left waits for the next refill with its slots left on
 * the ring (back-pressure: the frontend's ring fills and its queue stops; nothing is dropped).  Credit
 * accumulates up to max(BYTES, 128 KiB), Linux's burst allowance, so one 64 KiB GSO frame always passes
 * eventually whatever the rate.  Linux keeps the credit per queue (each queue gets the whole rate); here it
 * is per vif, which is what an operator writing `rate=` means with several queues.  The check takes a mutex
 * only when a rate is set (an unlimited vif reads one atomic).  A new rate applies live
 * (pv_net_vif_set_rate from the control thread, then pv_net_queue_credit_kick on each queue).
 *
 * Carrier: a queue whose held frame outlived rx_drain_timeout_ms (the guest posts no RX buffers) counts as
 * stalled; while any queue is, the tap's carrier is off, so the host stops queueing frames for a guest that
 * takes none (its qdisc drops them, counted by the host) instead of buffering them.  The queue is ready again
 * when the guest posts a buffer; the carrier comes back when no queue is stalled (Linux's
 * xenvif_queue_carrier_off / _on, with the drain timeout as the stall timeout).
 */
#ifndef PVBACK_NETVIF_H
#define PVBACK_NETVIF_H

#include <pthread.h>
#include <stdint.h>

#define PV_NET_CREDIT_MAX_BURST (128u * 1024u) /* Linux: "a burst big enough to transmit a jumbo packet" */

struct pv_net_vif {
    pthread_mutex_t lock;
    uint64_t bytes;     /* credit per window; 0: unlimited (read without the lock as a fast path) */
    uint64_t period_ns; /* the window: USECS */
    uint64_t remaining;
    uint64_t window_start_ns;
    uint32_t stalled_queues; /* atomic */
    uint32_t carrier_offs;   /* times the carrier went off (atomic) */
};

struct pv_net_vif *pv_net_vif_create(void);
void pv_net_vif_destroy(struct pv_net_vif *v);
/* `bytes` every `usecs`; bytes 0: unlimited (usecs is then ignored). */
void pv_net_vif_set_rate(struct pv_net_vif *v, uint64_t bytes, uint64_t usecs);

/* Take `size` bytes of credit at time `now_ns` (CLOCK_MONOTONIC).  Returns 1 if the packet may go (the credit
 * is spent), 0 if it must wait: *wake_ns is then when the next refill is due. */
int pv_net_vif_take_credit(struct pv_net_vif *v, uint32_t size, uint64_t now_ns, uint64_t *wake_ns);

/* A queue stalled / is ready again: returns 1 when the carrier must now go off / on (the first stalled queue,
 * the last ready one). */
int pv_net_vif_queue_stalled(struct pv_net_vif *v);
int pv_net_vif_queue_ready(struct pv_net_vif *v);
uint32_t pv_net_vif_carrier_offs(const struct pv_net_vif *v);

uint64_t pv_net_now_ns(void);

#endif
