/* NBD I/O engine: the transmission phase of the NBD protocol (doc/proto.md of the NBD project) under the
 * block data path.  The handshake happens in Python (backends/drivers/storage/nbd.py); the socket arrives
 * here ready for requests.
 *
 * Threads.  submit() frames a batch and sends it from the caller's thread (one sendmsg per batch where the
 * iovec fits), so the common path costs no hand-off.  A reader thread per connection parses simple replies,
 * scatters read data into the op's iovec and completes ops into their sinks.  A small tx thread sends what
 * the reader discovers must be sent (the FLUSH half of a WRITE_SYNC on a server without FUA, flushes that
 * bound the replay log, writes held back by that bound): the reader itself never sends, because a reader
 * blocked in send() while the server blocks sending replies to us is a deadlock.
 * Locks: send_lock (the socket's write side) is taken before lock (the tables); the reader takes only lock.
 *
 * Reconnect.  A dropped connection does not fail ops: the engine goes DISCONNECTED, writes its state eventfd
 * and keeps every unanswered op.  pv_io_engine_nbd_reconnect() (a new, handshaken socket) first rewrites
 * the replay log, then resends every unanswered op.  The replay log holds a copy of every write acknowledged
 * since the last completed flush, because a server may lose its volatile cache together with the
 * connection: after the replay the new server holds every byte the guest was told is written.  The log is
 * bounded: past the bound a flush is issued and new writes wait for it.  A server that offers no flush
 * claims to have no volatile cache, so nothing is logged for it.  pv_io_engine_nbd_fail() ends it: every
 * unanswered op completes with -EIO, and later ops fail at once.
 */
#ifndef PVBACK_IO_NBD_H
#define PVBACK_IO_NBD_H

#include <stddef.h>
#include <stdint.h>

#include "ioengine.h"

/* Transmission flags (NBD_FLAG_*). */
#define PV_NBD_FLAG_HAS_FLAGS (1u << 0)
#define PV_NBD_FLAG_READ_ONLY (1u << 1)
#define PV_NBD_FLAG_SEND_FLUSH (1u << 2)
#define PV_NBD_FLAG_SEND_FUA (1u << 3)
#define PV_NBD_FLAG_ROTATIONAL (1u << 4)
#define PV_NBD_FLAG_SEND_TRIM (1u << 5)
#define PV_NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define PV_NBD_FLAG_CAN_MULTI_CONN (1u << 8)

#define PV_NBD_STATE_CONNECTED 0
#define PV_NBD_STATE_DISCONNECTED 1
#define PV_NBD_STATE_FAILED 2

#define PV_NBD_DEFAULT_LOG_LIMIT (64ull << 20)
#define PV_NBD_MAX_PAYLOAD (32u << 20) /* the largest READ/WRITE most servers take (nbdkit, qemu-nbd) */

struct pv_nbd_stats {
    uint32_t state;
    uint32_t inflight;          /* ops taken and not completed */
    uint64_t log_bytes;         /* replay log: bytes held */
    uint64_t log_entries;
    uint64_t log_limit;
    uint64_t reconnects;
    uint64_t replayed_writes;   /* log entries rewritten on new connections */
    uint64_t resent_commands;   /* unanswered commands sent again on new connections */
    uint64_t bound_flushes;     /* flushes the engine issued to keep the log within its bound */
    uint64_t commands_sent;
    uint64_t replies;
};

/* sock_fd is duplicated (the caller keeps and closes its own) and switched to blocking mode. */
struct pv_io_engine *pv_io_engine_nbd_open(int sock_fd, uint64_t export_size, uint32_t transmission_flags,
                                           char *err, size_t errlen);
/* Readable when the state changed (read it with pv_io_engine_nbd_state, which also drains the eventfd). */
int pv_io_engine_nbd_state_fd(struct pv_io_engine *e);
int pv_io_engine_nbd_state(struct pv_io_engine *e);
/* Blocking: replays the log on new_fd (dup'd), then resends unanswered ops.  0, or -errno with the engine
 * still DISCONNECTED (try again with another socket).  -EINVAL: not an NBD engine or already failed. */
int pv_io_engine_nbd_reconnect(struct pv_io_engine *e, int new_fd);
/* Give up: the connection is shut down, unanswered ops complete with -EIO, later ops fail at once. */
void pv_io_engine_nbd_fail(struct pv_io_engine *e);
void pv_io_engine_nbd_set_log_limit(struct pv_io_engine *e, uint64_t bytes);
void pv_io_engine_nbd_get_stats(struct pv_io_engine *e, struct pv_nbd_stats *out);

#endif
