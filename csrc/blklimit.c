/* A disk's token buckets; see blklimit.h. */
#include "blklimit.h"

#include <stdlib.h>
#include <time.h>

/* A bucket without a cap grants this much per pass: never spent in practice, never overflows when charged. */
#define UNLIMITED (INT64_MAX / 4)

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct pv_blk_limit *pv_blk_limit_create(void)
{
    struct pv_blk_limit *l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    if (pthread_mutex_init(&l->lock, NULL) != 0) {
        free(l);
        return NULL;
    }
    l->burst_ms = 100;
    return l;
}

void pv_blk_limit_destroy(struct pv_blk_limit *l)
{
    if (!l)
        return;
    pthread_mutex_destroy(&l->lock);
    free(l);
}

static int64_t bucket_cap(uint64_t rate, uint32_t burst_ms)
{
    /* milli-units: rate * burst_ms (units/s * ms = milli-units); at least 4 timer periods' worth so a queue
     * sleeping PV_BLK_LIMIT_MIN_WAIT_MS never finds its refill clipped, and at least one whole unit. */
    uint32_t ms = burst_ms > 4 * PV_BLK_LIMIT_MIN_WAIT_MS ? burst_ms : 4 * PV_BLK_LIMIT_MIN_WAIT_MS;
    unsigned __int128 cap = (unsigned __int128)rate * ms;
    if (cap < 1000)
        cap = 1000;
    return cap > UNLIMITED ? UNLIMITED : (int64_t)cap;
}

static void refill(struct pv_blk_bucket *b, uint64_t elapsed_ns)
{
    if (!b->rate)
        return;
    /* rate units/s = rate / 1e6 milli-units per ns */
    unsigned __int128 add = (unsigned __int128)elapsed_ns * b->rate / 1000000u;
    /* tokens <= cap always, so cap - tokens does not overflow (both within +-UNLIMITED) */
    if (add >= (unsigned __int128)(b->cap - b->tokens))
        b->tokens = b->cap;
    else
        b->tokens += (int64_t)add;
}

static void refill_all(struct pv_blk_limit *l, uint64_t now)
{
    if (now > l->last_ns) {
        refill(&l->ops, now - l->last_ns);
        refill(&l->bytes, now - l->last_ns);
        l->last_ns = now;
    }
}

/* When the bucket will hold `need` milli-units again (0 if it does now). */
static uint64_t time_to(const struct pv_blk_bucket *b, int64_t need)
{
    if (!b->rate || b->tokens >= need)
        return 0;
    unsigned __int128 ns = ((unsigned __int128)(need - b->tokens) * 1000000u + b->rate - 1) / b->rate;
    return ns > (unsigned __int128)UINT64_MAX / 2 ? UINT64_MAX / 2 : (uint64_t)ns;
}

static uint64_t wake_time(const struct pv_blk_limit *l, uint64_t now)
{
    uint64_t t = (uint64_t)PV_BLK_LIMIT_MIN_WAIT_MS * 1000000u;
    uint64_t to = time_to(&l->ops, 1000), tb = time_to(&l->bytes, 1);
    if (to > t)
        t = to;
    if (tb > t)
        t = tb;
    return now + t;
}

int pv_blk_limit_set(struct pv_blk_limit *l, uint64_t iops, uint64_t bps, uint32_t burst_ms)
{
    if (iops > PV_BLK_LIMIT_MAX_IOPS || bps > PV_BLK_LIMIT_MAX_BPS || burst_ms > PV_BLK_LIMIT_MAX_BURST_MS)
        return -1;
    pthread_mutex_lock(&l->lock);
    uint64_t now = mono_ns();
    refill_all(l, now);
    l->last_ns = now;
    struct pv_blk_bucket *bs[2] = {&l->ops, &l->bytes};
    uint64_t rates[2] = {iops, bps};
    for (int i = 0; i < 2; i++) {
        struct pv_blk_bucket *b = bs[i];
        int was = b->rate != 0;
        b->rate = rates[i];
        b->cap = rates[i] ? bucket_cap(rates[i], burst_ms) : 0;
        if (!rates[i])
            b->tokens = 0;
        else if (!was)
            b->tokens = b->cap; /* newly capped: an idle disk's full burst */
        else if (b->tokens > b->cap)
            b->tokens = b->cap; /* a lower cap applies now, not after the old burst is spent */
    }
    l->burst_ms = burst_ms;
    l->generation++;
    pthread_mutex_unlock(&l->lock);
    return 0;
}

int pv_blk_limit_enabled(const struct pv_blk_limit *l)
{
    return __atomic_load_n(&l->ops.rate, __ATOMIC_RELAXED) || __atomic_load_n(&l->bytes.rate, __ATOMIC_RELAXED);
}

static int64_t reserve(struct pv_blk_bucket *b, uint32_t n)
{
    if (!b->rate)
        return UNLIMITED;
    int64_t share = b->tokens / (int64_t)n;
    if (share <= 0)
        share = b->tokens;
    b->tokens -= share;
    return share;
}

int pv_blk_limit_begin(struct pv_blk_limit *l, uint64_t now_ns, struct pv_blk_limit_pass *pass, uint64_t *wake_ns)
{
    pthread_mutex_lock(&l->lock);
    refill_all(l, now_ns);
    if ((l->ops.rate && l->ops.tokens <= 0) || (l->bytes.rate && l->bytes.tokens <= 0)) {
        *wake_ns = wake_time(l, now_ns);
        l->waiting++;
        l->waits++;
        pthread_mutex_unlock(&l->lock);
        pass->active = 0;
        return 0;
    }
    uint32_t n = l->waiting + 1;
    pass->ops = reserve(&l->ops, n);
    pass->bytes = reserve(&l->bytes, n);
    pass->active = 1;
    pass->admitted = 0;
    pthread_mutex_unlock(&l->lock);
    return 1;
}

static void give_back(struct pv_blk_bucket *b, int64_t left)
{
    if (!b->rate || left == UNLIMITED || left > UNLIMITED / 2)
        return; /* no cap (now or when the pass began): nothing was reserved */
    int64_t t = b->tokens + left;
    b->tokens = t > b->cap ? b->cap : t;
}

void pv_blk_limit_end(struct pv_blk_limit *l, uint64_t now_ns, struct pv_blk_limit_pass *pass, int starved,
                      uint64_t *wake_ns)
{
    if (!pass->active)
        return;
    pthread_mutex_lock(&l->lock);
    refill_all(l, now_ns);
    give_back(&l->ops, pass->ops);
    give_back(&l->bytes, pass->bytes);
    l->admitted += pass->admitted;
    if (starved) {
        *wake_ns = wake_time(l, now_ns);
        l->waiting++;
        l->waits++;
    }
    pthread_mutex_unlock(&l->lock);
    pass->active = 0;
}

void pv_blk_limit_woke(struct pv_blk_limit *l, uint64_t slept_ns)
{
    pthread_mutex_lock(&l->lock);
    if (l->waiting)
        l->waiting--;
    l->throttled_ns += slept_ns;
    pthread_mutex_unlock(&l->lock);
}

void pv_blk_limit_get_stats(struct pv_blk_limit *l, struct pv_blk_limit_stats *out)
{
    pthread_mutex_lock(&l->lock);
    *out = (struct pv_blk_limit_stats){.iops = l->ops.rate, .bps = l->bytes.rate, .burst_ms = l->burst_ms,
                                       .waiting = l->waiting, .waits = l->waits, .throttled_ns = l->throttled_ns,
                                       .admitted = l->admitted};
    pthread_mutex_unlock(&l->lock);
}
