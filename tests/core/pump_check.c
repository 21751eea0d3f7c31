/* Drives csrc/pump.c with real fds: eventfd sources, a stop fd, a hung-up pipe.  Prints one line per check;
 * tests/core/test_pump.py compiles and runs it. */
#include "pump.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct src_state {
    int fd;
    int calls;
    int stop_after;  /* >0: write the stop fd on this call */
    int stop_fd;
    int32_t fail_at; /* >0: return -42 on this call */
};

static int32_t handler(void *ctx)
{
    struct src_state *s = ctx;
    uint64_t v;
    if (read(s->fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        return -99;
    s->calls++;
    if (s->fail_at && s->calls == s->fail_at)
        return -42;
    if (s->stop_after && s->calls == s->stop_after) {
        uint64_t one = 1;
        if (write(s->stop_fd, &one, sizeof(one)) != sizeof(one))
            return -98;
    }
    return 0;
}

#define CHECK(cond, name)                                                                                       \
    do {                                                                                                       \
        printf("%s %s\n", (cond) ? "PASS" : "FAIL", name);                                                     \
        failed += !(cond);                                                                                     \
    } while (0)

int main(void)
{
    int failed = 0;
    uint64_t one = 1;
    int stop = eventfd(0, EFD_NONBLOCK);
    int a = eventfd(0, EFD_NONBLOCK), b = eventfd(0, EFD_NONBLOCK);

    /* Both ready at once: both handlers run in the same wakeup, in order; then the stop ends the loop. */
    struct src_state sa = {.fd = a, .stop_fd = stop, .stop_after = 1}, sb = {.fd = b};
    struct pv_pump_source src[2] = {{a, handler, &sa, 0}, {b, handler, &sb, 0}};
    if (write(a, &one, 8) != 8 || write(b, &one, 8) != 8)
        return 2;
    int32_t rc = pv_pump_run(src, 2, stop);
    CHECK(rc == 0 && sa.calls == 1 && sb.calls == 1, "ready_sources_then_stop");

    /* A handler's negative value ends the loop with it. */
    uint64_t v;
    if (read(stop, &v, 8) != 8)
        return 2;
    struct src_state sc = {.fd = a, .fail_at = 1};
    struct pv_pump_source src2[1] = {{a, handler, &sc, 0}};
    if (write(a, &one, 8) != 8)
        return 2;
    rc = pv_pump_run(src2, 1, stop);
    CHECK(rc == -42 && sc.calls == 1, "handler_error_ends_loop");

    /* A hung-up source with a hangup_rc ends the loop before any handler runs. */
    int p[2];
    if (pipe(p) < 0)
        return 2;
    close(p[1]);
    struct src_state sd = {.fd = p[0]}, se = {.fd = b};
    if (write(b, &one, 8) != 8)
        return 2;
    struct pv_pump_source src3[2] = {{b, handler, &se, 0}, {p[0], handler, &sd, -7}};
    rc = pv_pump_run(src3, 2, stop);
    CHECK(rc == -7 && sd.calls == 0 && se.calls == 0, "hangup_rc_ends_loop");

    /* Too many sources is refused. */
    struct pv_pump_source many[PV_PUMP_MAX_SOURCES + 1];
    CHECK(pv_pump_run(many, PV_PUMP_MAX_SOURCES + 1, stop) == -EINVAL, "too_many_sources");
    return failed ? 1 : 0;
}
