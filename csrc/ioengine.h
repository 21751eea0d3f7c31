/* The I/O engine under the block data path: a small ops table so storage transports plug in (FILE and NULL
 * here; an NBD socket engine can be added by implementing `submit`/`close` and calling pv_io_complete).
 *
 * Concurrency contract.  A `struct pv_io` belongs to its submitter until submit(), to the engine until the
 * engine calls pv_io_complete(), then to the submitter's sink.  The sink is the only object shared between
 * threads: a mutex-protected FIFO plus an eventfd that the submitter's event loop watches.  Engines never
 * look at what the submitter does with the result.
 *
 * FILE engine, two modes (the trade-off is measured in reference/baselines-storage-tpm.md):
 *  - inline (nr_threads = 0): preadv/pwritev run in the submitter's thread during submit().  Right for
 *    images in tmpfs or the page cache, where an op costs ~0.7 us and any hand-off to another thread costs a
 *    cross-vCPU wakeup (~20 us each way).
 *    pv_io_engine_file_map() maps the file shared: reads and writes are then a memcpy between the mapping
 *    and the op's buffers (no syscall, no page-cache lookup), guarded against SIGBUS (see ioengine.c).
 *  - thread pool (nr_threads > 0): workers run the syscalls and post completions; right for O_DIRECT files
 *    and block devices, where the device latency dominates and concurrency is what buys IOPS.  With
 *    io_uring, an O_DIRECT file's reads and writes go instead to a ring per submitter (pv_io_engine_attach):
 *    queued without a thread hand-off, completed by the kernel straight into the submitter's eventfd, and
 *    reaped by the submitter in pv_io_sink_take(); the pool keeps flushes, discards and huge iovecs.
 * NULL engine: completes every op at once without touching any buffer, so a read hands back whatever the
 * bounce buffer held (zeros or that same queue's earlier data, never another guest's).  It exists to measure
 * the framework's own cost.
 */
#ifndef PVBACK_IOENGINE_H
#define PVBACK_IOENGINE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define PV_IO_READ 0
#define PV_IO_WRITE 1
#define PV_IO_FLUSH 2            /* fdatasync, no data */
#define PV_IO_WRITE_SYNC 3       /* pwritev then fdatasync (FLUSH/BARRIER carrying data) */
#define PV_IO_DISCARD 4          /* punch a hole / BLKDISCARD */
#define PV_IO_SECURE_DISCARD 5   /* BLKSECDISCARD; files answer -EOPNOTSUPP */

#define PV_IO_ENGINE_NULL 0
#define PV_IO_ENGINE_FILE 1
#define PV_IO_ENGINE_NBD 2 /* reserved for the NBD transport */

struct pv_io_sink;

struct pv_io {
    uint8_t op;
    int32_t result; /* 0 or -errno once completed */
    uint64_t offset; /* bytes */
    uint64_t length; /* bytes: the sum of iov lengths for data ops, the range for discard */
    const struct iovec *iov;
    uint32_t iovcnt;
    struct pv_io_sink *sink;
    struct pv_io *next; /* link: engine job queue, then sink FIFO */
    /* 1 + the index of the sink's registered buffer that holds iov[0] (one-entry iovecs only), 0 = none:
     * an attached ring then reads or writes it with no per-op page pinning (pv_io_sink_buffers). */
    uint32_t fixed;
};

/* Completion FIFO of one submitter (one block queue). */
struct pv_io_sink {
    pthread_mutex_t lock;
    struct pv_io *head;
    struct pv_io *tail;
    int signaled; /* the eventfd was written since the last take: keeps inline completions syscall-free */
    int efd;
    /* Set by pv_io_engine_attach() when the engine completes into a ring the submitter reaps itself
     * (io_uring for O_DIRECT files): the kernel writes `efd` per completion, no thread of ours is woken in
     * between.  Touched by the submitter's thread only (submit, take), so no lock. */
    void *uring;  /* struct io_uring *, owned by the sink */
    int uring_fd; /* the engine's file, to redo a short transfer synchronously */
    uint32_t nbufs; /* slots of the ring's registered-buffer table (pv_io_sink_buffers), 0 = none */
};

int pv_io_sink_init(struct pv_io_sink *s); /* 0 or -errno */
void pv_io_sink_destroy(struct pv_io_sink *s);
/* Detach every completed op (the FIFO's oldest first, then the attached ring's).  Reads the eventfd only if
 * a poster or the ring wrote it. */
struct pv_io *pv_io_sink_take(struct pv_io_sink *s);
/* Registered buffers of an attached ring (io_uring's fixed buffers): a table of `n` empty slots, then one
 * buffer per slot set or cleared (base NULL) as the submitter maps and unmaps memory it does I/O on.  The
 * kernel pins a slot's pages once, at set, instead of at every op.  -EOPNOTSUPP without an attached ring;
 * any -errno (the kernel's refusal: old kernel, memory it cannot pin, RLIMIT_MEMLOCK) means "do without".
 * A cleared slot's pages stay pinned until the ops using it completed; clear before unmapping. */
int pv_io_sink_buffers(struct pv_io_sink *s, uint32_t n);
int pv_io_sink_buffer_set(struct pv_io_sink *s, uint32_t slot, void *base, size_t len);
/* Drop the whole table (before the memory behind it is unmapped en masse). */
void pv_io_sink_buffers_drop(struct pv_io_sink *s);
/* Consume whatever the eventfd holds (call when the loop saw it readable, so it does not stay readable). */
void pv_io_sink_ack(struct pv_io_sink *s);
/* Make the eventfd readable, from any thread: the submitter's loop wakes and looks (a completion's wakeup). */
void pv_io_sink_wake(struct pv_io_sink *s);
/* Lock-free "is anything waiting" hint for pollers (the FIFO or the attached ring). */
int pv_io_sink_nonempty(struct pv_io_sink *s);

/* Engines call this once per op.  `signal` = 0 only when completing inside submit() on the submitter's
 * thread (the submitter harvests right after). */
void pv_io_complete(struct pv_io *io, int32_t result, int signal);

struct pv_io_engine;
struct pv_io_engine_ops {
    /* Take ownership of `n` ops; every one is completed exactly once (errors go in its result). */
    void (*submit)(struct pv_io_engine *e, struct pv_io **ios, uint32_t n);
    /* Stop workers and free.  No op may be outstanding. */
    void (*close)(struct pv_io_engine *e);
    /* Optional: give this submitter's sink a completion ring it reaps in its own thread.  0, or -errno (the
     * engine then completes through its threads as before).  Every sink attached must be destroyed before
     * the engine is closed. */
    int (*attach)(struct pv_io_engine *e, struct pv_io_sink *s);
};

struct pv_io_engine {
    const struct pv_io_engine_ops *ops;
    uint32_t kind;
    uint32_t inline_completion; /* 1: every op is completed before submit() returns */
};

struct pv_io_engine *pv_io_engine_null_open(void);
/* `fd` is duplicated (the engine's lifetime is its own).  nr_threads = 0: inline. */
struct pv_io_engine *pv_io_engine_file_open(int fd, uint32_t nr_threads, char *err, size_t errlen);
void pv_io_engine_submit(struct pv_io_engine *e, struct pv_io **ios, uint32_t n);
/* Inline FILE engines only: serve reads and writes within the file's current size through a shared mapping.
 * Call before the first submit.  0 or -errno (err says why); the engine keeps working unmapped on failure. */
int pv_io_engine_file_map(struct pv_io_engine *e, char *err, size_t errlen);
/* Mapped copies that faulted (file shrunk, no room for a hole's page) and were redone with a syscall. */
uint64_t pv_io_engine_file_map_faults(const struct pv_io_engine *e);
/* See pv_io_engine_ops.attach; -EOPNOTSUPP for engines without one. */
int pv_io_engine_attach(struct pv_io_engine *e, struct pv_io_sink *s);
void pv_io_engine_close(struct pv_io_engine *e);
uint32_t pv_io_engine_kind(const struct pv_io_engine *e);
uint32_t pv_io_engine_inline(const struct pv_io_engine *e);

/* Run one op synchronously on `fd` (what the FILE engine's workers do); returns 0 or -errno. */
int32_t pv_io_execute(int fd, int is_blockdev, const struct pv_io *io);

#endif
