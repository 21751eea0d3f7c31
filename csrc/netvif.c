/* State shared by a vif's queues; see netvif.h. */
#include "netvif.h"

#include <stdlib.h>
#include <time.h>

uint64_t pv_net_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct pv_net_vif *pv_net_vif_create(void)
{
    struct pv_net_vif *v = calloc(1, sizeof(*v));
    if (!v)
        return NULL;
    if (pthread_mutex_init(&v->lock, NULL) != 0) {
        free(v);
        return NULL;
    }
    return v;
}

void pv_net_vif_destroy(struct pv_net_vif *v)
{
    if (!v)
        return;
    pthread_mutex_destroy(&v->lock);
    free(v);
}

/* A refill: one window's credit on top of what is left, capped at the burst allowance (tx_add_credit). */
static void refill(struct pv_net_vif *v)
{
    uint64_t cap = v->bytes > PV_NET_CREDIT_MAX_BURST ? v->bytes : PV_NET_CREDIT_MAX_BURST;
    uint64_t sum = v->remaining + v->bytes;
    if (sum < v->remaining) /* wrapped (a rate near 2^64) */
        sum = UINT64_MAX;
    v->remaining = sum < cap ? sum : cap;
}

void pv_net_vif_set_rate(struct pv_net_vif *v, uint64_t bytes, uint64_t usecs)
{
    pthread_mutex_lock(&v->lock);
    if (bytes && !usecs)
        usecs = 1;
    uint64_t was = v->bytes;
    v->period_ns = usecs * 1000u;
    if (!was && bytes) {
        /* Limited from now on: one window's credit to start with, as a vif created with a rate. */
        v->remaining = bytes;
        v->window_start_ns = pv_net_now_ns();
    } else if (v->remaining > bytes) {
        /* A lower rate applies at once, not after the credit earned at the old one is spent (as Linux's
         * xen_net_rate_changed). */
        v->remaining = bytes;
    }
    __atomic_store_n(&v->bytes, bytes, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&v->lock);
}

int pv_net_vif_take_credit(struct pv_net_vif *v, uint32_t size, uint64_t now_ns, uint64_t *wake_ns)
{
    if (!__atomic_load_n(&v->bytes, __ATOMIC_ACQUIRE))
        return 1;
    int ok = 1;
    pthread_mutex_lock(&v->lock);
    if (v->bytes) {
        uint64_t next = v->window_start_ns + v->period_ns;
        if (size > v->remaining && now_ns >= next) {
            /* The window passed: a new one starts now, with its credit. */
            v->window_start_ns = now_ns;
            refill(v);
            next = now_ns + v->period_ns;
        }
        if (size > v->remaining) {
            *wake_ns = next;
            ok = 0;
        } else {
            v->remaining -= size;
        }
    }
    pthread_mutex_unlock(&v->lock);
    return ok;
}

int pv_net_vif_queue_stalled(struct pv_net_vif *v)
{
    if (__atomic_fetch_add(&v->stalled_queues, 1, __ATOMIC_ACQ_REL) != 0)
        return 0;
    __atomic_fetch_add(&v->carrier_offs, 1, __ATOMIC_RELAXED);
    return 1;
}

int pv_net_vif_queue_ready(struct pv_net_vif *v)
{
    return __atomic_sub_fetch(&v->stalled_queues, 1, __ATOMIC_ACQ_REL) == 0;
}

uint32_t pv_net_vif_carrier_offs(const struct pv_net_vif *v)
{
    return __atomic_load_n(&v->carrier_offs, __ATOMIC_RELAXED);
}
