/* Shared-ring primitives, binary-compatible with Xen's public io/ring.h.
 *
 * The shared page starts with a 64-byte header (req_prod, req_event, rsp_prod, rsp_event, pad) followed by
 * `size` slots of `slot_size` bytes (the size of the request/response union).  Indices are free-running u32;
 * all arithmetic is modulo 2^32.  These functions never touch an event channel: they return "notify needed"
 * and the caller decides what to do with it (MirageOS shared-memory-ring style).
 *
 * Batch-shaped: one call consumes up to N slots (each copied exactly once into private memory, the XSA-155
 * defence) or pushes N responses.  No policy lives here.
 */
#ifndef PVBACK_RING_H
#define PVBACK_RING_H

#include <stddef.h>
#include <stdint.h>

#define PV_RING_PAGE_SIZE 4096u
#define PV_RING_HEADER_SIZE 64u

/* Errors returned (negated) by the consume calls. */
#define PV_RING_EOVERFLOW 1 /* req_prod - rsp_prod_pvt > size: hostile or broken frontend */

struct pv_sring {
    uint32_t req_prod;
    uint32_t req_event;
    uint32_t rsp_prod;
    uint32_t rsp_event;
    uint8_t pvt[4];
    uint8_t pad[44];
    uint8_t ring[]; /* slots */
};

/* Backend (consumer of requests, producer of responses). */
struct pv_back_ring {
    struct pv_sring *sring;
    uint32_t size;      /* number of slots, a power of two */
    uint32_t slot_size; /* bytes per slot (sizeof the request/response union) */
    uint32_t req_cons;
    uint32_t rsp_prod_pvt;
    uint32_t overflowed; /* sticky: once a frontend is seen bogus, the ring stays dead */
};

/* Frontend (producer of requests, consumer of responses); used by the emulated guests and tests. */
struct pv_front_ring {
    struct pv_sring *sring;
    uint32_t size;
    uint32_t slot_size;
    uint32_t req_prod_pvt;
    uint32_t rsp_cons;
};

/* __CONST_RING_SIZE: round_down_pow2((bytes - 64) / slot_size); 0 if it does not fit. */
uint32_t pv_ring_size(uint32_t nr_pages, uint32_t slot_size);

/* Frontend only: SHARED_RING_INIT (prod = 0, event = 1, pads zeroed). */
void pv_sring_init(void *page);
/* As SHARED_RING_INIT but starting at index `start` (req/rsp_prod = start, events = start + 1); used by
 * tests to exercise wrap-around at 2^32. */
void pv_sring_init_at(void *page, uint32_t start);

void pv_back_ring_attach(struct pv_back_ring *r, void *sring, uint32_t nr_pages, uint32_t slot_size,
                         uint32_t start_idx);
void pv_front_ring_attach(struct pv_front_ring *r, void *sring, uint32_t nr_pages, uint32_t slot_size,
                          uint32_t start_idx);

/* Number of requests the frontend has published and we have not consumed, bounded as
 * RING_HAS_UNCONSUMED_REQUESTS does.  Returns -PV_RING_EOVERFLOW for a bogus req_prod. */
int32_t pv_back_ring_pending(struct pv_back_ring *r);

/* Copy up to `max` request slots into `out` (max * slot_size bytes), advancing req_cons.  Each slot is read
 * from shared memory exactly once.  Returns the number copied, or -PV_RING_EOVERFLOW (and marks the ring
 * dead) when req_prod - rsp_prod_pvt > size. */
int32_t pv_back_ring_consume(struct pv_back_ring *r, void *out, uint32_t max);

/* Write `n` responses of `rsp_size` bytes each (packed in `rsps`) into zeroed slots, without publishing. */
void pv_back_ring_put_responses(struct pv_back_ring *r, const void *rsps, uint32_t n, uint32_t rsp_size);
/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish rsp_prod_pvt; returns 1 if the frontend must be notified. */
int pv_back_ring_push(struct pv_back_ring *r);
/* put + push in one call. */
int pv_back_ring_respond(struct pv_back_ring *r, const void *rsps, uint32_t n, uint32_t rsp_size);
/* RING_FINAL_CHECK_FOR_REQUESTS: returns >0 if more requests are pending (after re-arming req_event),
 * 0 if the backend may sleep, -PV_RING_EOVERFLOW if req_prod is bogus. */
int32_t pv_back_ring_final_check(struct pv_back_ring *r);
/* Restart recovery for a backend that may be killed at any instruction.  respond_noted = put + push, with a
 * note in the shared header's reserved padding (bytes 20..63: SHARED_RING_INIT zeroes them and no frontend of
 * a protocol that uses this reads or writes them) naming the slot being written and holding its response, so
 * a restarted backend's recover_noted (at attach, before consuming) publishes what the killed one had written
 * but not published.  Responses up to PV_RING_NOTE_RSP_MAX bytes (blkif's 16, netif's 8, ...).  Returns 1 if
 * the frontend must be notified. */
#define PV_RING_NOTE_RSP_MAX 16u
int pv_back_ring_respond_noted(struct pv_back_ring *r, const void *rsps, uint32_t n, uint32_t rsp_size);
void pv_back_ring_recover_noted(struct pv_back_ring *r, uint32_t nr_pages, uint32_t rsp_size);
/* Free response slots the backend may still produce into (requests consumed but not answered). */
uint32_t pv_back_ring_outstanding(const struct pv_back_ring *r);

/* Frontend side. */
uint32_t pv_front_ring_free(const struct pv_front_ring *r);
/* Copy up to `n` requests (req_size bytes each, packed) into the next free slots (zero-padded to the slot
 * size); returns how many fit. */
uint32_t pv_front_ring_put_requests(struct pv_front_ring *r, const void *reqs, uint32_t n, uint32_t req_size);
/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY. */
int pv_front_ring_push(struct pv_front_ring *r);
/* Copy up to `max` responses (rsp_size bytes each) out; returns the number copied, or
 * -PV_RING_EOVERFLOW when rsp_prod runs ahead of what was requested. */
int32_t pv_front_ring_consume(struct pv_front_ring *r, void *out, uint32_t max, uint32_t rsp_size);
/* RING_FINAL_CHECK_FOR_RESPONSES. */
int32_t pv_front_ring_final_check(struct pv_front_ring *r);

#endif
