/* Real Xen behind the platform seam: libxengnttab.so.1 and libxenevtchn.so.1 loaded with dlopen at run
 * time, so building pvback needs neither Xen headers nor Xen libraries, and a machine without Xen gets a
 * clear error instead of a missing-symbol failure at import.
 *
 * Both constructors return NULL and write a one-line reason into err (libraries absent, /dev/xen node absent,
 * permission denied...).  The returned objects are freed through their ops->close.
 */
#ifndef PVBACK_XEN_DL_H
#define PVBACK_XEN_DL_H

#include <stddef.h>
#include <stdint.h>

#include "platform.h"

/* Opens a gntdev handle.  Probes GNTTABOP_copy support the way QEMU does (a zero-count grant copy); without
 * it, copy() falls back to map + memcpy + unmap per segment. */
struct pv_gnt *pv_gnt_xen_open(char *err, size_t errlen);

/* 1 if the handle uses the kernel's grant copy, 0 if it emulates it with map+memcpy+unmap, -1 if g is not a
 * real-Xen handle. */
int pv_gnt_xen_has_copy(struct pv_gnt *g);

/* Binds a local port to (domid, remote_port) on a handle of its own, so every port has its own pollable fd.
 * Xen marks a freshly bound interdomain port pending: the first pending() after bind reports an event. */
struct pv_evtchn *pv_evtchn_xen_bind(uint32_t domid, uint32_t remote_port, char *err, size_t errlen);

#endif
