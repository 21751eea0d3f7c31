/* Shared pumps: a few threads serving many blk queues (N queues on M threads instead of a thread per queue).
 *
 * One pump object holds the queues; each of its threads runs pv_blk_pump_run.  The threads sleep in one
 * epoll_wait on every source of every queue (event channel, completion fd, pause and limit timers; edge-
 * triggered, so each new event wakes one thread and becomes a pending bit of its queue) and then take turns:
 * each queue that has something to do gets one turn at a time, in the order it became ready, by whichever
 * thread is free, and consumes at most `budget` requests in that turn (pv_blk_queue_serve).  A queue that
 * still has requests on its ring goes to the back of the line and gets another turn without waiting for an
 * event, so a guest that keeps its ring full gets one batch per turn and its neighbours theirs in between,
 * and no queue is ever served by two threads at once.  A thread whose turns found work may keep looking
 * (epoll_wait without sleeping) for `spin_us` before it sleeps again.
 *
 * Threads: add/remove/take_dead/set_* may be called from any thread; remove() waits for a turn in progress
 * on that queue, so its return means no thread will touch the queue again.  The sizes are the caller's
 * policy (config knobs); this file only bounds them.
 */
#ifndef PVBACK_BLKPUMP_H
#define PVBACK_BLKPUMP_H

#include <stddef.h>
#include <stdint.h>

#include "blkback.h"

#define PV_BLK_PUMP_MAX_QUEUES 4096
#define PV_BLK_PUMP_MAX_BUDGET 4096
#define PV_BLK_PUMP_DEAD 1 /* pv_blk_pump_run: a queue died (take it with pv_blk_pump_take_dead), call again */

struct pv_blk_pump;

struct pv_blk_pump_stats {
    uint64_t passes;      /* rounds of turns (each: the queues ready at its start, once each) */
    uint64_t turns;       /* queue turns served */
    uint64_t budget_hits; /* turns that ended with requests left on the ring */
    uint64_t sleeps;      /* epoll_wait calls that could block */
    uint32_t queues;      /* queues held now */
};

/* capacity: queues it may hold at once (1..PV_BLK_PUMP_MAX_QUEUES); budget: requests per queue per turn
 * (1..PV_BLK_PUMP_MAX_BUDGET).  NULL with a message in err on failure. */
struct pv_blk_pump *pv_blk_pump_create(uint32_t capacity, uint32_t budget, uint32_t spin_us, char *err,
                                       size_t errlen);
/* Only once no thread runs it and it holds no queue. */
void pv_blk_pump_destroy(struct pv_blk_pump *p);
/* Serve `q` from now on (its first turn looks at the ring: requests may be queued already).  0, -ENOSPC when
 * full, -EEXIST if it holds q already, or -errno from epoll. */
int pv_blk_pump_add(struct pv_blk_pump *p, struct pv_blk_queue *q);
/* Stop serving `q`: on return the pump thread will not touch it again.  Returns the negative code it died
 * with (-PV_BLK_EDEAD, -PV_BLK_EEVTCHN), 0 if it was alive, -ENOENT if the pump did not hold it. */
int32_t pv_blk_pump_remove(struct pv_blk_pump *p, struct pv_blk_queue *q);
/* One of the pump's threads: serve until stop_fd (one eventfd shared by all of them) is readable (0), a queue
 * dies (PV_BLK_PUMP_DEAD: it is no longer served, the others are; call again), or epoll fails
 * (-PV_BLK_EEVTCHN).  The stop fd stays in the pump's set until it is closed. */
int32_t pv_blk_pump_run(struct pv_blk_pump *p, int stop_fd);
/* Queues that died and were not reported yet, with their codes; returns how many were written (<= max). */
uint32_t pv_blk_pump_take_dead(struct pv_blk_pump *p, struct pv_blk_queue **queues, int32_t *codes, uint32_t max);
/* Live changes; values out of range are clamped to the bounds above (1..MAX_BUDGET). */
void pv_blk_pump_set_budget(struct pv_blk_pump *p, uint32_t budget);
void pv_blk_pump_set_spin_us(struct pv_blk_pump *p, uint32_t spin_us);
void pv_blk_pump_get_stats(struct pv_blk_pump *p, struct pv_blk_pump_stats *out);

#endif
