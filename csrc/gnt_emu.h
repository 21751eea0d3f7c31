/* Emulated grant table.
 *
 * Backend side: a `struct pv_gnt` that reaches a guest's memory only through the guest's v1 grant table,
 * both held in memfds the guest handed over (via the broker).  It enforces what Xen 4.17 enforces
 * (grant_table.c: _set_status_v1, acquire_grant_for_copy, gnttab_copy_buf) with the same GNTST_* results,
 * and keeps GTF_reading/GTF_writing set in the shared entry while a grant is mapped or being copied, so the
 * guest's revoke fails exactly when it would on Xen.  Pin counts live in private memory (Xen's "active
 * entries"); they are per handle, so two handles must not serve the same grant at once (as two backend
 * domains never are granted the same ref).
 *
 * Guest side: helpers to grant and revoke an entry with Xen's ordering rules (grant_table.h:43-91).
 */
#ifndef PVBACK_GNT_EMU_H
#define PVBACK_GNT_EMU_H

#include <stdint.h>

#include "platform.h"

struct pv_gnt *pv_gnt_emu_open(uint16_t self_domid);
/* Make `domid` reachable.  The fds are duplicated (the caller keeps and closes its own).  0 or -errno
 * (-EEXIST if already attached, -EINVAL for sizes that do not fit the fds). */
int pv_gnt_emu_attach(struct pv_gnt *g, uint32_t domid, int mem_fd, uint64_t mem_pages, int gtab_fd,
                      uint32_t nr_entries);
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

#endif
