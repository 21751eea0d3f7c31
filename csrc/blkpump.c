/* Shared pumps: a few threads serving many blk queues; see blkpump.h. */
#include "blkpump.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#include "pvtime.h"

/* epoll tokens: slot index (bits 0-23), source (24-31), the slot's generation (32-63), so an event that was
 * already collected when its queue was removed (or the slot reused) is recognised as stale and dropped. */
#define TOKEN_STOP UINT64_MAX
#define TOKEN_WAKE (UINT64_MAX - 1)
#define MAX_EVENTS 64

struct slot {
    struct pv_blk_pump *pump;
    struct pv_blk_queue *q; /* NULL: free */
    uint32_t index;
    uint32_t gen;
    uint32_t pending; /* 1 << PV_BLK_SRC_* seen since its last turn */
    int fds[PV_BLK_NR_SOURCES];
    int queued;
    int busy; /* a thread is serving it (outside the lock) */
    int hup;
    int32_t dead_rc; /* != 0: died, no longer served */
    int dead_reported;
    struct slot *next;
};

struct pv_blk_pump {
    pthread_mutex_t lock;
    pthread_cond_t idle; /* a slot stopped being busy (remove waits for it) */
    uint32_t sleepers;   /* threads in a blocking epoll_wait */
    int epfd;
    int wake_fd;
    uint32_t capacity;
    uint32_t budget;  /* atomic */
    uint32_t spin_us; /* atomic */
    struct slot *slots;
    struct slot *ready_head, *ready_tail;
    uint32_t nready;
    uint32_t nqueues;
    uint32_t ndead_unreported;
    struct pv_blk_pump_stats st;
};

static uint64_t token(const struct slot *s, int src)
{
    return (uint64_t)s->index | ((uint64_t)src << 24) | ((uint64_t)s->gen << 32);
}

static void ready_push(struct pv_blk_pump *p, struct slot *s)
{
    if (s->queued)
        return;
    s->queued = 1;
    s->next = NULL;
    if (p->ready_tail)
        p->ready_tail->next = s;
    else
        p->ready_head = s;
    p->ready_tail = s;
    p->nready++;
}

static struct slot *ready_pop(struct pv_blk_pump *p)
{
    struct slot *s = p->ready_head;
    if (!s)
        return NULL;
    p->ready_head = s->next;
    if (!p->ready_head)
        p->ready_tail = NULL;
    p->nready--;
    s->queued = 0;
    s->next = NULL;
    return s;
}

static void ready_unlink(struct pv_blk_pump *p, struct slot *s)
{
    if (!s->queued)
        return;
    struct slot **pp = &p->ready_head, *prev = NULL;
    while (*pp && *pp != s) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (*pp) {
        *pp = s->next;
        if (p->ready_tail == s)
            p->ready_tail = prev;
        p->nready--;
    }
    s->queued = 0;
    s->next = NULL;
}

static void unwatch(struct pv_blk_pump *p, struct slot *s)
{
    for (int i = 0; i < PV_BLK_NR_SOURCES; i++)
        if (s->fds[i] >= 0)
            (void)epoll_ctl(p->epfd, EPOLL_CTL_DEL, s->fds[i], NULL);
}

/* The queue's spurious-event pause: stop/resume reporting its event channel (called inside its turn). */
static void listen_hook(void *ctx, int on)
{
    struct slot *s = ctx;
    struct epoll_event ev = {.events = on ? EPOLLIN | EPOLLET : 0, .data.u64 = token(s, PV_BLK_SRC_EVENT)};
    (void)epoll_ctl(s->pump->epfd, EPOLL_CTL_MOD, s->fds[PV_BLK_SRC_EVENT], &ev);
}

struct pv_blk_pump *pv_blk_pump_create(uint32_t capacity, uint32_t budget, uint32_t spin_us, char *err,
                                       size_t errlen)
{
    if (capacity == 0 || capacity > PV_BLK_PUMP_MAX_QUEUES) {
        snprintf(err, errlen, "pump capacity %u not in 1..%u", capacity, PV_BLK_PUMP_MAX_QUEUES);
        return NULL;
    }
    if (budget == 0 || budget > PV_BLK_PUMP_MAX_BUDGET) {
        snprintf(err, errlen, "pump budget %u not in 1..%u", budget, PV_BLK_PUMP_MAX_BUDGET);
        return NULL;
    }
    struct pv_blk_pump *p = calloc(1, sizeof(*p));
    if (!p || !(p->slots = calloc(capacity, sizeof(*p->slots)))) {
        free(p);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    p->capacity = capacity;
    p->budget = budget;
    p->spin_us = spin_us;
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = TOKEN_WAKE};
    if (p->epfd < 0 || p->wake_fd < 0 || epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->wake_fd, &ev) < 0) {
        snprintf(err, errlen, "epoll/eventfd: %s", strerror(errno));
        if (p->epfd >= 0)
            close(p->epfd);
        if (p->wake_fd >= 0)
            close(p->wake_fd);
        free(p->slots);
        free(p);
        return NULL;
    }
    for (uint32_t i = 0; i < capacity; i++) {
        p->slots[i].pump = p;
        p->slots[i].index = i;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->idle, NULL);
    return p;
}

void pv_blk_pump_destroy(struct pv_blk_pump *p)
{
    if (!p)
        return;
    close(p->epfd);
    close(p->wake_fd);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->idle);
    free(p->slots);
    free(p);
}

int pv_blk_pump_add(struct pv_blk_pump *p, struct pv_blk_queue *q)
{
    pthread_mutex_lock(&p->lock);
    struct slot *s = NULL;
    for (uint32_t i = 0; i < p->capacity; i++) {
        if (p->slots[i].q == q) {
            pthread_mutex_unlock(&p->lock);
            return -EEXIST;
        }
        if (!s && !p->slots[i].q)
            s = &p->slots[i];
    }
    if (!s) {
        pthread_mutex_unlock(&p->lock);
        return -ENOSPC;
    }
    s->gen++;
    s->q = q;
    s->pending = 0;
    s->hup = 0;
    s->dead_rc = 0;
    s->dead_reported = 0;
    pv_blk_queue_sources(q, s->fds);
    for (int i = 0; i < PV_BLK_NR_SOURCES; i++) {
        if (s->fds[i] < 0)
            continue;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = token(s, i)};
        if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, s->fds[i], &ev) < 0) {
            int e = errno;
            while (i-- > 0)
                if (s->fds[i] >= 0)
                    (void)epoll_ctl(p->epfd, EPOLL_CTL_DEL, s->fds[i], NULL);
            s->q = NULL;
            pthread_mutex_unlock(&p->lock);
            return -e;
        }
    }
    pv_blk_queue_attach(q, listen_hook, s);
    p->nqueues++;
    /* Its first turn looks at the ring: requests may have been queued before anyone listened. */
    ready_push(p, s);
    pthread_mutex_unlock(&p->lock);
    uint64_t one = 1;
    (void)!write(p->wake_fd, &one, sizeof(one));
    return 0;
}

int32_t pv_blk_pump_remove(struct pv_blk_pump *p, struct pv_blk_queue *q)
{
    pthread_mutex_lock(&p->lock);
    for (uint32_t i = 0; i < p->capacity; i++) {
        struct slot *s = &p->slots[i];
        if (s->q != q)
            continue;
        while (s->busy)
            pthread_cond_wait(&p->idle, &p->lock);
        if (!s->dead_rc)
            unwatch(p, s);
        else if (!s->dead_reported)
            p->ndead_unreported--;
        ready_unlink(p, s);
        pv_blk_queue_attach(q, NULL, NULL);
        int32_t rc = s->dead_rc;
        s->q = NULL;
        s->gen++;
        p->nqueues--;
        pthread_mutex_unlock(&p->lock);
        return rc;
    }
    pthread_mutex_unlock(&p->lock);
    return -ENOENT;
}

/* Turns for the calling thread: the queues ready when it starts (at least one), each once, in the order
 * they became ready; a queue another thread is serving is not ready (it goes back to the line when that
 * turn ends).  Called and returns with the lock held; serves with it released. */
static int32_t pass(struct pv_blk_pump *p)
{
    uint32_t budget = __atomic_load_n(&p->budget, __ATOMIC_RELAXED);
    uint32_t n = p->nready;
    int32_t work = 0;
    p->st.passes++;
    while (n--) {
        struct slot *s = ready_pop(p);
        if (!s)
            break; /* another thread took the rest */
        uint32_t bits = s->pending;
        s->pending = 0;
        s->busy = 1;
        int hup = s->hup;
        pthread_mutex_unlock(&p->lock);
        int more = 0;
        int32_t rc = hup ? -PV_BLK_EEVTCHN : pv_blk_queue_serve(s->q, bits, budget, &more);
        pthread_mutex_lock(&p->lock);
        s->busy = 0;
        pthread_cond_broadcast(&p->idle);
        p->st.turns++;
        if (rc < 0) {
            /* Only this queue stops: its sources leave the set, the caller hears of it (take_dead). */
            unwatch(p, s);
            s->dead_rc = rc;
            p->ndead_unreported++;
            continue;
        }
        work += rc;
        if (more) {
            p->st.budget_hits++;
            work++;
        }
        /* Left with requests, or something fired during the turn: back in line. */
        if (more || s->pending || s->hup)
            ready_push(p, s);
    }
    return work;
}

int32_t pv_blk_pump_run(struct pv_blk_pump *p, int stop_fd)
{
    /* Level-triggered, unlike the queues' sources: every thread of the pump must see it. */
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TOKEN_STOP};
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, stop_fd, &ev) < 0 && errno != EEXIST)
        return -PV_BLK_EEVTCHN;
    struct epoll_event evs[MAX_EVENTS];
    uint64_t spin_until = 0; /* look without sleeping until then (0: sleep when nothing is ready) */
    int32_t ret = 0;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        int may_sleep = !p->nready && !spin_until;
        if (may_sleep) {
            p->sleepers++;
            p->st.sleeps++;
        }
        pthread_mutex_unlock(&p->lock);
        /* Sources are edge-triggered: each new event is reported once, to one thread, and becomes a pending
         * bit of its queue, so no thread spins on a source another is in the middle of serving. */
        int n = epoll_wait(p->epfd, evs, MAX_EVENTS, may_sleep ? -1 : 0);
        int err = n < 0 ? errno : 0;
        pthread_mutex_lock(&p->lock);
        if (may_sleep)
            p->sleepers--;
        if (n < 0) {
            pthread_mutex_unlock(&p->lock);
            if (err == EINTR)
                continue;
            ret = -PV_BLK_EEVTCHN;
            break;
        }
        int stop = 0;
        for (int i = 0; i < n; i++) {
            uint64_t t = evs[i].data.u64;
            if (t == TOKEN_STOP) {
                stop = 1;
                continue;
            }
            if (t == TOKEN_WAKE) {
                uint64_t v;
                (void)!read(p->wake_fd, &v, sizeof(v));
                continue;
            }
            uint32_t idx = (uint32_t)(t & 0xffffffu), src = (uint32_t)((t >> 24) & 0xffu);
            if (idx >= p->capacity || src >= PV_BLK_NR_SOURCES)
                continue;
            struct slot *s = &p->slots[idx];
            if (!s->q || s->gen != (uint32_t)(t >> 32) || s->dead_rc)
                continue; /* removed (or reused) since epoll_wait collected it */
            s->pending |= 1u << src;
            if (src == PV_BLK_SRC_EVENT && (evs[i].events & (EPOLLERR | EPOLLHUP)))
                s->hup = 1;
            if (!s->busy)
                ready_push(p, s);
        }
        if (stop) {
            pthread_mutex_unlock(&p->lock);
            break;
        }
        /* More in line than this thread will take at once while others sleep: wake one to share it. */
        if (p->nready > 1 && p->sleepers) {
            uint64_t one = 1;
            (void)!write(p->wake_fd, &one, sizeof(one));
        }
        int32_t work = p->nready ? pass(p) : 0;
        int dead = p->ndead_unreported != 0;
        pthread_mutex_unlock(&p->lock);
        if (dead) {
            ret = PV_BLK_PUMP_DEAD;
            break;
        }
        uint32_t us = __atomic_load_n(&p->spin_us, __ATOMIC_RELAXED);
        if (work > 0 && us) {
            spin_until = now_ns() + (uint64_t)us * 1000u;
        } else if (spin_until) {
            if (now_ns() >= spin_until)
                spin_until = 0;
            else
                cpu_relax();
        }
    }
    return ret;
}

uint32_t pv_blk_pump_take_dead(struct pv_blk_pump *p, struct pv_blk_queue **queues, int32_t *codes, uint32_t max)
{
    uint32_t n = 0;
    pthread_mutex_lock(&p->lock);
    for (uint32_t i = 0; i < p->capacity && n < max; i++) {
        struct slot *s = &p->slots[i];
        if (s->q && s->dead_rc && !s->dead_reported) {
            s->dead_reported = 1;
            p->ndead_unreported--;
            queues[n] = s->q;
            codes[n] = s->dead_rc;
            n++;
        }
    }
    pthread_mutex_unlock(&p->lock);
    return n;
}

void pv_blk_pump_set_budget(struct pv_blk_pump *p, uint32_t budget)
{
    if (budget == 0)
        budget = 1;
    if (budget > PV_BLK_PUMP_MAX_BUDGET)
        budget = PV_BLK_PUMP_MAX_BUDGET;
    __atomic_store_n(&p->budget, budget, __ATOMIC_RELAXED);
}

void pv_blk_pump_set_spin_us(struct pv_blk_pump *p, uint32_t spin_us)
{
    __atomic_store_n(&p->spin_us, spin_us, __ATOMIC_RELAXED);
}

void pv_blk_pump_get_stats(struct pv_blk_pump *p, struct pv_blk_pump_stats *out)
{
    pthread_mutex_lock(&p->lock);
    *out = p->st;
    out->queues = p->nqueues;
    pthread_mutex_unlock(&p->lock);
}
