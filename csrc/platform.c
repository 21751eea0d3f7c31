/* Out-of-line dispatch through the ops tables, so Python (cffi) and code that does not include the
 * inline helpers can call either platform's implementation. */
#include "platform.h"

int pv_gnt_do_copy(struct pv_gnt *g, struct pv_gcopy_seg *segs, uint32_t n) { return g->ops->copy(g, segs, n); }

void *pv_gnt_do_map(struct pv_gnt *g, uint32_t domid, const uint32_t *refs, uint32_t n, int writable,
                    int16_t *status)
{
    return g->ops->map(g, domid, refs, n, writable, status);
}

int pv_gnt_do_unmap(struct pv_gnt *g, void *addr, uint32_t n) { return g->ops->unmap(g, addr, n); }

void pv_gnt_close(struct pv_gnt *g)
{
    if (g)
        g->ops->close(g);
}

int pv_evtchn_do_notify(struct pv_evtchn *e) { return e->ops->notify(e); }
int pv_evtchn_do_pending(struct pv_evtchn *e) { return e->ops->pending(e); }
int pv_evtchn_do_unmask(struct pv_evtchn *e) { return e->ops->unmask(e); }

void pv_evtchn_close(struct pv_evtchn *e)
{
    if (e)
        e->ops->close(e);
}
