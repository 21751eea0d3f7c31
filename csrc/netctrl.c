/* netback's per-vif control plane; see netctrl.h. */
#include "netctrl.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "netback.h"

#define HANDOFF_MASK (PV_NETCTRL_HANDOFF_SLOTS - 1u)
#define ALL_HASH_TYPES                                                                                        \
    (PV_NETIF_CTRL_HASH_TYPE_IPV4 | PV_NETIF_CTRL_HASH_TYPE_IPV4_TCP | PV_NETIF_CTRL_HASH_TYPE_IPV6 |         \
     PV_NETIF_CTRL_HASH_TYPE_IPV6_TCP)
_Static_assert((PV_NETCTRL_HANDOFF_SLOTS & HANDOFF_MASK) == 0, "hand-off slots: a power of two");

struct handoff_cell {
    uint32_t seq; /* == pos: free for the producer of pos; == pos + 1: full for the consumer */
    uint32_t len;
    struct pv_netctrl_meta meta;
    uint8_t *data;
};

struct handoff {
    /* Apart on their own cache lines: the producers' CASes must not bounce the consumer's line. */
    _Alignas(64) uint32_t enq; /* producers' position (CAS) */
    _Alignas(64) uint32_t deq; /* the consumer's, private to it */
    int efd;
    struct handoff_cell cells[PV_NETCTRL_HANDOFF_SLOTS];
    uint8_t *mem;
};

struct pv_netctrl {
    uint32_t nr_queues;
    uint32_t domid;
    struct pv_gnt *gnt;
    struct handoff *ho; /* per queue (64-byte aligned); NULL with one queue or without a ctrl ring */

    /* What the queues read: in `own`, or in the caller's memory (a file mapping that outlives the daemon). */
    struct pv_netctrl_state *pub;
    struct pv_netctrl_state own;
    /* Hash: written by the ctrl ring's server only (queue 0's pump), published under pub->hash_seq. */
    struct pv_net_hash hash; /* the writer's own copy */
    /* Multicast list: writers serialised by mc_lock (TX paths of any queue), published under pub->mcast_seq. */
    pthread_mutex_t mc_lock;
    struct pv_net_mcast mcast;
    uint8_t mcast_control;

    /* ctrl ring */
    struct pv_back_ring ctrl;
    struct pv_evtchn *ctrl_ev;
    int ctrl_kick;
    int ctrl_dead;
    uint8_t *ctrl_slots;
    struct pv_netif_ctrl_response *ctrl_rsp;
    uint64_t ctrl_requests, ctrl_errors; /* written by queue 0's pump, read with its stats */
};

/* ---- seqlock publication ------------------------------------------------------------------------------ */

static void publish(uint32_t *seq, void *pub, const void *src, size_t n)
{
    uint32_t s = __atomic_load_n(seq, __ATOMIC_RELAXED);
    __atomic_store_n(seq, s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(pub, src, n);
    __atomic_store_n(seq, s + 2, __ATOMIC_RELEASE);
}

/* Copy `pub` when `seq` moved since *seen; never blocks the reader for long (a writer copies < 1 KiB). */
static void snapshot(const uint32_t *seq, const void *pub, void *dst, size_t n, uint32_t *seen)
{
    uint32_t s = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
    if (s == *seen)
        return;
    for (;;) {
        s = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
        if (s & 1)
            continue;
        memcpy(dst, pub, n);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(seq, __ATOMIC_RELAXED) == s)
            break;
    }
    *seen = s;
}

/* ---- the vif ------------------------------------------------------------------------------------------ */

void pv_netctrl_destroy(struct pv_netctrl *v)
{
    if (!v)
        return;
    if (v->ho) {
        for (uint32_t i = 0; i < v->nr_queues; i++) {
            if (v->ho[i].efd >= 0)
                close(v->ho[i].efd);
            free(v->ho[i].mem);
        }
        free(v->ho);
    }
    if (v->ctrl_kick >= 0)
        close(v->ctrl_kick);
    free(v->ctrl_slots);
    free(v->ctrl_rsp);
    pthread_mutex_destroy(&v->mc_lock);
    free(v);
}

struct pv_netctrl *pv_netctrl_create(uint32_t nr_queues, uint32_t frontend_domid, struct pv_gnt *gnt,
                                     uint8_t handoff, char *err, size_t errlen)
{
    if (nr_queues == 0 || nr_queues > PV_NETCTRL_MAX_QUEUES || !gnt) {
        snprintf(err, errlen, "bad vif: %u queues", nr_queues);
        return NULL;
    }
    struct pv_netctrl *v = calloc(1, sizeof(*v));
    if (!v) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    v->nr_queues = nr_queues;
    v->domid = frontend_domid;
    v->gnt = gnt;
    v->ctrl_kick = -1;
    v->pub = &v->own;
    pthread_mutex_init(&v->mc_lock, NULL);
    if (nr_queues > 1 && handoff) {
        size_t bytes = nr_queues * sizeof(*v->ho); /* a multiple of 64: the struct's alignment */
        v->ho = aligned_alloc(64, bytes);
        if (!v->ho)
            goto oom;
        memset(v->ho, 0, bytes);
        for (uint32_t i = 0; i < nr_queues; i++)
            v->ho[i].efd = -1;
        for (uint32_t i = 0; i < nr_queues; i++) {
            struct handoff *h = &v->ho[i];
            h->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
            if (h->efd < 0) {
                snprintf(err, errlen, "eventfd: %s", strerror(errno));
                pv_netctrl_destroy(v);
                return NULL;
            }
            h->mem = malloc((size_t)PV_NETCTRL_HANDOFF_SLOTS * PV_NETCTRL_FRAME_MAX);
            if (!h->mem)
                goto oom;
            for (uint32_t k = 0; k < PV_NETCTRL_HANDOFF_SLOTS; k++) {
                h->cells[k].seq = k;
                h->cells[k].data = h->mem + (size_t)k * PV_NETCTRL_FRAME_MAX;
            }
        }
    }
    return v;
oom:
    snprintf(err, errlen, "out of memory");
    pv_netctrl_destroy(v);
    return NULL;
}

static int state_valid(const struct pv_netctrl_state *st, uint32_t nr_queues)
{
    const struct pv_net_hash *h = &st->hash;
    if ((st->hash_seq & 1) || (st->mcast_seq & 1)) /* killed in the middle of a publication */
        return 0;
    if (h->alg > PV_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ || (h->flags & ~ALL_HASH_TYPES) ||
        h->size > PV_NETCTRL_MAX_MAPPING || st->mcast.n > PV_NETCTRL_MCAST_MAX)
        return 0;
    for (uint32_t i = 0; i < PV_NETCTRL_MAX_MAPPING; i++)
        if (h->mapping[i] >= nr_queues)
            return 0;
    return 1;
}

int pv_netctrl_use_state(struct pv_netctrl *v, void *mem, size_t len, const uint8_t ident[16], uint8_t load)
{
    if (!mem || len < sizeof(struct pv_netctrl_state) || v->pub != &v->own)
        return -EINVAL;
    struct pv_netctrl_state *st = mem;
    /* Only the state of this very vif (the caller's identity: frontend, rings, ports) and only when intact;
     * anything else starts afresh, as a frontend that just connected expects. */
    int ok = load && st->magic == PV_NETCTRL_STATE_MAGIC && memcmp(st->ident, ident, 16) == 0 &&
             state_valid(st, v->nr_queues);
    if (ok) {
        v->hash = st->hash;
        v->mcast = st->mcast;
    } else {
        memset(st, 0, sizeof(*st));
        memcpy(st->ident, ident, 16);
        __atomic_store_n(&st->magic, PV_NETCTRL_STATE_MAGIC, __ATOMIC_RELEASE);
    }
    v->pub = st;
    return ok;
}

void pv_netctrl_set_mcast_control(struct pv_netctrl *v, uint8_t on)
{
    __atomic_store_n(&v->mcast_control, (uint8_t)(on != 0), __ATOMIC_RELEASE);
}

int pv_netctrl_attach_ctrl(struct pv_netctrl *v, void *ctrl_sring, struct pv_evtchn *ev)
{
    if (!ctrl_sring || v->ctrl.sring)
        return -EINVAL;
    /* As the data rings: resume after the last published response (restart recovery). */
    uint32_t start = __atomic_load_n(&((struct pv_sring *)ctrl_sring)->rsp_prod, __ATOMIC_ACQUIRE);
    pv_back_ring_attach(&v->ctrl, ctrl_sring, 1, PV_NETIF_CTRL_SLOT_SIZE, start);
    pv_back_ring_recover_noted(&v->ctrl, 1, PV_NETIF_CTRL_RSP_SIZE);
    if (!v->ctrl.size)
        return -EINVAL;
    v->ctrl_slots = malloc((size_t)v->ctrl.size * PV_NETIF_CTRL_SLOT_SIZE);
    v->ctrl_rsp = calloc(v->ctrl.size, sizeof(*v->ctrl_rsp));
    v->ctrl_kick = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!v->ctrl_slots || !v->ctrl_rsp || v->ctrl_kick < 0)
        return -ENOMEM;
    v->ctrl_ev = ev;
    return 0;
}

void pv_netctrl_get_hash(struct pv_netctrl *v, struct pv_net_hash *out)
{
    uint32_t seen = UINT32_MAX;
    snapshot(&v->pub->hash_seq, &v->pub->hash, out, sizeof(*out), &seen);
}

uint32_t pv_netctrl_mcast_count(struct pv_netctrl *v)
{
    pthread_mutex_lock(&v->mc_lock);
    uint32_t n = v->mcast.n;
    pthread_mutex_unlock(&v->mc_lock);
    return n;
}

uint32_t pv_netctrl_ctrl_errors(struct pv_netctrl *v)
{
    return (uint32_t)__atomic_load_n(&v->ctrl_errors, __ATOMIC_RELAXED);
}

/* ---- ctrl ring (hash.c's setters, process_ctrl_request) ---------------------------------------------- */

static int gcopy_in(struct pv_netctrl *v, uint32_t gref, void *dst, uint32_t len)
{
    /* The data starts at the beginning of the granted page (netif.h), and never runs past it. */
    if (len > PV_NETIF_PAGE_SIZE)
        return -1;
    struct pv_gcopy_seg s;
    memset(&s, 0, sizeof(s));
    s.source.foreign.ref = gref;
    s.source.foreign.offset = 0;
    s.source.foreign.domid = (uint16_t)v->domid;
    s.dest.virt = dst;
    s.len = (uint16_t)len;
    s.flags = PV_GCOPY_SOURCE_GREF;
    if (pv_gnt_copy(v->gnt, &s, 1) < 0 || s.status != PV_GNTST_okay)
        return -1;
    return 0;
}

static uint32_t ctrl_request(struct pv_netctrl *v, const struct pv_netif_ctrl_request *r, uint32_t *data)
{
    struct pv_net_hash *h = &v->hash;
    *data = 0;
    switch (r->type) {
    case PV_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM:
        if (r->data[0] != PV_NETIF_CTRL_HASH_ALGORITHM_NONE && r->data[0] != PV_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ)
            return PV_NETIF_CTRL_STATUS_INVALID_PARAMETER;
        h->alg = r->data[0];
        break;
    case PV_NETIF_CTRL_TYPE_GET_HASH_FLAGS:
        if (h->alg == PV_NETIF_CTRL_HASH_ALGORITHM_NONE)
            return PV_NETIF_CTRL_STATUS_NOT_SUPPORTED;
        *data = h->flags;
        return PV_NETIF_CTRL_STATUS_SUCCESS;
    case PV_NETIF_CTRL_TYPE_SET_HASH_FLAGS:
        if ((r->data[0] & ~ALL_HASH_TYPES) || h->alg == PV_NETIF_CTRL_HASH_ALGORITHM_NONE)
            return PV_NETIF_CTRL_STATUS_INVALID_PARAMETER;
        h->flags = r->data[0];
        break;
    case PV_NETIF_CTRL_TYPE_SET_HASH_KEY: {
        /* data[0] gref, data[1] length: longer than the 40 bytes we keep is refused (Linux); shorter keys are
         * zero-padded.  A grant we cannot copy fails the request, not the vif. */
        uint32_t len = r->data[1];
        uint8_t key[PV_NETCTRL_MAX_KEY] = {0};
        if (len > PV_NETCTRL_MAX_KEY)
            return PV_NETIF_CTRL_STATUS_INVALID_PARAMETER;
        if (len && gcopy_in(v, r->data[0], key, len) < 0)
            return PV_NETIF_CTRL_STATUS_INVALID_PARAMETER;
        memcpy(h->key, key, sizeof(key));
        break;
    }
    case PV_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE:
        *data = PV_NETCTRL_MAX_MAPPING;
        return PV_NETIF_CTRL_STATUS_SUCCESS;
    case PV_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE:
        if (r->data[0] > PV_NETCTRL_MAX_MAPPING)
            return PV_NETIF_CTRL_STATUS_INVALID_PARAMETER;
        h->size = r->data[0];
        memset(h->mapping, 0, sizeof(h->mapping)); /* every entry queue 0 until the frontend sets them */
        break;
    case PV_NETIF_CTRL_TYPE_SET_HASH_MAPPING: {
        /* data[0] gref, data[1] entries, data[2] first entry.  The range is checked for u32 wrap-around and
         * against the table; the entries are copied aside and each checked against the number of queues
         * before any is used (XSA-270: Linux once used out-of-range entries as queue indices). */
        uint32_t gref = r->data[0], len = r->data[1], off = r->data[2];
        if (off + len < off || off + len > h->size || len > PV_NETIF_PAGE_SIZE / sizeof(uint32_t))
            return PV_NETIF_CTRL_STATUS_INVALID_PARAMETER;
        uint32_t tmp[PV_NETCTRL_MAX_MAPPING];
        if (len && gcopy_in(v, gref, tmp, len * (uint32_t)sizeof(uint32_t)) < 0)
            return PV_NETIF_CTRL_STATUS_INVALID_PARAMETER;
        for (uint32_t i = 0; i < len; i++)
            if (tmp[i] >= v->nr_queues)
                return PV_NETIF_CTRL_STATUS_INVALID_PARAMETER;
        memcpy(h->mapping + off, tmp, (size_t)len * sizeof(uint32_t));
        break;
    }
    default:
        /* INVALID (0), the grant-mapping requests (8-10) and anything unknown. */
        return PV_NETIF_CTRL_STATUS_NOT_SUPPORTED;
    }
    publish(&v->pub->hash_seq, &v->pub->hash, h, sizeof(*h));
    return PV_NETIF_CTRL_STATUS_SUCCESS;
}

int32_t pv_netctrl_ctrl_run(struct pv_netctrl *v)
{
    if (!v->ctrl.sring)
        return 0;
    if (v->ctrl_dead)
        return -PV_NET_ECTRL;
    /* A storm of requests is served in rounds of two rings' worth, then the pump polls its other sources
     * (queue 0's data path) and comes back through the kick eventfd. */
    uint32_t budget = 2 * v->ctrl.size, done = 0;
    for (;;) {
        uint32_t want = budget - done < v->ctrl.size ? budget - done : v->ctrl.size;
        if (want == 0) {
            uint64_t one = 1;
            if (v->ctrl_kick >= 0)
                (void)!write(v->ctrl_kick, &one, sizeof(one));
            break;
        }
        int32_t n = pv_back_ring_consume(&v->ctrl, v->ctrl_slots, want);
        if (n < 0) {
            v->ctrl_dead = 1;
            return -PV_NET_ECTRL;
        }
        if (n == 0) {
            int32_t more = pv_back_ring_final_check(&v->ctrl);
            if (more < 0) {
                v->ctrl_dead = 1;
                return -PV_NET_ECTRL;
            }
            if (more == 0)
                break;
            continue;
        }
        for (int32_t i = 0; i < n; i++) {
            struct pv_netif_ctrl_request r;
            memcpy(&r, v->ctrl_slots + (size_t)i * PV_NETIF_CTRL_SLOT_SIZE, sizeof(r));
            uint32_t data = 0, status = ctrl_request(v, &r, &data);
            __atomic_store_n(&v->ctrl_requests, v->ctrl_requests + 1, __ATOMIC_RELAXED);
            if (status != PV_NETIF_CTRL_STATUS_SUCCESS)
                __atomic_store_n(&v->ctrl_errors, v->ctrl_errors + 1, __ATOMIC_RELAXED);
            pv_netif_make_ctrl_response(&v->ctrl_rsp[i], r.id, r.type, status, data);
        }
        if (pv_back_ring_respond_noted(&v->ctrl, v->ctrl_rsp, (uint32_t)n, PV_NETIF_CTRL_RSP_SIZE) && v->ctrl_ev)
            pv_evtchn_notify(v->ctrl_ev);
        done += (uint32_t)n;
    }
    return (int32_t)done;
}

static int32_t on_ctrl_event(void *ctx)
{
    struct pv_netctrl *v = ctx;
    if (pv_evtchn_do_pending(v->ctrl_ev) < 0)
        return -PV_NET_EEVTCHN;
    int32_t rc = pv_netctrl_ctrl_run(v);
    if (rc < 0)
        return rc;
    return pv_evtchn_do_unmask(v->ctrl_ev) < 0 ? -PV_NET_EEVTCHN : 0;
}

static int32_t on_ctrl_kick(void *ctx)
{
    struct pv_netctrl *v = ctx;
    uint64_t n;
    (void)!read(v->ctrl_kick, &n, sizeof(n));
    int32_t rc = pv_netctrl_ctrl_run(v);
    return rc < 0 ? rc : 0;
}

uint32_t pv_netctrl_ctrl_sources(struct pv_netctrl *v, int fds[2], int32_t (*handlers[2])(void *))
{
    if (!v || !v->ctrl.sring)
        return 0;
    uint32_t n = 0;
    if (v->ctrl_ev) {
        fds[n] = v->ctrl_ev->fd;
        handlers[n++] = on_ctrl_event;
    }
    fds[n] = v->ctrl_kick;
    handlers[n++] = on_ctrl_kick;
    return n;
}

/* ---- hashing and steering ----------------------------------------------------------------------------- */

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

/* What of a frame is hashed (addresses, + ports) into buf[36]: returns the hash type (0: none), *n bytes. */
static uint8_t hash_input(const struct pv_net_hash *h, const uint8_t *f, uint32_t len, uint8_t buf[36],
                          uint32_t *n_out)
{
    if (h->alg != PV_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ || len < 14)
        return 0;
    uint32_t l4off = 0, hdr_end = 0;
    uint8_t proto = 0, v6 = 0;
    /* A TCP header we can find: not a fragment (no ports in it), as the flow dissector's ports. */
    int tcp = pv_net_l4(f, len, &l4off, &proto, &hdr_end, &v6) == 0 && proto == 6;
    uint32_t n;
    uint8_t type;
    uint16_t et = be16(f + 12);
    if (et == 0x0800) {
        if (len < 14 + 20 || (f[14] >> 4) != 4)
            return 0;
        memcpy(buf, f + 14 + 12, 8); /* saddr, daddr */
        n = 8;
        if ((h->flags & PV_NETIF_CTRL_HASH_TYPE_IPV4_TCP) && tcp) {
            memcpy(buf + 8, f + l4off, 4); /* sport, dport */
            n = 12;
            type = PV_NETIF_CTRL_HASH_TYPE_IPV4_TCP;
        } else if (h->flags & PV_NETIF_CTRL_HASH_TYPE_IPV4) {
            type = PV_NETIF_CTRL_HASH_TYPE_IPV4;
        } else {
            return 0;
        }
    } else if (et == 0x86dd) {
        if (len < 14 + 40 || (f[14] >> 4) != 6)
            return 0;
        memcpy(buf, f + 14 + 8, 32);
        n = 32;
        if ((h->flags & PV_NETIF_CTRL_HASH_TYPE_IPV6_TCP) && tcp) {
            memcpy(buf + 32, f + l4off, 4);
            n = 36;
            type = PV_NETIF_CTRL_HASH_TYPE_IPV6_TCP;
        } else if (h->flags & PV_NETIF_CTRL_HASH_TYPE_IPV6) {
            type = PV_NETIF_CTRL_HASH_TYPE_IPV6;
        } else {
            return 0;
        }
    } else {
        return 0; /* ARP, a VLAN tag, ...: no hash (Linux: the frame's hash is cleared, raw value 0) */
    }
    *n_out = n;
    return type;
}

uint8_t pv_netctrl_frame_hash(const struct pv_net_hash *h, const uint8_t *f, uint32_t len, uint32_t *hash)
{
    uint8_t buf[36];
    uint32_t n = 0;
    uint8_t type = hash_input(h, f, len, buf, &n);
    *hash = type ? pv_netif_toeplitz(h->key, PV_NETCTRL_MAX_KEY, buf, n) : 0;
    return type;
}

/* The Toeplitz hash byte by byte: tab[i][b] is what byte value b at input position i XORs into the hash (the
 * 32-bit key windows at bits 8i..8i+7).  Built per queue when the key changes (36 KiB, ~74k steps); then a
 * frame costs one lookup per input byte instead of one step per bit (Xen's reference loop). */
static uint32_t key_window(const uint8_t key[PV_NETCTRL_MAX_KEY], uint32_t bit)
{
    uint64_t w = 0;
    for (uint32_t i = 0; i < 5; i++) {
        uint32_t at = bit / 8 + i;
        w = (w << 8) | (at < PV_NETCTRL_MAX_KEY ? key[at] : 0);
    }
    return (uint32_t)(w >> (8 - bit % 8));
}

static void toeplitz_table(const uint8_t key[PV_NETCTRL_MAX_KEY], uint32_t tab[36][256])
{
    for (uint32_t i = 0; i < 36; i++) {
        uint32_t w[8];
        for (uint32_t k = 0; k < 8; k++)
            w[k] = key_window(key, 8 * i + k);
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (uint32_t k = 0; k < 8; k++)
                if (b & (0x80u >> k))
                    v ^= w[k];
            tab[i][b] = v;
        }
    }
}

uint32_t pv_netctrl_pick(const struct pv_net_hash *h, uint32_t hash, uint32_t nr_queues)
{
    if (h->size == 0)
        return hash % nr_queues;
    uint32_t q = h->mapping[hash % h->size];
    return q < nr_queues ? q : 0; /* entries were checked when set; belt and braces */
}

void pv_netctrl_q_join(struct pv_netctrl_q *c, struct pv_netctrl *v, uint32_t index)
{
    c->vif = v;
    c->index = index;
    c->hash_seq = c->mcast_seq = UINT32_MAX;
    c->tab_ready = 0;
    memset(&c->hash, 0, sizeof(c->hash));
    memset(&c->mcast, 0, sizeof(c->mcast));
}

void pv_netctrl_q_refresh(struct pv_netctrl_q *c)
{
    struct pv_netctrl *v = c->vif;
    if (!v)
        return;
    uint32_t seen = c->hash_seq;
    snapshot(&v->pub->hash_seq, &v->pub->hash, &c->hash, sizeof(c->hash), &c->hash_seq);
    if (c->hash_seq != seen && c->hash.alg == PV_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ &&
        (!c->tab_ready || memcmp(c->tab_key, c->hash.key, PV_NETCTRL_MAX_KEY) != 0)) {
        toeplitz_table(c->hash.key, c->tab);
        memcpy(c->tab_key, c->hash.key, PV_NETCTRL_MAX_KEY);
        c->tab_ready = 1;
    }
    c->mcast_control = __atomic_load_n(&v->mcast_control, __ATOMIC_ACQUIRE);
    if (c->mcast_control)
        snapshot(&v->pub->mcast_seq, &v->pub->mcast, &c->mcast, sizeof(c->mcast), &c->mcast_seq);
}

int32_t pv_netctrl_rx_steer(struct pv_netctrl_q *c, const uint8_t *buf, uint32_t total)
{
    c->meta.hash = 0;
    c->meta.htype = 0;
    if (!c->vif || total < PV_VNET_HDR_LEN + 14)
        return (int32_t)c->index;
    const uint8_t *f = buf + PV_VNET_HDR_LEN;
    uint32_t len = total - PV_VNET_HDR_LEN;
    /* Multicast but not broadcast (Linux: PACKET_MULTICAST) while the frontend controls the list. */
    if (c->mcast_control && (f[0] & 1) && memcmp(f, "\xff\xff\xff\xff\xff\xff", 6) != 0) {
        uint32_t i;
        for (i = 0; i < c->mcast.n; i++)
            if (memcmp(c->mcast.addr[i], f, 6) == 0)
                break;
        if (i == c->mcast.n) {
            c->st.rx_mcast_filtered++;
            return -1;
        }
    }
    if (c->hash.alg != PV_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ)
        return (int32_t)c->index; /* no hash selected: the queue the tap chose */
    uint8_t in[36];
    uint32_t n = 0;
    c->meta.htype = hash_input(&c->hash, f, len, in, &n);
    uint32_t hv = 0;
    for (uint32_t i = 0; i < n && c->meta.htype; i++)
        hv ^= c->tab[i][in[i]];
    c->meta.hash = hv;
    if (!c->vif->ho)
        return (int32_t)c->index; /* no hand-off rings (no ctrl ring): the hash only travels as an extra */
    return (int32_t)pv_netctrl_pick(&c->hash, c->meta.hash, c->vif->nr_queues);
}

int pv_netctrl_handoff_push(struct pv_netctrl_q *c, uint32_t dest, const uint8_t *buf, uint32_t total)
{
    struct pv_netctrl *v = c->vif;
    if (!v || !v->ho || dest >= v->nr_queues || total > PV_NETCTRL_FRAME_MAX) {
        c->st.rx_handoff_drops++;
        return -1;
    }
    struct handoff *h = &v->ho[dest];
    uint32_t pos = __atomic_load_n(&h->enq, __ATOMIC_RELAXED);
    struct handoff_cell *cell;
    for (;;) {
        cell = &h->cells[pos & HANDOFF_MASK];
        uint32_t seq = __atomic_load_n(&cell->seq, __ATOMIC_ACQUIRE);
        int32_t dif = (int32_t)(seq - pos);
        if (dif == 0) {
            if (__atomic_compare_exchange_n(&h->enq, &pos, pos + 1, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                break;
        } else if (dif < 0) {
            c->st.rx_handoff_drops++; /* full: queue `dest` is not keeping up */
            c->kick |= 1ull << dest;
            return -1;
        } else {
            pos = __atomic_load_n(&h->enq, __ATOMIC_RELAXED);
        }
    }
    memcpy(cell->data, buf, total);
    cell->len = total;
    cell->meta = c->meta;
    __atomic_store_n(&cell->seq, pos + 1, __ATOMIC_RELEASE);
    c->st.rx_steered++;
    c->kick |= 1ull << dest;
    return 0;
}

uint32_t pv_netctrl_handoff_pop(struct pv_netctrl_q *c, uint8_t *out)
{
    struct pv_netctrl *v = c->vif;
    if (!v || !v->ho)
        return 0;
    struct handoff *h = &v->ho[c->index];
    uint32_t pos = h->deq;
    struct handoff_cell *cell = &h->cells[pos & HANDOFF_MASK];
    uint32_t seq = __atomic_load_n(&cell->seq, __ATOMIC_ACQUIRE);
    if (seq != pos + 1)
        return 0;
    uint32_t len = cell->len;
    memcpy(out, cell->data, len);
    c->meta = cell->meta;
    h->deq = pos + 1;
    __atomic_store_n(&cell->seq, pos + PV_NETCTRL_HANDOFF_SLOTS, __ATOMIC_RELEASE);
    c->st.rx_handoff_in++;
    return len;
}

uint32_t pv_netctrl_handoff_purge(struct pv_netctrl_q *c)
{
    struct pv_netctrl *v = c->vif;
    if (!v || !v->ho)
        return 0;
    struct handoff *h = &v->ho[c->index];
    uint32_t n = 0;
    for (;;) {
        uint32_t pos = h->deq;
        struct handoff_cell *cell = &h->cells[pos & HANDOFF_MASK];
        if (__atomic_load_n(&cell->seq, __ATOMIC_ACQUIRE) != pos + 1)
            break;
        h->deq = pos + 1;
        __atomic_store_n(&cell->seq, pos + PV_NETCTRL_HANDOFF_SLOTS, __ATOMIC_RELEASE);
        n++;
    }
    return n;
}

void pv_netctrl_kick(struct pv_netctrl_q *c)
{
    struct pv_netctrl *v = c->vif;
    uint64_t k = c->kick;
    c->kick = 0;
    if (!v || !v->ho)
        return;
    while (k) {
        uint32_t i = (uint32_t)__builtin_ctzll(k);
        k &= k - 1;
        uint64_t one = 1;
        (void)!write(v->ho[i].efd, &one, sizeof(one));
    }
}

int pv_netctrl_handoff_fd(const struct pv_netctrl_q *c)
{
    return (c->vif && c->vif->ho) ? c->vif->ho[c->index].efd : -1;
}

void pv_netctrl_handoff_ack(const struct pv_netctrl_q *c)
{
    int fd = pv_netctrl_handoff_fd(c);
    uint64_t n;
    if (fd >= 0)
        (void)!read(fd, &n, sizeof(n));
}

uint32_t pv_netctrl_rx_extras(struct pv_netctrl_q *c, uint8_t gso_type, uint16_t gso_size, uint16_t headroom,
                              struct pv_netif_extra_info out[3])
{
    uint32_t n = 0;
    memset(out, 0, 3 * sizeof(out[0]));
    if (gso_type != PV_NETIF_GSO_TYPE_NONE) {
        out[n].type = PV_NETIF_EXTRA_TYPE_GSO;
        out[n].u.gso.type = gso_type;
        out[n].u.gso.size = gso_size;
        n++;
    }
    if (c->meta.htype) {
        out[n].type = PV_NETIF_EXTRA_TYPE_HASH;
        out[n].u.hash.type = c->meta.htype;
        out[n].u.hash.algorithm = PV_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ;
        memcpy(out[n].u.hash.value, &c->meta.hash, 4); /* little-endian u32, as Linux stores it */
        n++;
    }
    if (headroom) {
        /* The XDP extra (u16 headroom in the union): Linux netfront takes the RX offset from it. */
        out[n].type = PV_NETIF_EXTRA_TYPE_XDP;
        memcpy(&out[n].u, &headroom, 2);
        n++;
    }
    for (uint32_t i = 0; i + 1 < n; i++)
        out[i].flags = PV_NETIF_EXTRA_FLAG_MORE;
    return n;
}

int16_t pv_netctrl_tx_mcast(struct pv_netctrl_q *c, const struct pv_netif_tx_pkt *pkt)
{
    struct pv_netctrl *v = c->vif;
    if (!v)
        return PV_NETIF_RSP_OKAY; /* no vif (C-level tests): answered, nothing kept */
    int16_t status = PV_NETIF_RSP_OKAY;
    pthread_mutex_lock(&v->mc_lock);
    struct pv_net_mcast *m = &v->mcast;
    if (pkt->extra_types & (1u << PV_NETIF_EXTRA_TYPE_MCAST_ADD)) {
        /* Linux keeps duplicates (a DEL removes one) and refuses the 65th address with an error response. */
        if (m->n >= PV_NETCTRL_MCAST_MAX) {
            status = PV_NETIF_RSP_ERROR;
            c->st.mcast_full++;
        } else {
            memcpy(m->addr[m->n++], pkt->mcast_addr, 6);
            c->st.mcast_add++;
        }
    } else {
        for (uint32_t i = 0; i < m->n; i++) {
            if (memcmp(m->addr[i], pkt->mcast_addr, 6) == 0) {
                memmove(m->addr[i], m->addr[i + 1], (size_t)(m->n - i - 1) * 6);
                m->n--;
                break;
            }
        }
        c->st.mcast_del++;
    }
    if (status == PV_NETIF_RSP_OKAY)
        publish(&v->pub->mcast_seq, &v->pub->mcast, m, sizeof(*m));
    pthread_mutex_unlock(&v->mc_lock);
    return status;
}

void pv_netctrl_q_stats(const struct pv_netctrl_q *c, struct pv_netctrl_stats *out)
{
    *out = c->st;
    if (c->vif && c->index == 0) {
        out->ctrl_requests = __atomic_load_n(&c->vif->ctrl_requests, __ATOMIC_RELAXED);
        out->ctrl_errors = __atomic_load_n(&c->vif->ctrl_errors, __ATOMIC_RELAXED);
    }
}
