/* Real-Xen grant and event-channel shims over libxengnttab.so.1 / libxenevtchn.so.1, loaded with dlopen.
 *
 * The few prototypes used are declared here (their ABI has been stable since Xen 4.7), so the build needs no
 * Xen package.  Each handle gets its own xentoollog logger that keeps the last message instead of printing it:
 * a guest handing us bad grants must not be able to flood dom0's stderr, and the message still reaches the
 * caller through the error string / status.
 */
#include "xen_dl.h"

#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- the ABI we rely on (xentoollog.h, xengnttab.h, xenevtchn.h) ---- */

struct xtl_logger {
    void (*vmessage)(struct xtl_logger *l, int level, int errnoval, const char *context, const char *format,
                     va_list al) __attribute__((format(printf, 5, 0)));
    void (*progress)(struct xtl_logger *l, const char *context, const char *doing_what, int percent,
                     unsigned long done, unsigned long total);
    void (*destroy)(struct xtl_logger *l);
};
#define XTL_WARN 7

struct quiet_logger {
    struct xtl_logger ops; /* first: the library holds a pointer to this */
    char last[160];
};

typedef void xengnttab_handle;
typedef void xenevtchn_handle;

struct gnt_syms {
    xengnttab_handle *(*open)(struct xtl_logger *logger, unsigned flags);
    int (*close)(xengnttab_handle *h);
    void *(*map_domain_grant_refs)(xengnttab_handle *h, uint32_t count, uint32_t domid, uint32_t *refs,
                                   int prot);
    int (*unmap)(xengnttab_handle *h, void *addr, uint32_t count);
    int (*grant_copy)(xengnttab_handle *h, uint32_t count, struct pv_gcopy_seg *segs);
};

struct evtchn_syms {
    xenevtchn_handle *(*open)(struct xtl_logger *logger, unsigned flags);
    int (*close)(xenevtchn_handle *h);
    int (*fd)(xenevtchn_handle *h);
    int (*notify)(xenevtchn_handle *h, uint32_t port);
    int (*bind_interdomain)(xenevtchn_handle *h, uint32_t domid, uint32_t remote_port);
    int (*unbind)(xenevtchn_handle *h, uint32_t port);
    int (*pending)(xenevtchn_handle *h);
    int (*unmask)(xenevtchn_handle *h, uint32_t port);
};

/* ---- loading ---- */

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static struct gnt_syms gnt;
static struct evtchn_syms evt;
static int gnt_loaded, evt_loaded;

/* Resolve `names` (NULL-terminated) into consecutive function-pointer slots of `table`. */
static int load_lib(const char *soname, const char *const *names, void **table, char *err, size_t errlen)
{
    void *h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *why = dlerror();
        snprintf(err, errlen, "cannot load %s (%s): install Xen's tools libraries (Debian: %s)", soname,
                 why ? why : "not found", strncmp(soname, "libxengnttab", 12) == 0 ? "libxengnttab1" :
                                                                                     "libxenevtchn1");
        errno = ENOENT;
        return -1;
    }
    for (size_t i = 0; names[i]; i++) {
        void *sym = dlsym(h, names[i]);
        if (!sym) {
            snprintf(err, errlen, "%s lacks %s: Xen tools libraries too old", soname, names[i]);
            dlclose(h);
            errno = ENOSYS;
            return -1;
        }
        table[i] = sym;
    }
    return 0; /* never dlclose'd: function pointers may be in use by other handles */
}

static int load_gnttab(char *err, size_t errlen)
{
    static const char *const names[] = {"xengnttab_open", "xengnttab_close", "xengnttab_map_domain_grant_refs",
                                        "xengnttab_unmap", "xengnttab_grant_copy", NULL};
    int rc = 0;
    pthread_mutex_lock(&load_lock);
    if (!gnt_loaded) {
        void *table[5];
        rc = load_lib("libxengnttab.so.1", names, table, err, errlen);
        if (rc == 0) {
            memcpy(&gnt.open, &table[0], sizeof(void *));
            memcpy(&gnt.close, &table[1], sizeof(void *));
            memcpy(&gnt.map_domain_grant_refs, &table[2], sizeof(void *));
            memcpy(&gnt.unmap, &table[3], sizeof(void *));
            memcpy(&gnt.grant_copy, &table[4], sizeof(void *));
            gnt_loaded = 1;
        }
    }
    pthread_mutex_unlock(&load_lock);
    return rc;
}

static int load_evtchn(char *err, size_t errlen)
{
    static const char *const names[] = {"xenevtchn_open",   "xenevtchn_close",  "xenevtchn_fd",
                                        "xenevtchn_notify", "xenevtchn_bind_interdomain",
                                        "xenevtchn_unbind", "xenevtchn_pending", "xenevtchn_unmask",
                                        NULL};
    int rc = 0;
    pthread_mutex_lock(&load_lock);
    if (!evt_loaded) {
        void *table[8];
        rc = load_lib("libxenevtchn.so.1", names, table, err, errlen);
        if (rc == 0) {
            memcpy(&evt.open, &table[0], sizeof(void *));
            memcpy(&evt.close, &table[1], sizeof(void *));
            memcpy(&evt.fd, &table[2], sizeof(void *));
            memcpy(&evt.notify, &table[3], sizeof(void *));
            memcpy(&evt.bind_interdomain, &table[4], sizeof(void *));
            memcpy(&evt.unbind, &table[5], sizeof(void *));
            memcpy(&evt.pending, &table[6], sizeof(void *));
            memcpy(&evt.unmask, &table[7], sizeof(void *));
            evt_loaded = 1;
        }
    }
    pthread_mutex_unlock(&load_lock);
    return rc;
}

/* ---- logging ---- */

static void quiet_vmessage(struct xtl_logger *l, int level, int errnoval, const char *context, const char *fmt,
                           va_list al)
{
    struct quiet_logger *q = (struct quiet_logger *)l;
    if (level >= XTL_WARN)
        vsnprintf(q->last, sizeof(q->last), fmt, al);
}

static void quiet_init(struct quiet_logger *q)
{
    memset(q, 0, sizeof(*q));
    q->ops.vmessage = quiet_vmessage;
}

/* The usual causes, spelled out for an operator: no Xen, module not loaded, not root. */
static void open_error(char *err, size_t errlen, const char *node, const char *module, int e)
{
    if (e == ENOENT || e == ENXIO || e == ENODEV)
        snprintf(err, errlen,
                 "cannot open %s: %s (not running in a Xen domain, or the %s module is not loaded)", node,
                 strerror(e), module);
    else if (e == EACCES || e == EPERM)
        snprintf(err, errlen, "cannot open %s: %s (needs root in dom0 or a driver domain)", node, strerror(e));
    else
        snprintf(err, errlen, "cannot open %s: %s", node, strerror(e));
}

/* ---- grants ---- */

struct pv_gnt_xen {
    struct pv_gnt base;
    xengnttab_handle *xgt;
    int have_copy;
    struct quiet_logger log;
};

static int16_t map_errno_status(int e)
{
    switch (e) {
    case EPERM:
    case EACCES:
        return PV_GNTST_permission_denied;
    case ENOMEM:
    case ENOSPC:
        return PV_GNTST_no_device_space;
    default:
        return PV_GNTST_general_error;
    }
}

static void *xen_map(struct pv_gnt *g, uint32_t domid, const uint32_t *refs, uint32_t n, int writable,
                     int16_t *status)
{
    struct pv_gnt_xen *x = (struct pv_gnt_xen *)g;
    if (n == 0 || domid >= 0x7ff0u) { /* DOMID_FIRST_RESERVED: never a guest */
        *status = n == 0 ? PV_GNTST_general_error : PV_GNTST_bad_domain;
        return NULL;
    }
    /* The library's refs parameter is not const but it only reads it. */
    void *addr = gnt.map_domain_grant_refs(x->xgt, n, domid, (uint32_t *)refs,
                                           writable ? PROT_READ | PROT_WRITE : PROT_READ);
    if (!addr) {
        *status = map_errno_status(errno);
        return NULL;
    }
    *status = PV_GNTST_okay;
    __atomic_add_fetch(&g->live_mappings, (int64_t)n, __ATOMIC_RELAXED);
    return addr;
}

static int xen_unmap(struct pv_gnt *g, void *addr, uint32_t n)
{
    struct pv_gnt_xen *x = (struct pv_gnt_xen *)g;
    if (gnt.unmap(x->xgt, addr, n) < 0)
        return -errno;
    __atomic_sub_fetch(&g->live_mappings, (int64_t)n, __ATOMIC_RELAXED);
    return 0;
}

/* The gntdev ioctl rejects the whole batch (EINVAL) for one malformed segment, so malformed ones are caught
 * here and get their own status, as the hypervisor would give them. */
static int seg_ok(const struct pv_gcopy_seg *s)
{
    if (!(s->flags & (PV_GCOPY_SOURCE_GREF | PV_GCOPY_DEST_GREF)))
        return 0;
    if ((s->flags & PV_GCOPY_SOURCE_GREF) && (uint32_t)s->source.foreign.offset + s->len > PV_PAGE_SIZE)
        return 0;
    if ((s->flags & PV_GCOPY_DEST_GREF) && (uint32_t)s->dest.foreign.offset + s->len > PV_PAGE_SIZE)
        return 0;
    if (s->flags & ~(PV_GCOPY_SOURCE_GREF | PV_GCOPY_DEST_GREF))
        return 0;
    return 1;
}

/* map + memcpy + unmap of one segment, for kernels without IOCTL_GNTDEV_GRANT_COPY. */
static int16_t copy_one_by_map(struct pv_gnt_xen *x, struct pv_gcopy_seg *s)
{
    void *src_map = NULL, *dst_map = NULL;
    const uint8_t *src;
    uint8_t *dst;
    int16_t st = PV_GNTST_okay;

    if (s->flags & PV_GCOPY_SOURCE_GREF) {
        uint32_t ref = s->source.foreign.ref;
        src_map = gnt.map_domain_grant_refs(x->xgt, 1, s->source.foreign.domid, &ref, PROT_READ);
        if (!src_map)
            return map_errno_status(errno);
        src = (const uint8_t *)src_map + s->source.foreign.offset;
    } else {
        src = s->source.virt;
    }
    if (s->flags & PV_GCOPY_DEST_GREF) {
        uint32_t ref = s->dest.foreign.ref;
        dst_map = gnt.map_domain_grant_refs(x->xgt, 1, s->dest.foreign.domid, &ref, PROT_READ | PROT_WRITE);
        if (!dst_map) {
            st = map_errno_status(errno);
            goto out;
        }
        dst = (uint8_t *)dst_map + s->dest.foreign.offset;
    } else {
        dst = s->dest.virt;
    }
    memcpy(dst, src, s->len);
out:
    if (src_map)
        gnt.unmap(x->xgt, src_map, 1);
    if (dst_map)
        gnt.unmap(x->xgt, dst_map, 1);
    return st;
}

static int xen_copy(struct pv_gnt *g, struct pv_gcopy_seg *segs, uint32_t n)
{
    struct pv_gnt_xen *x = (struct pv_gnt_xen *)g;
    uint32_t bad = 0;

    for (uint32_t i = 0; i < n; i++) {
        if (seg_ok(&segs[i])) {
            segs[i].status = PV_GNTST_okay;
        } else {
            segs[i].status = PV_GNTST_bad_copy_arg;
            bad++;
        }
    }
    if (!x->have_copy) {
        for (uint32_t i = 0; i < n; i++)
            if (segs[i].status == PV_GNTST_okay)
                segs[i].status = copy_one_by_map(x, &segs[i]);
        return 0;
    }
    if (bad == n)
        return 0;
    if (bad == 0) {
        if (gnt.grant_copy(x->xgt, n, segs) < 0) {
            int e = errno;
            for (uint32_t i = 0; i < n; i++)
                segs[i].status = PV_GNTST_general_error;
            return -e;
        }
        return 0;
    }
    /* Rare: a batch with malformed segments.  Copy the good ones through a compacted array. */
    struct pv_gcopy_seg *tmp = malloc((size_t)(n - bad) * sizeof(*tmp));
    if (!tmp) {
        for (uint32_t i = 0; i < n; i++)
            segs[i].status = PV_GNTST_general_error;
        return -ENOMEM;
    }
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++)
        if (segs[i].status == PV_GNTST_okay)
            tmp[m++] = segs[i];
    int rc = 0;
    if (gnt.grant_copy(x->xgt, m, tmp) < 0) {
        rc = -errno;
        for (uint32_t i = 0; i < m; i++)
            tmp[i].status = PV_GNTST_general_error;
    }
    m = 0;
    for (uint32_t i = 0; i < n; i++)
        if (segs[i].status == PV_GNTST_okay)
            segs[i].status = tmp[m++].status;
    free(tmp);
    if (rc < 0)
        for (uint32_t i = 0; i < n; i++)
            if (segs[i].status == PV_GNTST_okay)
                segs[i].status = PV_GNTST_general_error;
    return rc;
}

static void xen_gnt_close(struct pv_gnt *g)
{
    struct pv_gnt_xen *x = (struct pv_gnt_xen *)g;
    if (!x)
        return;
    gnt.close(x->xgt); /* also drops any mapping still live */
    free(x);
}

static const struct pv_gnt_ops xen_gnt_ops = {
    .copy = xen_copy,
    .map = xen_map,
    .unmap = xen_unmap,
    .close = xen_gnt_close,
};

struct pv_gnt *pv_gnt_xen_open(char *err, size_t errlen)
{
    if (errlen)
        err[0] = '\0';
    if (load_gnttab(err, errlen) < 0)
        return NULL;
    struct pv_gnt_xen *x = calloc(1, sizeof(*x));
    if (!x) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    quiet_init(&x->log);
    errno = 0;
    x->xgt = gnt.open(&x->log.ops, 0);
    if (!x->xgt) {
        int e = errno ? errno : ENOENT;
        open_error(err, errlen, "/dev/xen/gntdev", "xen-gntdev", e);
        free(x);
        errno = e;
        return NULL;
    }
    x->base.ops = &xen_gnt_ops;
    x->base.live_mappings = 0;
    /* As QEMU's xen_be_gnttab_init: an empty copy succeeds iff the kernel has IOCTL_GNTDEV_GRANT_COPY. */
    x->have_copy = gnt.grant_copy(x->xgt, 0, NULL) == 0;
    return &x->base;
}

int pv_gnt_xen_has_copy(struct pv_gnt *g)
{
    if (!g || g->ops != &xen_gnt_ops)
        return -1;
    return ((struct pv_gnt_xen *)g)->have_copy;
}

/* ---- event channels ---- */

struct pv_evtchn_xen {
    struct pv_evtchn base;
    xenevtchn_handle *xce;
    struct quiet_logger log;
};

static int xen_notify(struct pv_evtchn *e)
{
    struct pv_evtchn_xen *x = (struct pv_evtchn_xen *)e;
    return evt.notify(x->xce, e->local_port) < 0 ? -errno : 0;
}

static int xen_pending(struct pv_evtchn *e)
{
    struct pv_evtchn_xen *x = (struct pv_evtchn_xen *)e;
    /* xenevtchn_pending blocks when nothing is pending (O_NONBLOCK is not honoured on every kernel), so poll
     * first: callers run this on the event loop. */
    struct pollfd p = {.fd = e->fd, .events = POLLIN};
    int r = poll(&p, 1, 0);
    if (r < 0)
        return errno == EINTR ? 0 : -errno;
    if (r == 0 || !(p.revents & POLLIN))
        return 0;
    int port = evt.pending(x->xce);
    if (port < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
    /* One port per handle, so anything else would be a kernel bug; report it rather than ignore it. */
    if ((uint32_t)port != e->local_port)
        return -EPROTO;
    return 1;
}

static int xen_unmask(struct pv_evtchn *e)
{
    struct pv_evtchn_xen *x = (struct pv_evtchn_xen *)e;
    return evt.unmask(x->xce, e->local_port) < 0 ? -errno : 0;
}

static void xen_evtchn_close(struct pv_evtchn *e)
{
    struct pv_evtchn_xen *x = (struct pv_evtchn_xen *)e;
    if (!x)
        return;
    evt.unbind(x->xce, e->local_port);
    evt.close(x->xce);
    free(x);
}

static const struct pv_evtchn_ops xen_evtchn_ops = {
    .notify = xen_notify,
    .pending = xen_pending,
    .unmask = xen_unmask,
    .close = xen_evtchn_close,
};

struct pv_evtchn *pv_evtchn_xen_bind(uint32_t domid, uint32_t remote_port, char *err, size_t errlen)
{
    if (errlen)
        err[0] = '\0';
    if (domid >= 0x7ff0u) {
        snprintf(err, errlen, "bind_interdomain: domid %u is reserved", domid);
        errno = EINVAL;
        return NULL;
    }
    if (load_evtchn(err, errlen) < 0)
        return NULL;
    struct pv_evtchn_xen *x = calloc(1, sizeof(*x));
    if (!x) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    quiet_init(&x->log);
    errno = 0;
    x->xce = evt.open(&x->log.ops, 0);
    if (!x->xce) {
        int e = errno ? errno : ENOENT;
        open_error(err, errlen, "/dev/xen/evtchn", "xen-evtchn", e);
        free(x);
        errno = e;
        return NULL;
    }
    int port = evt.bind_interdomain(x->xce, domid, remote_port);
    if (port < 0) {
        int e = errno;
        snprintf(err, errlen, "bind_interdomain(domain %u, port %u): %s", domid, remote_port, strerror(e));
        evt.close(x->xce);
        free(x);
        errno = e;
        return NULL;
    }
    x->base.ops = &xen_evtchn_ops;
    x->base.fd = evt.fd(x->xce);
    x->base.local_port = (uint32_t)port;
    x->base.remote_port = remote_port;
    x->base.remote_domid = domid;
    return &x->base;
}
