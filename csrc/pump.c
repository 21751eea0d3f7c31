/* The pump's poll loop; see pump.h. */
#include "pump.h"

#include <errno.h>
#include <poll.h>

int32_t pv_pump_run(const struct pv_pump_source *src, uint32_t n, int stop_fd)
{
    if (n > PV_PUMP_MAX_SOURCES)
        return -EINVAL;
    struct pollfd p[PV_PUMP_MAX_SOURCES + 1];
    p[0] = (struct pollfd){.fd = stop_fd, .events = POLLIN};
    for (uint32_t i = 0; i < n; i++)
        p[i + 1] = (struct pollfd){.fd = src[i].fd, .events = POLLIN};
    for (;;) {
        /* Handlers may pause a source between wakeups by setting its fd negative (poll ignores it): a tap
         * whose frames have nowhere to go until the guest posts buffers. */
        for (uint32_t i = 0; i < n; i++)
            p[i + 1].fd = src[i].fd;
        if (poll(p, n + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -PV_PUMP_EPOLL;
        }
        if (p[0].revents)
            return 0;
        for (uint32_t i = 0; i < n; i++)
            if ((p[i + 1].revents & (POLLERR | POLLHUP | POLLNVAL)) && src[i].hangup_rc)
                return src[i].hangup_rc;
        for (uint32_t i = 0; i < n; i++) {
            if (!p[i + 1].revents)
                continue;
            int32_t rc = src[i].ready(src[i].ctx);
            if (rc < 0)
                return rc;
        }
    }
}
