/* Slots per second through csrc/ring.c from a pure C loop: the ceiling the cffi batch path is compared to
 * (perf/bench_ring.py).  One thread plays both ends, batch by batch, doing exactly the calls the Python
 * benchmark makes: front put + push, back consume + respond, front consume.
 *
 * Usage: ring_loop SLOTS BATCH SLOT_SIZE RSP_SIZE PAGES [CHUNKS]
 * The run is timed in CHUNKS equal parts (default 1); best_slots_per_s is the fastest part, the figure least
 * disturbed by other load on a shared machine.
 * Prints: slots=<n> seconds=<s> slots_per_s=<r> best_slots_per_s=<r> checksum=<c>
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ring.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Returns the slots moved; `sum` depends on every copied-out byte so nothing can be elided. */
static uint64_t run(struct pv_front_ring *f, struct pv_back_ring *b, uint64_t slots, uint32_t batch,
                    uint32_t slot_size, uint32_t rsp_size, uint8_t *reqs, uint8_t *bout, uint8_t *rsps,
                    uint8_t *fout, uint64_t *sum)
{
    uint64_t done = 0;
    while (done < slots) {
        pv_front_ring_put_requests(f, reqs, batch, slot_size);
        pv_front_ring_push(f);
        int32_t got = pv_back_ring_consume(b, bout, batch);
        if (got <= 0) {
            fprintf(stderr, "consume returned %d\n", got);
            exit(1);
        }
        pv_back_ring_respond(b, rsps, (uint32_t)got, rsp_size);
        int32_t back = pv_front_ring_consume(f, fout, batch, rsp_size);
        *sum += bout[(uint32_t)(got - 1) * slot_size] + fout[0] + (uint64_t)back;
        done += (uint64_t)got;
    }
    return done;
}

int main(int argc, char **argv)
{
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: %s SLOTS BATCH SLOT_SIZE RSP_SIZE PAGES [CHUNKS]\n", argv[0]);
        return 2;
    }
    uint64_t slots = strtoull(argv[1], NULL, 0);
    uint32_t batch = (uint32_t)atoi(argv[2]);
    uint32_t slot_size = (uint32_t)atoi(argv[3]);
    uint32_t rsp_size = (uint32_t)atoi(argv[4]);
    uint32_t pages = (uint32_t)atoi(argv[5]);
    uint64_t chunks = argc == 7 ? strtoull(argv[6], NULL, 0) : 1;
    if (chunks == 0)
        chunks = 1;
    if (pv_ring_size(pages, slot_size) < batch || rsp_size > slot_size) {
        fprintf(stderr, "batch %u does not fit a %u-page ring of %u-byte slots\n", batch, pages, slot_size);
        return 2;
    }
    void *page = aligned_alloc(4096, (size_t)pages * 4096);
    uint8_t *reqs = malloc((size_t)batch * slot_size), *bout = malloc((size_t)batch * slot_size);
    uint8_t *rsps = malloc((size_t)batch * rsp_size), *fout = malloc((size_t)batch * rsp_size);
    if (!page || !reqs || !bout || !rsps || !fout)
        return 1;
    for (size_t i = 0; i < (size_t)batch * slot_size; i++)
        reqs[i] = (uint8_t)(i * 7);
    memset(rsps, 1, (size_t)batch * rsp_size);
    struct pv_front_ring f;
    struct pv_back_ring b;
    pv_sring_init(page);
    pv_front_ring_attach(&f, page, pages, slot_size, 0);
    pv_back_ring_attach(&b, page, pages, slot_size, 0);
    uint64_t sum = 0;
    run(&f, &b, slots / 10 + batch, batch, slot_size, rsp_size, reqs, bout, rsps, fout, &sum); /* warm up */
    uint64_t done = 0;
    double total = 0, best = 0;
    for (uint64_t c = 0; c < chunks; c++) {
        double t0 = now();
        uint64_t d = run(&f, &b, slots / chunks, batch, slot_size, rsp_size, reqs, bout, rsps, fout, &sum);
        double dt = now() - t0;
        total += dt;
        done += d;
        if ((double)d / dt > best)
            best = (double)d / dt;
    }
    printf("slots=%llu seconds=%.6f slots_per_s=%.0f best_slots_per_s=%.0f checksum=%llu\n",
           (unsigned long long)done, total, (double)done / total, best, (unsigned long long)sum);
    return 0;
}
