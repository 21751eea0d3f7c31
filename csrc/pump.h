/* The poll loop every data path's pump thread runs: wait on a stop fd and a few sources (an event channel, a
 * completion fd, a tap, a swtpm socket), and on each wakeup call each ready source's handler once, in array
 * order.  One loop for every device type; the handlers hold the protocol.  No policy, no Python.
 *
 * A handler returns >= 0 to go on, < 0 to end the loop with that value.  A source whose fd reports
 * POLLERR/POLLHUP/POLLNVAL ends the loop with its `hangup_rc` (before any handler of that wakeup runs), unless
 * hangup_rc is 0: then its handler is called and decides (a tap whose peer went away, say).
 *
 * The fds are re-read from `src` before every poll: a handler may pause its source (or another) by setting
 * the fd negative and resume it later (the caller keeps `src` writable and alive while the loop runs). */
#ifndef PVBACK_PUMP_H
#define PVBACK_PUMP_H

#include <stdint.h>

#define PV_PUMP_MAX_SOURCES 8
#define PV_PUMP_EPOLL 3 /* poll() itself failed (not EINTR): nothing left to wait on */

struct pv_pump_source {
    int fd;
    int32_t (*ready)(void *ctx);
    void *ctx;
    int32_t hangup_rc;
};

/* Returns 0 once stop_fd is readable, a handler's negative value, a source's hangup_rc, -PV_PUMP_EPOLL, or
 * -EINVAL for more than PV_PUMP_MAX_SOURCES sources. */
int32_t pv_pump_run(const struct pv_pump_source *src, uint32_t n, int stop_fd);

/* The same with bounded polling: after a wakeup whose handlers returned work (> 0 summed), the sources are
 * polled without sleeping (poll with a zero timeout) for up to *spin_us microseconds from the last pass that
 * found work, then the loop sleeps again.  Saves the wake-up latency (12-30 us) of a peer thread that answers
 * quickly, at the cost of that much CPU per busy period.  *spin_us is re-read after each pass (may change
 * under a running loop); NULL or 0: never spin. */
int32_t pv_pump_run_spin(const struct pv_pump_source *src, uint32_t n, int stop_fd, const uint32_t *spin_us);

#endif
