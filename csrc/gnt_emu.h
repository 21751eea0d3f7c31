/* Emulated grant table.
 *
 * Backend side: a `struct pv_gnt` that reaches a guest's memory only through the guest's v1 grant table,
 * both held in memfds the guest handed over (via the broker).  It enforces what Xen 4.17 enforces
 * (grant_table.c: _set_status_v1, acquire_grant_for_copy, gnttab_copy_buf) with the same GNTST_* results,
 * and keeps GTF_reading/GTF_writing set in the shared entry while a grant is mapped or being copied, so the
 * guest's revoke fails exactly when it would on Xen.  Pin counts (Xen's "active entries") are per handle
 * and per guest, kept in a pin table: a memfd the broker creates and also holds, so when a backend process
 * dies the broker can clear the bits its pins held (pv_gnt_emu_release_pins), as Xen does when the
 * kernel's gntdev unmaps a dead process's grants.  A handle's own release clears the bits without looking
 * at other handles' tables, so two live handles must not serve the same grant at once (as two backend
 * domains are never granted the same ref); the dead-backend release does look, because a new backend
 * instance may already be serving the grants of the one that died.
 *
 * Guest side: helpers to grant and revoke an entry with Xen's ordering rules (grant_table.h:43-91).
 */
#ifndef PVBACK_GNT_EMU_H
#define PVBACK_GNT_EMU_H

#include <stdint.h>

#include "platform.h"

/* Pin table layout (shared between a backend and the broker).  Counts are written only by the owning
 * handle, under its lock; the broker reads them.  `reaping` is raised by the broker while it releases a
 * dead handle's pins of the same guest: a handle that sets a bit from a zero count checks it afterwards
 * (Dekker-style, both sides fenced), so the broker never clears a bit a live handle has just taken. */
struct pv_gnt_emu_pin {
    uint32_t pin;   /* users of this ref through this handle (maps + copies in flight) */
    uint32_t wpin;  /* of which writable */
    uint32_t frame; /* frame read when the first pin was taken: later guest edits do not move a pinned grant */
};
struct pv_gnt_emu_pintab {
    uint32_t reaping;
    uint32_t reserved[15]; /* one cache line: the broker's writes to `reaping` do not bounce the entries */
    struct pv_gnt_emu_pin e[];
};
/* Bytes of a pin table for `nr_entries` grant entries. */
uint64_t pv_gnt_emu_pintab_size(uint32_t nr_entries);

struct pv_gnt *pv_gnt_emu_open(uint16_t self_domid);
/* Make `domid` reachable.  The fds are duplicated (the caller keeps and closes its own).  `pin_fd` is the
 * pin table the broker made for this (backend, guest) pair, a memfd of at least pv_gnt_emu_pintab_size()
 * bytes sealed against shrinking, all zero; -1 keeps the counts in private memory instead (tests without a
 * broker: nobody can release them if the process dies).  0 or -errno (-EEXIST if already attached, -EINVAL
 * for sizes that do not fit the fds, -EPERM for unsealed memfds). */
int pv_gnt_emu_attach(struct pv_gnt *g, uint32_t domid, int mem_fd, uint64_t mem_pages, int gtab_fd,
                      uint32_t nr_entries, int pin_fd);
/* 0, -ENOENT if not attached, -EBUSY while pages of it are mapped or grants of it are pinned. */
int pv_gnt_emu_detach(struct pv_gnt *g, uint32_t domid);
/* Pinned grants (mapped or mid-copy) of `domid` through this handle: tests and leak checks. */
int64_t pv_gnt_emu_pinned(struct pv_gnt *g, uint32_t domid);

/* Guest side, on the guest's own mapping of its grant table of `nr_entries` entries.
 * grant: domid and frame first, then a release barrier, then flags.  -EINVAL for a bad ref, -EBUSY if the
 * entry is still in use (permit_access, reading or writing set).
 * revoke: clears flags with a cmpxchg that fails with -EBUSY while GTF_reading|GTF_writing are set. */
int pv_gnt_emu_grant(void *gtab, uint32_t nr_entries, uint32_t ref, uint16_t domid, uint32_t frame,
                     int readonly);
int pv_gnt_emu_revoke(void *gtab, uint32_t nr_entries, uint32_t ref);

/* Broker side: the handle owning pin table `dead` is gone (its process died or exited).  For every ref it
 * still pinned, clear GTF_reading in the guest's entry unless a table in `others` (the live handles of the
 * same guest) still holds a pin on it, and GTF_writing unless one holds a writable pin; then zero `dead`.
 * Returns the number of refs `dead` had pinned.  `others` may be NULL when n_other is 0. */
int64_t pv_gnt_emu_release_pins(void *gtab, uint32_t nr_entries, void *dead, void *const *others,
                                uint32_t n_other);

#endif
