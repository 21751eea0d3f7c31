/* I/O engines; see ioengine.h for the ownership and threading contract. */
#include "ioengine.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef PVBACK_HAVE_URING
#include <liburing.h>
#endif

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* ---- sink ------------------------------------------------------------------------------------------- */

int pv_io_sink_init(struct pv_io_sink *s)
{
    memset(s, 0, sizeof(*s));
    s->uring_fd = -1;
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->efd < 0)
        return -errno;
    pthread_mutex_init(&s->lock, NULL);
    return 0;
}

void pv_io_sink_destroy(struct pv_io_sink *s)
{
#ifdef PVBACK_HAVE_URING
    if (s->uring) {
        io_uring_queue_exit(s->uring);
        free(s->uring);
        s->uring = NULL;
    }
#endif
    s->nbufs = 0;
    if (s->efd >= 0) {
        close(s->efd);
        pthread_mutex_destroy(&s->lock);
    }
    s->efd = -1;
}

int pv_io_sink_buffers(struct pv_io_sink *s, uint32_t n)
{
#ifdef PVBACK_HAVE_URING
    if (!s->uring)
        return -EOPNOTSUPP;
    if (s->nbufs)
        return -EBUSY;
    if (n == 0)
        return -EINVAL;
    int rc = io_uring_register_buffers_sparse(s->uring, n);
    if (rc == 0)
        s->nbufs = n;
    return rc;
#else
    (void)s;
    (void)n;
    return -EOPNOTSUPP;
#endif
}

int pv_io_sink_buffer_set(struct pv_io_sink *s, uint32_t slot, void *base, size_t len)
{
#ifdef PVBACK_HAVE_URING
    if (slot >= s->nbufs)
        return -EINVAL;
    struct iovec iov = {.iov_base = base, .iov_len = base ? len : 0};
    __u64 tag = 0;
    int rc = io_uring_register_buffers_update_tag(s->uring, slot, &iov, &tag, 1);
    return rc == 1 ? 0 : (rc < 0 ? rc : -EIO);
#else
    (void)s;
    (void)slot;
    (void)base;
    (void)len;
    return -EOPNOTSUPP;
#endif
}

void pv_io_sink_buffers_drop(struct pv_io_sink *s)
{
#ifdef PVBACK_HAVE_URING
    if (s->nbufs)
        (void)io_uring_unregister_buffers(s->uring);
#endif
    s->nbufs = 0;
}

void pv_io_sink_ack(struct pv_io_sink *s)
{
    uint64_t v;
    while (read(s->efd, &v, sizeof(v)) < 0 && errno == EINTR)
        ;
}

void pv_io_sink_wake(struct pv_io_sink *s)
{
    uint64_t one = 1;
    while (write(s->efd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

static int uring_ready(struct pv_io_sink *s)
{
#ifdef PVBACK_HAVE_URING
    return s->uring && io_uring_cq_ready(s->uring) > 0;
#else
    (void)s;
    return 0;
#endif
}

#ifdef PVBACK_HAVE_URING
/* Append the ring's completions to `list`/`tail`. */
static struct pv_io *uring_reap(struct pv_io_sink *s, struct pv_io *list, struct pv_io **tail)
{
    struct io_uring *ring = s->uring;
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(ring, head, cqe)
    {
        struct pv_io *io = io_uring_cqe_get_data(cqe);
        int32_t res = cqe->res;
        seen++;
        if (res >= 0 && (uint64_t)res != io->length)
            res = pv_io_execute(s->uring_fd, 0, io); /* short transfer (EOF, signal): redo it whole */
        io->result = res < 0 ? res : 0;
        io->next = NULL;
        if (*tail)
            (*tail)->next = io;
        else
            list = io;
        *tail = io;
    }
    io_uring_cq_advance(ring, seen);
    return list;
}
#endif

struct pv_io *pv_io_sink_take(struct pv_io_sink *s)
{
    int ring = uring_ready(s);
    pthread_mutex_lock(&s->lock);
    struct pv_io *list = s->head, *tail = s->tail;
    s->head = s->tail = NULL;
    /* Drain the eventfd before dropping the lock: read after unlocking, it could swallow the write of a
     * poster that completed in between (it saw signaled == 0), leaving that completion without a wakeup.
     * A poster that set `signaled` but writes only after we read leaves a spurious wakeup: harmless.  The
     * ring's completions are reaped after this read, so one posted meanwhile is either reaped now or wakes
     * the submitter again. */
    if (s->signaled || ring) {
        pv_io_sink_ack(s);
        s->signaled = 0;
    }
    pthread_mutex_unlock(&s->lock);
#ifdef PVBACK_HAVE_URING
    if (ring)
        list = uring_reap(s, list, &tail);
#endif
    return list;
}

int pv_io_sink_nonempty(struct pv_io_sink *s)
{
    return __atomic_load_n(&s->head, __ATOMIC_ACQUIRE) != NULL || uring_ready(s);
}

void pv_io_complete(struct pv_io *io, int32_t result, int signal)
{
    struct pv_io_sink *s = io->sink;
    io->result = result;
    io->next = NULL;
    int wake = 0;
    pthread_mutex_lock(&s->lock);
    if (s->tail)
        s->tail->next = io;
    else
        __atomic_store_n(&s->head, io, __ATOMIC_RELEASE);
    s->tail = io;
    /* One eventfd write per batch of completions: the first poster after a take wakes the loop, the rest
     * ride along. */
    if (signal && !s->signaled) {
        s->signaled = 1;
        wake = 1;
    }
    pthread_mutex_unlock(&s->lock);
    if (wake)
        pv_io_sink_wake(s);
}

/* ---- synchronous execution ---------------------------------------------------------------------------- */

/* preadv/pwritev the whole iovec, resuming after short transfers without modifying the caller's iovec. */
static int32_t rw_all(int fd, int write_op, const struct iovec *iov, uint32_t cnt, uint64_t off)
{
    uint32_t idx = 0;
    size_t skip = 0; /* bytes of iov[idx] already done */
    while (idx < cnt) {
        ssize_t n;
        if (skip) {
            char *base = (char *)iov[idx].iov_base + skip;
            size_t len = iov[idx].iov_len - skip;
            n = write_op ? pwrite(fd, base, len, (off_t)off) : pread(fd, base, len, (off_t)off);
        } else {
            int c = (int)((cnt - idx) > IOV_MAX ? IOV_MAX : (cnt - idx));
            n = write_op ? pwritev(fd, iov + idx, c, (off_t)off) : preadv(fd, iov + idx, c, (off_t)off);
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO; /* the image shrank under us: never hand back a partial buffer as success */
        off += (uint64_t)n;
        size_t left = (size_t)n;
        while (left && idx < cnt) {
            size_t rest = iov[idx].iov_len - skip;
            if (left >= rest) {
                left -= rest;
                idx++;
                skip = 0;
            } else {
                skip += left;
                left = 0;
            }
        }
        while (idx < cnt && iov[idx].iov_len == 0)
            idx++;
    }
    return 0;
}

static int32_t sync_fd(int fd)
{
    while (fdatasync(fd) < 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}

static int32_t discard(int fd, int is_blockdev, int secure, uint64_t off, uint64_t len)
{
    if (len == 0)
        return 0;
    if (is_blockdev) {
        uint64_t range[2] = {off, len};
        if (ioctl(fd, secure ? BLKSECDISCARD : BLKDISCARD, range) < 0)
            return errno == ENOTTY ? -EOPNOTSUPP : -errno;
        return 0;
    }
    if (secure)
        return -EOPNOTSUPP; /* a punched hole in a file is not an erase of the media below it */
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0)
        return -errno;
    return 0;
}

int32_t pv_io_execute(int fd, int is_blockdev, const struct pv_io *io)
{
    int32_t rc;
    switch (io->op) {
    case PV_IO_READ:
        return rw_all(fd, 0, io->iov, io->iovcnt, io->offset);
    case PV_IO_WRITE:
        return rw_all(fd, 1, io->iov, io->iovcnt, io->offset);
    case PV_IO_FLUSH:
        return sync_fd(fd);
    case PV_IO_WRITE_SYNC:
        rc = rw_all(fd, 1, io->iov, io->iovcnt, io->offset);
        return rc ? rc : sync_fd(fd);
    case PV_IO_DISCARD:
        return discard(fd, is_blockdev, 0, io->offset, io->length);
    case PV_IO_SECURE_DISCARD:
        return discard(fd, is_blockdev, 1, io->offset, io->length);
    default:
        return -EINVAL;
    }
}

/* ---- NULL engine ------------------------------------------------------------------------------------- */

static void null_submit(struct pv_io_engine *e, struct pv_io **ios, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        pv_io_complete(ios[i], 0, 0);
}

static void null_close(struct pv_io_engine *e) { free(e); }

static const struct pv_io_engine_ops null_ops = {.submit = null_submit, .close = null_close};

struct pv_io_engine *pv_io_engine_null_open(void)
{
    struct pv_io_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->ops = &null_ops;
    e->kind = PV_IO_ENGINE_NULL;
    e->inline_completion = 1;
    return e;
}

/* ---- FILE engine ------------------------------------------------------------------------------------- */

struct file_engine {
    struct pv_io_engine base;
    int fd;
    int is_blockdev;
    uint32_t nr_threads;
    pthread_t *threads;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct pv_io *head, *tail; /* jobs not yet picked by a worker */
    int stopping;
    int direct; /* O_DIRECT: reads and writes may go to a submitter's io_uring (attach) */
    uint8_t *map; /* inline only: the file mapped shared (pv_io_engine_file_map), NULL if not */
    uint64_t map_len;
    uint64_t map_faults; /* copies that faulted and went to the syscall path instead */
};

static void *file_worker(void *arg)
{
    struct file_engine *f = arg;
    pthread_mutex_lock(&f->lock);
    for (;;) {
        while (!f->head && !f->stopping)
            pthread_cond_wait(&f->cond, &f->lock);
        struct pv_io *io = f->head;
        if (!io)
            break; /* stopping and nothing left */
        f->head = io->next;
        if (!f->head)
            f->tail = NULL;
        pthread_mutex_unlock(&f->lock);
        pv_io_complete(io, pv_io_execute(f->fd, f->is_blockdev, io), 1);
        pthread_mutex_lock(&f->lock);
    }
    pthread_mutex_unlock(&f->lock);
    return NULL;
}

#ifdef PVBACK_HAVE_URING
/* Queue what the submitter's ring can take; the rest goes to the pool.  Returns how many ops were left in
 * `ios` (moved to the front).  Every op of one call comes from one submitter, hence one ring. */
static uint32_t uring_submit(struct file_engine *f, struct pv_io **ios, uint32_t n)
{
    struct io_uring *ring = n ? ios[0]->sink->uring : NULL;
    if (!ring)
        return n;
    uint32_t left = 0, queued = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct pv_io *io = ios[i];
        if ((io->op != PV_IO_READ && io->op != PV_IO_WRITE) || io->iovcnt > IOV_MAX) {
            ios[left++] = io;
            continue;
        }
        struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
        if (!sqe) {
            io_uring_submit(ring);
            sqe = io_uring_get_sqe(ring);
            if (!sqe) {
                ios[left++] = io;
                continue;
            }
        }
        if (io->fixed && io->iovcnt == 1 && io->fixed <= io->sink->nbufs) {
            void *base = io->iov[0].iov_base;
            unsigned len = (unsigned)io->iov[0].iov_len;
            if (io->op == PV_IO_READ)
                io_uring_prep_read_fixed(sqe, f->fd, base, len, io->offset, (int)io->fixed - 1);
            else
                io_uring_prep_write_fixed(sqe, f->fd, base, len, io->offset, (int)io->fixed - 1);
        } else if (io->op == PV_IO_READ) {
            io_uring_prep_readv(sqe, f->fd, io->iov, io->iovcnt, io->offset);
        } else {
            io_uring_prep_writev(sqe, f->fd, io->iov, io->iovcnt, io->offset);
        }
        io_uring_sqe_set_data(sqe, io);
        queued++;
    }
    if (queued) {
        int rc;
        while ((rc = io_uring_submit(ring)) == -EINTR || rc == -EAGAIN)
            ;
    }
    return left;
}

static int file_attach(struct pv_io_engine *e, struct pv_io_sink *s)
{
    struct file_engine *f = (struct file_engine *)e;
    /* Buffered files would be punted to io-wq workers (tmpfs refuses RWF_NOWAIT): the pool is as good. */
    if (!f->direct || f->nr_threads == 0)
        return -EOPNOTSUPP;
    if (s->uring)
        return -EBUSY;
    struct io_uring *ring = calloc(1, sizeof(*ring));
    if (!ring)
        return -ENOMEM;
    /* Sized for one blkif ring's worth of requests; a fuller queue submits what it has and takes more SQEs,
     * and the kernel keeps CQEs beyond the CQ ring (IORING_FEAT_NODROP). */
    int rc = io_uring_queue_init(256, ring, 0);
    if (rc == 0) {
        rc = io_uring_register_eventfd(ring, s->efd);
        if (rc == 0) {
            s->uring = ring;
            s->uring_fd = f->fd;
            return 0;
        }
        io_uring_queue_exit(ring);
    }
    free(ring);
    return rc;
}
#endif

/* ---- mapped inline execution ----------------------------------------------------------------------------
 * A read served by preadv costs a syscall, an iovec import and a page-cache lookup on top of the copy; on a
 * 4 KiB tmpfs read that is most of the ~1.5 us (perf/RESULTS.md).  With the file mapped, the same one copy is
 * a memcpy between the mapping and the request's pages (the guest's own, when they are persistently mapped).
 * A mapped page can fault where preadv would have answered: the file was shrunk under the mapping, or tmpfs
 * has no room for the page of a hole.  The copy runs under a per-thread guard; SIGBUS inside it jumps back
 * and that op goes through the syscall path, which gives it its proper answer (EIO past the end, zeros for
 * a hole).  SIGBUS anywhere else goes to whatever handled it before. */

static __thread sigjmp_buf *fault_guard;
static struct sigaction prev_sigbus;
static pthread_once_t sigbus_once = PTHREAD_ONCE_INIT;
static int sigbus_rc;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *g = fault_guard;
    if (g) {
        fault_guard = NULL;
        siglongjmp(*g, 1);
    }
    if ((prev_sigbus.sa_flags & SA_SIGINFO) && prev_sigbus.sa_sigaction) {
        prev_sigbus.sa_sigaction(sig, si, uc);
        return;
    }
    if (!(prev_sigbus.sa_flags & SA_SIGINFO) && prev_sigbus.sa_handler != SIG_DFL &&
        prev_sigbus.sa_handler != SIG_IGN) {
        prev_sigbus.sa_handler(sig);
        return;
    }
    /* Default action: returning re-executes the faulting access, which now takes it. */
    signal(SIGBUS, SIG_DFL);
}

static void sigbus_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    /* NODEFER: the guard leaves the handler by siglongjmp without restoring the signal mask (no syscall per
     * batch); SIGBUS must not stay blocked in that thread, or its next fault would kill the process. */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigbus_rc = sigaction(SIGBUS, &sa, &prev_sigbus) < 0 ? -errno : 0;
}

static inline int mappable(const struct file_engine *f, const struct pv_io *io)
{
    return (io->op == PV_IO_READ || io->op == PV_IO_WRITE) && io->offset <= f->map_len &&
           io->length <= f->map_len - io->offset;
}

static void mapped_submit(struct file_engine *f, struct pv_io **ios, uint32_t n)
{
    sigjmp_buf jb;
    volatile uint32_t i = 0;
    fault_guard = NULL; /* first touch of the TLS slot here, not in the handler */
    if (sigsetjmp(jb, 0)) {
        __atomic_fetch_add(&f->map_faults, 1, __ATOMIC_RELAXED);
        pv_io_complete(ios[i], pv_io_execute(f->fd, f->is_blockdev, ios[i]), 0);
        i++;
    }
    for (; i < n; i++) {
        struct pv_io *io = ios[i];
        if (!mappable(f, io)) {
            pv_io_complete(io, pv_io_execute(f->fd, f->is_blockdev, io), 0);
            continue;
        }
        uint8_t *at = f->map + io->offset;
        fault_guard = &jb;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        if (io->op == PV_IO_READ)
            for (uint32_t k = 0; k < io->iovcnt; at += io->iov[k].iov_len, k++)
                memcpy(io->iov[k].iov_base, at, io->iov[k].iov_len);
        else
            for (uint32_t k = 0; k < io->iovcnt; at += io->iov[k].iov_len, k++)
                memcpy(at, io->iov[k].iov_base, io->iov[k].iov_len);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        fault_guard = NULL;
        pv_io_complete(io, 0, 0);
    }
}

int pv_io_engine_file_map(struct pv_io_engine *e, char *err, size_t errlen)
{
    if (e->kind != PV_IO_ENGINE_FILE || !e->inline_completion) {
        snprintf(err, errlen, "only an inline file engine can be mapped");
        return -EINVAL;
    }
    struct file_engine *f = (struct file_engine *)e;
    if (f->map)
        return 0;
    struct stat st;
    if (fstat(f->fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size <= 0) {
        snprintf(err, errlen, "not a non-empty regular file");
        return -EINVAL;
    }
    pthread_once(&sigbus_once, sigbus_install);
    if (sigbus_rc) {
        snprintf(err, errlen, "sigaction(SIGBUS): %s", strerror(-sigbus_rc));
        return sigbus_rc;
    }
    int fl = fcntl(f->fd, F_GETFL);
    int prot = PROT_READ | (fl >= 0 && (fl & O_ACCMODE) == O_RDWR ? PROT_WRITE : 0);
    /* No MAP_POPULATE: on tmpfs a populated hole is an allocated page; pages are faulted in as guests use them. */
    void *m = mmap(NULL, (size_t)st.st_size, prot, MAP_SHARED, f->fd, 0);
    if (m == MAP_FAILED) {
        int rc = -errno;
        snprintf(err, errlen, "mmap: %s", strerror(errno));
        return rc;
    }
    f->map = m;
    f->map_len = (uint64_t)st.st_size;
    return 0;
}

uint64_t pv_io_engine_file_map_faults(const struct pv_io_engine *e)
{
    if (e->kind != PV_IO_ENGINE_FILE)
        return 0;
    return __atomic_load_n(&((const struct file_engine *)e)->map_faults, __ATOMIC_RELAXED);
}

static void file_submit(struct pv_io_engine *e, struct pv_io **ios, uint32_t n)
{
    struct file_engine *f = (struct file_engine *)e;
    if (f->map) {
        mapped_submit(f, ios, n);
        return;
    }
    if (f->nr_threads == 0) {
        for (uint32_t i = 0; i < n; i++)
            pv_io_complete(ios[i], pv_io_execute(f->fd, f->is_blockdev, ios[i]), 0);
        return;
    }
#ifdef PVBACK_HAVE_URING
    if (f->direct)
        n = uring_submit(f, ios, n);
#endif
    if (n == 0)
        return;
    pthread_mutex_lock(&f->lock);
    for (uint32_t i = 0; i < n; i++) {
        ios[i]->next = NULL;
        if (f->tail)
            f->tail->next = ios[i];
        else
            f->head = ios[i];
        f->tail = ios[i];
    }
    /* Wake as many workers as there are new jobs, not all of them: each wakeup is a cross-CPU IPI. */
    if (n >= f->nr_threads)
        pthread_cond_broadcast(&f->cond);
    else
        for (uint32_t i = 0; i < n; i++)
            pthread_cond_signal(&f->cond);
    pthread_mutex_unlock(&f->lock);
}

static void file_close(struct pv_io_engine *e)
{
    struct file_engine *f = (struct file_engine *)e;
    if (f->nr_threads) {
        pthread_mutex_lock(&f->lock);
        f->stopping = 1;
        pthread_cond_broadcast(&f->cond);
        pthread_mutex_unlock(&f->lock);
        for (uint32_t i = 0; i < f->nr_threads; i++)
            pthread_join(f->threads[i], NULL);
        free(f->threads);
    }
    pthread_cond_destroy(&f->cond);
    pthread_mutex_destroy(&f->lock);
    if (f->map)
        munmap(f->map, (size_t)f->map_len);
    close(f->fd);
    free(f);
}

#ifdef PVBACK_HAVE_URING
static const struct pv_io_engine_ops file_ops = {.submit = file_submit, .close = file_close, .attach = file_attach};
#else
static const struct pv_io_engine_ops file_ops = {.submit = file_submit, .close = file_close};
#endif

struct pv_io_engine *pv_io_engine_file_open(int fd, uint32_t nr_threads, char *err, size_t errlen)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        snprintf(err, errlen, "fstat: %s", strerror(errno));
        return NULL;
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        snprintf(err, errlen, "not a regular file or block device");
        return NULL;
    }
    if (nr_threads > 256) {
        snprintf(err, errlen, "nr_threads %u > 256", nr_threads);
        return NULL;
    }
    struct file_engine *f = calloc(1, sizeof(*f));
    if (!f) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    f->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (f->fd < 0) {
        snprintf(err, errlen, "dup: %s", strerror(errno));
        free(f);
        return NULL;
    }
    f->is_blockdev = S_ISBLK(st.st_mode);
    int fl = fcntl(f->fd, F_GETFL);
    f->direct = fl >= 0 && (fl & O_DIRECT);
    f->base.ops = &file_ops;
    f->base.kind = PV_IO_ENGINE_FILE;
    f->base.inline_completion = nr_threads == 0;
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->cond, NULL);
    if (nr_threads) {
        f->threads = calloc(nr_threads, sizeof(pthread_t));
        if (!f->threads) {
            snprintf(err, errlen, "out of memory");
            file_close(&f->base);
            return NULL;
        }
        for (uint32_t i = 0; i < nr_threads; i++) {
            int rc = pthread_create(&f->threads[i], NULL, file_worker, f);
            if (rc) {
                snprintf(err, errlen, "pthread_create: %s", strerror(rc));
                f->nr_threads = i; /* join the ones that started */
                file_close(&f->base);
                return NULL;
            }
            f->nr_threads = i + 1;
        }
    }
    return &f->base;
}

void pv_io_engine_submit(struct pv_io_engine *e, struct pv_io **ios, uint32_t n) { e->ops->submit(e, ios, n); }
int pv_io_engine_attach(struct pv_io_engine *e, struct pv_io_sink *s)
{
    return e->ops->attach ? e->ops->attach(e, s) : -EOPNOTSUPP;
}
void pv_io_engine_close(struct pv_io_engine *e)
{
    if (e)
        e->ops->close(e);
}
uint32_t pv_io_engine_kind(const struct pv_io_engine *e) { return e->kind; }
uint32_t pv_io_engine_inline(const struct pv_io_engine *e) { return e->inline_completion; }
