/* Monotonic time and the spin-wait hint shared by the data path and the benchmark's frontend. */
#ifndef PVBACK_PVTIME_H
#define PVBACK_PVTIME_H

#include <stdint.h>
#include <time.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Tells the CPU we are spinning (PAUSE): the sibling hyperthread and the power state do better. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

#endif
