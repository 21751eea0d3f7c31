/* Bare eventfd ping-pong between two processes: the floor under the project's kick -> response latency
 * (an event-channel notify on the emulated platform is an eventfd write).  Blocking reads on both sides, one
 * clock_gettime pair per round trip.
 *
 * Usage: eventfd_pingpong ROUNDS WARMUP CPU_PARENT CPU_CHILD      (a CPU of -1 leaves that side unpinned)
 * Prints: rounds=<n> p50_us=<x> p99_us=<x> p999_us=<x> min_us=<x> mean_us=<x>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) {
        perror("sched_setaffinity");
        exit(3);
    }
}

static void xwrite(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof(one)) != sizeof(one))
        if (errno != EINTR) {
            perror("write");
            exit(1);
        }
}

/* Returns 0 when the peer is gone (the parent closes its end to stop the child). */
static int xread(int fd)
{
    uint64_t v;
    for (;;) {
        ssize_t r = read(fd, &v, sizeof(v));
        if (r == sizeof(v))
            return 1;
        if (r < 0 && errno == EINTR)
            continue;
        return 0;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(const double *sorted, long n, double p)
{
    long i = (long)(p * (double)(n - 1) + 0.5);
    return sorted[i];
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s ROUNDS WARMUP CPU_PARENT CPU_CHILD\n", argv[0]);
        return 2;
    }
    long rounds = atol(argv[1]), warmup = atol(argv[2]);
    int cpu_parent = atoi(argv[3]), cpu_child = atoi(argv[4]);
    if (rounds < 1 || warmup < 0)
        return 2;
    int ping = eventfd(0, EFD_CLOEXEC), pong = eventfd(0, EFD_CLOEXEC);
    if (ping < 0 || pong < 0) {
        perror("eventfd");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        pin(cpu_child);
        for (long i = 0; i < warmup + rounds; i++) {
            if (!xread(ping))
                _exit(0);
            xwrite(pong);
        }
        _exit(0);
    }
    pin(cpu_parent);
    double *rtt = malloc(sizeof(double) * (size_t)rounds);
    if (!rtt)
        return 1;
    for (long i = 0; i < warmup + rounds; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        xwrite(ping);
        if (!xread(pong)) {
            fprintf(stderr, "peer gone\n");
            kill(child, SIGKILL);
            return 1;
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (i >= warmup)
            rtt[i - warmup] = (double)(b.tv_sec - a.tv_sec) * 1e6 + (double)(b.tv_nsec - a.tv_nsec) * 1e-3;
    }
    int status;
    waitpid(child, &status, 0);
    double sum = 0;
    for (long i = 0; i < rounds; i++)
        sum += rtt[i];
    qsort(rtt, (size_t)rounds, sizeof(double), cmp_double);
    printf("rounds=%ld p50_us=%.3f p99_us=%.3f p999_us=%.3f min_us=%.3f mean_us=%.3f\n", rounds,
           pct(rtt, rounds, 0.50), pct(rtt, rounds, 0.99), pct(rtt, rounds, 0.999), rtt[0], sum / (double)rounds);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
