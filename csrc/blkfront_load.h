/* A blkif load generator for the guest side of the benchmark: the hot loop of a frontend, in C, so the
 * backend is measured and not the frontend's interpreter.
 *
 * The caller (a Python guest process) does the xenstore handshake, grants the data pages and hands over the
 * front rings, their event channels and, per request id, the granted pages.  pv_load_run() then fills
 * requests, pushes, notifies only when the ring says so, waits (spinning briefly, then poll() on the event
 * fds), consumes responses and records each request's latency in a log-linear histogram, until the time or
 * op budget is spent and every request in flight has been answered.
 *
 * Request ids are the in-flight slots 0..qd-1; slot i always goes to queue i % nqueues and always uses the
 * same pages (a persistent-grant frontend's behaviour; with grant copy the backend never maps them).
 * Latency = response seen - request pushed, one clock read per batch on each side.
 */
#ifndef PVBACK_BLKFRONT_LOAD_H
#define PVBACK_BLKFRONT_LOAD_H

#include <stdint.h>

#include "platform.h"
#include "ring.h"

/* Histogram: values in ns; 32 sub-buckets per power of two (<= 3 % wide), up to 2^44 ns. */
#define PV_LOAD_SUB_BITS 5
#define PV_LOAD_HIST_BUCKETS 1344

#define PV_LOAD_EINVAL 1    /* bad configuration (message in err) */
#define PV_LOAD_ERING 2     /* the backend broke the ring protocol */
#define PV_LOAD_EEVTCHN 3   /* notify/poll failed */
#define PV_LOAD_ESTALL 4    /* nothing answered for stall_ms with requests in flight */

struct pv_load_queue {
    struct pv_front_ring *ring;
    struct pv_evtchn *evtchn;
};

struct pv_load_config {
    uint32_t abi;           /* PV_BLKIF_ABI_* */
    uint32_t nqueues;
    uint32_t qd;            /* requests in flight, over all queues */
    uint32_t bs;            /* bytes per request: a multiple of 512, at most 11 pages direct or 512 indirect */
    uint32_t read_pct;      /* 100: all reads, 0: all writes */
    uint32_t random;        /* 1: uniformly random block-aligned offsets; 0: one sequential stream */
    uint64_t region_bytes;  /* offsets stay in [0, region_bytes) */
    uint64_t duration_ns;   /* stop issuing after this long (0: no limit) */
    uint64_t max_ops;       /* stop issuing after this many (0: no limit) */
    uint32_t spin_us;       /* look at the rings this long before sleeping on the event fds */
    uint32_t stall_ms;      /* give up if nothing is answered for this long (0: 10 s) */
    uint64_t seed;
    uint32_t block_read;    /* 1 queue only: sleep in a blocking read() of the event fd instead of poll()
                             * + read() (no stall detection then: bound the caller instead) */
    uint32_t notify_spin;   /* hostile: while spinning for responses, notify every queue on every pass (a
                             * guest hammering its event channel); use with a large spin_us */
};

/* Pages of one request id: data_refs[id * segs_per_req + k]; indirect requests (bs > 11 pages) also need
 * ind_refs[id] and ind_addrs[id] (one granted page the generator writes the segment list into). */
struct pv_load_pages {
    const uint32_t *data_refs;
    uint32_t segs_per_req;
    const uint32_t *ind_refs;
    void *const *ind_addrs;
};

struct pv_load_result {
    uint64_t ops;
    uint64_t reads;
    uint64_t writes;
    uint64_t bytes;
    uint64_t errors;      /* responses with a status other than OKAY */
    uint64_t elapsed_ns;  /* first push to last response */
    uint64_t notifies;    /* kicks sent */
    uint64_t sleeps;      /* poll() calls */
    uint64_t spin_hits;   /* responses found while spinning */
    uint64_t lat_min_ns;
    uint64_t lat_max_ns;
    uint64_t lat_sum_ns;
    uint64_t hist[PV_LOAD_HIST_BUCKETS];
};

/* Returns 0, or -PV_LOAD_E* (err holds a message).  `res` is filled in either case. */
int pv_load_run(const struct pv_load_config *cfg, const struct pv_load_queue *queues,
                const struct pv_load_pages *pages, struct pv_load_result *res, char *err, uint32_t errlen);

/* The histogram bucket of a latency, and the value a bucket stands for (its midpoint), in ns. */
uint32_t pv_load_bucket(uint64_t ns);
uint64_t pv_load_bucket_value(uint32_t bucket);
/* p in [0, 100]: latency (ns) below which p % of the recorded requests fall (0 if none). */
uint64_t pv_load_percentile(const struct pv_load_result *res, double p);

#endif
