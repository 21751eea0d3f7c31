/* Emulated event channel: one bound port is a pair of eventfds, one per direction (the broker creates them
 * and hands each end the pair crossed over).  notify = write the peer's eventfd; pending = read our own
 * (non-blocking: the asyncio reader calls it when the fd is readable).  An eventfd counter collapses any
 * number of notifications into one, like Xen's single pending bit. */
#ifndef PVBACK_EVTCHN_EMU_H
#define PVBACK_EVTCHN_EMU_H

#include <stdint.h>

#include "platform.h"

/* Takes ownership of both fds on success (they are closed by pv_evtchn_close); NULL with errno on failure,
 * then the caller still owns them. */
struct pv_evtchn *pv_evtchn_emu_open(int wake_fd, int notify_fd, uint32_t local_port, uint32_t remote_domid,
                                     uint32_t remote_port);

#endif
