/* Guest-side blkif load generator; see blkfront_load.h. */
#include "blkfront_load.h"
#include "pvtime.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blkif.h"

#define MAX_QUEUES 16
#define RSP_BATCH 64

struct slot {
    uint64_t t_push;
    uint32_t queue;
    uint8_t op;
};

struct gen {
    const struct pv_load_config *cfg;
    const struct pv_load_queue *qs;
    const struct pv_load_pages *pg;
    struct pv_load_result *res;
    struct slot *slots;
    uint32_t slot_size;
    uint32_t nseg;       /* segments per request */
    uint32_t indirect;
    uint64_t nblocks;    /* bs-sized blocks in the region */
    uint64_t next_seq;   /* sequential cursor, in blocks */
    uint64_t rng;
    uint64_t issued;
    uint32_t inflight;
    uint32_t dirty[MAX_QUEUES]; /* requests put but not pushed */
    uint8_t req[128];
};

/* xorshift64*: cheap and good enough to spread offsets; not for anything secret. */
static inline uint64_t rnd(struct gen *g)
{
    uint64_t x = g->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    g->rng = x;
    return x * 2685821657736338717ull;
}

uint32_t pv_load_bucket(uint64_t ns)
{
    const uint32_t sub = 1u << PV_LOAD_SUB_BITS;
    if (ns < sub)
        return (uint32_t)ns;
    uint32_t msb = 63u - (uint32_t)__builtin_clzll(ns);
    uint32_t b = (msb - PV_LOAD_SUB_BITS + 1) * sub + (uint32_t)((ns >> (msb - PV_LOAD_SUB_BITS)) & (sub - 1));
    return b < PV_LOAD_HIST_BUCKETS ? b : PV_LOAD_HIST_BUCKETS - 1;
}

uint64_t pv_load_bucket_value(uint32_t b)
{
    const uint32_t sub = 1u << PV_LOAD_SUB_BITS;
    if (b < sub)
        return b;
    uint32_t msb = b / sub + PV_LOAD_SUB_BITS - 1;
    uint64_t width = 1ull << (msb - PV_LOAD_SUB_BITS);
    uint64_t lo = (uint64_t)(sub + b % sub) << (msb - PV_LOAD_SUB_BITS);
    return lo + width / 2;
}

uint64_t pv_load_percentile(const struct pv_load_result *res, double p)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < PV_LOAD_HIST_BUCKETS; i++)
        total += res->hist[i];
    if (!total)
        return 0;
    if (p < 0)
        p = 0;
    if (p > 100)
        p = 100;
    /* The smallest bucket holding the ceil(p% * total)-th value (nearest-rank). */
    uint64_t rank = (uint64_t)(p / 100.0 * (double)total + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (uint32_t i = 0; i < PV_LOAD_HIST_BUCKETS; i++) {
        seen += res->hist[i];
        if (seen >= rank)
            return pv_load_bucket_value(i);
    }
    return pv_load_bucket_value(PV_LOAD_HIST_BUCKETS - 1);
}

static void build_request(struct gen *g, uint32_t id, uint8_t op, uint64_t sector)
{
    const struct pv_load_pages *pg = g->pg;
    const uint32_t *refs = pg->data_refs + (size_t)id * pg->segs_per_req;
    uint32_t bs = g->cfg->bs, left = bs;
    memset(g->req, 0, sizeof(g->req));
    if (g->indirect) {
        struct pv_blkif_segment *segs = (struct pv_blkif_segment *)pg->ind_addrs[id];
        for (uint32_t k = 0; k < g->nseg; k++) {
            uint32_t n = left < PV_PAGE_SIZE ? left : PV_PAGE_SIZE;
            segs[k] = (struct pv_blkif_segment){.gref = refs[k], .first_sect = 0, .last_sect = (uint8_t)(n / 512 - 1)};
            left -= n;
        }
        if (g->cfg->abi == PV_BLKIF_ABI_X86_64) {
            struct pv_blkif_x86_64_request_indirect *r = (void *)g->req;
            r->operation = PV_BLKIF_OP_INDIRECT;
            r->indirect_op = op;
            r->nr_segments = (uint16_t)g->nseg;
            r->id = id;
            r->sector_number = sector;
            r->indirect_grefs[0] = pg->ind_refs[id];
        } else {
            struct pv_blkif_x86_32_request_indirect *r = (void *)g->req;
            r->operation = PV_BLKIF_OP_INDIRECT;
            r->indirect_op = op;
            r->nr_segments = (uint16_t)g->nseg;
            r->id = id;
            r->sector_number = sector;
            r->indirect_grefs[0] = pg->ind_refs[id];
        }
        return;
    }
    struct pv_blkif_segment *seg;
    if (g->cfg->abi == PV_BLKIF_ABI_X86_64) {
        struct pv_blkif_x86_64_request *r = (void *)g->req;
        r->operation = op;
        r->nr_segments = (uint8_t)g->nseg;
        r->id = id;
        r->sector_number = sector;
        seg = r->seg;
    } else {
        struct pv_blkif_x86_32_request *r = (void *)g->req;
        r->operation = op;
        r->nr_segments = (uint8_t)g->nseg;
        r->id = id;
        r->sector_number = sector;
        seg = r->seg;
    }
    for (uint32_t k = 0; k < g->nseg; k++) {
        uint32_t n = left < PV_PAGE_SIZE ? left : PV_PAGE_SIZE;
        seg[k] = (struct pv_blkif_segment){.gref = refs[k], .first_sect = 0, .last_sect = (uint8_t)(n / 512 - 1)};
        left -= n;
    }
}

/* Put request `id` on its queue's ring (not yet pushed). */
static void issue(struct gen *g, uint32_t id)
{
    const struct pv_load_config *cfg = g->cfg;
    uint64_t block;
    if (cfg->random) {
        block = rnd(g) % g->nblocks;
    } else {
        block = g->next_seq;
        g->next_seq = g->next_seq + 1 < g->nblocks ? g->next_seq + 1 : 0;
    }
    uint8_t op = PV_BLKIF_OP_READ;
    if (cfg->read_pct < 100 && (cfg->read_pct == 0 || rnd(g) % 100 >= cfg->read_pct))
        op = PV_BLKIF_OP_WRITE;
    build_request(g, id, op, block * (cfg->bs / 512));
    uint32_t q = id % cfg->nqueues;
    pv_front_ring_put_requests(g->qs[q].ring, g->req, 1, g->slot_size);
    g->slots[id].op = op;
    g->slots[id].queue = q;
    g->dirty[q]++;
    g->issued++;
    g->inflight++;
}

static int push_all(struct gen *g, uint64_t t)
{
    for (uint32_t q = 0; q < g->cfg->nqueues; q++) {
        if (!g->dirty[q])
            continue;
        g->dirty[q] = 0;
        if (pv_front_ring_push(g->qs[q].ring)) {
            g->res->notifies++;
            if (pv_evtchn_notify(g->qs[q].evtchn) < 0)
                return -PV_LOAD_EEVTCHN;
        }
    }
    (void)t;
    return 0;
}

static int want_more(const struct gen *g, uint64_t t, uint64_t t0)
{
    const struct pv_load_config *cfg = g->cfg;
    if (cfg->max_ops && g->issued >= cfg->max_ops)
        return 0;
    if (cfg->duration_ns && t - t0 >= cfg->duration_ns)
        return 0;
    return 1;
}

static int check_config(const struct pv_load_config *cfg, const struct pv_load_queue *qs,
                        const struct pv_load_pages *pg, char *err, uint32_t errlen)
{
#define BAD(...)                                                                                               \
    do {                                                                                                       \
        snprintf(err, errlen, __VA_ARGS__);                                                                    \
        return -PV_LOAD_EINVAL;                                                                                \
    } while (0)
    uint32_t slot = pv_blkif_slot_size(cfg->abi);
    if (!slot)
        BAD("unknown ABI %u", cfg->abi);
    if (cfg->nqueues == 0 || cfg->nqueues > MAX_QUEUES)
        BAD("nqueues %u not in 1..%u", cfg->nqueues, MAX_QUEUES);
    if (cfg->qd == 0)
        BAD("qd 0"); /* qd < nqueues is fine: the queues past qd stay idle (QD1 on a 2-queue disk) */
    if (cfg->bs == 0 || cfg->bs % 512)
        BAD("bs %u is not a positive multiple of 512", cfg->bs);
    uint32_t nseg = (cfg->bs + PV_PAGE_SIZE - 1) / PV_PAGE_SIZE;
    if (nseg > PV_BLKIF_SEGS_PER_INDIRECT_FRAME)
        BAD("bs %u needs %u segments: more than one indirect page holds", cfg->bs, nseg);
    if (pg->segs_per_req < nseg)
        BAD("%u pages per request given, bs %u needs %u", pg->segs_per_req, cfg->bs, nseg);
    if (nseg > PV_BLKIF_MAX_SEGMENTS_PER_REQUEST && (!pg->ind_refs || !pg->ind_addrs))
        BAD("bs %u needs indirect pages", cfg->bs);
    if (cfg->read_pct > 100)
        BAD("read_pct %u > 100", cfg->read_pct);
    if (cfg->region_bytes < cfg->bs)
        BAD("region of %llu bytes is smaller than one request", (unsigned long long)cfg->region_bytes);
    if (!cfg->duration_ns && !cfg->max_ops)
        BAD("neither a duration nor an op count");
    for (uint32_t q = 0; q < cfg->nqueues; q++) {
        if (!qs[q].ring || !qs[q].evtchn)
            BAD("queue %u has no ring or event channel", q);
        if (qs[q].ring->slot_size != slot)
            BAD("queue %u: ring slots of %u bytes, ABI needs %u", q, qs[q].ring->slot_size, slot);
        uint32_t want = cfg->qd / cfg->nqueues + (q < cfg->qd % cfg->nqueues);
        if (pv_front_ring_free(qs[q].ring) < want)
            BAD("queue %u: %u free slots, qd needs %u", q, pv_front_ring_free(qs[q].ring), want);
    }
    return 0;
#undef BAD
}

int pv_load_run(const struct pv_load_config *cfg, const struct pv_load_queue *queues,
                const struct pv_load_pages *pages, struct pv_load_result *res, char *err, uint32_t errlen)
{
    memset(res, 0, sizeof(*res));
    if (errlen)
        err[0] = 0;
    int rc = check_config(cfg, queues, pages, err, errlen);
    if (rc)
        return rc;
    struct gen g = {
        .cfg = cfg,
        .qs = queues,
        .pg = pages,
        .res = res,
        .slot_size = pv_blkif_slot_size(cfg->abi),
        .nseg = (cfg->bs + PV_PAGE_SIZE - 1) / PV_PAGE_SIZE,
        .nblocks = cfg->region_bytes / cfg->bs,
        .rng = cfg->seed ? cfg->seed : 0x9e3779b97f4a7c15ull,
    };
    g.indirect = g.nseg > PV_BLKIF_MAX_SEGMENTS_PER_REQUEST;
    g.slots = calloc(cfg->qd, sizeof(*g.slots));
    if (!g.slots) {
        snprintf(err, errlen, "out of memory");
        return -PV_LOAD_EINVAL;
    }
    uint32_t rsp_size = pv_blkif_rsp_size(cfg->abi);
    uint8_t rsps[RSP_BATCH * 16];
    struct pollfd pfd[MAX_QUEUES];
    for (uint32_t q = 0; q < cfg->nqueues; q++)
        pfd[q] = (struct pollfd){.fd = queues[q].evtchn->fd, .events = POLLIN};
    uint64_t spin_ns = (uint64_t)cfg->spin_us * 1000u;
    uint64_t stall_ns = (uint64_t)(cfg->stall_ms ? cfg->stall_ms : 10000) * 1000000u;
    res->lat_min_ns = UINT64_MAX;
    int block_fd = -1, saved_fl = -1;
    if (cfg->nqueues == 1 && cfg->block_read) {
        saved_fl = fcntl(pfd[0].fd, F_GETFL);
        if (saved_fl >= 0 && fcntl(pfd[0].fd, F_SETFL, saved_fl & ~O_NONBLOCK) == 0)
            block_fd = pfd[0].fd;
    }

    uint64_t t0 = now_ns(), t = t0, last_progress = t0, t_end = t0;
    for (uint32_t id = 0; id < cfg->qd && want_more(&g, t, t0); id++) {
        issue(&g, id);
        g.slots[id].t_push = t0;
    }
    rc = push_all(&g, t0);
    uint64_t idle_since = 0;
    while (!rc && g.inflight) {
        uint32_t got = 0;
        for (uint32_t q = 0; q < cfg->nqueues && !rc; q++) {
            for (;;) {
                int32_t n = pv_front_ring_consume(queues[q].ring, rsps, RSP_BATCH, rsp_size);
                if (n < 0) {
                    snprintf(err, errlen, "queue %u: the backend produced more responses than requests", q);
                    rc = -PV_LOAD_ERING;
                    break;
                }
                if (n == 0)
                    break;
                t = now_ns();
                got += (uint32_t)n;
                for (int32_t i = 0; i < n; i++) {
                    const uint8_t *rp = rsps + (size_t)i * rsp_size;
                    uint64_t id;
                    int16_t status;
                    memcpy(&id, rp, sizeof(id));
                    memcpy(&status, rp + 10, sizeof(status)); /* same offset in both ABIs */
                    if (id >= cfg->qd || g.slots[id].queue != q || g.slots[id].t_push == 0) {
                        snprintf(err, errlen, "queue %u: response for unknown id %llu", q, (unsigned long long)id);
                        rc = -PV_LOAD_ERING;
                        break;
                    }
                    struct slot *s = &g.slots[id];
                    uint64_t lat = t - s->t_push;
                    s->t_push = 0;
                    g.inflight--;
                    res->ops++;
                    if (s->op == PV_BLKIF_OP_READ)
                        res->reads++;
                    else
                        res->writes++;
                    res->bytes += cfg->bs;
                    if (status != PV_BLKIF_RSP_OKAY)
                        res->errors++;
                    res->lat_sum_ns += lat;
                    if (lat < res->lat_min_ns)
                        res->lat_min_ns = lat;
                    if (lat > res->lat_max_ns)
                        res->lat_max_ns = lat;
                    res->hist[pv_load_bucket(lat)]++;
                    if (want_more(&g, t, t0)) {
                        issue(&g, (uint32_t)id);
                        s->t_push = t; /* pushed below, before anything else waits */
                    }
                }
                if (rc)
                    break;
            }
        }
        if (rc)
            break;
        if (got) {
            t_end = t;
            last_progress = t;
            idle_since = 0;
            rc = push_all(&g, t);
            continue;
        }
        if (!g.inflight)
            break;
        t = now_ns();
        if (t - last_progress > stall_ns) {
            snprintf(err, errlen, "no response for %llu ms with %u requests in flight",
                     (unsigned long long)(stall_ns / 1000000u), g.inflight);
            rc = -PV_LOAD_ESTALL;
            break;
        }
        if (!idle_since)
            idle_since = t;
        if (t - idle_since < spin_ns) {
            if (cfg->notify_spin) {
                for (uint32_t q = 0; q < cfg->nqueues && !rc; q++) {
                    res->notifies++;
                    if (pv_evtchn_notify(queues[q].evtchn) < 0)
                        rc = -PV_LOAD_EEVTCHN;
                }
                continue;
            }
            cpu_relax();
            continue;
        }
        /* Re-arm rsp_event, then look once more: a response published in between would find the event
         * unarmed and send nothing. */
        int more = 0;
        for (uint32_t q = 0; q < cfg->nqueues; q++)
            if (pv_front_ring_final_check(queues[q].ring) > 0)
                more = 1;
        if (more) {
            if (spin_ns)
                res->spin_hits++;
            continue;
        }
        res->sleeps++;
        if (block_fd >= 0) {
            /* One queue: sleep in read() itself, one syscall per wakeup like a bare eventfd waiter (poll +
             * read is two).  A dead backend is caught by the caller's process timeout, not by stall_ms. */
            uint64_t v;
            if (read(block_fd, &v, sizeof(v)) < 0 && errno != EINTR && errno != EAGAIN) {
                snprintf(err, errlen, "read event: %s", strerror(errno));
                rc = -PV_LOAD_EEVTCHN;
                break;
            }
            idle_since = 0;
            continue;
        }
        int pr = poll(pfd, cfg->nqueues, 100);
        if (pr < 0 && errno != EINTR) {
            snprintf(err, errlen, "poll: %s", strerror(errno));
            rc = -PV_LOAD_EEVTCHN;
            break;
        }
        for (uint32_t q = 0; q < cfg->nqueues; q++)
            if (pfd[q].revents)
                pv_evtchn_do_pending(queues[q].evtchn);
        idle_since = 0;
    }
    res->elapsed_ns = (t_end > t0 ? t_end : now_ns()) - t0;
    if (res->lat_min_ns == UINT64_MAX)
        res->lat_min_ns = 0;
    if (block_fd >= 0)
        fcntl(block_fd, F_SETFL, saved_fl);
    free(g.slots);
    return rc;
}
