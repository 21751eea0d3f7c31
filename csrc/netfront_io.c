/* The emulated guest's netfront data path; see netfront_io.h.
 *
 * The slot layouts are written out here from Xen's public io/netif.h (a frontend stands for foreign code and
 * does not borrow the backend's netif.h).
 */
#include "netfront_io.h"
#include "pvtime.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* io/netif.h */
#define TXF_CSUM_BLANK 1u
#define TXF_DATA_VALIDATED 2u
#define TXF_MORE_DATA 4u
#define TXF_EXTRA_INFO 8u
#define RXF_DATA_VALIDATED 1u
#define RXF_CSUM_BLANK 2u
#define RXF_MORE_DATA 4u
#define RXF_EXTRA_INFO 8u
#define EXTRA_GSO 1u
#define EXTRA_FLAG_MORE 1u
#define GSO_TCPV4 1u
#define GSO_TCPV6 2u
#define RSP_NULL 1
#define MAX_TX_SIZE 0xFFFFu

/* linux/virtio_net.h */
#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1u
#define VNET_F_DATA_VALID 2u
#define VNET_GSO_NONE 0u
#define VNET_GSO_TCPV4 1u
#define VNET_GSO_TCPV6 4u
#define VNET_GSO_ECN 0x80u

#define PAGE 4096u
#define RSP_BATCH 256
#define RX_MAX_PARTS 64 /* a packet spread over more buffers than this is malformed */
#define HDR_PEEK 192    /* bytes gathered to find the L4 header of an RX packet */

struct tx_req {
    uint32_t gref;
    uint16_t offset;
    uint16_t flags;
    uint16_t id;
    uint16_t size;
};
struct tx_rsp {
    uint16_t id;
    int16_t status;
};
struct rx_req {
    uint16_t id;
    uint16_t pad;
    uint32_t gref;
};
struct rx_rsp {
    uint16_t id;
    uint16_t offset;
    uint16_t flags;
    int16_t status;
};
struct extra {
    uint8_t type;
    uint8_t flags;
    uint16_t gso_size;
    uint8_t gso_type;
    uint8_t gso_pad;
    uint16_t gso_features;
};
struct vnet_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
};
_Static_assert(sizeof(struct tx_req) == 12, "netif_tx_request");
_Static_assert(sizeof(struct rx_rsp) == 8, "netif_rx_response");
_Static_assert(sizeof(struct extra) == 8, "netif_extra_info (gso)");
_Static_assert(sizeof(struct vnet_hdr) == VNET_HDR_LEN, "virtio_net_hdr");

struct part {
    uint32_t buf;
    uint16_t off;
    uint16_t len;
};

struct nf {
    const struct pv_nf_queue *q;
    struct pv_nf_stats *st;
    char *err;
    uint32_t errlen;
    /* TX pool: a stack of free page indices; the top `tx_want` are the next read's */
    uint32_t *tx_free;
    uint32_t tx_want; /* pages offered to one read: a largest frame's, or the whole pool if it is smaller */
    uint32_t tx_nfree;
    uint8_t *tx_busy;
    uint32_t tx_inflight;
    /* RX: the buffer posted in each ring slot, the buffers to post again */
    uint32_t *rx_posted;
    uint32_t rx_mask;
    uint32_t *rx_done;
    uint32_t rx_ndone;
    /* the RX packet being assembled (it may span consume batches) */
    struct part parts[RX_MAX_PARTS];
    uint32_t nparts;
    uint16_t first_flags;
    uint8_t in_extra, more, bad;
    uint8_t gso_type;
    uint16_t gso_size;
    uint32_t tap_drained;
};

static int fail(struct nf *n, int code, const char *fmt, ...)
{
    if (n->err && n->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(n->err, n->errlen, fmt, ap);
        va_end(ap);
    }
    return -code;
}

static int notify(struct nf *n, struct pv_evtchn *e, uint64_t *count)
{
    int rc = e->ops->notify(e);
    if (rc < 0)
        return fail(n, PV_NF_EEVTCHN, "event channel notify: %s", strerror(-rc));
    (*count)++;
    return 0;
}

/* ---- TX ----------------------------------------------------------------------------------------------- */

/* Responses give the pages back.  Returns the number of responses seen, or -PV_NF_ERING. */
static int tx_reap(struct nf *n)
{
    struct tx_rsp rsp[RSP_BATCH];
    int total = 0;
    for (;;) {
        int32_t got = pv_front_ring_consume(n->q->tx, rsp, RSP_BATCH, sizeof(rsp[0]));
        if (got < 0)
            return fail(n, PV_NF_ERING, "TX ring: the backend published more responses than requests");
        for (int32_t i = 0; i < got; i++) {
            if (rsp[i].status == RSP_NULL)
                continue; /* an extra-info slot's answer */
            uint16_t id = rsp[i].id;
            if (id >= n->q->ntx || !n->tx_busy[id])
                return fail(n, PV_NF_ERING, "TX response for id %u, which is not in flight", id);
            if (rsp[i].status < 0)
                n->st->tx_errors++;
            n->tx_busy[id] = 0;
            n->tx_inflight--;
            n->tx_free[n->tx_nfree++] = id;
        }
        total += got;
        if (got < RSP_BATCH)
            return total;
    }
}

static int tx_room(const struct nf *n)
{
    return n->tx_nfree >= n->tx_want && pv_front_ring_free(n->q->tx) >= n->tx_want + 1;
}

/* Read up to `batch` frames from the tap into pool pages and put their slots; one push for them all.
 * Returns frames put (or dropped), or -PV_NF_*. */
static int tx_frames(struct nf *n)
{
    const struct pv_nf_queue *q = n->q;
    uint32_t batch = q->batch ? q->batch : 64, done = 0, put = 0;
    n->tap_drained = 0;
    while (done < batch) {
        if (!tx_room(n)) {
            n->st->tx_full++;
            break;
        }
        struct vnet_hdr vh;
        /* The header, the pages, then a private spill buffer: tun copies what fits and returns that, so a
         * byte in the spill buffer is how a frame larger than the pages shows itself. */
        uint8_t spill[64];
        struct iovec iov[2 + PV_NF_MAX_TX_PAGES_PER_FRAME];
        iov[0] = (struct iovec){&vh, sizeof(vh)};
        for (uint32_t k = 0; k < n->tx_want; k++) {
            uint32_t page = n->tx_free[n->tx_nfree - 1 - k];
            iov[1 + k] = (struct iovec){q->tx_addrs[page], PAGE};
        }
        iov[1 + n->tx_want] = (struct iovec){spill, sizeof(spill)};
        ssize_t got = readv(q->tap_fd, iov, 2 + (int)n->tx_want);
        n->st->tap_reads++;
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                n->tap_drained = 1;
                break;
            }
            return fail(n, PV_NF_ETAP, "tap read: %s", strerror(errno));
        }
        done++;
        uint32_t flen = got > VNET_HDR_LEN ? (uint32_t)got - VNET_HDR_LEN : 0;
        uint32_t gso = vh.gso_type & ~VNET_GSO_ECN;
        int bad_gso = (gso != VNET_GSO_NONE && gso != VNET_GSO_TCPV4 && gso != VNET_GSO_TCPV6) ||
                      (gso && !vh.gso_size);
        if (flen < 14 || flen > MAX_TX_SIZE || flen > n->tx_want * PAGE || bad_gso) {
            n->st->tx_dropped++;
            continue;
        }
        uint32_t npages = (flen + PAGE - 1) / PAGE;
        uint16_t flags = 0;
        if (vh.flags & VNET_F_NEEDS_CSUM) {
            flags |= TXF_CSUM_BLANK | TXF_DATA_VALIDATED;
            n->st->tx_csum_blank++;
        } else if (vh.flags & VNET_F_DATA_VALID) {
            flags |= TXF_DATA_VALIDATED;
        }
        uint8_t slots[(PV_NF_MAX_TX_PAGES_PER_FRAME + 1) * sizeof(struct tx_req)];
        struct tx_req *s = (struct tx_req *)slots;
        uint32_t ns = 0, left = flen;
        for (uint32_t k = 0; k < npages; k++) {
            uint32_t page = n->tx_free[n->tx_nfree - 1 - k];
            uint32_t len = left < PAGE ? left : PAGE;
            left -= len;
            uint16_t f = k + 1 < npages ? TXF_MORE_DATA : 0;
            if (k == 0)
                f |= flags | (gso ? TXF_EXTRA_INFO : 0);
            s[ns++] = (struct tx_req){.gref = q->tx_refs[page], .offset = 0, .flags = f, .id = (uint16_t)page,
                                      .size = (uint16_t)(k == 0 ? flen : len)};
            if (k == 0 && gso) {
                struct extra *e = (struct extra *)&s[ns++];
                memset(e, 0, sizeof(struct tx_req));
                e->type = EXTRA_GSO;
                e->gso_size = vh.gso_size;
                e->gso_type = gso == VNET_GSO_TCPV4 ? GSO_TCPV4 : GSO_TCPV6;
            }
            n->tx_busy[page] = 1;
        }
        n->tx_nfree -= npages;
        n->tx_inflight += npages;
        pv_front_ring_put_requests(q->tx, slots, ns, sizeof(struct tx_req));
        put++;
        n->st->tx_packets++;
        n->st->tx_bytes += flen;
        if (gso)
            n->st->tx_gso++;
    }
    if (put && pv_front_ring_push(q->tx)) {
        int rc = notify(n, q->ev_tx, &n->st->tx_notifies);
        if (rc < 0)
            return rc;
    }
    return (int)done;
}

/* ---- RX ----------------------------------------------------------------------------------------------- */

static int rx_post(struct nf *n)
{
    const struct pv_nf_queue *q = n->q;
    if (!n->rx_ndone)
        return 0;
    struct rx_req reqs[RSP_BATCH];
    uint32_t i = 0;
    while (i < n->rx_ndone) {
        uint32_t k = 0;
        for (; k < RSP_BATCH && i + k < n->rx_ndone; k++) {
            uint32_t b = n->rx_done[i + k];
            n->rx_posted[(q->rx->req_prod_pvt + k) & n->rx_mask] = b;
            reqs[k] = (struct rx_req){.id = (uint16_t)b, .pad = 0, .gref = q->rx_refs[b]};
        }
        uint32_t put = pv_front_ring_put_requests(q->rx, reqs, k, sizeof(reqs[0]));
        if (put != k) /* cannot happen: at most nrx <= ring size buffers exist */
            return fail(n, PV_NF_ERING, "RX ring full while reposting %u buffers", k);
        i += k;
    }
    n->rx_ndone = 0;
    if (pv_front_ring_push(q->rx))
        return notify(n, q->ev_rx, &n->st->rx_notifies);
    return 0;
}

/* (csum_start, csum_offset, end of the L4 header) of a TCP/UDP frame; -1 if it has none. */
static int l4_where(const uint8_t *f, uint32_t len, uint16_t *start, uint16_t *off, uint16_t *end, uint8_t *tcp)
{
    uint32_t o = 14;
    if (len < 14)
        return -1;
    uint16_t et = (uint16_t)(f[12] << 8 | f[13]);
    if (et == 0x8100) {
        if (len < 18)
            return -1;
        et = (uint16_t)(f[16] << 8 | f[17]);
        o = 18;
    }
    uint8_t proto;
    if (et == 0x0800) {
        if (len < o + 20)
            return -1;
        uint32_t ihl = (f[o] & 0xFu) * 4;
        if (ihl < 20)
            return -1;
        proto = f[o + 9];
        o += ihl;
    } else if (et == 0x86DD) {
        if (len < o + 40)
            return -1;
        proto = f[o + 6];
        o += 40;
    } else {
        return -1;
    }
    if (proto == 6) {
        if (len < o + 20)
            return -1;
        *start = (uint16_t)o;
        *off = 16;
        *end = (uint16_t)(o + (f[o + 12] >> 4) * 4u);
        *tcp = 1;
        return 0;
    }
    if (proto == 17) {
        *start = (uint16_t)o;
        *off = 6;
        *end = (uint16_t)(o + 8);
        *tcp = 0;
        return 0;
    }
    return -1;
}

static void rx_release_parts(struct nf *n)
{
    for (uint32_t i = 0; i < n->nparts; i++)
        n->rx_done[n->rx_ndone++] = n->parts[i].buf;
    n->nparts = 0;
    n->bad = 0;
    n->gso_type = 0;
    n->gso_size = 0;
}

static int rx_deliver(struct nf *n)
{
    const struct pv_nf_queue *q = n->q;
    if (n->bad || !n->nparts) {
        n->st->rx_errors++;
        rx_release_parts(n);
        return 0;
    }
    struct vnet_hdr vh = {0};
    struct iovec iov[1 + RX_MAX_PARTS];
    uint32_t total = 0;
    iov[0] = (struct iovec){&vh, sizeof(vh)};
    for (uint32_t i = 0; i < n->nparts; i++) {
        iov[1 + i] = (struct iovec){(uint8_t *)q->rx_addrs[n->parts[i].buf] + n->parts[i].off, n->parts[i].len};
        total += n->parts[i].len;
    }
    if ((n->first_flags & RXF_CSUM_BLANK) || n->gso_type) {
        uint8_t peek[HDR_PEEK];
        uint32_t have = 0;
        for (uint32_t i = 0; i < n->nparts && have < HDR_PEEK; i++) {
            uint32_t c = n->parts[i].len < HDR_PEEK - have ? n->parts[i].len : HDR_PEEK - have;
            memcpy(peek + have, iov[1 + i].iov_base, c);
            have += c;
        }
        uint16_t cs, co, end;
        uint8_t tcp;
        if (l4_where(peek, have, &cs, &co, &end, &tcp) < 0 || (n->gso_type && !tcp)) {
            n->st->rx_errors++;
            rx_release_parts(n);
            return 0;
        }
        vh.flags = VNET_F_NEEDS_CSUM;
        vh.csum_start = cs;
        vh.csum_offset = co;
        if (n->gso_type) {
            vh.gso_type = n->gso_type == GSO_TCPV4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
            vh.gso_size = n->gso_size;
            vh.hdr_len = end;
            n->st->rx_gso++;
        }
    } else if (n->first_flags & RXF_DATA_VALIDATED) {
        vh.flags = VNET_F_DATA_VALID;
    }
    for (;;) {
        ssize_t w = writev(q->tap_fd, iov, 1 + (int)n->nparts);
        n->st->tap_writes++;
        if (w >= 0) {
            n->st->rx_packets++;
            n->st->rx_bytes += total;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno == EBADF)
            return fail(n, PV_NF_ETAP, "tap write: %s", strerror(errno));
        n->st->rx_errors++; /* the guest's stack refused it (link down, no buffer): a lost packet */
        break;
    }
    rx_release_parts(n);
    return 0;
}

/* Consume RX responses, write complete packets, post the buffers again.  Returns responses seen or -PV_NF_*. */
static int rx_responses(struct nf *n)
{
    const struct pv_nf_queue *q = n->q;
    uint8_t raw[RSP_BATCH][8];
    int total = 0;
    for (;;) {
        uint32_t cons = q->rx->rsp_cons;
        int32_t got = pv_front_ring_consume(q->rx, raw, RSP_BATCH, 8);
        if (got < 0)
            return fail(n, PV_NF_ERING, "RX ring: the backend published more responses than requests");
        for (int32_t i = 0; i < got; i++) {
            uint32_t buf = n->rx_posted[(cons + (uint32_t)i) & n->rx_mask];
            if (n->in_extra) {
                const struct extra *e = (const struct extra *)raw[i];
                if (e->type == EXTRA_GSO) {
                    if ((e->gso_type != GSO_TCPV4 && e->gso_type != GSO_TCPV6) || !e->gso_size)
                        n->bad = 1;
                    n->gso_type = e->gso_type;
                    n->gso_size = e->gso_size;
                }
                n->in_extra = (e->flags & EXTRA_FLAG_MORE) != 0;
                n->rx_done[n->rx_ndone++] = buf; /* an extra slot's buffer carries nothing */
            } else {
                const struct rx_rsp *r = (const struct rx_rsp *)raw[i];
                if (!n->nparts && !n->bad)
                    n->first_flags = r->flags;
                if (n->nparts == RX_MAX_PARTS) {
                    n->bad = 1;
                    n->rx_done[n->rx_ndone++] = buf;
                } else {
                    if (r->status < 0 || (uint32_t)r->offset + (uint32_t)r->status > PAGE)
                        n->bad = 1;
                    n->parts[n->nparts++] = (struct part){buf, r->offset, r->status < 0 ? 0 : (uint16_t)r->status};
                }
                /* extra-info slots follow the first response only */
                n->in_extra = n->nparts == 1 && (r->flags & RXF_EXTRA_INFO) != 0;
                n->more = (r->flags & RXF_MORE_DATA) != 0;
            }
            if (!n->in_extra && !n->more && n->nparts) {
                int rc = rx_deliver(n);
                if (rc < 0)
                    return rc;
            }
        }
        total += got;
        if (got < RSP_BATCH)
            break;
    }
    int rc = rx_post(n);
    return rc < 0 ? rc : total;
}

/* ---- the loop ----------------------------------------------------------------------------------------- */

static int ack(struct nf *n, struct pv_evtchn *e)
{
    int rc = e->ops->pending(e);
    return rc < 0 ? fail(n, PV_NF_EEVTCHN, "event channel: %s", strerror(-rc)) : 0;
}

static int rings_have_work(const struct nf *n)
{
    const struct pv_nf_queue *q = n->q;
    return __atomic_load_n(&q->rx->sring->rsp_prod, __ATOMIC_ACQUIRE) != q->rx->rsp_cons ||
           (n->tx_inflight && __atomic_load_n(&q->tx->sring->rsp_prod, __ATOMIC_ACQUIRE) != q->tx->rsp_cons);
}

static int run(struct nf *n, int stop_fd)
{
    const struct pv_nf_queue *q = n->q;
    for (uint32_t b = 0; b < q->nrx; b++)
        n->rx_done[n->rx_ndone++] = b;
    int rc = rx_post(n);
    if (rc < 0)
        return rc;
    n->tap_drained = 0;
    for (;;) {
        n->st->loops++;
        int work = 0;
        if ((rc = tx_reap(n)) < 0)
            return rc;
        work += rc;
        if ((rc = rx_responses(n)) < 0)
            return rc;
        work += rc;
        if (tx_room(n) && !n->tap_drained) {
            if ((rc = tx_frames(n)) < 0)
                return rc;
            work += rc;
        }
        if (work)
            continue;
        if (q->spin_us) {
            uint64_t until = now_ns() + (uint64_t)q->spin_us * 1000u;
            int found = 0;
            while (now_ns() < until) {
                if ((found = rings_have_work(n)))
                    break;
                cpu_relax();
            }
            if (found) {
                n->st->spin_hits++;
                continue;
            }
        }
        /* Re-arm rsp_event on both rings, then look once more: a response published before the re-arm
         * sends no event. */
        int32_t more_tx = n->tx_inflight ? pv_front_ring_final_check(q->tx) : 0;
        int32_t more_rx = pv_front_ring_final_check(q->rx);
        if (more_tx || more_rx)
            continue;
        struct pollfd fds[4];
        int nf = 0, itap = -1, irx = -1;
        fds[nf++] = (struct pollfd){stop_fd, POLLIN, 0};
        int itx = nf;
        fds[nf++] = (struct pollfd){q->ev_tx->fd, POLLIN, 0};
        if (q->ev_rx != q->ev_tx) {
            irx = nf;
            fds[nf++] = (struct pollfd){q->ev_rx->fd, POLLIN, 0};
        }
        if (tx_room(n)) {
            itap = nf;
            fds[nf++] = (struct pollfd){q->tap_fd, POLLIN, 0};
        }
        int pr = poll(fds, (nfds_t)nf, -1);
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            return fail(n, PV_NF_EEVTCHN, "poll: %s", strerror(errno));
        }
        n->st->wakeups++;
        if (fds[0].revents)
            return 0;
        if (fds[itx].revents && (rc = ack(n, q->ev_tx)) < 0)
            return rc;
        if (irx >= 0 && fds[irx].revents && (rc = ack(n, q->ev_rx)) < 0)
            return rc;
        if (itap >= 0 && (fds[itap].revents & (POLLERR | POLLHUP | POLLNVAL)))
            return fail(n, PV_NF_ETAP, "tap fd: poll revents %#x", fds[itap].revents);
        if (itap >= 0 && fds[itap].revents)
            n->tap_drained = 0;
    }
}

int pv_nf_run(const struct pv_nf_queue *q, int stop_fd, struct pv_nf_stats *st, char *err, uint32_t errlen)
{
    struct nf n = {.q = q, .st = st, .err = err, .errlen = errlen};
    if (err && errlen)
        err[0] = 0;
    if (!q || !q->tx || !q->rx || !q->ev_tx || !q->ev_rx || !st || q->tap_fd < 0 || stop_fd < 0)
        return fail(&n, PV_NF_EINVAL, "missing ring, event channel, tap or stats");
    if (!q->ntx || q->ntx > 65536 || !q->tx_addrs || !q->tx_refs)
        return fail(&n, PV_NF_EINVAL, "the TX pool needs 1 to 65536 pages (got %u)", q->ntx);
    if (q->tx->size < PV_NF_MAX_TX_PAGES_PER_FRAME + 1)
        return fail(&n, PV_NF_EINVAL, "TX ring of %u slots is too small", q->tx->size);
    if (!q->nrx || q->nrx > q->rx->size || !q->rx_addrs || !q->rx_refs)
        return fail(&n, PV_NF_EINVAL, "%u RX buffers for a ring of %u slots", q->nrx, q->rx->size);
    if (q->tx->req_prod_pvt != q->tx->rsp_cons || q->rx->req_prod_pvt != q->rx->rsp_cons)
        return fail(&n, PV_NF_EINVAL, "the rings have requests in flight");
    n.tx_free = malloc(sizeof(uint32_t) * q->ntx);
    n.tx_busy = calloc(q->ntx, 1);
    n.rx_posted = calloc(q->rx->size, sizeof(uint32_t));
    n.rx_done = malloc(sizeof(uint32_t) * (q->nrx + RX_MAX_PARTS));
    int rc;
    if (!n.tx_free || !n.tx_busy || !n.rx_posted || !n.rx_done) {
        rc = fail(&n, PV_NF_EINVAL, "out of memory");
    } else {
        for (uint32_t i = 0; i < q->ntx; i++)
            n.tx_free[i] = q->ntx - 1 - i;
        n.tx_nfree = q->ntx;
        n.tx_want = q->ntx < PV_NF_MAX_TX_PAGES_PER_FRAME ? q->ntx : PV_NF_MAX_TX_PAGES_PER_FRAME;
        n.rx_mask = q->rx->size - 1;
        rc = run(&n, stop_fd);
    }
    free(n.tx_free);
    free(n.tx_busy);
    free(n.rx_posted);
    free(n.rx_done);
    return rc;
}
