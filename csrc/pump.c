/* The pump's poll loop; see pump.h. */
#include "pump.h"

#include <errno.h>
#include <poll.h>

#include "pvtime.h"

int32_t pv_pump_run(const struct pv_pump_source *src, uint32_t n, int stop_fd)
{
    return pv_pump_run_spin(src, n, stop_fd, NULL);
}

int32_t pv_pump_run_spin(const struct pv_pump_source *src, uint32_t n, int stop_fd, const uint32_t *spin_us)
{
    if (n > PV_PUMP_MAX_SOURCES)
        return -EINVAL;
    struct pollfd p[PV_PUMP_MAX_SOURCES + 1];
    p[0] = (struct pollfd){.fd = stop_fd, .events = POLLIN};
    for (uint32_t i = 0; i < n; i++)
        p[i + 1] = (struct pollfd){.fd = src[i].fd, .events = POLLIN};
    uint64_t spin_until = 0; /* look without sleeping until then (0: sleep at once) */
    for (;;) {
        /* Handlers may pause a source between wakeups by setting its fd negative (poll ignores it): a tap
         * whose frames have nowhere to go until the guest posts buffers. */
        for (uint32_t i = 0; i < n; i++)
            p[i + 1].fd = src[i].fd;
        int r = poll(p, n + 1, spin_until ? 0 : -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -PV_PUMP_EPOLL;
        }
        if (r == 0) {
            /* Spinning and nothing yet: the other side's next batch usually follows within a wake-up's
             * latency, which is what the spin saves; past the deadline, sleep. */
            if (now_ns() >= spin_until)
                spin_until = 0;
            else
                cpu_relax();
            continue;
        }
        if (p[0].revents)
            return 0;
        for (uint32_t i = 0; i < n; i++)
            if ((p[i + 1].revents & (POLLERR | POLLHUP | POLLNVAL)) && src[i].hangup_rc)
                return src[i].hangup_rc;
        int32_t work = 0;
        for (uint32_t i = 0; i < n; i++) {
            if (!p[i + 1].revents)
                continue;
            int32_t rc = src[i].ready(src[i].ctx);
            if (rc < 0)
                return rc;
            work += rc;
        }
        uint32_t us = spin_us ? __atomic_load_n(spin_us, __ATOMIC_RELAXED) : 0;
        /* Only a pass that moved something starts (or extends) a spin: an idle source costs nothing. */
        if (work > 0 && us)
            spin_until = now_ns() + (uint64_t)us * 1000u;
    }
}
