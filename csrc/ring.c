/* Shared-ring primitives; see ring.h.  Barrier placement follows io/ring.h line by line: a hostile peer sees
 * exactly the ordering a Linux or Xen peer would. */
#include "ring.h"

#include <string.h>

/* Volatile accessors: the peer may change shared words at any time, so each read is a single load that the
 * compiler may neither repeat nor tear. */
#define READ_SHARED(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_SHARED(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* rmb/wmb are compiler barriers on x86 (TSO) but we state them in the C11 model so other targets are right
 * too; mb must order a store before a later load, which only a full fence does (mfence on x86). */
#define pv_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define pv_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#define pv_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)

uint32_t pv_ring_size(uint32_t nr_pages, uint32_t slot_size)
{
    if (slot_size == 0 || nr_pages == 0 || nr_pages > 1024)
        return 0;
    uint64_t n = ((uint64_t)nr_pages * PV_RING_PAGE_SIZE - PV_RING_HEADER_SIZE) / slot_size;
    if (n == 0)
        return 0;
    uint32_t p = 1;
    while ((uint64_t)p * 2 <= n)
        p *= 2;
    return p;
}

void pv_sring_init_at(void *page, uint32_t start)
{
    struct pv_sring *s = page;
    s->req_prod = start;
    s->rsp_prod = start;
    s->req_event = start + 1;
    s->rsp_event = start + 1;
    memset(s->pvt, 0, sizeof(s->pvt));
    memset(s->pad, 0, sizeof(s->pad));
}

void pv_sring_init(void *page) { pv_sring_init_at(page, 0); }

void pv_back_ring_attach(struct pv_back_ring *r, void *sring, uint32_t nr_pages, uint32_t slot_size,
                         uint32_t start_idx)
{
    r->sring = sring;
    r->size = pv_ring_size(nr_pages, slot_size);
    r->slot_size = slot_size;
    r->req_cons = start_idx;
    r->rsp_prod_pvt = start_idx;
    r->overflowed = 0;
}

void pv_front_ring_attach(struct pv_front_ring *r, void *sring, uint32_t nr_pages, uint32_t slot_size,
                          uint32_t start_idx)
{
    r->sring = sring;
    r->size = pv_ring_size(nr_pages, slot_size);
    r->slot_size = slot_size;
    r->req_prod_pvt = start_idx;
    r->rsp_cons = start_idx;
}

static inline uint8_t *slot(struct pv_sring *s, uint32_t size, uint32_t slot_size, uint32_t idx)
{
    return s->ring + (size_t)(idx & (size - 1)) * slot_size;
}

/* Bounded unconsumed count given an already-read req_prod (RING_HAS_UNCONSUMED_REQUESTS plus the
 * PROD_OVERFLOW test).  Taking `prod` as an argument means req_prod is read once per decision. */
static int32_t unconsumed(struct pv_back_ring *r, uint32_t prod)
{
    if (r->overflowed)
        return -PV_RING_EOVERFLOW;
    if ((uint32_t)(prod - r->rsp_prod_pvt) > r->size) {
        r->overflowed = 1;
        return -PV_RING_EOVERFLOW;
    }
    uint32_t req = prod - r->req_cons;
    uint32_t rsp = r->size - (r->req_cons - r->rsp_prod_pvt);
    return (int32_t)(req < rsp ? req : rsp);
}

int32_t pv_back_ring_pending(struct pv_back_ring *r)
{
    uint32_t prod = READ_SHARED(r->sring->req_prod);
    pv_rmb();
    return unconsumed(r, prod);
}

int32_t pv_back_ring_consume(struct pv_back_ring *r, void *out, uint32_t max)
{
    uint32_t prod = READ_SHARED(r->sring->req_prod);
    pv_rmb(); /* see the requests the frontend published before req_prod */
    int32_t avail = unconsumed(r, prod);
    if (avail < 0)
        return avail;
    uint32_t n = (uint32_t)avail < max ? (uint32_t)avail : max;
    uint8_t *dst = out;
    for (uint32_t i = 0; i < n; i++) {
        /* RING_COPY_REQUEST: one volatile copy of the slot; the caller validates only this copy. */
        const volatile uint8_t *src = slot(r->sring, r->size, r->slot_size, r->req_cons + i);
        for (uint32_t b = 0; b < r->slot_size; b++)
            dst[b] = src[b];
        dst += r->slot_size;
    }
    r->req_cons += n;
    return (int32_t)n;
}

void pv_back_ring_put_responses(struct pv_back_ring *r, const void *rsps, uint32_t n, uint32_t rsp_size)
{
    const uint8_t *src = rsps;
    if (rsp_size > r->slot_size)
        rsp_size = r->slot_size;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *dst = slot(r->sring, r->size, r->slot_size, r->rsp_prod_pvt);
        /* The response is written into a zeroed slot: the rest of the union (request bytes) must not be
         * handed back to the guest (XSA-216). */
        memset(dst, 0, r->slot_size);
        memcpy(dst, src, rsp_size);
        src += rsp_size;
        r->rsp_prod_pvt++;
    }
}

int pv_back_ring_push(struct pv_back_ring *r)
{
    uint32_t old = READ_SHARED(r->sring->rsp_prod);
    uint32_t new = r->rsp_prod_pvt;
    pv_wmb(); /* frontend must see the responses before the new rsp_prod */
    WRITE_SHARED(r->sring->rsp_prod, new);
    pv_mb(); /* the rsp_prod store must be visible before we read rsp_event */
    uint32_t ev = READ_SHARED(r->sring->rsp_event);
    return (uint32_t)(new - ev) < (uint32_t)(new - old);
}

int pv_back_ring_respond(struct pv_back_ring *r, const void *rsps, uint32_t n, uint32_t rsp_size)
{
    pv_back_ring_put_responses(r, rsps, n, rsp_size);
    return pv_back_ring_push(r);
}

int32_t pv_back_ring_final_check(struct pv_back_ring *r)
{
    int32_t work = pv_back_ring_pending(r);
    if (work != 0)
        return work;
    WRITE_SHARED(r->sring->req_event, r->req_cons + 1);
    pv_mb(); /* req_event must be visible before we look at req_prod again */
    return pv_back_ring_pending(r);
}

uint32_t pv_back_ring_outstanding(const struct pv_back_ring *r)
{
    return r->req_cons - r->rsp_prod_pvt;
}

uint32_t pv_front_ring_free(const struct pv_front_ring *r)
{
    return r->size - (r->req_prod_pvt - r->rsp_cons);
}

uint32_t pv_front_ring_put_requests(struct pv_front_ring *r, const void *reqs, uint32_t n, uint32_t req_size)
{
    uint32_t room = pv_front_ring_free(r);
    const uint8_t *src = reqs;
    if (n > room)
        n = room;
    if (req_size > r->slot_size)
        req_size = r->slot_size;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *dst = slot(r->sring, r->size, r->slot_size, r->req_prod_pvt);
        memcpy(dst, src, req_size);
        memset(dst + req_size, 0, r->slot_size - req_size);
        src += req_size;
        r->req_prod_pvt++;
    }
    return n;
}

int pv_front_ring_push(struct pv_front_ring *r)
{
    uint32_t old = READ_SHARED(r->sring->req_prod);
    uint32_t new = r->req_prod_pvt;
    pv_wmb();
    WRITE_SHARED(r->sring->req_prod, new);
    pv_mb();
    uint32_t ev = READ_SHARED(r->sring->req_event);
    return (uint32_t)(new - ev) < (uint32_t)(new - old);
}

int32_t pv_front_ring_consume(struct pv_front_ring *r, void *out, uint32_t max, uint32_t rsp_size)
{
    uint32_t prod = READ_SHARED(r->sring->rsp_prod);
    pv_rmb();
    if ((uint32_t)(prod - r->rsp_cons) > (uint32_t)(r->req_prod_pvt - r->rsp_cons))
        return -PV_RING_EOVERFLOW; /* RING_RESPONSE_PROD_OVERFLOW: more responses than requests */
    uint32_t avail = prod - r->rsp_cons;
    uint32_t n = avail < max ? avail : max;
    if (rsp_size > r->slot_size)
        rsp_size = r->slot_size;
    uint8_t *dst = out;
    for (uint32_t i = 0; i < n; i++) {
        const volatile uint8_t *src = slot(r->sring, r->size, r->slot_size, r->rsp_cons + i);
        for (uint32_t b = 0; b < rsp_size; b++)
            dst[b] = src[b];
        dst += rsp_size;
    }
    r->rsp_cons += n;
    return (int32_t)n;
}

int32_t pv_front_ring_final_check(struct pv_front_ring *r)
{
    uint32_t prod = READ_SHARED(r->sring->rsp_prod);
    if (prod != r->rsp_cons)
        return 1;
    WRITE_SHARED(r->sring->rsp_event, r->rsp_cons + 1);
    pv_mb();
    prod = READ_SHARED(r->sring->rsp_prod);
    return prod != r->rsp_cons;
}

/* ---- the restart note -------------------------------------------------------------------------------- */

/* A response reuses its request's slot.  A daemon killed after writing a slot but before publishing rsp_prod
 * would leave a slot holding neither the request (needed to serve it again after a restart) nor a published
 * response.  So while a batch is written, the shared ring header's reserved padding (no frontend uses it)
 * says which slot is being written and holds that slot's response: slots before it are complete responses.
 * A restarted daemon finishes the publication from there (pv_back_ring_recover_noted).  Two response
 * buffers, picked by the index's parity, so the one the current index names is never being rewritten. */
#define NOTE_MAGIC 0x70764c47u
struct rsp_note {
    uint32_t magic;
    uint32_t idx;
    uint8_t rsp[2][PV_RING_NOTE_RSP_MAX];
};
_Static_assert(sizeof(struct rsp_note) <= sizeof(((struct pv_sring *)0)->pad), "the note fits the padding");

static struct rsp_note *note_of(const struct pv_back_ring *r) { return (struct rsp_note *)(void *)r->sring->pad; }

int pv_back_ring_respond_noted(struct pv_back_ring *r, const void *rsps, uint32_t n, uint32_t rsp_size)
{
    struct rsp_note *note = note_of(r);
    const uint8_t *p = rsps;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t idx = r->rsp_prod_pvt;
        memcpy(note->rsp[idx & 1], p + (size_t)i * rsp_size, rsp_size);
        __atomic_store_n(&note->idx, idx, __ATOMIC_RELEASE);
        if (i == 0)
            __atomic_store_n(&note->magic, NOTE_MAGIC, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_RELEASE); /* the note names the slot before the slot changes */
        pv_back_ring_put_responses(r, p + (size_t)i * rsp_size, 1, rsp_size);
    }
    int notify = pv_back_ring_push(r);
    __atomic_store_n(&note->magic, 0, __ATOMIC_RELEASE);
    return notify;
}

/* The note is guest-writable: read once, bounded to the slots the frontend has published requests in; a
 * frontend lying here only gets its own request slots back as responses. */
void pv_back_ring_recover_noted(struct pv_back_ring *r, uint32_t nr_pages, uint32_t rsp_size)
{
    struct rsp_note *note = note_of(r);
    struct rsp_note copy;
    memcpy(&copy, note, sizeof(copy));
    __atomic_store_n(&note->magic, 0, __ATOMIC_RELEASE);
    if (copy.magic != NOTE_MAGIC || rsp_size > PV_RING_NOTE_RSP_MAX)
        return;
    uint32_t start = r->rsp_prod_pvt;
    uint32_t prod = __atomic_load_n(&r->sring->req_prod, __ATOMIC_ACQUIRE);
    if (prod - start > r->size || copy.idx - start >= prod - start)
        return;
    pv_back_ring_attach(r, r->sring, nr_pages, r->slot_size, copy.idx);
    pv_back_ring_put_responses(r, copy.rsp[copy.idx & 1], 1, rsp_size);
    pv_back_ring_push(r);
    pv_back_ring_attach(r, r->sring, nr_pages, r->slot_size, copy.idx + 1);
}
