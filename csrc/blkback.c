/* Block data path of one queue; see blkback.h for the contract, the ordering rules and the tunables. */
#include "blkback.h"
#include "pump.h"
#include "pvtime.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/timerfd.h>

#define MODE_NONE 0
#define MODE_COPY 1
#define MODE_PERSIST 2

/* Grant-copy segments per hypercall.  A batch needing more issues several calls; 2048 covers a full 32-slot
 * ring of 11-segment requests (352) and most indirect batches while keeping the array at 48 KiB. */
#define GC_CAP 2048u

struct pgnt {
    uint32_t gref;
    uint32_t in_use; /* segments of in-flight requests using this mapping */
    uint64_t last_use;
    void *addr;
    struct pgnt *hnext; /* hash chain while mapped, free list otherwise */
    uint8_t fixed;      /* addr is the sink's registered buffer number (this entry's index) */
};

struct blk_req {
    struct pv_io io; /* first: a completed pv_io * is its blk_req * */
    struct pv_blkif_req r;
    struct pv_blkif_segment *segs; /* r.seg, or ind for indirect requests */
    struct pv_blkif_segment *ind;  /* private copy of the indirect pages */
    struct iovec *iov;
    void **pages;     /* MODE_COPY: one bounce page per segment */
    struct pgnt **pg; /* MODE_PERSIST: one mapping per segment */
    uint32_t nseg;
    uint32_t nres; /* pages/pg entries acquired */
    uint8_t mode;
    int reason;
    uint32_t pos; /* ring index of the request's slot */
    uint64_t t_start;
    struct blk_req *next; /* free list / parked list */
};

struct pv_blk_queue {
    struct pv_back_ring ring;
    struct pv_gnt *gnt;
    struct pv_evtchn *evtchn;
    struct pv_io_engine *eng;
    struct pv_io_sink sink;
    struct pv_blkif_disk disk;
    struct pv_blk_queue_config cfg;
    uint32_t slot_size, rsp_size, size, maxsegs;
    int dead;

    struct blk_req *reqs;
    struct blk_req *free_reqs;
    uint32_t nfree;
    uint32_t inflight;
    uint64_t consumed;

    uint8_t *slots;
    uint8_t *rsps;
    uint32_t nrsp;
    /* Responses are published in ring order (see finish); those that overtook an earlier request wait here,
     * by ring index modulo the ring size. */
    uint8_t *held;
    uint8_t *held_ok;
    uint32_t next_rsp; /* ring index of the next response to publish */

    struct pv_gcopy_seg *gc;
    struct blk_req **gc_owner;
    uint32_t ngc;

    struct blk_req **work;
    struct blk_req **batch;
    uint32_t nbatch;
    struct pv_io **iobatch;

    struct blk_req *fence;
    int fence_started;
    struct blk_req *parked_head, *parked_tail;

    void **page_cache;
    uint32_t npages_cached;

    struct pgnt *pgs;
    struct pgnt **pbuckets;
    uint32_t pbucket_mask;
    struct pgnt *pfree;
    uint32_t pcount;
    uint64_t ptick;

    uint64_t now;
    struct pv_blk_stats st;

    /* Limits (blklimit.h): the pass this queue is spending, and while it has no tokens, the timer that
     * wakes it at the refill. */
    struct pv_blk_limit_pass pass;
    int limit_timer; /* -1 without a limit object */
    int throttled;
    uint64_t throttled_since;

    /* Spurious-event back-off (the pump only): events that found nothing to do in a row, and the timer
     * that resumes listening to the event channel after a pause.  pump_src is the pump's source array. */
    uint32_t spurious_run;
    int evt_timer;
    int evt_off; /* the pause is on: the event channel is not listened to */
    struct pv_pump_source *pump_src;

    /* Shared pumps (blkpump.h): requests this pass may still consume (UINT32_MAX: no bound), whether it left
     * some on the ring, and how to stop/resume listening to the event channel (the spurious pause). */
    uint32_t budget_left;
    int more;
    void (*listen)(void *ctx, int on);
    void *listen_ctx;
};

/* The operation a response carries: for INDIRECT the inner operation, as Linux blkback answers and as Linux
 * blkfront checks ("response has wrong operation"); the wire code for everything else. */
static inline uint8_t rsp_op(const struct blk_req *r) { return r->r.indirect ? r->r.op : r->r.operation; }

/* ---- bounce pages ------------------------------------------------------------------------------------ */

static void *page_get(struct pv_blk_queue *q)
{
    if (q->npages_cached)
        return q->page_cache[--q->npages_cached];
    void *p = NULL;
    if (posix_memalign(&p, PV_PAGE_SIZE, PV_PAGE_SIZE))
        return NULL;
    /* Fresh heap memory may hold anything this process freed, another guest's data included; a read that
     * returns less than asked (null engine) must not hand that out. */
    memset(p, 0, PV_PAGE_SIZE);
    return p;
}

static void page_put(struct pv_blk_queue *q, void *p)
{
    if (q->npages_cached < q->cfg.max_buffer_pages)
        q->page_cache[q->npages_cached++] = p;
    else
        free(p);
}

/* ---- persistent grants ------------------------------------------------------------------------------- */

static inline uint32_t pg_hash(const struct pv_blk_queue *q, uint32_t gref)
{
    return (uint32_t)((gref * 2654435761u) >> 7) & q->pbucket_mask;
}

static struct pgnt *pg_lookup(struct pv_blk_queue *q, uint32_t gref)
{
    for (struct pgnt *e = q->pbuckets[pg_hash(q, gref)]; e; e = e->hnext)
        if (e->gref == gref)
            return e;
    return NULL;
}

static void pg_unlink(struct pv_blk_queue *q, struct pgnt *e)
{
    struct pgnt **pp = &q->pbuckets[pg_hash(q, e->gref)];
    while (*pp && *pp != e)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = e->hnext;
    e->hnext = NULL;
}

/* O_DIRECT through the queue's io_uring: a persistently mapped page is registered with the ring once, so a
 * one-segment request on it skips the kernel's per-op page pinning (READ_FIXED/WRITE_FIXED).  Only where the
 * grant layer's mappings may be pinned (pv_gnt.mappings_pinnable: not yet Xen's gntdev pages); where the kernel
 * refuses one (RLIMIT_MEMLOCK) that page simply goes by readv/writev. */
static void pg_register(struct pv_blk_queue *q, struct pgnt *e)
{
    e->fixed = 0;
    if (!q->sink.nbufs)
        return;
    uint32_t slot = (uint32_t)(e - q->pgs);
    if (pv_io_sink_buffer_set(&q->sink, slot, e->addr, PV_PAGE_SIZE) == 0)
        e->fixed = 1;
    else
        q->st.fixed_buffer_refusals++;
}

/* Before the unmap: the ring must not keep the page pinned once the grant is given back. */
static void pg_unregister(struct pv_blk_queue *q, struct pgnt *e)
{
    if (e->fixed)
        (void)pv_io_sink_buffer_set(&q->sink, (uint32_t)(e - q->pgs), NULL, 0);
    e->fixed = 0;
}

static struct pgnt *pg_acquire(struct pv_blk_queue *q, uint32_t gref)
{
    struct pgnt *e = pg_lookup(q, gref);
    if (e) {
        e->in_use++;
        e->last_use = ++q->ptick;
        q->st.persistent_hits++;
        return e;
    }
    if (q->pfree) {
        e = q->pfree;
        q->pfree = e->hnext;
    } else {
        /* Evict the least recently used idle mapping.  A linear scan: evictions only happen when the
         * guest's working set exceeds the pool, and then the map/unmap dwarfs the scan. */
        struct pgnt *victim = NULL;
        for (uint32_t i = 0; i < q->cfg.max_persistent_grants; i++) {
            struct pgnt *c = &q->pgs[i];
            if (c->in_use == 0 && c->addr && (!victim || c->last_use < victim->last_use))
                victim = c;
        }
        if (!victim)
            return NULL;
        pg_unlink(q, victim);
        pg_unregister(q, victim);
        pv_gnt_unmap(q->gnt, victim->addr, 1);
        victim->addr = NULL;
        q->pcount--;
        q->st.persistent_evictions++;
        e = victim;
    }
    int16_t status = 0;
    /* Writable even for guest->disk requests: the same page serves later reads (blkfront grants persistent
     * pages read-write).  A read-only grant fails here and the request falls back to grant copy. */
    void *addr = pv_gnt_map(q->gnt, q->cfg.frontend_domid, &gref, 1, 1, &status);
    if (!addr) {
        e->hnext = q->pfree;
        q->pfree = e;
        return NULL;
    }
    e->gref = gref;
    e->addr = addr;
    e->in_use = 1;
    pg_register(q, e);
    e->last_use = ++q->ptick;
    uint32_t h = pg_hash(q, gref);
    e->hnext = q->pbuckets[h];
    q->pbuckets[h] = e;
    q->pcount++;
    q->st.persistent_maps++;
    return e;
}

/* ---- grant copy batching ----------------------------------------------------------------------------- */

static void gc_run(struct pv_blk_queue *q)
{
    if (!q->ngc)
        return;
    /* On a whole-call failure the ops contract sets every status to an error, so the loop below is enough. */
    pv_gnt_copy(q->gnt, q->gc, q->ngc);
    q->st.grant_copy_calls++;
    q->st.grant_copy_segs += q->ngc;
    for (uint32_t i = 0; i < q->ngc; i++)
        if (q->gc[i].status != PV_GNTST_okay && q->gc_owner[i]->reason == PV_BLKIF_OK)
            q->gc_owner[i]->reason = PV_BLKIF_E_GRANT;
    q->ngc = 0;
}

/* Guest page (gref, offset) <-> local buffer; to_guest selects the direction. */
static void gc_add(struct pv_blk_queue *q, struct blk_req *owner, uint32_t gref, uint32_t offset, void *local,
                   uint32_t len, int to_guest)
{
    if (q->ngc == GC_CAP)
        gc_run(q);
    struct pv_gcopy_seg *s = &q->gc[q->ngc];
    memset(s, 0, sizeof(*s));
    union pv_gcopy_ptr *foreign = to_guest ? &s->dest : &s->source;
    union pv_gcopy_ptr *mine = to_guest ? &s->source : &s->dest;
    foreign->foreign.ref = gref;
    foreign->foreign.offset = (uint16_t)offset;
    foreign->foreign.domid = (uint16_t)q->cfg.frontend_domid;
    mine->virt = local;
    s->len = (uint16_t)len;
    s->flags = to_guest ? PV_GCOPY_DEST_GREF : PV_GCOPY_SOURCE_GREF;
    q->gc_owner[q->ngc++] = owner;
}

/* ---- requests and responses -------------------------------------------------------------------------- */

static struct blk_req *req_alloc(struct pv_blk_queue *q)
{
    struct blk_req *r = q->free_reqs;
    q->free_reqs = r->next;
    q->nfree--;
    r->next = NULL;
    r->nseg = 0;
    r->nres = 0;
    r->mode = MODE_NONE;
    r->reason = PV_BLKIF_OK;
    return r;
}

static void req_release(struct pv_blk_queue *q, struct blk_req *r)
{
    if (r->mode == MODE_COPY)
        for (uint32_t i = 0; i < r->nres; i++)
            page_put(q, r->pages[i]);
    else if (r->mode == MODE_PERSIST)
        for (uint32_t i = 0; i < r->nres; i++)
            r->pg[i]->in_use--;
    r->nres = 0;
    r->mode = MODE_NONE;
}

static void flush_responses(struct pv_blk_queue *q)
{
    if (!q->nrsp)
        return;
    int notify = pv_back_ring_respond_noted(&q->ring, q->rsps, q->nrsp, q->rsp_size);
    q->nrsp = 0;
    if (notify) {
        q->st.notifies++;
        if (q->evtchn)
            pv_evtchn_notify(q->evtchn);
    }
}

/* Answer and recycle.  Only called once nothing touches the request's grants any more. */
static void finish(struct pv_blk_queue *q, struct blk_req *r, int reason)
{
    int16_t status = pv_blkif_reason_status(reason);
    if (reason != PV_BLKIF_OK) {
        q->st.errors[reason < PV_BLKIF_NR_REASONS ? reason : PV_BLKIF_E_IO]++;
        q->st.last_error_sector = r->r.sector_number;
        q->st.last_error_operation = r->r.operation;
        q->st.last_error_op = r->r.op;
        q->st.last_error_nr_segments = r->r.nr_segments;
        q->st.last_error_reason = (uint32_t)reason; /* last: a reader that sees it sees the rest of this one */
    } else if (r->r.op == PV_BLKIF_OP_READ) {
        q->st.bytes_read += r->r.nr_sectors << PV_BLKIF_SECTOR_SHIFT;
    } else if (r->r.op != PV_BLKIF_OP_DISCARD) {
        q->st.bytes_written += r->r.nr_sectors << PV_BLKIF_SECTOR_SHIFT;
    }
    req_release(q, r);
    /* Published in ring order, so that after a crash "rsp_prod" still splits answered from unanswered
     * requests: a restarted daemon re-attaches there (pv_blk_queue_create), and with out-of-order
     * publication an unanswered request whose slot an overtaking response had reused would be lost and the
     * overtaking one answered twice.  The price: a response waits for every earlier request's. */
    uint32_t mask = q->size - 1;
    if (r->pos == q->next_rsp) {
        pv_blkif_make_response(q->cfg.abi, q->rsps + (size_t)q->nrsp * q->rsp_size, r->r.id, rsp_op(r), status);
        q->nrsp++;
        q->next_rsp++;
        while (q->held_ok[q->next_rsp & mask]) {
            uint32_t h = q->next_rsp & mask;
            memcpy(q->rsps + (size_t)q->nrsp * q->rsp_size, q->held + (size_t)h * q->rsp_size, q->rsp_size);
            q->held_ok[h] = 0;
            q->nrsp++;
            q->next_rsp++;
        }
    } else {
        uint32_t h = r->pos & mask;
        pv_blkif_make_response(q->cfg.abi, q->held + (size_t)h * q->rsp_size, r->r.id, rsp_op(r), status);
        q->held_ok[h] = 1;
    }
    q->st.responses++;
    uint64_t us = q->now > r->t_start ? (q->now - r->t_start) / 1000u : 0;
    uint32_t b = us ? 64u - (uint32_t)__builtin_clzll(us) : 0;
    q->st.latency_us_log2[b < PV_BLK_LAT_BUCKETS ? b : PV_BLK_LAT_BUCKETS - 1]++;
    if (r == q->fence) {
        q->fence = NULL;
        q->fence_started = 0;
    }
    r->next = q->free_reqs;
    q->free_reqs = r;
    q->nfree++;
}

static int is_fence(const struct blk_req *r)
{
    return r->r.operation == PV_BLKIF_OP_FLUSH_DISKCACHE || r->r.operation == PV_BLKIF_OP_WRITE_BARRIER;
}

/* Point the request's iovec at its data: persistent mappings when negotiated and worth it, else bounce pages
 * (filled by the batch's grant copy for guest->disk requests). */
static void setup_data(struct pv_blk_queue *q, struct blk_req *r, int to_disk)
{
    r->io.iov = r->iov;
    r->io.iovcnt = r->nseg;
    int want_persist = q->cfg.persistent && q->cfg.max_persistent_grants &&
                       r->io.length >= q->cfg.persistent_min_bytes;
    if (want_persist) {
        uint32_t i;
        for (i = 0; i < r->nseg; i++) {
            r->pg[i] = pg_acquire(q, r->segs[i].gref);
            if (!r->pg[i])
                break;
        }
        if (i == r->nseg) {
            r->mode = MODE_PERSIST;
            r->nres = r->nseg;
            if (r->nseg == 1 && r->pg[0]->fixed) {
                r->io.fixed = (uint32_t)(r->pg[0] - q->pgs) + 1;
                q->st.fixed_buffer_reqs++;
            }
            for (i = 0; i < r->nseg; i++) {
                const struct pv_blkif_segment *s = &r->segs[i];
                r->iov[i].iov_base = (uint8_t *)r->pg[i]->addr + ((size_t)s->first_sect << PV_BLKIF_SECTOR_SHIFT);
                r->iov[i].iov_len = (size_t)(s->last_sect - s->first_sect + 1) << PV_BLKIF_SECTOR_SHIFT;
            }
            return;
        }
        while (i--)
            r->pg[i]->in_use--;
        q->st.persistent_fallbacks++;
    }
    r->mode = MODE_COPY;
    for (uint32_t i = 0; i < r->nseg; i++) {
        const struct pv_blkif_segment *s = &r->segs[i];
        void *p = page_get(q);
        if (!p) {
            r->reason = PV_BLKIF_E_NOMEM;
            return;
        }
        r->pages[i] = p;
        r->nres = i + 1;
        uint32_t len = (uint32_t)(s->last_sect - s->first_sect + 1) << PV_BLKIF_SECTOR_SHIFT;
        r->iov[i].iov_base = p;
        r->iov[i].iov_len = len;
        if (to_disk)
            gc_add(q, r, s->gref, (uint32_t)s->first_sect << PV_BLKIF_SECTOR_SHIFT, p, len, 0);
    }
}

static void setup_io(struct pv_blk_queue *q, struct blk_req *r)
{
    struct pv_io *io = &r->io;
    io->sink = &q->sink;
    io->result = 0;
    io->next = NULL;
    io->iov = NULL;
    io->iovcnt = 0;
    io->fixed = 0;
    io->offset = r->r.sector_number << PV_BLKIF_SECTOR_SHIFT;
    io->length = r->r.nr_sectors << PV_BLKIF_SECTOR_SHIFT;
    switch (r->r.op) {
    case PV_BLKIF_OP_READ:
        io->op = PV_IO_READ;
        setup_data(q, r, 0);
        break;
    case PV_BLKIF_OP_WRITE:
        io->op = PV_IO_WRITE;
        setup_data(q, r, 1);
        break;
    case PV_BLKIF_OP_FLUSH_DISKCACHE:
    case PV_BLKIF_OP_WRITE_BARRIER:
        if (r->nseg == 0) {
            io->op = PV_IO_FLUSH;
            io->offset = 0; /* sector_number means nothing here (Linux sends -1) */
        } else {
            io->op = PV_IO_WRITE_SYNC;
            setup_data(q, r, 1);
        }
        break;
    case PV_BLKIF_OP_DISCARD:
        io->op = (r->r.flag & PV_BLKIF_DISCARD_SECURE) ? PV_IO_SECURE_DISCARD : PV_IO_DISCARD;
        break;
    default:
        r->reason = PV_BLKIF_E_BAD_OP; /* unreachable: validation refused it */
        break;
    }
}

/* Prepare and hand the collected batch to the engine: one grant copy (guest -> bounce) for all its writes,
 * one submit call. */
static void submit_batch(struct pv_blk_queue *q)
{
    if (!q->nbatch)
        return;
    for (uint32_t i = 0; i < q->nbatch; i++)
        setup_io(q, q->batch[i]);
    gc_run(q);
    uint32_t nio = 0;
    for (uint32_t i = 0; i < q->nbatch; i++) {
        struct blk_req *r = q->batch[i];
        if (r->reason != PV_BLKIF_OK)
            finish(q, r, r->reason);
        else
            q->iobatch[nio++] = &r->io;
    }
    q->nbatch = 0;
    q->inflight += nio;
    if (nio)
        pv_io_engine_submit(q->eng, q->iobatch, nio);
}

static void park(struct pv_blk_queue *q, struct blk_req *r)
{
    r->next = NULL;
    if (q->parked_tail)
        q->parked_tail->next = r;
    else
        q->parked_head = r;
    q->parked_tail = r;
}

static void dispatch(struct pv_blk_queue *q, struct blk_req *r)
{
    if (q->fence) {
        park(q, r);
        return;
    }
    if (is_fence(r)) {
        submit_batch(q); /* what came before the fence goes first */
        q->fence = r;
        q->fence_started = 0;
        q->st.fences++;
        return;
    }
    q->batch[q->nbatch++] = r;
}

static void count_shape(struct pv_blk_queue *q, const struct blk_req *r, const struct pv_blkif_segment *segs,
                        uint32_t nseg)
{
    if (nseg > PV_BLKIF_MAX_SEGMENTS_PER_REQUEST && segs == r->r.seg)
        nseg = PV_BLKIF_MAX_SEGMENTS_PER_REQUEST; /* a direct request claiming more: judge the 11 there are */
    q->st.shapes[pv_blkif_shape(&q->disk, &r->r, segs, nseg)]++;
}

/* What a request costs the bandwidth bucket: the data it moves (a discard moves none). */
static void charge_bytes(struct pv_blk_queue *q, const struct blk_req *r)
{
    if (q->pass.active && r->r.op != PV_BLKIF_OP_DISCARD)
        pv_blk_limit_pass_charge_bytes(&q->pass, r->r.nr_sectors << PV_BLKIF_SECTOR_SHIFT);
}

/* Copy-out, validate and dispatch `n` consumed slots.  With a limit pass open, stops admitting when the
 * queue's share is spent and puts the slots it did not admit back on the ring (their copies are dropped
 * unread: they are copied and validated again when their turn comes).  Returns the slots admitted. */
static uint32_t process_slots(struct pv_blk_queue *q, uint32_t n)
{
    uint32_t nwork = 0, nind = 0;
    uint32_t base = q->ring.req_cons - n;
    q->now = now_ns();
    uint32_t admitted = n;
    for (uint32_t i = 0; i < n; i++) {
        if (q->pass.active) {
            if (!pv_blk_limit_pass_open(&q->pass)) {
                admitted = i;
                q->ring.req_cons -= n - i;
                q->consumed -= n - i;
                break;
            }
            pv_blk_limit_pass_charge_op(&q->pass);
        }
        struct blk_req *r = req_alloc(q);
        r->t_start = q->now;
        r->pos = base + i;
        pv_blkif_parse(q->cfg.abi, q->slots + (size_t)i * q->slot_size, &r->r);
        q->st.req_by_op[r->r.operation < 7 ? r->r.operation : 7]++;
        int rc = pv_blkif_validate(&q->disk, &r->r);
        if (!r->r.indirect || rc != PV_BLKIF_OK) /* an indirect one is counted once its segments are here */
            count_shape(q, r, r->r.indirect ? NULL : r->r.seg, r->r.indirect ? 0 : r->r.nr_segments);
        if (rc != PV_BLKIF_OK) {
            finish(q, r, rc);
            continue;
        }
        if (r->r.indirect) {
            /* The segment list lives in guest pages: copy it into private memory once, then validate it. */
            uint32_t left = r->r.nr_segments;
            for (uint32_t p = 0; p < r->r.nr_indirect_pages; p++) {
                uint32_t cnt = left < PV_BLKIF_SEGS_PER_INDIRECT_FRAME ? left : PV_BLKIF_SEGS_PER_INDIRECT_FRAME;
                gc_add(q, r, r->r.indirect_grefs[p], 0, r->ind + (size_t)p * PV_BLKIF_SEGS_PER_INDIRECT_FRAME,
                       cnt * (uint32_t)sizeof(struct pv_blkif_segment), 0);
                left -= cnt;
            }
            nind++;
        } else {
            r->segs = r->r.seg;
            r->nseg = r->r.nr_segments;
            charge_bytes(q, r);
        }
        q->work[nwork++] = r;
    }
    if (nind)
        gc_run(q);
    for (uint32_t i = 0; i < nwork; i++) {
        struct blk_req *r = q->work[i];
        if (r->reason != PV_BLKIF_OK) {
            if (r->r.indirect)
                count_shape(q, r, NULL, 0);
            finish(q, r, r->reason);
            continue;
        }
        if (r->r.indirect) {
            count_shape(q, r, r->ind, r->r.nr_segments);
            int rc = pv_blkif_validate_segments(&q->disk, &r->r, r->ind, r->r.nr_segments);
            if (rc != PV_BLKIF_OK) {
                finish(q, r, rc);
                continue;
            }
            r->segs = r->ind;
            r->nseg = r->r.nr_segments;
            charge_bytes(q, r);
        }
        dispatch(q, r);
    }
    submit_batch(q);
    return admitted;
}

/* Collect finished I/O: one grant copy (bounce -> guest) for every read, then the responses. */
static uint32_t harvest(struct pv_blk_queue *q)
{
    struct pv_io *list = pv_io_sink_take(&q->sink);
    if (!list)
        return 0;
    uint32_t n = 0;
    for (struct pv_io *io = list; io; io = io->next) {
        struct blk_req *r = (struct blk_req *)io;
        q->inflight--;
        n++;
        if (io->result < 0) {
            r->reason = io->result == -EOPNOTSUPP ? PV_BLKIF_E_UNSUPPORTED : PV_BLKIF_E_IO;
        } else if (io->op == PV_IO_READ && r->mode == MODE_COPY) {
            for (uint32_t i = 0; i < r->nseg; i++) {
                const struct pv_blkif_segment *s = &r->segs[i];
                gc_add(q, r, s->gref, (uint32_t)s->first_sect << PV_BLKIF_SECTOR_SHIFT, r->pages[i],
                       (uint32_t)r->iov[i].iov_len, 1);
            }
        }
    }
    gc_run(q);
    q->now = now_ns();
    for (struct pv_io *io = list; io;) {
        struct pv_io *next = io->next;
        struct blk_req *r = (struct blk_req *)io;
        finish(q, r, r->reason);
        io = next;
    }
    return n;
}

static void mark_dead(struct pv_blk_queue *q)
{
    if (!q->dead)
        q->st.ring_overflow++;
    q->dead = 1;
}

/* No tokens: leave the ring alone until the timer fires at `wake` (absolute, CLOCK_MONOTONIC). */
static void throttle(struct pv_blk_queue *q, uint64_t wake)
{
    struct itimerspec its = {.it_value = {.tv_sec = (time_t)(wake / 1000000000u),
                                          .tv_nsec = (long)(wake % 1000000000u)}};
    if (!its.it_value.tv_sec && !its.it_value.tv_nsec)
        its.it_value.tv_nsec = 1; /* 0 would disarm */
    (void)timerfd_settime(q->limit_timer, TFD_TIMER_ABSTIME, &its, NULL);
    q->throttled = 1;
    q->throttled_since = now_ns();
    q->st.limit_waits++;
}

static void unthrottle(struct pv_blk_queue *q)
{
    if (!q->throttled)
        return;
    uint64_t slept = now_ns() - q->throttled_since;
    q->throttled = 0;
    q->st.limit_throttled_ns += slept;
    pv_blk_limit_woke(q->cfg.limit, slept);
}

/* Before consuming: 1 if the queue may take requests now (no limit, or a pass with tokens), 0 if it is (or
 * just became) throttled. */
static int limit_admit(struct pv_blk_queue *q)
{
    if (!q->cfg.limit)
        return 1;
    if (q->throttled)
        return 0;
    uint64_t wake = 0;
    if (q->pass.active) {
        if (pv_blk_limit_pass_open(&q->pass))
            return 1;
        if (pv_back_ring_pending(&q->ring) <= 0)
            return 1; /* nothing waits: the final check decides; the pass ends with the pump */
        pv_blk_limit_end(q->cfg.limit, now_ns(), &q->pass, 1, &wake);
        throttle(q, wake);
        return 0;
    }
    if (!pv_blk_limit_enabled(q->cfg.limit) || pv_back_ring_pending(&q->ring) <= 0)
        return 1;
    if (pv_blk_limit_begin(q->cfg.limit, now_ns(), &q->pass, &wake))
        return 1;
    throttle(q, wake);
    return 0;
}

static int32_t pump(struct pv_blk_queue *q)
{
    uint64_t before = q->st.responses;
    uint64_t deadline = 0;
    for (;;) {
        harvest(q);
        if (q->fence) {
            if (!q->fence_started && q->inflight == 0) {
                q->fence_started = 1;
                q->batch[q->nbatch++] = q->fence;
                submit_batch(q);
                continue;
            }
            if (pv_io_sink_nonempty(&q->sink))
                continue;
            break; /* the completion fd brings us back */
        }
        if (q->parked_head) {
            struct blk_req *r = q->parked_head;
            q->parked_head = q->parked_tail = NULL;
            while (r) {
                struct blk_req *next = r->next;
                dispatch(q, r);
                r = next;
            }
            submit_batch(q);
            continue;
        }
        if (q->dead)
            break;
        if (q->nfree == 0) {
            int32_t p = pv_back_ring_pending(&q->ring);
            if (p < 0)
                mark_dead(q);
            else if (p > 0)
                q->st.out_of_requests++;
            break;
        }
        if (!limit_admit(q))
            break; /* the limit timer brings us back */
        if (q->budget_left == 0) {
            /* A shared pump's pass is bounded: what is left waits for the next pass (the pump comes back
             * without an event), so a ring kept full gets one batch per pass and its neighbours theirs. */
            int32_t p = pv_back_ring_pending(&q->ring);
            if (p < 0) {
                mark_dead(q);
                break;
            }
            if (p > 0) {
                q->more = 1;
                break;
            }
        } else {
            uint32_t want = q->nfree < q->budget_left ? q->nfree : q->budget_left;
            int32_t n = pv_back_ring_consume(&q->ring, q->slots, want);
            if (n < 0) {
                mark_dead(q);
                break;
            }
            if (n > 0) {
                q->consumed += (uint32_t)n;
                uint32_t admitted = process_slots(q, (uint32_t)n);
                if (q->budget_left != UINT32_MAX)
                    q->budget_left -= admitted;
                continue;
            }
        }
        flush_responses(q);
        int32_t more = pv_back_ring_final_check(&q->ring);
        if (more < 0) {
            mark_dead(q);
            break;
        }
        if (more > 0)
            continue;
        uint32_t poll_us = __atomic_load_n(&q->cfg.poll_us, __ATOMIC_RELAXED);
        if (poll_us == 0 || q->listen)
            break; /* a shared pump polls for all its queues at once (blkpump.c), never for one */
        uint64_t t = now_ns();
        if (!deadline)
            deadline = t + (uint64_t)poll_us * 1000u;
        int found = 0;
        while (t < deadline) {
            if (pv_back_ring_pending(&q->ring) != 0 || pv_io_sink_nonempty(&q->sink)) {
                found = 1;
                break;
            }
            cpu_relax();
            t = now_ns();
        }
        if (!found)
            break;
        q->st.polls_hit++;
    }
    if (q->pass.active) {
        /* Idle (or stopped for another reason): the unspent share goes back to the disk's other queues. */
        uint64_t unused = 0;
        pv_blk_limit_end(q->cfg.limit, now_ns(), &q->pass, 0, &unused);
    }
    flush_responses(q);
    if (q->dead)
        return -PV_BLK_EDEAD;
    return (int32_t)(q->st.responses - before);
}

int32_t pv_blk_queue_kick(struct pv_blk_queue *q)
{
    q->st.kicks++;
    uint64_t c0 = q->consumed, r0 = q->st.responses;
    int32_t rc = pump(q);
    if (q->consumed == c0 && q->st.responses == r0)
        q->st.spurious_kicks++;
    return rc;
}

int32_t pv_blk_queue_event(struct pv_blk_queue *q)
{
    if (q->evtchn && pv_evtchn_do_pending(q->evtchn) < 0)
        return -PV_BLK_EEVTCHN;
    int32_t rc = pv_blk_queue_kick(q);
    if (rc >= 0 && q->evtchn && pv_evtchn_do_unmask(q->evtchn) < 0)
        return -PV_BLK_EEVTCHN;
    return rc;
}

int32_t pv_blk_queue_complete(struct pv_blk_queue *q)
{
    q->st.completes++;
    pv_io_sink_ack(&q->sink); /* the loop saw the fd readable: leave it unreadable */
    return pump(q);
}

uint32_t pv_blk_queue_drain(struct pv_blk_queue *q, int timeout_ms)
{
    uint64_t deadline = timeout_ms >= 0 ? now_ns() + (uint64_t)timeout_ms * 1000000u : 0;
    harvest(q);
    while (q->inflight) {
        int wait = -1;
        if (timeout_ms >= 0) {
            uint64_t t = now_ns();
            if (t >= deadline)
                break;
            wait = (int)((deadline - t) / 1000000u) + 1;
        }
        struct pollfd pfd = {.fd = q->sink.efd, .events = POLLIN};
        /* Short slices: a completion posted between take and poll may have found `signaled` set already. */
        poll(&pfd, 1, wait < 0 || wait > 10 ? 10 : wait);
        pv_io_sink_ack(&q->sink);
        harvest(q);
    }
    flush_responses(q);
    return q->inflight;
}

static int32_t on_complete(void *q) { return pv_blk_queue_complete(q); }

static int32_t on_limit_timer(void *ctx)
{
    struct pv_blk_queue *q = ctx;
    uint64_t expirations;
    if (read(q->limit_timer, &expirations, sizeof(expirations)) != (ssize_t)sizeof(expirations))
        return 0;
    unthrottle(q);
    return pump(q);
}

void pv_blk_queue_limit_kick(struct pv_blk_queue *q)
{
    if (q->limit_timer < 0)
        return;
    struct itimerspec its = {.it_value = {.tv_nsec = 1}};
    (void)timerfd_settime(q->limit_timer, 0, &its, NULL);
}
/* A frontend that notifies far more often than it queues work (a guest hammering its event channel) would
 * keep this queue's pump awake doing nothing, on a core the other guests' pumps need.  After the second
 * event in a row that found no request and no response to write, stop listening to the event channel for a
 * while, doubling from SPURIOUS_PAUSE_MIN_NS to SPURIOUS_PAUSE_MAX_NS while it goes on (Linux's lateeoi
 * back-off for spurious events does the same, in jiffies).  Any event that finds work resets it, so a
 * well-behaved guest's occasional spurious event costs it nothing; completions are served during the pause
 * (they also look at the ring), and the pause ends with a look at the ring. */
#define SPURIOUS_PAUSE_MIN_NS 20000u

/* Stop or resume listening to the event channel: in pv_blk_queue_run's source array (poll skips a negative
 * fd) or through the shared pump's hook. */
static void evt_listen(struct pv_blk_queue *q, int on)
{
    __atomic_store_n(&q->evt_off, !on, __ATOMIC_RELAXED);
    if (q->pump_src)
        q->pump_src[1].fd = on ? q->evtchn->fd : -1;
    else if (q->listen)
        q->listen(q->listen_ctx, on);
}

static int32_t on_event(void *ctx)
{
    struct pv_blk_queue *q = ctx;
    uint64_t c0 = q->consumed, r0 = q->st.responses;
    int32_t rc = pv_blk_queue_event(q);
    if (rc < 0)
        return rc;
    if (q->consumed != c0 || q->st.responses != r0 || q->throttled || q->more) {
        /* A throttled queue, or one whose pass budget an earlier handler spent, leaves work on the ring on
         * purpose: not the guest's fault. */
        q->spurious_run = 0;
        return rc;
    }
    uint64_t max_ns = (uint64_t)q->cfg.spurious_pause_max_us * 1000u;
    if (++q->spurious_run < 2 || q->evt_timer < 0 || !max_ns)
        return rc;
    uint32_t shift = q->spurious_run - 2 > 20 ? 20 : q->spurious_run - 2;
    uint64_t ns = (uint64_t)SPURIOUS_PAUSE_MIN_NS << shift;
    if (ns > max_ns)
        ns = max_ns;
    struct itimerspec its = {.it_value = {.tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u)}};
    if (timerfd_settime(q->evt_timer, 0, &its, NULL) == 0) {
        evt_listen(q, 0);
        q->st.spurious_pauses++;
    }
    return rc;
}

static int32_t on_evt_timer(void *ctx)
{
    struct pv_blk_queue *q = ctx;
    uint64_t expirations;
    if (read(q->evt_timer, &expirations, sizeof(expirations)) != (ssize_t)sizeof(expirations))
        return 0;
    evt_listen(q, 1);
    /* What the guest queued during the pause, and its events (coalesced in the channel meanwhile): judged
     * like any event, so a guest still hammering pauses again, for longer. */
    return on_event(q);
}

int32_t pv_blk_queue_run(struct pv_blk_queue *q, int stop_fd)
{
    /* Requests may have been queued before anyone listened, and the initial event may be gone already. */
    int32_t rc = pv_blk_queue_kick(q);
    if (rc < 0)
        return rc;
    /* Completions first: they free requests a full ring may be waiting for. */
    struct pv_pump_source src[4] = {
        {.fd = q->sink.efd, .ready = on_complete, .ctx = q},
        {.fd = q->evtchn ? q->evtchn->fd : -1, .ready = on_event, .ctx = q, .hangup_rc = -PV_BLK_EEVTCHN},
        {.fd = q->evtchn ? q->evt_timer : -1, .ready = on_evt_timer, .ctx = q},
        {.fd = q->limit_timer, .ready = on_limit_timer, .ctx = q},
    };
    q->pump_src = src;
    __atomic_store_n(&q->evt_off, 0, __ATOMIC_RELAXED);
    q->spurious_run = 0;
    rc = pv_pump_run(src, q->limit_timer >= 0 ? 4 : 3, stop_fd);
    q->pump_src = NULL;
    if (q->evt_timer >= 0) {
        struct itimerspec off = {0};
        (void)timerfd_settime(q->evt_timer, 0, &off, NULL);
    }
    return rc == -PV_PUMP_EPOLL ? -PV_BLK_EEVTCHN : rc;
}

/* ---- shared pumps (blkpump.c) ------------------------------------------------------------------------ */

void pv_blk_queue_sources(const struct pv_blk_queue *q, int fds[PV_BLK_NR_SOURCES])
{
    fds[PV_BLK_SRC_COMPLETE] = q->sink.efd;
    fds[PV_BLK_SRC_EVENT] = q->evtchn ? q->evtchn->fd : -1;
    fds[PV_BLK_SRC_EVT_TIMER] = q->evtchn ? q->evt_timer : -1;
    fds[PV_BLK_SRC_LIMIT_TIMER] = q->limit_timer;
}

void pv_blk_queue_attach(struct pv_blk_queue *q, void (*listen)(void *ctx, int on), void *ctx)
{
    q->listen = listen;
    q->listen_ctx = ctx;
    q->spurious_run = 0;
    __atomic_store_n(&q->evt_off, 0, __ATOMIC_RELAXED); /* a new pump listens from the start */
    if (!listen && q->evt_timer >= 0) {
        struct itimerspec off = {0};
        (void)timerfd_settime(q->evt_timer, 0, &off, NULL);
    }
}

int32_t pv_blk_queue_serve(struct pv_blk_queue *q, uint32_t ready, uint32_t budget, int *more)
{
    static int32_t (*const handler[PV_BLK_NR_SOURCES])(void *) = {
        [PV_BLK_SRC_COMPLETE] = on_complete, [PV_BLK_SRC_EVENT] = on_event,
        [PV_BLK_SRC_EVT_TIMER] = on_evt_timer, [PV_BLK_SRC_LIMIT_TIMER] = on_limit_timer,
    };
    q->budget_left = budget ? budget : UINT32_MAX;
    q->more = 0;
    int32_t total = 0, rc = 0;
    if (!ready) {
        rc = pump(q); /* a continuation (or the first look): no source fired */
        total = rc;
    }
    /* Completions first (they free requests a full ring waits for); the event last, so that it sees
     * whether the pass had work for it (the spurious-event judgement). */
    static const int order[PV_BLK_NR_SOURCES] = {PV_BLK_SRC_COMPLETE, PV_BLK_SRC_LIMIT_TIMER,
                                                 PV_BLK_SRC_EVT_TIMER, PV_BLK_SRC_EVENT};
    for (int i = 0; i < PV_BLK_NR_SOURCES && rc >= 0; i++) {
        if (!(ready & (1u << order[i])))
            continue;
        rc = handler[order[i]](q);
        if (rc > 0)
            total += rc;
    }
    *more = q->more && rc >= 0;
    q->budget_left = UINT32_MAX;
    q->more = 0;
    return rc < 0 ? rc : total;
}

/* ---- set-up ------------------------------------------------------------------------------------------ */

static void queue_free(struct pv_blk_queue *q)
{
    if (q->cfg.limit) {
        /* Leave the disk's buckets as if this queue had never been there: its share back, not waiting. */
        uint64_t unused = 0;
        pv_blk_limit_end(q->cfg.limit, now_ns(), &q->pass, 0, &unused);
        unthrottle(q);
    }
    if (q->limit_timer >= 0)
        close(q->limit_timer);
    if (q->evt_timer >= 0)
        close(q->evt_timer);
    if (q->reqs) {
        for (uint32_t i = 0; i < q->size; i++) {
            struct blk_req *r = &q->reqs[i];
            free(r->ind);
            free(r->iov);
            free(r->pages);
            free(r->pg);
        }
        free(q->reqs);
    }
    pv_io_sink_buffers_drop(&q->sink); /* before the pages behind it are unmapped */
    if (q->pgs) {
        for (uint32_t i = 0; i < q->cfg.max_persistent_grants; i++)
            if (q->pgs[i].addr)
                pv_gnt_unmap(q->gnt, q->pgs[i].addr, 1);
        free(q->pgs);
    }
    free(q->pbuckets);
    if (q->page_cache) {
        for (uint32_t i = 0; i < q->npages_cached; i++)
            free(q->page_cache[i]);
        free(q->page_cache);
    }
    free(q->slots);
    free(q->rsps);
    free(q->held);
    free(q->held_ok);
    free(q->gc);
    free(q->gc_owner);
    free(q->work);
    free(q->batch);
    free(q->iobatch);
    pv_io_sink_destroy(&q->sink);
    free(q);
}

struct pv_blk_queue *pv_blk_queue_create(void *sring, const struct pv_blk_queue_config *cfg, struct pv_gnt *gnt,
                                         struct pv_evtchn *evtchn, struct pv_io_engine *eng, char *err,
                                         size_t errlen)
{
#define FAIL(...)                                                                                              \
    do {                                                                                                       \
        snprintf(err, errlen, __VA_ARGS__);                                                                    \
        if (q)                                                                                                 \
            queue_free(q);                                                                                     \
        return NULL;                                                                                           \
    } while (0)
    struct pv_blk_queue *q = NULL;
    uint32_t slot_size = pv_blkif_slot_size(cfg->abi);
    if (!slot_size)
        FAIL("unknown blkif ABI %u", cfg->abi);
    if (!sring || !gnt || !eng)
        FAIL("ring, grant handle and engine are required");
    if (cfg->nr_ring_pages == 0 || cfg->nr_ring_pages > 1024 || (cfg->nr_ring_pages & (cfg->nr_ring_pages - 1)))
        FAIL("bad ring page count %u", cfg->nr_ring_pages);
    if (cfg->sector_size != 512 && cfg->sector_size != 1024 && cfg->sector_size != 2048 &&
        cfg->sector_size != 4096)
        FAIL("bad sector size %u", cfg->sector_size);
    if (cfg->max_indirect_segments > PV_BLKIF_MAX_INDIRECT_SEGMENTS)
        FAIL("max_indirect_segments %u > %u", cfg->max_indirect_segments, PV_BLKIF_MAX_INDIRECT_SEGMENTS);
    if (cfg->max_persistent_grants > (1u << 20))
        FAIL("max_persistent_grants %u too large", cfg->max_persistent_grants);

    q = calloc(1, sizeof(*q));
    if (!q)
        FAIL("out of memory");
    q->sink.efd = -1;
    q->limit_timer = -1;
    q->evt_timer = -1;
    q->budget_left = UINT32_MAX;
    q->cfg = *cfg;
    q->gnt = gnt;
    q->evtchn = evtchn;
    q->eng = eng;
    q->slot_size = slot_size;
    q->rsp_size = pv_blkif_rsp_size(cfg->abi);
    int rc = pv_io_sink_init(&q->sink);
    if (rc)
        FAIL("eventfd: %s", strerror(-rc));
    if (evtchn) {
        q->evt_timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (q->evt_timer < 0)
            FAIL("timerfd: %s", strerror(errno));
    }
    if (cfg->limit) {
        q->limit_timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (q->limit_timer < 0)
            FAIL("timerfd: %s", strerror(errno));
    }
    /* A completion ring of our own where the engine has one (io_uring, O_DIRECT): completions then reach
     * the pumping thread without a hop through an engine thread.  Without it the engine's threads post. */
    (void)pv_io_engine_attach(eng, &q->sink);
    /* BACK_RING_ATTACH at the last published response: a fresh ring has rsp_prod == 0, and a ring picked up
     * again after a daemon restart resumes right after the last answer the guest saw, so requests the dead
     * daemon consumed but never answered are served again (block reads and writes are idempotent).  A
     * frontend lying about rsp_prod only moves the window; the req_prod overflow check still bounds it. */
    uint32_t start = __atomic_load_n(&((struct pv_sring *)sring)->rsp_prod, __ATOMIC_ACQUIRE);
    pv_back_ring_attach(&q->ring, sring, cfg->nr_ring_pages, slot_size, start);
    q->size = q->ring.size;
    if (!q->size)
        FAIL("ring does not fit");
    pv_back_ring_recover_noted(&q->ring, cfg->nr_ring_pages, q->rsp_size);
    start = q->ring.rsp_prod_pvt;
    q->disk = (struct pv_blkif_disk){
        .sectors = cfg->sectors,
        .sector_size = cfg->sector_size,
        .max_indirect_segments = cfg->max_indirect_segments,
        .readonly = cfg->readonly,
        .can_flush = cfg->can_flush,
        .can_barrier = cfg->can_barrier,
        .can_discard = cfg->can_discard,
        .can_secure_discard = cfg->can_secure_discard,
    };
    q->maxsegs = cfg->max_indirect_segments > PV_BLKIF_MAX_SEGMENTS_PER_REQUEST ? cfg->max_indirect_segments
                                                                               : PV_BLKIF_MAX_SEGMENTS_PER_REQUEST;
    q->slots = malloc((size_t)q->size * slot_size);
    q->rsps = calloc(q->size, q->rsp_size);
    q->held = calloc(q->size, q->rsp_size);
    q->held_ok = calloc(q->size, 1);
    q->next_rsp = start;
    q->gc = calloc(GC_CAP, sizeof(*q->gc));
    q->gc_owner = calloc(GC_CAP, sizeof(*q->gc_owner));
    q->work = calloc(q->size, sizeof(*q->work));
    q->batch = calloc(q->size, sizeof(*q->batch));
    q->iobatch = calloc(q->size, sizeof(*q->iobatch));
    q->page_cache = calloc(cfg->max_buffer_pages ? cfg->max_buffer_pages : 1, sizeof(void *));
    q->reqs = calloc(q->size, sizeof(*q->reqs));
    if (!q->slots || !q->rsps || !q->held || !q->held_ok || !q->gc || !q->gc_owner || !q->work || !q->batch || !q->iobatch ||
        !q->page_cache || !q->reqs)
        FAIL("out of memory");
    for (uint32_t i = 0; i < q->size; i++) {
        struct blk_req *r = &q->reqs[i];
        r->iov = calloc(q->maxsegs, sizeof(*r->iov));
        r->pages = calloc(q->maxsegs, sizeof(*r->pages));
        r->pg = calloc(q->maxsegs, sizeof(*r->pg));
        if (cfg->max_indirect_segments)
            r->ind = calloc(cfg->max_indirect_segments, sizeof(*r->ind));
        if (!r->iov || !r->pages || !r->pg || (cfg->max_indirect_segments && !r->ind))
            FAIL("out of memory");
        r->next = q->free_reqs;
        q->free_reqs = r;
    }
    q->nfree = q->size;
    if (cfg->persistent && cfg->max_persistent_grants) {
        uint32_t nb = 1;
        while (nb < 2 * cfg->max_persistent_grants)
            nb <<= 1;
        q->pbucket_mask = nb - 1;
        q->pbuckets = calloc(nb, sizeof(*q->pbuckets));
        q->pgs = calloc(cfg->max_persistent_grants, sizeof(*q->pgs));
        if (!q->pbuckets || !q->pgs)
            FAIL("out of memory");
        for (uint32_t i = cfg->max_persistent_grants; i-- > 0;) {
            q->pgs[i].hnext = q->pfree;
            q->pfree = &q->pgs[i];
        }
        /* One registered-buffer slot per persistent mapping, where the engine gave the queue a ring and
         * the grant layer's mappings may be pinned. */
        if (q->sink.uring && gnt && gnt->mappings_pinnable &&
            pv_io_sink_buffers(&q->sink, cfg->max_persistent_grants) != 0)
            q->st.fixed_buffer_refusals++;
    } else {
        q->cfg.persistent = 0;
        q->cfg.max_persistent_grants = 0;
    }
    return q;
#undef FAIL
}

void pv_blk_queue_destroy(struct pv_blk_queue *q)
{
    if (!q)
        return;
    pv_blk_queue_drain(q, -1);
    queue_free(q);
}

int pv_blk_queue_completion_fd(const struct pv_blk_queue *q) { return q->sink.efd; }
uint32_t pv_blk_queue_inflight(const struct pv_blk_queue *q) { return q->inflight; }
int pv_blk_queue_dead(const struct pv_blk_queue *q) { return q->dead; }
uint32_t pv_blk_queue_ring_size(const struct pv_blk_queue *q) { return q->size; }
uint32_t pv_blk_queue_persistent_count(const struct pv_blk_queue *q) { return q->pcount; }
void pv_blk_queue_set_poll_us(struct pv_blk_queue *q, uint32_t us)
{
    __atomic_store_n(&q->cfg.poll_us, us, __ATOMIC_RELAXED);
}
void pv_blk_queue_get_stats(const struct pv_blk_queue *q, struct pv_blk_stats *out) { *out = q->st; }

#define PEEK(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
void pv_blk_queue_ring_state(const struct pv_blk_queue *q, struct pv_blk_ring_state *out)
{
    const struct pv_sring *s = q->ring.sring;
    out->req_prod = PEEK(s->req_prod);
    out->req_event = PEEK(s->req_event);
    out->rsp_prod = PEEK(s->rsp_prod);
    out->rsp_event = PEEK(s->rsp_event);
    out->req_cons = PEEK(q->ring.req_cons);
    out->rsp_next = PEEK(q->next_rsp);
    out->held = 0;
    for (uint32_t i = 0; i < q->size; i++)
        out->held += PEEK(q->held_ok[i]) != 0;
    out->inflight = PEEK(q->inflight);
    out->free_reqs = PEEK(q->nfree);
    out->fence = PEEK(q->fence) ? 1u + (uint32_t)(PEEK(q->fence_started) != 0) : 0u;
    out->parked = PEEK(q->parked_head) != NULL;
    out->listening = !PEEK(q->evt_off);
    out->throttled = PEEK(q->throttled) != 0;
}
#undef PEEK

void pv_blk_queue_nudge(struct pv_blk_queue *q) { pv_io_sink_wake(&q->sink); }

int pv_blk_queue_notify(struct pv_blk_queue *q) { return q->evtchn ? pv_evtchn_notify(q->evtchn) : 0; }

void pv_blk_queue_set_sectors(struct pv_blk_queue *q, uint64_t sectors)
{
    /* Called from the control thread while the pump runs: one atomic store, which the validator loads once per
     * request.  Requests already validated against the old size complete as they were. */
    __atomic_store_n(&q->disk.sectors, sectors, __ATOMIC_RELAXED);
    __atomic_store_n(&q->cfg.sectors, sectors, __ATOMIC_RELAXED);
}
