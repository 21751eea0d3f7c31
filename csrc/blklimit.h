/* A disk's I/O limits: an IOPS and a bandwidth token bucket shared by the disk's queues (one per device, like
 * netback's per-vif credit), with a burst allowance.  No policy here beyond the bucket arithmetic: the rates
 * come from the control path (pv_blk_limit_set, from any thread, at any time) and the queues' pumps
 * (blkback.c) spend them.
 *
 * The buckets hold milli-units (milli-ops, milli-bytes) so that slow rates refill smoothly.  They may go
 * negative: a request is admitted while its queue's share is positive and then charged in full, so a request
 * larger than the burst still passes (after the debt is repaid, the long-run rate is exact) and the cap never
 * depends on the request size.
 *
 * Fairness between a disk's queues: a queue spends tokens in passes.  At the start of a pass it reserves a
 * share, (tokens now) / (1 + queues waiting for tokens), and at the end returns what it did not spend (or
 * its debt).  Two queues woken by the same refill thus split it, and one busy queue cannot take the tokens a
 * waiting one needs.  One mutex, taken twice per pass (not per request).
 *
 * Burst: the buckets hold at most `burst_ms` of their rate (at least PV_BLK_LIMIT_MIN_WAIT_MS * 4, so the
 * timer's granularity never loses tokens).  An idle disk thus starts with that many ms of I/O at full speed. */
#ifndef PVBACK_BLKLIMIT_H
#define PVBACK_BLKLIMIT_H

#include <pthread.h>
#include <stdint.h>

/* A throttled queue sleeps at least this long: at most 1000 wakeups per second per queue however low the
 * rate, and each wakeup admits a batch (the debt model keeps the rate exact). */
#define PV_BLK_LIMIT_MIN_WAIT_MS 1
#define PV_BLK_LIMIT_MAX_IOPS 100000000ull        /* 1e8 ops/s */
#define PV_BLK_LIMIT_MAX_BPS 1000000000000ull     /* 1 TB/s */
#define PV_BLK_LIMIT_MAX_BURST_MS 60000u

struct pv_blk_limit_stats {
    uint64_t iops;          /* 0: no IOPS cap */
    uint64_t bps;           /* 0: no bandwidth cap */
    uint32_t burst_ms;
    uint32_t waiting;       /* queues sleeping until a refill */
    uint64_t waits;         /* times a queue had to sleep for tokens */
    uint64_t throttled_ns;  /* summed over the queues: time spent sleeping with requests on the ring */
    uint64_t admitted;      /* requests admitted while a cap was set */
};

struct pv_blk_bucket {
    int64_t tokens; /* milli-units */
    int64_t cap;    /* milli-units */
    uint64_t rate;  /* units per second; 0: unlimited */
};

struct pv_blk_limit {
    pthread_mutex_t lock;
    struct pv_blk_bucket ops, bytes;
    uint32_t burst_ms;
    uint64_t last_ns;
    uint32_t waiting;
    uint32_t generation; /* bumped by pv_blk_limit_set: a queue's timer wakes early to see the new rates */
    uint64_t waits, throttled_ns, admitted;
};

/* One queue's pass: its reserved share, spent request by request without the lock. */
struct pv_blk_limit_pass {
    int active;
    int64_t ops;   /* milli-ops left */
    int64_t bytes; /* milli-bytes left */
    uint64_t admitted;
};

struct pv_blk_limit *pv_blk_limit_create(void);
void pv_blk_limit_destroy(struct pv_blk_limit *l);
/* Set the caps (0 = none) and the burst; applies at once to every queue (they look again at their next
 * wakeup; pv_blk_queue_limit_kick wakes a sleeping one now).  Returns -1 for values out of range. */
int pv_blk_limit_set(struct pv_blk_limit *l, uint64_t iops, uint64_t bps, uint32_t burst_ms);
void pv_blk_limit_get_stats(struct pv_blk_limit *l, struct pv_blk_limit_stats *out);

/* ---- for blkback.c (not in the cdef) ---- */
/* Nonzero when a cap is set (a relaxed read: a change is seen at the next pass). */
int pv_blk_limit_enabled(const struct pv_blk_limit *l);
/* Start a pass: refill, reserve this queue's share.  Returns 1 with `pass` filled, or 0 when the disk has no
 * tokens now: then *wake_ns says when to look again and the queue counts as waiting until it calls
 * pv_blk_limit_woke. */
int pv_blk_limit_begin(struct pv_blk_limit *l, uint64_t now_ns, struct pv_blk_limit_pass *pass, uint64_t *wake_ns);
/* End a pass: give back what is left of the share (or charge the debt).  If `starved` (the queue stopped
 * with requests left because its share ran out), it becomes a waiter and *wake_ns is set. */
void pv_blk_limit_end(struct pv_blk_limit *l, uint64_t now_ns, struct pv_blk_limit_pass *pass, int starved,
                      uint64_t *wake_ns);
/* A waiting queue's timer fired (or it was kicked): it no longer waits; `slept_ns` goes to the stats. */
void pv_blk_limit_woke(struct pv_blk_limit *l, uint64_t slept_ns);

static inline int pv_blk_limit_pass_open(const struct pv_blk_limit_pass *p) { return p->ops > 0 && p->bytes > 0; }
static inline void pv_blk_limit_pass_charge_op(struct pv_blk_limit_pass *p)
{
    p->ops -= 1000;
    p->admitted++;
}
static inline void pv_blk_limit_pass_charge_bytes(struct pv_blk_limit_pass *p, uint64_t bytes)
{
    p->bytes -= (int64_t)(bytes * 1000u);
}

#endif
