#include "evtchn_emu.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

struct evtchn_emu {
    struct pv_evtchn pub; /* first: the ops see a struct pv_evtchn * */
    int notify_fd;
};

static int emu_notify(struct pv_evtchn *e)
{
    uint64_t one = 1;
    for (;;) {
        if (write(((struct evtchn_emu *)e)->notify_fd, &one, sizeof(one)) == (ssize_t)sizeof(one))
            return 0;
        if (errno == EAGAIN) /* counter saturated: an event is pending anyway */
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

static int emu_pending(struct pv_evtchn *e)
{
    uint64_t v;
    for (;;) {
        if (read(e->fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
            return 1;
        if (errno == EAGAIN)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

/* Reading the eventfd already re-armed it: nothing is masked in between, the caller re-checks its ring. */
static int emu_unmask(struct pv_evtchn *e) { return 0; }

static void emu_close(struct pv_evtchn *e)
{
    close(e->fd);
    close(((struct evtchn_emu *)e)->notify_fd);
    free(e);
}

static const struct pv_evtchn_ops emu_ops = {
    .notify = emu_notify,
    .pending = emu_pending,
    .unmask = emu_unmask,
    .close = emu_close,
};

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

struct pv_evtchn *pv_evtchn_emu_open(int wake_fd, int notify_fd, uint32_t local_port, uint32_t remote_domid,
                                     uint32_t remote_port)
{
    if (wake_fd < 0 || notify_fd < 0) {
        errno = EBADF;
        return NULL;
    }
    if (set_nonblock(wake_fd) < 0 || set_nonblock(notify_fd) < 0)
        return NULL;
    struct evtchn_emu *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->pub.ops = &emu_ops;
    e->pub.fd = wake_fd;
    e->pub.local_port = local_port;
    e->pub.remote_port = remote_port;
    e->pub.remote_domid = remote_domid;
    e->notify_fd = notify_fd;
    return &e->pub;
}
