/* netback's data path for one queue; see netback.h. */
#include "netback.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/if_tun.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "netctrl.h"
#include "pump.h"

#define TX_BUF_SIZE (1u << 20)                            /* frames of one grant-copy batch */
#define FRAME_MAX (PV_VNET_HDR_LEN + 65535u + 64u)        /* vnet header + the largest frame (+ slack) */
#define RX_READ_MAX (PV_VNET_HDR_LEN + 65536u + 256u)     /* what one tap read may return */
#define RX_BUF_SIZE ((1u << 20) + RX_READ_MAX)
#define RX_MAX_CHUNKS 20 /* 64 KiB frame in 4 KiB buffers (17) + headroom split + GSO extra */

struct tx_pkt {
    uint32_t off;        /* frame (after the vnet header slot) in txbuf */
    uint32_t len;
    uint32_t seg_first;  /* its copy segments */
    uint32_t nseg;
    uint32_t rsp_first;  /* its responses (first slot, extras, fragments) */
    uint32_t nrsp;
    uint16_t flags;
    uint8_t gso_type;
    uint16_t gso_size;
    uint8_t copy_failed; /* a grant copy of it failed: answered with an error, not delivered */
};

struct rx_frame {
    uint32_t seg_first, nseg;
    uint32_t rsp_first, nrsp; /* data responses and the extra, in ring order */
};

struct pv_net_queue {
    struct pv_net_queue_config cfg;
    struct pv_gnt *gnt;
    struct pv_evtchn *ev_tx, *ev_rx; /* ev_rx == ev_tx with one channel */
    int tap;
    struct pv_back_ring tx, rx;
    int dead;
    struct pv_net_stats st;
    struct pv_pump_source src[PV_PUMP_MAX_SOURCES];
    int timer; /* timerfd armed while a frame is held (rx_drain_timeout_ms), -1 without a timeout */
    int credit_timer;        /* timerfd armed for the next refill while TX waits for credit; -1 without */
    int tx_throttled;        /* TX waits for credit: passes do nothing until credit_timer fires */
    uint64_t throttled_since; /* ns */
    int rx_stalled;           /* counted in the vif's stalled queues (its carrier is off) */
    uint32_t nsrc;
    int tap_src; /* index of the tap in src[] */
    int handoff_src; /* index of the hand-off eventfd in src[] (netctrl.h), -1 without */
    struct pv_netctrl_q ctl; /* the vif's steering, multicast filter and hash (netctrl.h) */
    struct pv_netctrl_meta held_meta;

    /* TX batch */
    uint8_t *txslots;
    struct pv_netif_tx_response *txrsp;
    uint32_t ntxrsp;
    struct pv_gcopy_seg *txseg;
    uint32_t ntxseg;
    struct tx_pkt *txpkt;
    uint32_t ntxpkt;
    uint8_t *txbuf;
    uint32_t txoff;

    /* RX: posted requests consumed from the ring, in ring order, not yet answered */
    struct pv_netif_rx_request *rxreq; /* FIFO of rx.size */
    uint32_t rxreq_head, rxreq_n;
    struct pv_netif_rx_response *rxrsp; /* responses of the batch, in ring order */
    uint32_t nrxrsp;
    struct pv_gcopy_seg *rxseg;
    uint32_t nrxseg;
    struct rx_frame *rxfr;
    uint32_t nrxfr;
    uint8_t *rxbuf;
    uint32_t rxoff;     /* next free byte of rxbuf */
    uint32_t held_off;  /* a frame read but waiting for buffers (held_len > 0) */
    uint32_t held_len;
    uint8_t *rxslots;   /* scratch for consuming RX requests */
};

/* ---- frame parsing ----------------------------------------------------------------------------------- */

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

int pv_net_l4(const uint8_t *f, uint32_t len, uint32_t *l4off, uint8_t *proto, uint32_t *hdr_end, uint8_t *v6)
{
    if (len < 14)
        return -1;
    uint32_t off = 12;
    uint16_t type = be16(f + off);
    off += 2;
    if (type == 0x8100) { /* one 802.1Q tag */
        if (len < off + 4)
            return -1;
        type = be16(f + off + 2);
        off += 4;
    }
    uint8_t p;
    if (type == 0x0800) {
        if (len < off + 20)
            return -1;
        uint32_t ihl = (uint32_t)(f[off] & 0x0f) * 4;
        if ((f[off] >> 4) != 4 || ihl < 20 || len < off + ihl)
            return -1;
        if (be16(f + off + 6) & 0x3fff) /* MF or a fragment offset: no L4 header here to checksum */
            return -1;
        p = f[off + 9];
        off += ihl;
        *v6 = 0;
    } else if (type == 0x86dd) {
        if (len < off + 40 || (f[off] >> 4) != 6)
            return -1;
        p = f[off + 6];
        off += 40;
        /* Skip hop-by-hop, routing and destination options (as skb_checksum_setup_ipv6); a fragment header
         * means no L4 header to checksum. */
        for (int n = 0; n < 8 && (p == 0 || p == 43 || p == 60); n++) {
            if (len < off + 8)
                return -1;
            uint32_t hl = ((uint32_t)f[off + 1] + 1) * 8;
            p = f[off];
            off += hl;
        }
        if (p == 0 || p == 43 || p == 60 || p == 44)
            return -1;
        *v6 = 1;
    } else {
        return -1;
    }
    if (p == 6) {
        if (len < off + 20)
            return -1;
        uint32_t doff = (uint32_t)(f[off + 12] >> 4) * 4;
        if (doff < 20 || len < off + doff)
            return -1;
        *hdr_end = off + doff;
    } else if (p == 17) {
        if (len < off + 8)
            return -1;
        *hdr_end = off + 8;
    } else {
        return -1;
    }
    *l4off = off;
    *proto = p;
    return 0;
}

static uint32_t sum16(const uint8_t *p, uint32_t n, uint32_t acc)
{
    for (uint32_t i = 0; i + 1 < n; i += 2)
        acc += be16(p + i);
    if (n & 1)
        acc += (uint32_t)p[n - 1] << 8;
    return acc;
}

/* Write the pseudo-header sum into the L4 checksum field, as Linux's skb_checksum_setup(recalculate) does for
 * a GSO frame from a peer that did not set csum_blank. */
static void pseudo_csum(uint8_t *f, uint32_t len, uint32_t l4off, uint8_t proto, uint8_t v6)
{
    uint32_t ipoff = be16(f + 12) == 0x8100 ? 18 : 14; /* the IP header again: after Ethernet (and a tag) */
    uint32_t acc = 0;
    uint32_t l4len = len - l4off;
    if (v6) {
        acc = sum16(f + ipoff + 8, 32, acc);
    } else {
        acc = sum16(f + ipoff + 12, 8, acc);
    }
    acc += proto;
    acc += l4len & 0xffff;
    acc += l4len >> 16;
    while (acc >> 16)
        acc = (acc & 0xffff) + (acc >> 16);
    uint32_t at = l4off + (proto == 6 ? 16 : 6);
    f[at] = (uint8_t)(acc >> 8);
    f[at + 1] = (uint8_t)acc;
}

/* Finish a partial checksum (what Linux's skb_checksum_help does): the pseudo-header sum is written into the
 * field first, so a frontend's value there is never trusted, then the one's complement over the L4 bytes. */
static void full_csum(uint8_t *f, uint32_t len, uint32_t l4off, uint8_t proto, uint8_t v6)
{
    pseudo_csum(f, len, l4off, proto, v6);
    uint32_t acc = sum16(f + l4off, len - l4off, 0);
    while (acc >> 16)
        acc = (acc & 0xffff) + (acc >> 16);
    uint16_t c = (uint16_t)~acc;
    if (proto == 17 && c == 0)
        c = 0xffff; /* UDP: 0 means "no checksum" */
    uint32_t at = l4off + (proto == 6 ? 16 : 6);
    f[at] = (uint8_t)(c >> 8);
    f[at + 1] = (uint8_t)c;
}

/* ---- TX ------------------------------------------------------------------------------------------------ */

static void tx_add_rsp(struct pv_net_queue *q, uint16_t id, int16_t status)
{
    pv_netif_make_tx_response(&q->txrsp[q->ntxrsp++], id, status);
}

/* Answer every slot of a packet: the data slots with `status`, the extras with NETIF_RSP_NULL (as Linux's
 * make_tx_response).  For a drop before the fragments were recorded, only the first id is known: the other
 * data slots get the first's status with their own ids from the private copies. */
static void tx_answer_slots(struct pv_net_queue *q, const uint8_t *slots, const struct pv_netif_tx_pkt *pkt,
                            int16_t status)
{
    for (uint32_t k = 0; k < pkt->nr_slots; k++) {
        if (k >= 1 && k <= pkt->extra_count) {
            tx_add_rsp(q, 0, PV_NETIF_RSP_NULL);
            continue;
        }
        struct pv_netif_tx_request r;
        memcpy(&r, slots + (size_t)k * PV_NETIF_TX_SLOT_SIZE, sizeof(r));
        tx_add_rsp(q, r.id, status);
    }
}

static void tx_deliver(struct pv_net_queue *q, struct tx_pkt *p)
{
    uint8_t *frame = q->txbuf + p->off;
    uint8_t *h = frame - PV_VNET_HDR_LEN;
    memset(h, 0, PV_VNET_HDR_LEN);
    int reason = PV_NETIF_OK;
    if (q->cfg.check_mac && memcmp(frame + 6, q->cfg.mac, 6) != 0)
        reason = PV_NETIF_E_SPOOF;
    uint8_t csum = (p->flags & PV_NETTXF_csum_blank) || p->gso_type != PV_NETIF_GSO_TYPE_NONE;
    if (reason == PV_NETIF_OK && csum) {
        uint32_t l4off = 0, hdr_end = 0;
        uint8_t proto = 0, v6 = 0;
        if (pv_net_l4(frame, p->len, &l4off, &proto, &hdr_end, &v6) < 0 ||
            (p->gso_type != PV_NETIF_GSO_TYPE_NONE && proto != 6)) {
            reason = PV_NETIF_E_CSUM;
        } else if (q->cfg.tx_csum_full && p->gso_type != PV_NETIF_GSO_TYPE_NONE) {
            reason = PV_NETIF_E_TAP; /* GSO was not offered, and the switch would drop it anyway */
        } else if (q->cfg.tx_csum_full) {
            /* flags stay 0, not DATA_VALID: whoever receives it checks the checksum we wrote. */
            full_csum(frame, p->len, l4off, proto, v6);
            q->st.tx_csum_blank++;
        } else {
            if (!(p->flags & PV_NETTXF_csum_blank))
                pseudo_csum(frame, p->len, l4off, proto, v6);
            uint16_t start = (uint16_t)l4off, coff = proto == 6 ? 16 : 6;
            h[0] = PV_VNET_F_NEEDS_CSUM;
            memcpy(h + 6, &start, 2);
            memcpy(h + 8, &coff, 2);
            if (p->gso_type != PV_NETIF_GSO_TYPE_NONE) {
                uint16_t hl = (uint16_t)hdr_end, gs = p->gso_size;
                h[1] = p->gso_type == PV_NETIF_GSO_TYPE_TCPV4 ? PV_VNET_GSO_TCPV4 : PV_VNET_GSO_TCPV6;
                memcpy(h + 2, &hl, 2);
                memcpy(h + 4, &gs, 2);
                q->st.tx_gso++;
            } else {
                q->st.tx_csum_blank++;
            }
        }
    } else if (p->flags & PV_NETTXF_data_validated) {
        h[0] = PV_VNET_F_DATA_VALID;
    }
    if (reason == PV_NETIF_OK) {
        /* One write per frame: a tap takes no batch.  Writes never block (the host drops instead). */
        ssize_t w = write(q->tap, h, PV_VNET_HDR_LEN + p->len);
        if (w < 0)
            reason = PV_NETIF_E_TAP;
    }
    if (reason != PV_NETIF_OK) {
        q->st.rules[reason]++;
        q->st.tx_dropped++;
        return; /* the guest's data was consumed: its slots are answered OKAY, as Linux does */
    }
    q->st.tx_packets++;
    q->st.tx_bytes += p->len;
}

/* Copy the batch's frames out of the guest (one grant-copy call), hand them to the host, answer every slot. */
static void tx_flush(struct pv_net_queue *q)
{
    if (q->ntxseg) {
        q->st.grant_copy_calls++;
        q->st.grant_copy_segs += q->ntxseg;
        if (pv_gnt_copy(q->gnt, q->txseg, q->ntxseg) < 0)
            for (uint32_t i = 0; i < q->ntxseg; i++)
                q->txseg[i].status = PV_GNTST_general_error;
    }
    for (uint32_t i = 0; i < q->ntxpkt; i++) {
        struct tx_pkt *p = &q->txpkt[i];
        int ok = 1;
        for (uint32_t s = 0; s < p->nseg; s++)
            if (q->txseg[p->seg_first + s].status != PV_GNTST_okay)
                ok = 0;
        p->copy_failed = !ok;
        if (!ok) {
            q->st.rules[PV_NETIF_E_GRANT]++;
            q->st.tx_dropped++;
            for (uint32_t r = 0; r < p->nrsp; r++)
                if (q->txrsp[p->rsp_first + r].status != PV_NETIF_RSP_NULL)
                    q->txrsp[p->rsp_first + r].status = PV_NETIF_RSP_ERROR;
        }
    }
    if (q->ntxrsp) {
        /* Every copy of these slots' grants has ended: the guest may reuse them now.  Answered before the tap
         * writes, not after: a write runs the receiving stack inline (tens of us for a 64 KiB frame), and the
         * guest refills its TX pool meanwhile instead of waiting for the whole batch (the statuses are final:
         * a frame the host then drops is answered OKAY all the same, as Linux does). */
        if (pv_back_ring_respond_noted(&q->tx, q->txrsp, q->ntxrsp, PV_NETIF_TX_RSP_SIZE) && q->ev_tx) {
            pv_evtchn_notify(q->ev_tx);
            q->st.tx_notifies++;
        }
    }
    for (uint32_t i = 0; i < q->ntxpkt; i++) {
        struct tx_pkt *p = &q->txpkt[i];
        if (!p->copy_failed)
            tx_deliver(q, p);
    }
    q->ntxrsp = q->ntxseg = q->ntxpkt = 0;
    q->txoff = 0;
}

static void mark_dead(struct pv_net_queue *q, int reason)
{
    if (!q->dead) {
        q->st.rules[reason]++;
        q->st.dead_reason = (uint32_t)reason;
    }
    q->dead = 1;
}

/* Spend `size` bytes of the vif's credit, or (no credit left) arm the credit timer for the next refill and
 * return 1: the packet waits, as Linux's tx_credit_exceeded. */
static int tx_wait_credit(struct pv_net_queue *q, uint32_t size)
{
    uint64_t now = pv_net_now_ns(), wake = 0;
    if (pv_net_vif_take_credit(q->cfg.vif, size, now, &wake))
        return 0;
    struct itimerspec its = {.it_value = {.tv_sec = (time_t)(wake / 1000000000u),
                                          .tv_nsec = (long)(wake % 1000000000u)}};
    if (!its.it_value.tv_sec && !its.it_value.tv_nsec)
        its.it_value.tv_nsec = 1; /* 0 would disarm */
    (void)timerfd_settime(q->credit_timer, TFD_TIMER_ABSTIME, &its, NULL);
    q->tx_throttled = 1;
    q->throttled_since = now;
    q->st.tx_credit_waits++;
    return 1;
}

/* Parse the consumed slots [0, n) into the batch.  Returns -1 when a fatal rule killed the queue, 1 when a
 * packet waits for credit (it and the slots after it are back on the ring). */
static int tx_process(struct pv_net_queue *q, uint32_t n)
{
    uint32_t idx = 0;
    struct pv_netif_tx_pkt pkt;
    while (idx < n) {
        const uint8_t *slots = q->txslots + (size_t)idx * PV_NETIF_TX_SLOT_SIZE;
        int rc = pv_netif_tx_parse(slots, n - idx, &pkt);
        if (pv_netif_reason_fatal(rc)) {
            /* Stop at once (Linux turned `continue` into `break` here): nothing after a fatal slot is read. */
            tx_flush(q);
            mark_dead(q, rc);
            return -1;
        }
        idx += pkt.nr_slots;
        if (rc != PV_NETIF_OK) {
            q->st.rules[rc]++;
            q->st.tx_dropped++;
            tx_answer_slots(q, slots, &pkt, PV_NETIF_RSP_ERROR);
            continue;
        }
        if (pkt.extra_types & ((1u << PV_NETIF_EXTRA_TYPE_MCAST_ADD) | (1u << PV_NETIF_EXTRA_TYPE_MCAST_DEL))) {
            q->st.tx_mcast++;
            int16_t st = pv_netctrl_tx_mcast(&q->ctl, &pkt);
            if (st != PV_NETIF_RSP_OKAY)
                q->st.rules[PV_NETIF_E_MCAST]++;
            tx_answer_slots(q, slots, &pkt, st);
            continue;
        }
        if (q->cfg.vif && tx_wait_credit(q, pkt.len)) {
            /* Put this packet and the rest back: the frontend sees its ring fill up (back-pressure). */
            q->tx.req_cons -= n - (idx - pkt.nr_slots);
            return 1;
        }
        if (q->txoff + PV_VNET_HDR_LEN + pkt.len > TX_BUF_SIZE)
            tx_flush(q);
        struct tx_pkt *p = &q->txpkt[q->ntxpkt++];
        p->off = q->txoff + PV_VNET_HDR_LEN;
        p->len = pkt.len;
        p->flags = pkt.flags;
        p->gso_type = (pkt.extra_types & (1u << PV_NETIF_EXTRA_TYPE_GSO)) ? pkt.gso_type : PV_NETIF_GSO_TYPE_NONE;
        p->gso_size = pkt.gso_size;
        p->seg_first = q->ntxseg;
        p->rsp_first = q->ntxrsp;
        q->st.tx_zero_frags += pkt.zero_frags;
        /* Headers contiguous by construction: the whole frame goes to one linear buffer, slot after slot,
         * whatever the split (no tiny-slot header reaches the host: XSA-423/432). */
        uint32_t at = p->off;
        for (uint32_t f = 0; f < pkt.nr_frags; f++) {
            const struct pv_netif_tx_frag *fr = &pkt.frags[f];
            if (fr->size == 0)
                continue; /* XSA-448: answered, never copied */
            struct pv_gcopy_seg *s = &q->txseg[q->ntxseg++];
            memset(s, 0, sizeof(*s));
            s->source.foreign.ref = fr->gref;
            s->source.foreign.offset = fr->offset;
            s->source.foreign.domid = (uint16_t)q->cfg.frontend_domid;
            s->dest.virt = q->txbuf + at;
            s->len = fr->size;
            s->flags = PV_GCOPY_SOURCE_GREF;
            at += fr->size;
        }
        p->nseg = q->ntxseg - p->seg_first;
        tx_answer_slots(q, slots, &pkt, PV_NETIF_RSP_OKAY);
        p->nrsp = q->ntxrsp - p->rsp_first;
        q->txoff = at;
    }
    return 0;
}

int32_t pv_net_queue_tx(struct pv_net_queue *q)
{
    if (q->dead)
        return -PV_NET_EDEAD;
    uint64_t before = q->st.tx_packets;
    if (q->tx_throttled)
        return 0; /* the credit timer resumes TX */
    for (;;) {
        int32_t n = pv_back_ring_consume(&q->tx, q->txslots, q->tx.size);
        if (n < 0) {
            tx_flush(q);
            mark_dead(q, PV_NETIF_E_RING); /* "Impossible number of requests" */
            return -PV_NET_EDEAD;
        }
        if (n > 0) {
            int r = tx_process(q, (uint32_t)n);
            if (r < 0)
                return -PV_NET_EDEAD;
            if (r > 0) {
                tx_flush(q); /* what passed before the credit ran out */
                break;
            }
            continue;
        }
        tx_flush(q);
        int32_t more = pv_back_ring_final_check(&q->tx);
        if (more < 0) {
            mark_dead(q, PV_NETIF_E_RING);
            return -PV_NET_EDEAD;
        }
        if (more == 0)
            break;
    }
    return (int32_t)(q->st.tx_packets - before);
}

/* ---- RX ------------------------------------------------------------------------------------------------ */

/* Make at least `need` posted buffers available in the FIFO.  Returns 1 if there are, 0 if not (req_event
 * is then armed so the frontend's next post wakes us), -1 for a runaway req_prod. */
static int rx_reserve(struct pv_net_queue *q, uint32_t need)
{
    for (int round = 0; round < 2; round++) {
        while (q->rxreq_n < need) {
            uint32_t room = q->rx.size - q->rxreq_n;
            int32_t n = pv_back_ring_consume(&q->rx, q->rxslots, room);
            if (n < 0)
                return -1;
            if (n == 0)
                break;
            for (int32_t i = 0; i < n; i++) {
                uint32_t at = (q->rxreq_head + q->rxreq_n) % q->rx.size;
                memcpy(&q->rxreq[at], q->rxslots + (size_t)i * PV_NETIF_RX_SLOT_SIZE, PV_NETIF_RX_SLOT_SIZE);
                q->rxreq_n++;
            }
        }
        if (q->rxreq_n >= need)
            return 1;
        if (round == 0) {
            int32_t more = pv_back_ring_final_check(&q->rx);
            if (more < 0)
                return -1;
            if (more == 0)
                return 0;
        }
    }
    return q->rxreq_n >= need;
}

static void rx_flush(struct pv_net_queue *q)
{
    if (q->nrxseg) {
        q->st.grant_copy_calls++;
        q->st.grant_copy_segs += q->nrxseg;
        if (pv_gnt_copy(q->gnt, q->rxseg, q->nrxseg) < 0)
            for (uint32_t i = 0; i < q->nrxseg; i++)
                q->rxseg[i].status = PV_GNTST_general_error;
        for (uint32_t i = 0; i < q->nrxfr; i++) {
            struct rx_frame *fr = &q->rxfr[i];
            int ok = 1;
            for (uint32_t s = 0; s < fr->nseg; s++)
                if (q->rxseg[fr->seg_first + s].status != PV_GNTST_okay)
                    ok = 0;
            if (!ok) {
                q->st.rules[PV_NETIF_E_GRANT]++;
                q->st.rx_dropped++;
                /* A data response carries its length in status; an error status fails the whole frame. */
                q->rxrsp[fr->rsp_first].status = PV_NETIF_RSP_ERROR;
            }
        }
    }
    if (q->nrxrsp) {
        if (pv_back_ring_respond_noted(&q->rx, q->rxrsp, q->nrxrsp, PV_NETIF_RX_RSP_SIZE) && q->ev_rx) {
            pv_evtchn_notify(q->ev_rx);
            q->st.rx_notifies++;
        }
    }
    q->nrxrsp = q->nrxseg = q->nrxfr = 0;
    /* Keep a held frame: move it to the front of the emptied buffer. */
    if (q->held_len) {
        if (q->held_off)
            memmove(q->rxbuf, q->rxbuf + q->held_off, q->held_len);
        q->held_off = 0;
        q->rxoff = q->held_len;
    } else {
        q->rxoff = 0;
    }
}

static struct pv_netif_rx_request rx_take(struct pv_net_queue *q)
{
    struct pv_netif_rx_request r = q->rxreq[q->rxreq_head];
    q->rxreq_head = (q->rxreq_head + 1) % q->rx.size;
    q->rxreq_n--;
    return r;
}

/* Give one frame (vnet header + frame at rxbuf[off]) to the frontend.  Returns 1 done (delivered or dropped),
 * 0 not enough posted buffers (nothing taken), -1 dead ring. */
static int rx_frame(struct pv_net_queue *q, uint32_t off, uint32_t total)
{
    const uint8_t *h = q->rxbuf + off;
    const uint8_t *frame = h + PV_VNET_HDR_LEN;
    uint32_t len = total - PV_VNET_HDR_LEN;
    uint8_t vflags = h[0], vgso = (uint8_t)(h[1] & ~PV_VNET_GSO_ECN);
    uint16_t gso_size;
    memcpy(&gso_size, h + 4, 2);
    uint8_t xgso = PV_NETIF_GSO_TYPE_NONE;
    if (vgso == PV_VNET_GSO_TCPV4 && q->cfg.rx_gso_tcpv4)
        xgso = PV_NETIF_GSO_TYPE_TCPV4;
    else if (vgso == PV_VNET_GSO_TCPV6 && q->cfg.rx_gso_tcpv6)
        xgso = PV_NETIF_GSO_TYPE_TCPV6;
    /* The headroom may change under a running pump (XDP attached: Reconfiguring), one value per frame. */
    uint16_t headroom = __atomic_load_n(&q->cfg.rx_headroom, __ATOMIC_RELAXED);
    uint32_t first_room = PV_NETIF_PAGE_SIZE - headroom;
    /* Frames the frontend did not agree to take: the tap's offloads should never produce them. */
    if (len < 14 || (vgso != PV_VNET_GSO_NONE && xgso == PV_NETIF_GSO_TYPE_NONE) ||
        ((vflags & PV_VNET_F_NEEDS_CSUM) && !q->cfg.rx_csum) || (!q->cfg.rx_sg && len > first_room) ||
        (xgso != PV_NETIF_GSO_TYPE_NONE && gso_size == 0)) {
        q->st.rx_dropped++;
        return 1;
    }
    uint32_t chunks = 1 + (len > first_room ? (len - first_room + PV_NETIF_PAGE_SIZE - 1) / PV_NETIF_PAGE_SIZE : 0);
    struct pv_netif_extra_info ex[3];
    uint32_t nex = pv_netctrl_rx_extras(&q->ctl, xgso, gso_size, headroom, ex);
    uint32_t need = chunks + nex;
    if (need > RX_MAX_CHUNKS || need > q->rx.size) {
        q->st.rx_dropped++;
        return 1;
    }
    if (q->nrxrsp + need > q->rx.size) /* the batch's responses first */
        rx_flush(q);
    int r = rx_reserve(q, need);
    if (r <= 0)
        return r;
    uint16_t fl = 0;
    if (vflags & PV_VNET_F_NEEDS_CSUM)
        fl |= PV_NETRXF_csum_blank | PV_NETRXF_data_validated;
    else if (vflags & PV_VNET_F_DATA_VALID)
        fl |= PV_NETRXF_data_validated;
    struct rx_frame *fr = &q->rxfr[q->nrxfr++];
    fr->seg_first = q->nrxseg;
    fr->rsp_first = q->nrxrsp;
    uint32_t done = 0;
    for (uint32_t c = 0; c < chunks; c++) {
        struct pv_netif_rx_request req = rx_take(q);
        uint32_t boff = c == 0 ? headroom : 0;
        uint32_t n = len - done < PV_NETIF_PAGE_SIZE - boff ? len - done : PV_NETIF_PAGE_SIZE - boff;
        struct pv_gcopy_seg *s = &q->rxseg[q->nrxseg++];
        memset(s, 0, sizeof(*s));
        s->source.virt = (void *)(frame + done);
        s->dest.foreign.ref = req.gref;
        s->dest.foreign.offset = (uint16_t)boff;
        s->dest.foreign.domid = (uint16_t)q->cfg.frontend_domid;
        s->len = (uint16_t)n;
        s->flags = PV_GCOPY_DEST_GREF;
        uint16_t f = (uint16_t)(c == 0 ? fl : 0);
        if (c + 1 < chunks)
            f |= PV_NETRXF_more_data;
        if (c == 0 && nex)
            f |= PV_NETRXF_extra_info;
        pv_netif_make_rx_response(&q->rxrsp[q->nrxrsp++], req.id, (uint16_t)boff, f, (int16_t)n);
        done += n;
        if (c == 0 && nex) {
            /* The extras follow the first response, in the slots of the next requests (whose buffers the
             * frontend recycles). */
            for (uint32_t e = 0; e < nex; e++) {
                (void)rx_take(q);
                memcpy(&q->rxrsp[q->nrxrsp++], &ex[e], sizeof(ex[e]));
            }
            if (xgso != PV_NETIF_GSO_TYPE_NONE)
                q->st.rx_gso++;
            if (q->ctl.meta.htype)
                q->ctl.st.rx_hash_extras++;
        }
    }
    fr->nseg = q->nrxseg - fr->seg_first;
    fr->nrsp = q->nrxrsp - fr->rsp_first;
    q->st.rx_packets++;
    q->st.rx_bytes += len;
    return 1;
}

/* Arm (ms > 0) or disarm (0) the drain timer; a queue without a timeout has none. */
static void drain_timer(struct pv_net_queue *q, uint32_t ms)
{
    if (q->timer < 0)
        return;
    struct itimerspec its = {.it_value = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L}};
    (void)timerfd_settime(q->timer, 0, &its, NULL);
}

/* Stop (1) or resume (0) polling the tap and the hand-off ring while a frame waits for posted buffers. */
static void rx_pause(struct pv_net_queue *q, int pause)
{
    q->src[q->tap_src].fd = pause ? -1 : q->tap;
    if (q->handoff_src >= 0)
        q->src[q->handoff_src].fd = pause ? -1 : pv_netctrl_handoff_fd(&q->ctl);
}

/* The stall outlasted rx_drain_timeout_ms: drop the held frame and what the tap queued meanwhile (bounded:
 * a flood cannot keep us here), then poll the tap again. */
static void rx_purge(struct pv_net_queue *q)
{
    if (!q->held_len)
        return;
    q->st.rx_purges++;
    q->st.rx_dropped++;
    q->held_len = q->held_off = 0;
    q->rxoff = 0;
    for (uint32_t i = 0; i < 4 * q->rx.size; i++) {
        ssize_t n = read(q->tap, q->rxbuf, RX_READ_MAX);
        if (n < 0)
            break; /* EAGAIN: drained; an error shows at the next read of the data path */
        q->st.rx_dropped++;
    }
    q->st.rx_dropped += pv_netctrl_handoff_purge(&q->ctl);
    rx_pause(q, 0);
    if (q->cfg.vif && !q->rx_stalled) {
        q->rx_stalled = 1;
        if (pv_net_vif_queue_stalled(q->cfg.vif))
            (void)ioctl(q->tap, TUNSETCARRIER, &(int){0});
    }
}

/* A stalled queue whose guest posted a buffer again: the carrier comes back once no queue of the vif is
 * stalled (xenvif_rx_queue_ready). */
static void rx_ready_check(struct pv_net_queue *q)
{
    if (q->rxreq_n == 0 && pv_back_ring_pending(&q->rx) <= 0)
        return;
    q->rx_stalled = 0;
    if (pv_net_vif_queue_ready(q->cfg.vif))
        (void)ioctl(q->tap, TUNSETCARRIER, &(int){1});
}

int32_t pv_net_queue_rx(struct pv_net_queue *q)
{
    if (q->dead)
        return -PV_NET_EDEAD;
    if (q->rx_stalled)
        rx_ready_check(q);
    uint64_t before = q->st.rx_packets;
    int32_t rc = 0;
    pv_netctrl_q_refresh(&q->ctl);
    for (;;) {
        uint32_t off, total;
        if (q->held_len) {
            off = q->held_off;
            total = q->held_len;
            q->ctl.meta = q->held_meta;
        } else {
            if (q->rxoff + RX_READ_MAX > RX_BUF_SIZE || q->nrxfr >= q->rx.size)
                rx_flush(q);
            /* Frames other queues' pumps steered here first (they were read earlier), then our tap. */
            uint32_t got = pv_netctrl_handoff_pop(&q->ctl, q->rxbuf + q->rxoff);
            if (!got) {
                ssize_t n = read(q->tap, q->rxbuf + q->rxoff, RX_READ_MAX);
                if (n < 0) {
                    if (errno == EAGAIN || errno == EINTR)
                        break;
                    rc = -PV_NET_ETAP;
                    break;
                }
                if ((uint32_t)n <= PV_VNET_HDR_LEN) {
                    q->st.rx_dropped++;
                    continue;
                }
                got = (uint32_t)n;
                int32_t dest = pv_netctrl_rx_steer(&q->ctl, q->rxbuf + q->rxoff, got);
                if (dest < 0)
                    continue; /* multicast the frontend did not ask for */
                if ((uint32_t)dest != q->ctl.index) {
                    (void)pv_netctrl_handoff_push(&q->ctl, (uint32_t)dest, q->rxbuf + q->rxoff, got);
                    continue;
                }
            }
            off = q->rxoff;
            total = got;
            q->rxoff += (total + 63u) & ~63u;
        }
        int r = rx_frame(q, off, total);
        if (r < 0) {
            mark_dead(q, PV_NETIF_E_RING);
            rc = -PV_NET_EDEAD;
            break;
        }
        if (r == 0) {
            /* No buffers: hold the frame, stop polling the tap until the frontend posts (its event). */
            if (!q->held_len) {
                q->st.rx_stalls++;
                drain_timer(q, q->cfg.rx_drain_timeout_ms);
            }
            q->held_off = off;
            q->held_len = total;
            q->held_meta = q->ctl.meta;
            rx_pause(q, 1);
            break;
        }
        if (q->held_len) {
            q->held_len = 0;
            rx_pause(q, 0);
            drain_timer(q, 0);
        }
    }
    rx_flush(q);
    pv_netctrl_kick(&q->ctl);
    if (rc < 0)
        return rc;
    return (int32_t)(q->st.rx_packets - before);
}

/* ---- pump ---------------------------------------------------------------------------------------------- */

static int32_t ack(struct pv_evtchn *e) { return (e && pv_evtchn_do_pending(e) < 0) ? -PV_NET_EEVTCHN : 0; }
static int32_t unmask(struct pv_evtchn *e) { return (e && pv_evtchn_do_unmask(e) < 0) ? -PV_NET_EEVTCHN : 0; }

static int32_t on_tx_event(void *ctx)
{
    struct pv_net_queue *q = ctx;
    q->st.tx_events++;
    int32_t rc = ack(q->ev_tx);
    if (rc < 0)
        return rc;
    int32_t work = pv_net_queue_tx(q);
    if (work >= 0 && q->ev_rx == q->ev_tx) {
        rc = pv_net_queue_rx(q); /* one channel: it also says "buffers posted" */
        work = rc < 0 ? rc : work + rc;
    }
    if (work < 0)
        return work;
    rc = unmask(q->ev_tx);
    return rc < 0 ? rc : work; /* packets moved: the pump spins after a busy pass (poll_us) */
}

static int32_t on_rx_event(void *ctx)
{
    struct pv_net_queue *q = ctx;
    q->st.rx_events++;
    int32_t rc = ack(q->ev_rx);
    if (rc < 0)
        return rc;
    int32_t work = pv_net_queue_rx(q);
    if (work < 0)
        return work;
    rc = unmask(q->ev_rx);
    return rc < 0 ? rc : work;
}

static int32_t on_timer(void *ctx)
{
    struct pv_net_queue *q = ctx;
    uint64_t expirations;
    if (read(q->timer, &expirations, sizeof(expirations)) == (ssize_t)sizeof(expirations))
        rx_purge(q);
    return 0;
}

static int32_t on_credit_timer(void *ctx)
{
    struct pv_net_queue *q = ctx;
    uint64_t expirations;
    if (read(q->credit_timer, &expirations, sizeof(expirations)) != (ssize_t)sizeof(expirations))
        return 0;
    if (q->tx_throttled) {
        q->tx_throttled = 0;
        q->st.tx_throttled_ns += pv_net_now_ns() - q->throttled_since;
    }
    int32_t rc = pv_net_queue_tx(q);
    return rc < 0 ? rc : 0;
}

void pv_net_queue_credit_kick(struct pv_net_queue *q)
{
    if (q->credit_timer < 0)
        return;
    struct itimerspec its = {.it_value = {.tv_nsec = 1}};
    (void)timerfd_settime(q->credit_timer, 0, &its, NULL);
}

static int32_t on_handoff(void *ctx)
{
    struct pv_net_queue *q = ctx;
    pv_netctrl_handoff_ack(&q->ctl); /* before draining: a frame pushed meanwhile signals again */
    return pv_net_queue_rx(q);
}

static int32_t on_tap(void *ctx)
{
    struct pv_net_queue *q = ctx;
    q->st.tap_wakeups++;
    return pv_net_queue_rx(q);
}

int32_t pv_net_queue_run(struct pv_net_queue *q, int stop_fd)
{
    /* Requests may have been queued before anyone listened, and the initial event may be gone already. */
    int32_t rc = pv_net_queue_tx(q);
    if (rc >= 0)
        rc = pv_net_queue_rx(q);
    if (rc < 0)
        return rc;
    rc = pv_pump_run_spin(q->src, q->nsrc, stop_fd, &q->cfg.poll_us);
    return rc == -PV_PUMP_EPOLL ? -PV_NET_EEVTCHN : rc;
}

int pv_net_queue_dead(const struct pv_net_queue *q) { return q->dead; }

void pv_net_queue_get_stats(const struct pv_net_queue *q, struct pv_net_stats *out) { *out = q->st; }

/* ---- set-up -------------------------------------------------------------------------------------------- */

void pv_net_queue_destroy(struct pv_net_queue *q)
{
    if (!q)
        return;
    if (q->rx_stalled)
        (void)pv_net_vif_queue_ready(q->cfg.vif); /* the count only: a tap with no queue left has no carrier */
    if (q->tap >= 0)
        close(q->tap);
    if (q->timer >= 0)
        close(q->timer);
    if (q->credit_timer >= 0)
        close(q->credit_timer);
    free(q->txslots);
    free(q->txrsp);
    free(q->txseg);
    free(q->txpkt);
    free(q->txbuf);
    free(q->rxreq);
    free(q->rxrsp);
    free(q->rxseg);
    free(q->rxfr);
    free(q->rxbuf);
    free(q->rxslots);
    free(q);
}

static void attach(struct pv_back_ring *r, void *sring, uint32_t slot, uint32_t rsp)
{
    /* At the last published response: a ring picked up again after a daemon restart resumes right after the
     * last answer the guest saw (TX packets consumed but not answered are sent again; RX buffers posted but
     * not answered are used again), after publishing what the killed daemon had written but not published. */
    uint32_t start = __atomic_load_n(&((struct pv_sring *)sring)->rsp_prod, __ATOMIC_ACQUIRE);
    pv_back_ring_attach(r, sring, 1, slot, start);
    pv_back_ring_recover_noted(r, 1, rsp);
}

struct pv_net_queue *pv_net_queue_create(void *tx_sring, void *rx_sring, const struct pv_net_queue_config *cfg,
                                         struct pv_gnt *gnt, struct pv_evtchn *evtchn_tx,
                                         struct pv_evtchn *evtchn_rx, char *err, size_t errlen)
{
#define FAIL(...)                                                                                              \
    do {                                                                                                       \
        snprintf(err, errlen, __VA_ARGS__);                                                                    \
        pv_net_queue_destroy(q);                                                                               \
        return NULL;                                                                                           \
    } while (0)
    struct pv_net_queue *q = NULL;
    if (!tx_sring || !rx_sring || !gnt)
        FAIL("rings and grant handle are required");
    if (cfg->rx_headroom > 2048)
        FAIL("rx headroom %u too large", cfg->rx_headroom);
    q = calloc(1, sizeof(*q));
    if (!q)
        FAIL("out of memory");
    q->tap = -1;
    q->timer = -1;
    q->credit_timer = -1;
    q->handoff_src = -1;
    q->cfg = *cfg;
    q->gnt = gnt;
    q->ev_tx = evtchn_tx;
    q->ev_rx = evtchn_rx ? evtchn_rx : evtchn_tx;
    /* Close-on-exec, as every fd of the daemon: a plain dup() is inheritable, and uvloop spawns children
     * (swtpm) without closing fds.  A child holding a tap queue open keeps that queue attached after the daemon
     * is killed; the next daemon's queues come in beside it and the tap hashes host frames to the orphan too,
     * which nobody reads (a peer could not reach the guest until the guest's own traffic taught the tap's flow
     * table a live queue). */
    q->tap = fcntl(cfg->tap_fd, F_DUPFD_CLOEXEC, 0);
    if (q->tap < 0)
        FAIL("dup tap fd: %s", strerror(errno));
    attach(&q->tx, tx_sring, PV_NETIF_TX_SLOT_SIZE, PV_NETIF_TX_RSP_SIZE);
    attach(&q->rx, rx_sring, PV_NETIF_RX_SLOT_SIZE, PV_NETIF_RX_RSP_SIZE);
    if (!q->tx.size || !q->rx.size)
        FAIL("ring does not fit");
    q->txslots = malloc((size_t)q->tx.size * PV_NETIF_TX_SLOT_SIZE);
    q->txrsp = calloc(q->tx.size, sizeof(*q->txrsp));
    q->txseg = calloc(q->tx.size, sizeof(*q->txseg));
    q->txpkt = calloc(q->tx.size, sizeof(*q->txpkt));
    q->txbuf = malloc(TX_BUF_SIZE + FRAME_MAX);
    q->rxreq = calloc(q->rx.size, sizeof(*q->rxreq));
    q->rxrsp = calloc(q->rx.size, sizeof(*q->rxrsp));
    q->rxseg = calloc(q->rx.size, sizeof(*q->rxseg));
    q->rxfr = calloc(q->rx.size, sizeof(*q->rxfr));
    q->rxbuf = malloc(RX_BUF_SIZE);
    q->rxslots = malloc((size_t)q->rx.size * PV_NETIF_RX_SLOT_SIZE);
    if (!q->txslots || !q->txrsp || !q->txseg || !q->txpkt || !q->txbuf || !q->rxreq || !q->rxrsp ||
        !q->rxseg || !q->rxfr || !q->rxbuf || !q->rxslots)
        FAIL("out of memory");
    uint32_t n = 0;
    q->src[n++] = (struct pv_pump_source){
        .fd = q->ev_tx ? q->ev_tx->fd : -1, .ready = on_tx_event, .ctx = q, .hangup_rc = -PV_NET_EEVTCHN};
    if (q->ev_rx && q->ev_rx != q->ev_tx)
        q->src[n++] = (struct pv_pump_source){
            .fd = q->ev_rx->fd, .ready = on_rx_event, .ctx = q, .hangup_rc = -PV_NET_EEVTCHN};
    q->tap_src = (int)n;
    /* hangup_rc 0: the handler's read says what happened to the tap. */
    q->src[n++] = (struct pv_pump_source){.fd = q->tap, .ready = on_tap, .ctx = q, .hangup_rc = 0};
    if (cfg->rx_drain_timeout_ms) {
        q->timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (q->timer < 0)
            FAIL("timerfd: %s", strerror(errno));
        q->src[n++] = (struct pv_pump_source){.fd = q->timer, .ready = on_timer, .ctx = q, .hangup_rc = 0};
    }
    if (cfg->vif) {
        q->credit_timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (q->credit_timer < 0)
            FAIL("timerfd: %s", strerror(errno));
        q->src[n++] = (struct pv_pump_source){.fd = q->credit_timer, .ready = on_credit_timer, .ctx = q};
    }
    q->nsrc = n;
    return q;
#undef FAIL
}

/* ---- the vif's control plane (netctrl.h) --------------------------------------------------------------- */

int pv_net_queue_join_ctrl(struct pv_net_queue *q, struct pv_netctrl *v, uint32_t index)
{
    if (q->ctl.vif)
        return -EBUSY;
    pv_netctrl_q_join(&q->ctl, v, index);
    int fds[2];
    int32_t (*handlers[2])(void *);
    uint32_t nctrl = index == 0 ? pv_netctrl_ctrl_sources(v, fds, handlers) : 0;
    int hfd = pv_netctrl_handoff_fd(&q->ctl);
    if (q->nsrc + nctrl + (hfd >= 0) > PV_PUMP_MAX_SOURCES)
        return -E2BIG;
    if (hfd >= 0) {
        q->handoff_src = (int)q->nsrc;
        q->src[q->nsrc++] = (struct pv_pump_source){.fd = hfd, .ready = on_handoff, .ctx = q, .hangup_rc = 0};
    }
    for (uint32_t i = 0; i < nctrl; i++)
        q->src[q->nsrc++] =
            (struct pv_pump_source){.fd = fds[i], .ready = handlers[i], .ctx = v, .hangup_rc = -PV_NET_EEVTCHN};
    return 0;
}

int pv_net_queue_set_rx_headroom(struct pv_net_queue *q, uint16_t headroom)
{
    if (headroom > 2048) /* as at create: the first buffer must keep room for a frame */
        return -EINVAL;
    __atomic_store_n(&q->cfg.rx_headroom, headroom, __ATOMIC_RELAXED);
    return 0;
}

void pv_net_queue_get_ctrl_stats(const struct pv_net_queue *q, struct pv_netctrl_stats *out)
{
    pv_netctrl_q_stats(&q->ctl, out);
}
