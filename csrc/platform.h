/* The platform seam at the C level: grant-table and event-channel operations behind small ops tables, so the
 * data paths (blk, net, tpm) call the same functions on real Xen (libxengnttab/libxenevtchn, loaded at run
 * time) and on the emulated platform (guest memfds + eventfds).  Nothing here decides policy.
 *
 * Status codes are Xen's GNTST_* values (grant_table.h), so a caller cannot tell the platforms apart.
 */
#ifndef PVBACK_PLATFORM_H
#define PVBACK_PLATFORM_H

#include <stdint.h>

#define PV_PAGE_SIZE 4096u

/* GNTST_* (xen/include/public/grant_table.h) */
#define PV_GNTST_okay 0
#define PV_GNTST_general_error (-1)
#define PV_GNTST_bad_domain (-2)
#define PV_GNTST_bad_gntref (-3)
#define PV_GNTST_bad_handle (-4)
#define PV_GNTST_bad_virt_addr (-5)
#define PV_GNTST_bad_dev_addr (-6)
#define PV_GNTST_no_device_space (-7)
#define PV_GNTST_permission_denied (-8)
#define PV_GNTST_bad_page (-9)
#define PV_GNTST_bad_copy_arg (-10)
#define PV_GNTST_address_too_big (-11)
#define PV_GNTST_eagain (-12)
#define PV_GNTST_no_space (-13)

/* Grant entry v1 flags (grant_table.h) */
#define PV_GTF_invalid 0u
#define PV_GTF_permit_access 1u
#define PV_GTF_type_mask 3u
#define PV_GTF_readonly (1u << 2)
#define PV_GTF_reading (1u << 3)
#define PV_GTF_writing (1u << 4)

struct pv_grant_entry_v1 {
    uint16_t flags;
    uint16_t domid;
    uint32_t frame;
};

/* Same layout as xengnttab_grant_copy_segment_t, so the Xen implementation passes the array straight to
 * xengnttab_grant_copy(). */
#define PV_GCOPY_SOURCE_GREF 0x1u /* GNTCOPY_source_gref */
#define PV_GCOPY_DEST_GREF 0x2u   /* GNTCOPY_dest_gref */
union pv_gcopy_ptr {
    void *virt;
    struct {
        uint32_t ref;
        uint16_t offset;
        uint16_t domid;
    } foreign;
};
struct pv_gcopy_seg {
    union pv_gcopy_ptr source;
    union pv_gcopy_ptr dest;
    uint16_t len;
    uint16_t flags;
    int16_t status;
};

struct pv_gnt;
struct pv_gnt_ops {
    /* Execute `n` copy segments; each gets its own GNTST status.  Returns 0, or -errno if the whole call
     * failed (then every status is set to an error too). offset + len must stay within one page. */
    int (*copy)(struct pv_gnt *g, struct pv_gcopy_seg *segs, uint32_t n);
    /* Map `n` grants of domain `domid` into one virtually contiguous range, read-only unless `writable`.
     * All or nothing (as xengnttab_map_domain_grant_refs): on failure returns NULL and stores the GNTST
     * status of the first failing ref in *status. */
    void *(*map)(struct pv_gnt *g, uint32_t domid, const uint32_t *refs, uint32_t n, int writable,
                 int16_t *status);
    /* Unmap a range returned by map (n = the count given to map). Returns 0 or -errno. */
    int (*unmap)(struct pv_gnt *g, void *addr, uint32_t n);
    void (*close)(struct pv_gnt *g);
};
struct pv_gnt {
    const struct pv_gnt_ops *ops;
    int64_t live_mappings; /* pages currently mapped through this handle: leak checks read it */
    /* 1: a mapping is ordinary memory of this process, which the kernel may pin long-term (io_uring
     * registered buffers).  0 under Xen: gntdev mappings are foreign pages, and registering them has never
     * run under real Xen (the real-Xen test's dom0 build has no io_uring). */
    uint32_t mappings_pinnable;
};

static inline int pv_gnt_copy(struct pv_gnt *g, struct pv_gcopy_seg *s, uint32_t n)
{
    return g->ops->copy(g, s, n);
}
static inline void *pv_gnt_map(struct pv_gnt *g, uint32_t domid, const uint32_t *refs, uint32_t n, int w,
                               int16_t *st)
{
    return g->ops->map(g, domid, refs, n, w, st);
}
static inline int pv_gnt_unmap(struct pv_gnt *g, void *addr, uint32_t n) { return g->ops->unmap(g, addr, n); }

/* One bound interdomain event channel (one port), with its own pollable fd. */
struct pv_evtchn;
struct pv_evtchn_ops {
    int (*notify)(struct pv_evtchn *e);  /* 0 or -errno */
    int (*pending)(struct pv_evtchn *e); /* 1 if an event arrived (and acknowledges it), 0 if none, -errno */
    int (*unmask)(struct pv_evtchn *e);  /* re-enable delivery after the work is drained */
    void (*close)(struct pv_evtchn *e);  /* unbind and free */
};
struct pv_evtchn {
    const struct pv_evtchn_ops *ops;
    int fd;               /* readable when an event may be pending */
    uint32_t local_port;
    uint32_t remote_port;
    uint32_t remote_domid;
};

static inline int pv_evtchn_notify(struct pv_evtchn *e) { return e->ops->notify(e); }

/* Out-of-line dispatch (csrc/platform.c), for callers that cannot use the inline helpers (cffi). */
int pv_gnt_do_copy(struct pv_gnt *g, struct pv_gcopy_seg *segs, uint32_t n);
void *pv_gnt_do_map(struct pv_gnt *g, uint32_t domid, const uint32_t *refs, uint32_t n, int writable,
                    int16_t *status);
int pv_gnt_do_unmap(struct pv_gnt *g, void *addr, uint32_t n);
void pv_gnt_close(struct pv_gnt *g);
int pv_evtchn_do_notify(struct pv_evtchn *e);
int pv_evtchn_do_pending(struct pv_evtchn *e);
int pv_evtchn_do_unmask(struct pv_evtchn *e);
void pv_evtchn_close(struct pv_evtchn *e);

#endif
