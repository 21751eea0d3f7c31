/* The block data path of one queue (one ring): consume -> copy-out + validate -> grant copy/map -> submit I/O
 * -> respond.  Batch-shaped: the pump (pv_blk_queue_run) calls pv_blk_queue_event() once per event and
 * pv_blk_queue_complete() once per completion wakeup; everything per request happens in here.
 *
 * Concurrency contract: a queue is driven by one thread, its pump (pv_blk_queue_run, or an event loop calling
 * kick/event/complete).  The only cross-thread state is the completion sink of ioengine.h; persistent
 * grants, the request pool, bounce pages and stats are written by the pumping thread only.  Another thread
 * may read the stats and counters (each field is single-copy atomic, the set is not a snapshot) and call
 * set_sectors/set_poll_us.
 *
 * Ordering rules kept here:
 *  - a response is written only after every grant access of its request has ended (grant copies are
 *    synchronous; persistently mapped pages stay mapped by protocol, but the I/O on them has completed);
 *  - FLUSH_DISKCACHE and WRITE_BARRIER are fences: they start once every earlier request has completed,
 *    write their data (if any), then fdatasync; later requests wait (parked, already validated) until the
 *    fence has completed.  So an acknowledged flush means every acknowledged write is on stable storage.
 *  - a bogus req_prod kills the queue for good: every later call returns -PV_BLK_EDEAD.
 *
 * Tunables (pv_blk_queue_config):
 *  - max_persistent_grants (Linux default 1056): grefs kept mapped per queue when feature-persistent was
 *    negotiated.  More saves map/unmap for guests that reuse many pages; each costs a mapping slot (Xen
 *    maptrack) for as long as the queue lives.  Least recently used unused entries are evicted.
 *  - persistent_min_bytes: requests smaller than this use grant copy even with persistent grants: a copy of
 *    a few KiB is cheaper than the first map of a new gref, and copies never pin guest pages.
 *  - poll_us: after the ring is drained, keep looking at it (and at the completion sink) this long before
 *    returning.  Saves an event round trip (~20 us across vCPUs) per burst at the price of CPU.
 *  - max_buffer_pages: bounce pages kept cached when idle; more are allocated on demand.
 *  - spurious_pause_max_us: the longest pause of the event channel after events in a row that found nothing
 *    to do (a guest hammering it); 0 turns the back-off off.  Pauses start at 20 us and double.
 */
#ifndef PVBACK_BLKBACK_H
#define PVBACK_BLKBACK_H

#include <stddef.h>
#include <stdint.h>

#include "blkif.h"
#include "blklimit.h"
#include "ioengine.h"
#include "platform.h"
#include "ring.h"

#define PV_BLK_EDEAD 1     /* the ring is dead (hostile or broken frontend) */
#define PV_BLK_EEVTCHN 2   /* the event channel's pending/unmask failed */
#define PV_BLK_LAT_BUCKETS 32

struct pv_blk_queue_config {
    uint32_t abi;           /* PV_BLKIF_ABI_* */
    uint32_t frontend_domid;
    uint32_t nr_ring_pages; /* 1 << ring-page-order */
    uint32_t sector_size;   /* 512 or 4096 */
    uint64_t sectors;       /* 512-byte units */
    uint32_t max_indirect_segments; /* 0: no indirect */
    uint8_t readonly;
    uint8_t can_flush;
    uint8_t can_barrier;
    uint8_t can_discard;
    uint8_t can_secure_discard;
    uint8_t persistent; /* both ends said feature-persistent */
    uint32_t max_persistent_grants;
    uint32_t persistent_min_bytes;
    uint32_t poll_us;
    uint32_t max_buffer_pages;
    uint32_t spurious_pause_max_us; /* 0: never pause the event channel (see on_event in blkback.c) */
    /* The disk's token buckets (blklimit.h), shared by its queues; NULL: never limited.  Must outlive the
     * queue.  A queue with no tokens leaves requests on the ring (the guest sees back-pressure, nothing
     * fails) and sleeps on a timerfd until the refill. */
    struct pv_blk_limit *limit;
};

struct pv_blk_stats {
    uint64_t req_by_op[8]; /* by wire operation; [7] counts unknown codes */
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t errors[PV_BLKIF_NR_REASONS];
    uint64_t ring_overflow;
    uint64_t out_of_requests;
    uint64_t kicks;
    uint64_t spurious_kicks; /* kicks that found nothing to do */
    uint64_t completes;
    uint64_t responses;
    uint64_t notifies;
    uint64_t grant_copy_calls;
    uint64_t grant_copy_segs;
    uint64_t persistent_hits;
    uint64_t persistent_maps;
    uint64_t persistent_evictions;
    uint64_t persistent_fallbacks; /* wanted a persistent map, used grant copy */
    uint64_t fences;
    uint64_t polls_hit; /* work found while polling */
    uint64_t latency_us_log2[PV_BLK_LAT_BUCKETS]; /* [0]: < 1 us, [i]: [2^(i-1), 2^i) us */
    uint64_t shapes[PV_BLKIF_NR_SHAPES];          /* requests by pv_blkif_shape() */
    /* The last request answered with an error, for the operator's warning (errors[] counts them all). */
    uint64_t last_error_sector;
    uint32_t last_error_reason;
    uint8_t last_error_operation; /* wire code */
    uint8_t last_error_op;        /* effective op (indirect_op for INDIRECT) */
    uint16_t last_error_nr_segments;
    uint64_t limit_waits;        /* times this queue slept for tokens */
    uint64_t limit_throttled_ns; /* time it slept with requests on the ring */
    uint64_t spurious_pauses;    /* pauses of the event channel after events in a row that found nothing */
    uint64_t fixed_buffer_reqs;     /* one-segment requests handed to the engine with a registered buffer */
    uint64_t fixed_buffer_refusals; /* registrations the kernel refused (the table, or one page): readv instead */
};

struct pv_blk_queue;

/* `sring` = the mapped ring pages (nr_ring_pages contiguous).  gnt and eng must outlive the queue; evtchn
 * may be NULL (no notifications: tests).  On failure returns NULL with a message in err. */
struct pv_blk_queue *pv_blk_queue_create(void *sring, const struct pv_blk_queue_config *cfg, struct pv_gnt *gnt,
                                         struct pv_evtchn *evtchn, struct pv_io_engine *eng, char *err,
                                         size_t errlen);
/* Waits for in-flight I/O, unmaps persistent grants, frees.  The ring pages are the caller's. */
void pv_blk_queue_destroy(struct pv_blk_queue *q);

/* Drain the ring (with the final check), validate, copy, submit; with an inline engine also complete and
 * respond.  Returns the number of responses written, or -PV_BLK_EDEAD. */
int32_t pv_blk_queue_kick(struct pv_blk_queue *q);
/* The event channel fired: acknowledge it, kick, then re-enable delivery once the ring is drained (the
 * lateeoi rule), all in one call, so the loop's callback crosses into C once per event.  Returns responses
 * written, -PV_BLK_EDEAD, or -PV_BLK_EEVTCHN. */
int32_t pv_blk_queue_event(struct pv_blk_queue *q);
/* The completion fd fired: harvest, copy read data, respond, and resume consuming if a fence or a full pool
 * had stopped it.  Returns responses written, or -PV_BLK_EDEAD. */
int32_t pv_blk_queue_complete(struct pv_blk_queue *q);
/* The pump: kick once, then serve the event channel and the completion fd until `stop_fd` is readable (0)
 * or the queue dies (-PV_BLK_EDEAD, -PV_BLK_EEVTCHN).  Blocks; run it in a thread of its own, one per queue,
 * so queues use as many cores as there are and the control loop's work never delays a response. */
int32_t pv_blk_queue_run(struct pv_blk_queue *q, int stop_fd);
/* For a shared pump (blkpump.h), which serves many queues from one thread: a queue's sources by index, the
 * hook through which the queue stops/resumes listening to its event channel (NULL: detach, which also
 * disarms the pause timer), and one bounded pass.  `ready` has bit (1 << PV_BLK_SRC_*) set for each source
 * that fired (0: just look at the ring); at most `budget` requests are consumed (0: no bound) and *more says
 * whether requests were left on the ring for the next pass.  Returns responses written or -PV_BLK_E*. */
#define PV_BLK_SRC_COMPLETE 0
#define PV_BLK_SRC_EVENT 1
#define PV_BLK_SRC_EVT_TIMER 2
#define PV_BLK_SRC_LIMIT_TIMER 3
#define PV_BLK_NR_SOURCES 4
void pv_blk_queue_sources(const struct pv_blk_queue *q, int fds[PV_BLK_NR_SOURCES]);
void pv_blk_queue_attach(struct pv_blk_queue *q, void (*listen)(void *ctx, int on), void *ctx);
int32_t pv_blk_queue_serve(struct pv_blk_queue *q, uint32_t ready, uint32_t budget, int *more);
/* Block (up to timeout_ms, < 0 = forever) until nothing is in flight, answering what completes.  Returns
 * the number still in flight. */
uint32_t pv_blk_queue_drain(struct pv_blk_queue *q, int timeout_ms);

int pv_blk_queue_completion_fd(const struct pv_blk_queue *q);
uint32_t pv_blk_queue_inflight(const struct pv_blk_queue *q);
int pv_blk_queue_dead(const struct pv_blk_queue *q);
uint32_t pv_blk_queue_ring_size(const struct pv_blk_queue *q);
uint32_t pv_blk_queue_persistent_count(const struct pv_blk_queue *q);
void pv_blk_queue_set_poll_us(struct pv_blk_queue *q, uint32_t us);
void pv_blk_queue_get_stats(const struct pv_blk_queue *q, struct pv_blk_stats *out);
/* Where a queue stands with its frontend: the shared ring's four indices as the guest last wrote them and the
 * queue's own positions.  Read from any thread while the pump runs, each word once, so the set is only
 * roughly simultaneous: enough to tell a stuck guest's "nothing outstanding" from "requests not consumed"
 * (req_prod ahead of req_cons), "in flight" or "answered but unpublished". */
struct pv_blk_ring_state {
    uint32_t req_prod, req_event, rsp_prod, rsp_event; /* shared, the frontend's to change */
    uint32_t req_cons;    /* requests taken off the ring */
    uint32_t rsp_next;    /* ring index of the next response to publish (responses go out in ring order) */
    uint32_t held;        /* responses ready but waiting behind an earlier request's */
    uint32_t inflight;    /* requests with the I/O engine */
    uint32_t free_reqs;   /* request slots of the queue not in use */
    uint32_t fence;       /* 0: none, 1: a flush/barrier waits for earlier requests, 2: it is with the engine */
    uint32_t parked;      /* 1: requests wait behind that fence */
    uint32_t listening;   /* 0 while the spurious-event pause ignores the event channel */
    uint32_t throttled;   /* 1: the disk's I/O limit holds the ring until its timer */
};
void pv_blk_queue_ring_state(const struct pv_blk_queue *q, struct pv_blk_ring_state *out);
/* From any thread: make the queue's pump look at its ring and completions now, as if an I/O had completed
 * (what a lost event channel notification would have done). */
void pv_blk_queue_nudge(struct pv_blk_queue *q);
/* From any thread: notify the frontend (responses it was not told about, when a notification went missing). */
int pv_blk_queue_notify(struct pv_blk_queue *q);
/* Make a queue look at the limits again now (after pv_blk_limit_set): safe from any thread. */
void pv_blk_queue_limit_kick(struct pv_blk_queue *q);
/* Online resize: later requests are checked against the new size (512-byte units). */
void pv_blk_queue_set_sectors(struct pv_blk_queue *q, uint64_t sectors);

#endif
