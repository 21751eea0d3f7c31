/* NBD I/O engine; see io_nbd.h for the threading and reconnect design. */
#include "io_nbd.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_REQ_SIZE 28
#define NBD_REPLY_SIZE 16

/* NBD error values are Linux errno numbers for the ones the protocol defines; ESHUTDOWN is handled apart. */
#define NBD_ESHUTDOWN 108

#define SLOT_CHUNK 256
#define SLOT_MAX_CHUNKS 256
#define NO_SLOT UINT32_MAX
#define PART_MAIN 0
#define PART_FLUSH 1
#define MAX_PARTS 64
#define TRIM_PART_MIN (1ull << 30)
#define REPLAY_WAVE 64
#define REPLAY_TIMEOUT_S 30
#define RBUF_SIZE (256u << 10)

enum slot_kind { K_READ, K_WRITE, K_WRITE_SYNC, K_FLUSH, K_TRIM, K_BOUND_FLUSH };

struct slot {
    struct pv_io *io;  /* NULL for the engine's own flushes */
    uint64_t need;     /* parts not answered yet (bit = part number = cookie's upper half) */
    uint64_t sent;     /* parts sent on the current connection */
    uint64_t part_len; /* TRIM: bytes per part (NBD lengths are 32-bit) */
    uint64_t flush_mark; /* log sequence when the flush part went out: it covers entries older than that */
    int32_t result;
    uint32_t nparts;
    uint32_t next;     /* free list, or tx queue */
    uint8_t kind;
    uint8_t active;
    uint8_t fua;       /* WRITE_SYNC as FLUSH + WRITE|FUA, sent together */
    uint8_t queued;
};

struct log_entry {
    struct log_entry *next;
    uint64_t seq, off, len;
    uint8_t data[];
};

struct rbuf {
    int fd;
    uint8_t *buf;
    size_t start, end;
};

struct nbd_engine {
    struct pv_io_engine base;
    uint64_t size;
    uint32_t tflags;
    int state_efd;

    pthread_mutex_t ctl_lock; /* serialises reconnect/fail/close (the Python side's calls) */
    pthread_mutex_t send_lock;
    pthread_mutex_t lock;
    pthread_cond_t txcond;

    /* under lock */
    int fd;
    int state;
    int stopping;
    struct slot *chunks[SLOT_MAX_CHUNKS];
    uint32_t nchunks;
    uint32_t free_head;
    uint32_t inflight;
    uint32_t txq_head, txq_tail;
    int bound_flush_inflight;
    struct log_entry *log_head, *log_tail;
    uint64_t log_seq, log_bytes, log_entries, log_limit;
    struct pv_nbd_stats st;

    /* under ctl_lock */
    pthread_t reader;
    int reader_running;
    pthread_t txthread;
    int tx_running;

    /* scratch of the send_lock holder */
    uint8_t *hdrs;
    uint32_t *hdr_iov; /* which iov entry points at each header */
    size_t hdr_cap;
    struct iovec *iov;
    size_t iov_cap;
};

static inline void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (24 - 8 * i));
}
static inline void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (56 - 8 * i));
}
static inline uint32_t get_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t get_be64(const uint8_t *p) { return ((uint64_t)get_be32(p) << 32) | get_be32(p + 4); }

static void signal_state(struct nbd_engine *n)
{
    uint64_t one = 1;
    while (write(n->state_efd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

/* ---- slots ------------------------------------------------------------------------------------------ */

static inline struct slot *slot_at(struct nbd_engine *n, uint32_t idx)
{
    return &n->chunks[idx / SLOT_CHUNK][idx % SLOT_CHUNK];
}

static uint32_t slot_alloc(struct nbd_engine *n)
{
    if (n->free_head == NO_SLOT) {
        if (n->nchunks == SLOT_MAX_CHUNKS)
            return NO_SLOT;
        struct slot *c = calloc(SLOT_CHUNK, sizeof(*c));
        if (!c)
            return NO_SLOT;
        uint32_t base = n->nchunks * SLOT_CHUNK;
        n->chunks[n->nchunks++] = c;
        for (uint32_t i = SLOT_CHUNK; i-- > 0;) {
            c[i].next = n->free_head;
            n->free_head = base + i;
        }
    }
    uint32_t idx = n->free_head;
    struct slot *s = slot_at(n, idx);
    n->free_head = s->next;
    memset(s, 0, sizeof(*s));
    s->next = NO_SLOT;
    s->active = 1;
    n->inflight++;
    return idx;
}

static void slot_free(struct nbd_engine *n, uint32_t idx)
{
    struct slot *s = slot_at(n, idx);
    s->active = 0;
    s->io = NULL;
    s->next = n->free_head;
    n->free_head = idx;
    n->inflight--;
}

static void txq_push(struct nbd_engine *n, uint32_t idx, int front)
{
    struct slot *s = slot_at(n, idx);
    if (s->queued)
        return;
    s->queued = 1;
    s->next = NO_SLOT;
    if (n->txq_head == NO_SLOT) {
        n->txq_head = n->txq_tail = idx;
    } else if (front) {
        s->next = n->txq_head;
        n->txq_head = idx;
    } else {
        slot_at(n, n->txq_tail)->next = idx;
        n->txq_tail = idx;
    }
}

static void txq_clear(struct nbd_engine *n)
{
    for (uint32_t i = n->txq_head; i != NO_SLOT;) {
        struct slot *s = slot_at(n, i);
        i = s->next;
        s->queued = 0;
        s->next = NO_SLOT;
    }
    n->txq_head = n->txq_tail = NO_SLOT;
}

/* Writes wait while a bound flush is out and the log is full: that is what keeps the log bounded. */
static int held(struct nbd_engine *n, const struct slot *s)
{
    return s->kind == K_WRITE && n->bound_flush_inflight && n->log_bytes >= n->log_limit;
}

static int logging(const struct nbd_engine *n) { return (n->tflags & PV_NBD_FLAG_SEND_FLUSH) != 0; }

/* Issue a flush of our own once the log reaches its bound (caller holds lock). */
static void maybe_bound_flush(struct nbd_engine *n)
{
    if (!logging(n) || n->bound_flush_inflight || n->log_bytes < n->log_limit || n->state != PV_NBD_STATE_CONNECTED)
        return;
    uint32_t idx = slot_alloc(n);
    if (idx == NO_SLOT)
        return;
    struct slot *s = slot_at(n, idx);
    s->kind = K_BOUND_FLUSH;
    s->need = 1u << PART_MAIN;
    n->bound_flush_inflight = 1;
    n->st.bound_flushes++;
    txq_push(n, idx, 1);
    pthread_cond_signal(&n->txcond);
}

/* ---- replay log --------------------------------------------------------------------------------------- */

static void log_drop_before(struct nbd_engine *n, uint64_t mark)
{
    while (n->log_head && n->log_head->seq < mark) {
        struct log_entry *le = n->log_head;
        n->log_head = le->next;
        n->log_bytes -= le->len;
        n->log_entries--;
        free(le);
    }
    if (!n->log_head)
        n->log_tail = NULL;
}

static struct log_entry *log_copy(const struct pv_io *io)
{
    struct log_entry *le = malloc(sizeof(*le) + io->length);
    if (!le)
        return NULL;
    le->next = NULL;
    le->off = io->offset;
    le->len = io->length;
    size_t pos = 0;
    for (uint32_t i = 0; i < io->iovcnt && pos < io->length; i++) {
        size_t l = io->iov[i].iov_len;
        if (l > io->length - pos)
            l = io->length - pos;
        memcpy(le->data + pos, io->iov[i].iov_base, l);
        pos += l;
    }
    return le;
}

static void log_append(struct nbd_engine *n, struct log_entry *le)
{
    le->seq = n->log_seq++;
    if (n->log_tail)
        n->log_tail->next = le;
    else
        n->log_head = le;
    n->log_tail = le;
    n->log_bytes += le->len;
    n->log_entries++;
}

static void log_free_all(struct nbd_engine *n)
{
    log_drop_before(n, UINT64_MAX);
}

/* ---- sending ------------------------------------------------------------------------------------------ */

static int sendall(int fd, struct iovec *iov, size_t cnt)
{
    while (cnt) {
        struct msghdr mh = {0};
        mh.msg_iov = iov;
        mh.msg_iovlen = cnt > IOV_MAX ? IOV_MAX : cnt;
        ssize_t r = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        size_t left = (size_t)r;
        while (cnt && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt && left) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

/* A batch of frames in the send_lock holder's scratch. */
struct frames {
    size_t nhdr, niov;
};

static int reserve(struct nbd_engine *n, struct frames *f, size_t hdrs, size_t iovs)
{
    if ((f->nhdr + hdrs) * NBD_REQ_SIZE > n->hdr_cap) {
        size_t cap = n->hdr_cap ? n->hdr_cap : 64 * NBD_REQ_SIZE;
        while (cap < (f->nhdr + hdrs) * NBD_REQ_SIZE)
            cap *= 2;
        /* Headers are referenced from iov entries: point those at the moved block. */
        uint8_t *p = realloc(n->hdrs, cap);
        if (!p)
            return -ENOMEM;
        uint32_t *hi = realloc(n->hdr_iov, cap / NBD_REQ_SIZE * sizeof(*hi));
        if (!hi) {
            n->hdrs = p; /* keep the moved block; the capacity below stays the old one */
            for (size_t i = 0; i < f->nhdr; i++)
                n->iov[n->hdr_iov[i]].iov_base = p + i * NBD_REQ_SIZE;
            return -ENOMEM;
        }
        n->hdr_iov = hi;
        for (size_t i = 0; i < f->nhdr; i++)
            n->iov[hi[i]].iov_base = p + i * NBD_REQ_SIZE;
        n->hdrs = p;
        n->hdr_cap = cap;
    }
    if (f->niov + iovs > n->iov_cap) {
        size_t cap = n->iov_cap ? n->iov_cap : 256;
        while (cap < f->niov + iovs)
            cap *= 2;
        struct iovec *p = realloc(n->iov, cap * sizeof(*p));
        if (!p)
            return -ENOMEM;
        n->iov = p;
        n->iov_cap = cap;
    }
    return 0;
}

static void add_frame(struct nbd_engine *n, struct frames *f, uint16_t flags, uint16_t type, uint64_t cookie,
                      uint64_t off, uint32_t len, const struct iovec *data, uint32_t datacnt)
{
    n->hdr_iov[f->nhdr] = (uint32_t)f->niov;
    uint8_t *h = n->hdrs + f->nhdr++ * NBD_REQ_SIZE;
    put_be32(h, NBD_REQUEST_MAGIC);
    put_be16(h + 4, flags);
    put_be16(h + 6, type);
    put_be64(h + 8, cookie);
    put_be64(h + 16, off);
    put_be32(h + 24, len);
    n->iov[f->niov++] = (struct iovec){h, NBD_REQ_SIZE};
    for (uint32_t i = 0; i < datacnt; i++)
        if (data[i].iov_len)
            n->iov[f->niov++] = data[i];
    n->st.commands_sent++;
}

/* Frame the parts of slot `idx` that are unanswered and not yet on this connection (caller holds send_lock
 * and lock).  Returns -ENOMEM if scratch could not grow (nothing framed, parts stay unsent). */
static int frame_slot(struct nbd_engine *n, struct frames *f, uint32_t idx)
{
    struct slot *s = slot_at(n, idx);
    uint64_t todo = s->need & ~s->sent;
    if (!todo)
        return 0;
    size_t nparts = (size_t)__builtin_popcountll(todo);
    size_t datacnt = s->io && (s->kind == K_WRITE || s->kind == K_WRITE_SYNC) ? s->io->iovcnt : 0;
    if (reserve(n, f, nparts, nparts + datacnt))
        return -ENOMEM;
    const struct pv_io *io = s->io;
    for (uint32_t p = 0; p < MAX_PARTS; p++) {
        if (!(todo & (1ull << p)))
            continue;
        uint64_t cookie = ((uint64_t)p << 32) | idx;
        switch (s->kind) {
        case K_READ:
            add_frame(n, f, 0, NBD_CMD_READ, cookie, io->offset, (uint32_t)io->length, NULL, 0);
            break;
        case K_WRITE:
            add_frame(n, f, 0, NBD_CMD_WRITE, cookie, io->offset, (uint32_t)io->length, io->iov, io->iovcnt);
            break;
        case K_WRITE_SYNC:
            if (p == PART_MAIN) {
                add_frame(n, f, s->fua ? NBD_CMD_FLAG_FUA : 0, NBD_CMD_WRITE, cookie, io->offset,
                          (uint32_t)io->length, io->iov, io->iovcnt);
            } else {
                s->flush_mark = n->log_seq;
                add_frame(n, f, 0, NBD_CMD_FLUSH, cookie, 0, 0, NULL, 0);
            }
            break;
        case K_FLUSH:
        case K_BOUND_FLUSH:
            s->flush_mark = n->log_seq;
            add_frame(n, f, 0, NBD_CMD_FLUSH, cookie, 0, 0, NULL, 0);
            break;
        case K_TRIM: {
            uint64_t off = io->offset + (uint64_t)p * s->part_len;
            uint64_t len = io->length - (uint64_t)p * s->part_len;
            if (len > s->part_len)
                len = s->part_len;
            add_frame(n, f, 0, NBD_CMD_TRIM, cookie, off, (uint32_t)len, NULL, 0);
            break;
        }
        }
    }
    s->sent |= todo;
    return 0;
}

/* Send what was framed (caller holds send_lock, not lock).  A failed send shuts the socket down so the
 * reader sees the end and takes the engine to DISCONNECTED: one place handles a lost connection. */
static void flush_frames(struct nbd_engine *n, int fd, struct frames *f)
{
    if (f->niov && fd >= 0 && sendall(fd, n->iov, f->niov) < 0)
        shutdown(fd, SHUT_RDWR);
    f->nhdr = f->niov = 0;
}

/* ---- completion ---------------------------------------------------------------------------------------- */

static int32_t map_error(uint32_t err)
{
    switch (err) {
    case 0:
        return 0;
    case EPERM:
    case EIO:
    case ENOMEM:
    case EINVAL:
    case ENOSPC:
    case EOVERFLOW:
        return -(int32_t)err;
    case 95: /* NBD_ENOTSUP */
        return -EOPNOTSUPP;
    default:
        return -EIO;
    }
}

/* Apply one answered part (caller holds lock).  Returns the op to complete, if this was its last part. */
static struct pv_io *part_done(struct nbd_engine *n, uint32_t idx, uint32_t part, int32_t res,
                               struct log_entry *le, int32_t *result)
{
    struct slot *s = slot_at(n, idx);
    uint64_t bit = 1ull << part;
    s->need &= ~bit;
    s->sent &= ~bit;
    if (res && !s->result)
        s->result = res;
    int is_flush = s->kind == K_FLUSH || s->kind == K_BOUND_FLUSH || (s->kind == K_WRITE_SYNC && part == PART_FLUSH);
    if (is_flush && !res)
        log_drop_before(n, s->flush_mark);
    if (le) {
        log_append(n, le);
        maybe_bound_flush(n);
    }
    if (s->kind == K_WRITE_SYNC && !s->fua && part == PART_MAIN && !res && logging(n)) {
        /* The write is in: now the flush that makes it (and everything before it) durable. */
        s->need |= 1ull << PART_FLUSH;
        txq_push(n, idx, 0);
        pthread_cond_signal(&n->txcond);
        return NULL;
    }
    if (s->need)
        return NULL;
    struct pv_io *io = s->io;
    *result = s->result;
    if (s->kind == K_BOUND_FLUSH) {
        n->bound_flush_inflight = 0;
        pthread_cond_signal(&n->txcond); /* held writes may go */
    }
    slot_free(n, idx);
    return io;
}

/* ---- reader ------------------------------------------------------------------------------------------- */

static int rbuf_fill(struct rbuf *r)
{
    if (r->start == r->end)
        r->start = r->end = 0;
    for (;;) {
        ssize_t got = recv(r->fd, r->buf + r->end, RBUF_SIZE - r->end, 0);
        if (got > 0) {
            r->end += (size_t)got;
            return 0;
        }
        if (got == 0)
            return -ECONNRESET;
        if (errno != EINTR)
            return -errno;
    }
}

static int rbuf_read(struct rbuf *r, void *dst, size_t len)
{
    uint8_t *d = dst;
    while (len) {
        size_t avail = r->end - r->start;
        if (avail) {
            size_t c = avail < len ? avail : len;
            memcpy(d, r->buf + r->start, c);
            r->start += c;
            d += c;
            len -= c;
            continue;
        }
        if (len >= RBUF_SIZE / 4) {
            /* Big payloads land in place: no bounce through the buffer. */
            ssize_t got = recv(r->fd, d, len, MSG_WAITALL);
            if (got > 0) {
                d += got;
                len -= (size_t)got;
                continue;
            }
            if (got == 0)
                return -ECONNRESET;
            if (errno != EINTR)
                return -errno;
            continue;
        }
        if (RBUF_SIZE - r->end < 64)
            r->start = r->end = 0; /* empty here, so restarting at the front loses nothing */
        int rc = rbuf_fill(r);
        if (rc)
            return rc;
    }
    return 0;
}

static int rbuf_read_iov(struct rbuf *r, const struct pv_io *io)
{
    uint64_t left = io->length;
    for (uint32_t i = 0; i < io->iovcnt && left; i++) {
        size_t l = io->iov[i].iov_len < left ? io->iov[i].iov_len : (size_t)left;
        int rc = rbuf_read(r, io->iov[i].iov_base, l);
        if (rc)
            return rc;
        left -= l;
    }
    return left ? -EINVAL : 0;
}

static void on_disconnect(struct nbd_engine *n)
{
    pthread_mutex_lock(&n->lock);
    if (n->state == PV_NBD_STATE_CONNECTED) {
        n->state = PV_NBD_STATE_DISCONNECTED;
        for (uint32_t c = 0; c < n->nchunks; c++) {
            for (uint32_t i = 0; i < SLOT_CHUNK; i++) {
                struct slot *s = &n->chunks[c][i];
                if (!s->active)
                    continue;
                s->sent = 0;
                /* A WRITE_SYNC whose write was answered but whose flush was not: the write may have died in
                 * the server's cache, so both go again. */
                if (s->kind == K_WRITE_SYNC && !s->fua && s->need == (1ull << PART_FLUSH))
                    s->need = 1ull << PART_MAIN;
            }
        }
        txq_clear(n);
        signal_state(n);
    }
    pthread_mutex_unlock(&n->lock);
}

struct reader_arg {
    struct nbd_engine *n;
    int fd;
};

static void *reader_main(void *arg)
{
    struct reader_arg *ra = arg;
    struct nbd_engine *n = ra->n;
    struct rbuf r = {.fd = ra->fd, .buf = malloc(RBUF_SIZE)};
    free(ra);
    if (!r.buf) {
        shutdown(r.fd, SHUT_RDWR);
        on_disconnect(n);
        return NULL;
    }
    for (;;) {
        uint8_t h[NBD_REPLY_SIZE];
        if (rbuf_read(&r, h, sizeof(h)))
            break;
        if (get_be32(h) != NBD_SIMPLE_REPLY_MAGIC)
            break; /* structured replies were never negotiated: this is a broken or foreign peer */
        uint32_t err = get_be32(h + 4);
        uint64_t cookie = get_be64(h + 8);
        uint32_t idx = (uint32_t)cookie, part = (uint32_t)(cookie >> 32);
        if (err == NBD_ESHUTDOWN)
            break; /* the server is going away: the op goes again on the next connection */

        pthread_mutex_lock(&n->lock);
        n->st.replies++;
        struct slot *s = idx < n->nchunks * SLOT_CHUNK && part < MAX_PARTS ? slot_at(n, idx) : NULL;
        int valid = s && s->active && (s->sent & (1ull << part)) && (s->need & (1ull << part));
        struct pv_io *io = valid ? s->io : NULL;
        int kind = valid ? s->kind : -1;
        pthread_mutex_unlock(&n->lock);
        if (!valid)
            break; /* a reply to nothing we asked: cannot trust the stream any more */

        /* The slot cannot go away meanwhile: only this thread answers parts, and fail()/close() join us
         * before they touch slots. */
        if (kind == K_READ && err == 0 && rbuf_read_iov(&r, io))
            break;
        struct log_entry *le = NULL;
        if (kind == K_WRITE && err == 0 && logging(n)) {
            le = log_copy(io);
            /* Without a copy this write could not be replayed: make it durable instead of acking it. */
            if (!le)
                err = ENOMEM;
        }
        int32_t result = 0;
        pthread_mutex_lock(&n->lock);
        struct pv_io *done = part_done(n, idx, part, map_error(err), le, &result);
        pthread_mutex_unlock(&n->lock);
        if (done)
            pv_io_complete(done, result, 1);
    }
    shutdown(r.fd, SHUT_RDWR);
    free(r.buf);
    on_disconnect(n);
    return NULL;
}

static int start_reader(struct nbd_engine *n, int fd)
{
    struct reader_arg *ra = malloc(sizeof(*ra));
    if (!ra)
        return -ENOMEM;
    ra->n = n;
    ra->fd = fd;
    int rc = pthread_create(&n->reader, NULL, reader_main, ra);
    if (rc) {
        free(ra);
        return -rc;
    }
    n->reader_running = 1;
    return 0;
}

static void join_reader(struct nbd_engine *n)
{
    if (n->reader_running) {
        pthread_join(n->reader, NULL);
        n->reader_running = 0;
    }
}

/* ---- tx thread ---------------------------------------------------------------------------------------- */

static int tx_ready(struct nbd_engine *n)
{
    return n->state == PV_NBD_STATE_CONNECTED && n->txq_head != NO_SLOT && !held(n, slot_at(n, n->txq_head));
}

static void *tx_main(void *arg)
{
    struct nbd_engine *n = arg;
    pthread_mutex_lock(&n->lock);
    for (;;) {
        while (!n->stopping && !tx_ready(n))
            pthread_cond_wait(&n->txcond, &n->lock);
        if (n->stopping)
            break;
        pthread_mutex_unlock(&n->lock);
        pthread_mutex_lock(&n->send_lock);
        pthread_mutex_lock(&n->lock);
        struct frames f = {0};
        int fd = n->fd;
        while (n->state == PV_NBD_STATE_CONNECTED && n->txq_head != NO_SLOT) {
            uint32_t idx = n->txq_head;
            struct slot *s = slot_at(n, idx);
            if (held(n, s))
                break;
            if (frame_slot(n, &f, idx))
                break;
            n->txq_head = s->next;
            if (n->txq_head == NO_SLOT)
                n->txq_tail = NO_SLOT;
            s->queued = 0;
            s->next = NO_SLOT;
        }
        pthread_mutex_unlock(&n->lock);
        flush_frames(n, fd, &f);
        pthread_mutex_unlock(&n->send_lock);
        pthread_mutex_lock(&n->lock);
    }
    pthread_mutex_unlock(&n->lock);
    return NULL;
}

/* ---- submit ------------------------------------------------------------------------------------------- */

/* Set up a slot for `io`, or return an immediate result (0 or -errno, with *idx = NO_SLOT). */
static int32_t prepare(struct nbd_engine *n, struct pv_io *io, uint32_t *idx)
{
    *idx = NO_SLOT;
    uint32_t f = n->tflags;
    int ro = (f & PV_NBD_FLAG_READ_ONLY) != 0;
    uint8_t kind;
    switch (io->op) {
    case PV_IO_READ:
    case PV_IO_WRITE:
    case PV_IO_WRITE_SYNC:
        if (io->op != PV_IO_READ && ro)
            return -EROFS;
        if (io->length == 0 || io->length > PV_NBD_MAX_PAYLOAD || io->offset > n->size ||
            io->length > n->size - io->offset)
            return -EINVAL;
        kind = io->op == PV_IO_READ ? K_READ : io->op == PV_IO_WRITE ? K_WRITE : K_WRITE_SYNC;
        break;
    case PV_IO_FLUSH:
        if (!(f & PV_NBD_FLAG_SEND_FLUSH))
            return 0; /* the server has no volatile cache to flush */
        kind = K_FLUSH;
        break;
    case PV_IO_DISCARD:
        if (!(f & PV_NBD_FLAG_SEND_TRIM))
            return -EOPNOTSUPP;
        if (ro)
            return -EROFS;
        if (io->offset > n->size || io->length > n->size - io->offset)
            return -EINVAL;
        if (io->length == 0)
            return 0;
        kind = K_TRIM;
        break;
    case PV_IO_SECURE_DISCARD:
        return -EOPNOTSUPP; /* NBD has no secure erase */
    default:
        return -EINVAL;
    }
    if (n->state == PV_NBD_STATE_FAILED || n->stopping)
        return -EIO;
    uint32_t i = slot_alloc(n);
    if (i == NO_SLOT)
        return -ENOMEM;
    struct slot *s = slot_at(n, i);
    s->io = io;
    s->kind = kind;
    s->need = 1ull << PART_MAIN;
    if (kind == K_WRITE_SYNC && (f & PV_NBD_FLAG_SEND_FUA) && (f & PV_NBD_FLAG_SEND_FLUSH)) {
        /* FLUSH covers what completed before it, WRITE|FUA covers this write: together a pwrite+fdatasync
         * in one round trip. */
        s->fua = 1;
        s->need |= 1ull << PART_FLUSH;
    } else if (kind == K_WRITE_SYNC && (f & PV_NBD_FLAG_SEND_FUA)) {
        s->fua = 1;
    } else if (kind == K_TRIM) {
        uint64_t per = (io->length + MAX_PARTS - 1) / MAX_PARTS;
        per = (per + 4095) & ~4095ull;
        if (per < TRIM_PART_MIN)
            per = TRIM_PART_MIN;
        s->part_len = per;
        s->nparts = (uint32_t)((io->length + per - 1) / per);
        s->need = s->nparts == 64 ? UINT64_MAX : (1ull << s->nparts) - 1;
    }
    *idx = i;
    return 0;
}

static void nbd_submit(struct pv_io_engine *e, struct pv_io **ios, uint32_t cnt)
{
    struct nbd_engine *n = (struct nbd_engine *)e;
    struct pv_io *now_head = NULL, **now_tail = &now_head; /* completed inline, after the locks */
    pthread_mutex_lock(&n->send_lock);
    pthread_mutex_lock(&n->lock);
    struct frames f = {0};
    int fd = n->fd;
    int kick_tx = 0;
    for (uint32_t k = 0; k < cnt; k++) {
        struct pv_io *io = ios[k];
        uint32_t idx;
        int32_t r = prepare(n, io, &idx);
        if (idx == NO_SLOT) {
            io->result = r;
            io->next = NULL;
            *now_tail = io;
            now_tail = &io->next;
            continue;
        }
        if (n->state != PV_NBD_STATE_CONNECTED)
            continue; /* held until reconnect resends every unanswered op */
        struct slot *s = slot_at(n, idx);
        if (s->kind == K_WRITE && logging(n) && n->log_bytes >= n->log_limit) {
            maybe_bound_flush(n);
            txq_push(n, idx, 0);
            kick_tx = 1;
            continue;
        }
        if (frame_slot(n, &f, idx)) {
            txq_push(n, idx, 0); /* no scratch memory now: the tx thread retries */
            kick_tx = 1;
        }
    }
    if (kick_tx)
        pthread_cond_signal(&n->txcond);
    pthread_mutex_unlock(&n->lock);
    flush_frames(n, fd, &f);
    pthread_mutex_unlock(&n->send_lock);
    while (now_head) {
        struct pv_io *io = now_head;
        now_head = io->next;
        pv_io_complete(io, io->result, 0);
    }
}

/* ---- control ------------------------------------------------------------------------------------------ */

static void fail_all(struct nbd_engine *n)
{
    pthread_mutex_lock(&n->send_lock);
    pthread_mutex_lock(&n->lock);
    struct pv_io *head = NULL, **tail = &head;
    for (uint32_t c = 0; c < n->nchunks; c++) {
        for (uint32_t i = 0; i < SLOT_CHUNK; i++) {
            struct slot *s = &n->chunks[c][i];
            if (!s->active)
                continue;
            if (s->io) {
                s->io->next = NULL;
                *tail = s->io;
                tail = &s->io->next;
            }
            slot_free(n, c * SLOT_CHUNK + i);
        }
    }
    txq_clear(n);
    n->bound_flush_inflight = 0;
    log_free_all(n);
    pthread_mutex_unlock(&n->lock);
    pthread_mutex_unlock(&n->send_lock);
    while (head) {
        struct pv_io *io = head;
        head = io->next;
        pv_io_complete(io, -EIO, 1);
    }
}

void pv_io_engine_nbd_fail(struct pv_io_engine *e)
{
    if (!e || e->kind != PV_IO_ENGINE_NBD)
        return;
    struct nbd_engine *n = (struct nbd_engine *)e;
    pthread_mutex_lock(&n->ctl_lock);
    pthread_mutex_lock(&n->lock);
    n->state = PV_NBD_STATE_FAILED;
    if (n->fd >= 0)
        shutdown(n->fd, SHUT_RDWR);
    pthread_mutex_unlock(&n->lock);
    join_reader(n);
    fail_all(n);
    signal_state(n);
    pthread_mutex_unlock(&n->ctl_lock);
}

static int set_blocking(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)
        return -errno;
    return 0;
}

static void set_timeouts(int fd, int seconds)
{
    struct timeval tv = {.tv_sec = seconds, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static int overlaps(const struct log_entry *a, const struct log_entry *b)
{
    return a->off < b->off + b->len && b->off < a->off + a->len;
}

/* Rewrite the replay log on `fd`, oldest first.  Writes in flight together may land in any order, so a
 * wave never holds two entries that overlap: a later entry waits for the earlier one's reply. */
static int replay_log(struct nbd_engine *n, int fd)
{
    struct rbuf r = {.fd = fd, .buf = malloc(RBUF_SIZE)};
    if (!r.buf)
        return -ENOMEM;
    uint8_t hdrs[REPLAY_WAVE][NBD_REQ_SIZE];
    struct iovec iov[REPLAY_WAVE * 2];
    const struct log_entry *wave[REPLAY_WAVE];
    int rc = 0;
    const struct log_entry *le = n->log_head;
    while (le && !rc) {
        uint32_t w = 0;
        while (le && w < REPLAY_WAVE) {
            int clash = 0;
            for (uint32_t i = 0; i < w && !clash; i++)
                clash = overlaps(wave[i], le);
            if (clash)
                break;
            uint8_t *h = hdrs[w];
            put_be32(h, NBD_REQUEST_MAGIC);
            put_be16(h + 4, 0);
            put_be16(h + 6, NBD_CMD_WRITE);
            put_be64(h + 8, ((uint64_t)(MAX_PARTS - 1) << 32) | w);
            put_be64(h + 16, le->off);
            put_be32(h + 24, (uint32_t)le->len);
            iov[2 * w] = (struct iovec){h, NBD_REQ_SIZE};
            iov[2 * w + 1] = (struct iovec){(void *)le->data, le->len};
            wave[w++] = le;
            le = le->next;
        }
        rc = sendall(fd, iov, 2 * w);
        for (uint32_t i = 0; i < w && !rc; i++) {
            uint8_t h[NBD_REPLY_SIZE];
            rc = rbuf_read(&r, h, sizeof(h));
            if (!rc && (get_be32(h) != NBD_SIMPLE_REPLY_MAGIC || get_be64(h + 8) >> 32 != MAX_PARTS - 1 ||
                        (uint32_t)get_be64(h + 8) >= w))
                rc = -EPROTO;
            if (!rc && get_be32(h + 4))
                rc = -EIO;
        }
        if (!rc) {
            pthread_mutex_lock(&n->lock);
            n->st.replayed_writes += w;
            pthread_mutex_unlock(&n->lock);
        }
    }
    free(r.buf);
    return rc;
}

int pv_io_engine_nbd_reconnect(struct pv_io_engine *e, int new_fd)
{
    if (!e || e->kind != PV_IO_ENGINE_NBD)
        return -EINVAL;
    struct nbd_engine *n = (struct nbd_engine *)e;
    pthread_mutex_lock(&n->ctl_lock);
    pthread_mutex_lock(&n->lock);
    int state = n->state;
    if (state == PV_NBD_STATE_CONNECTED && n->fd >= 0)
        shutdown(n->fd, SHUT_RDWR); /* the caller judged it dead (e.g. hung): treat as dropped */
    pthread_mutex_unlock(&n->lock);
    if (state == PV_NBD_STATE_FAILED || n->stopping) {
        pthread_mutex_unlock(&n->ctl_lock);
        return -EINVAL;
    }
    join_reader(n); /* from here the log and the slots change only under our hands */

    int fd = fcntl(new_fd, F_DUPFD_CLOEXEC, 0);
    int rc = fd < 0 ? -errno : set_blocking(fd);
    if (!rc) {
        /* A server that accepts and then hangs must not hang the caller forever. */
        set_timeouts(fd, REPLAY_TIMEOUT_S);
        rc = replay_log(n, fd);
        set_timeouts(fd, 0);
    }
    if (rc) {
        if (fd >= 0)
            close(fd);
        pthread_mutex_unlock(&n->ctl_lock);
        return rc == -EAGAIN || rc == -EWOULDBLOCK ? -ETIMEDOUT : rc;
    }

    pthread_mutex_lock(&n->send_lock);
    pthread_mutex_lock(&n->lock);
    if (n->fd >= 0)
        close(n->fd);
    n->fd = fd;
    n->state = PV_NBD_STATE_CONNECTED;
    n->st.reconnects++;
    txq_clear(n);
    rc = start_reader(n, fd);
    if (rc) {
        n->state = PV_NBD_STATE_DISCONNECTED;
        pthread_mutex_unlock(&n->lock);
        pthread_mutex_unlock(&n->send_lock);
        pthread_mutex_unlock(&n->ctl_lock);
        return rc;
    }
    struct frames f = {0};
    for (uint32_t c = 0; c < n->nchunks; c++) {
        for (uint32_t i = 0; i < SLOT_CHUNK; i++) {
            uint32_t idx = c * SLOT_CHUNK + i;
            struct slot *s = slot_at(n, idx);
            if (!s->active || !(s->need & ~s->sent))
                continue;
            n->st.resent_commands += (uint64_t)__builtin_popcountll(s->need & ~s->sent);
            if (frame_slot(n, &f, idx))
                txq_push(n, idx, 0);
        }
    }
    pthread_cond_signal(&n->txcond);
    signal_state(n);
    pthread_mutex_unlock(&n->lock);
    flush_frames(n, fd, &f);
    pthread_mutex_unlock(&n->send_lock);
    pthread_mutex_unlock(&n->ctl_lock);
    return 0;
}

int pv_io_engine_nbd_state_fd(struct pv_io_engine *e)
{
    return e && e->kind == PV_IO_ENGINE_NBD ? ((struct nbd_engine *)e)->state_efd : -1;
}

int pv_io_engine_nbd_state(struct pv_io_engine *e)
{
    if (!e || e->kind != PV_IO_ENGINE_NBD)
        return -EINVAL;
    struct nbd_engine *n = (struct nbd_engine *)e;
    uint64_t v;
    while (read(n->state_efd, &v, sizeof(v)) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&n->lock);
    int s = n->state;
    pthread_mutex_unlock(&n->lock);
    return s;
}

void pv_io_engine_nbd_set_log_limit(struct pv_io_engine *e, uint64_t bytes)
{
    if (!e || e->kind != PV_IO_ENGINE_NBD)
        return;
    struct nbd_engine *n = (struct nbd_engine *)e;
    pthread_mutex_lock(&n->lock);
    n->log_limit = bytes;
    maybe_bound_flush(n);
    pthread_cond_signal(&n->txcond);
    pthread_mutex_unlock(&n->lock);
}

void pv_io_engine_nbd_get_stats(struct pv_io_engine *e, struct pv_nbd_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (!e || e->kind != PV_IO_ENGINE_NBD)
        return;
    struct nbd_engine *n = (struct nbd_engine *)e;
    pthread_mutex_lock(&n->lock);
    *out = n->st;
    out->state = (uint32_t)n->state;
    out->inflight = n->inflight;
    out->log_bytes = n->log_bytes;
    out->log_entries = n->log_entries;
    out->log_limit = n->log_limit;
    pthread_mutex_unlock(&n->lock);
}

static void nbd_close(struct pv_io_engine *e)
{
    struct nbd_engine *n = (struct nbd_engine *)e;
    pthread_mutex_lock(&n->ctl_lock);
    pthread_mutex_lock(&n->send_lock);
    pthread_mutex_lock(&n->lock);
    n->stopping = 1;
    int fd = n->fd;
    int connected = n->state == PV_NBD_STATE_CONNECTED;
    pthread_cond_broadcast(&n->txcond);
    pthread_mutex_unlock(&n->lock);
    if (connected && fd >= 0) {
        /* A polite goodbye lets the server drop the connection without logging an error. */
        uint8_t h[NBD_REQ_SIZE];
        put_be32(h, NBD_REQUEST_MAGIC);
        put_be16(h + 4, 0);
        put_be16(h + 6, NBD_CMD_DISC);
        put_be64(h + 8, UINT64_MAX);
        put_be64(h + 16, 0);
        put_be32(h + 24, 0);
        struct iovec v = {h, sizeof(h)};
        sendall(fd, &v, 1);
    }
    if (fd >= 0)
        shutdown(fd, SHUT_RDWR);
    pthread_mutex_unlock(&n->send_lock);
    join_reader(n);
    if (n->tx_running)
        pthread_join(n->txthread, NULL);
    fail_all(n); /* the contract says nothing is outstanding; if something is, it must still complete */
    for (uint32_t c = 0; c < n->nchunks; c++)
        free(n->chunks[c]);
    if (fd >= 0)
        close(fd);
    close(n->state_efd);
    free(n->hdrs);
    free(n->hdr_iov);
    free(n->iov);
    pthread_mutex_unlock(&n->ctl_lock);
    pthread_cond_destroy(&n->txcond);
    pthread_mutex_destroy(&n->lock);
    pthread_mutex_destroy(&n->send_lock);
    pthread_mutex_destroy(&n->ctl_lock);
    free(n);
}

static const struct pv_io_engine_ops nbd_ops = {.submit = nbd_submit, .close = nbd_close};

struct pv_io_engine *pv_io_engine_nbd_open(int sock_fd, uint64_t export_size, uint32_t transmission_flags,
                                           char *err, size_t errlen)
{
    if (!(transmission_flags & PV_NBD_FLAG_HAS_FLAGS)) {
        snprintf(err, errlen, "transmission flags lack NBD_FLAG_HAS_FLAGS");
        return NULL;
    }
    struct nbd_engine *n = calloc(1, sizeof(*n));
    if (!n) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    n->base.ops = &nbd_ops;
    n->base.kind = PV_IO_ENGINE_NBD;
    n->base.inline_completion = 0;
    n->size = export_size;
    n->tflags = transmission_flags;
    n->log_limit = PV_NBD_DEFAULT_LOG_LIMIT;
    n->free_head = NO_SLOT;
    n->txq_head = n->txq_tail = NO_SLOT;
    n->state = PV_NBD_STATE_CONNECTED;
    n->fd = fcntl(sock_fd, F_DUPFD_CLOEXEC, 0);
    if (n->fd < 0) {
        snprintf(err, errlen, "dup: %s", strerror(errno));
        free(n);
        return NULL;
    }
    int rc = set_blocking(n->fd);
    n->state_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (rc || n->state_efd < 0) {
        snprintf(err, errlen, "socket set-up: %s", strerror(rc ? -rc : errno));
        if (n->state_efd >= 0)
            close(n->state_efd);
        close(n->fd);
        free(n);
        return NULL;
    }
    pthread_mutex_init(&n->ctl_lock, NULL);
    pthread_mutex_init(&n->send_lock, NULL);
    pthread_mutex_init(&n->lock, NULL);
    pthread_cond_init(&n->txcond, NULL);
    rc = pthread_create(&n->txthread, NULL, tx_main, n);
    if (rc == 0) {
        n->tx_running = 1;
        rc = -start_reader(n, n->fd);
    }
    if (rc) {
        snprintf(err, errlen, "pthread_create: %s", strerror(rc));
        nbd_close(&n->base);
        return NULL;
    }
    return &n->base;
}
