/* blkif (xen/include/public/io/blkif.h) wire layouts for both x86 ABIs, a private normalized request, and the
 * validator.
 *
 * The frontend's slot is copied out of shared memory once (ring.c) and converted from its ABI into
 * `struct pv_blkif_req` here, once; every check then runs on that private copy (XSA-155).  Each refusal
 * carries a precise reason code so the data path can count it.
 *
 * Sector units follow the 2024 specification (Xen commit 221f2748e8da): sector_number, first_sect/last_sect,
 * nr_sectors and the `sectors` key are always 512-byte units; `sector-size` (512 or 4096) is only the logical
 * block size every request must be aligned to.
 *
 * The packed structs below mirror the official headers byte for byte (tests compare their offsets with
 * offsetof() on the real headers compiled -m64 and -m32); they are never used in place on shared memory.
 */
#ifndef PVBACK_BLKIF_H
#define PVBACK_BLKIF_H

#include <stdint.h>

#define PV_BLKIF_OP_READ 0
#define PV_BLKIF_OP_WRITE 1
#define PV_BLKIF_OP_WRITE_BARRIER 2
#define PV_BLKIF_OP_FLUSH_DISKCACHE 3
#define PV_BLKIF_OP_RESERVED_1 4
#define PV_BLKIF_OP_DISCARD 5
#define PV_BLKIF_OP_INDIRECT 6

#define PV_BLKIF_MAX_SEGMENTS_PER_REQUEST 11
#define PV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST 8
#define PV_BLKIF_SEGS_PER_INDIRECT_FRAME 512 /* 4096 / sizeof(struct pv_blkif_segment) */
#define PV_BLKIF_MAX_INDIRECT_SEGMENTS (PV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * PV_BLKIF_SEGS_PER_INDIRECT_FRAME)
#define PV_BLKIF_DISCARD_SECURE 1

#define PV_BLKIF_RSP_OKAY 0
#define PV_BLKIF_RSP_ERROR (-1)
#define PV_BLKIF_RSP_EOPNOTSUPP (-2)

#define PV_VDISK_CDROM 1
#define PV_VDISK_REMOVABLE 2
#define PV_VDISK_READONLY 4

#define PV_BLKIF_SECTOR_SHIFT 9
#define PV_BLKIF_SECTORS_PER_PAGE 8 /* 4 KiB Xen pages whatever the host page size */

/* Frontend ABIs (the `protocol` key). */
#define PV_BLKIF_ABI_X86_32 1
#define PV_BLKIF_ABI_X86_64 2

/* ---- wire layouts ------------------------------------------------------------------------------------- */

struct pv_blkif_segment {
    uint32_t gref;
    uint8_t first_sect;
    uint8_t last_sect;
    uint16_t _pad;
} __attribute__((packed));

struct pv_blkif_x86_64_request {
    uint8_t operation;
    uint8_t nr_segments;
    uint16_t handle;
    uint32_t _pad1;
    uint64_t id;
    uint64_t sector_number;
    struct pv_blkif_segment seg[PV_BLKIF_MAX_SEGMENTS_PER_REQUEST];
} __attribute__((packed));

struct pv_blkif_x86_32_request {
    uint8_t operation;
    uint8_t nr_segments;
    uint16_t handle;
    uint64_t id;
    uint64_t sector_number;
    struct pv_blkif_segment seg[PV_BLKIF_MAX_SEGMENTS_PER_REQUEST];
} __attribute__((packed));

struct pv_blkif_x86_64_request_discard {
    uint8_t operation;
    uint8_t flag;
    uint16_t handle;
    uint32_t _pad1;
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors;
} __attribute__((packed));

struct pv_blkif_x86_32_request_discard {
    uint8_t operation;
    uint8_t flag;
    uint16_t handle;
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors;
} __attribute__((packed));

struct pv_blkif_x86_64_request_indirect {
    uint8_t operation;
    uint8_t indirect_op;
    uint16_t nr_segments;
    uint32_t _pad1;
    uint64_t id;
    uint64_t sector_number;
    uint16_t handle;
    uint16_t _pad2;
    uint32_t indirect_grefs[PV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint32_t _pad3;
} __attribute__((packed, aligned(4))); /* aligned: the gref array is 4-aligned in both ABIs */

struct pv_blkif_x86_32_request_indirect {
    uint8_t operation;
    uint8_t indirect_op;
    uint16_t nr_segments;
    uint64_t id;
    uint64_t sector_number;
    uint16_t handle;
    uint16_t _pad1;
    uint32_t indirect_grefs[PV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint64_t _pad2;
} __attribute__((packed, aligned(4))); /* aligned: the gref array is 4-aligned in both ABIs */

struct pv_blkif_x86_64_response {
    uint64_t id;
    uint8_t operation;
    uint8_t _pad1;
    int16_t status;
    uint32_t _pad2;
} __attribute__((packed));

struct pv_blkif_x86_32_response {
    uint64_t id;
    uint8_t operation;
    uint8_t _pad1;
    int16_t status;
} __attribute__((packed));

/* Ring slot = sizeof(union {request, response}); the request is the largest member on both ABIs. */
#define PV_BLKIF_X86_64_SLOT_SIZE 112
#define PV_BLKIF_X86_32_SLOT_SIZE 108
#define PV_BLKIF_X86_64_RSP_SIZE 16
#define PV_BLKIF_X86_32_RSP_SIZE 12

_Static_assert(sizeof(struct pv_blkif_segment) == 8, "segment");
_Static_assert(sizeof(struct pv_blkif_x86_64_request) == PV_BLKIF_X86_64_SLOT_SIZE, "x86_64 request");
_Static_assert(sizeof(struct pv_blkif_x86_32_request) == PV_BLKIF_X86_32_SLOT_SIZE, "x86_32 request");
_Static_assert(sizeof(struct pv_blkif_x86_64_request_discard) == 32, "x86_64 discard");
_Static_assert(sizeof(struct pv_blkif_x86_32_request_discard) == 28, "x86_32 discard");
_Static_assert(sizeof(struct pv_blkif_x86_64_request_indirect) == 64, "x86_64 indirect");
_Static_assert(sizeof(struct pv_blkif_x86_32_request_indirect) == 64, "x86_32 indirect");
_Static_assert(sizeof(struct pv_blkif_x86_64_response) == PV_BLKIF_X86_64_RSP_SIZE, "x86_64 response");
_Static_assert(sizeof(struct pv_blkif_x86_32_response) == PV_BLKIF_X86_32_RSP_SIZE, "x86_32 response");

/* ---- private side ------------------------------------------------------------------------------------- */

/* Why a request was refused (or failed later).  Index into the per-reason error counters. */
#define PV_BLKIF_OK 0
#define PV_BLKIF_E_BAD_OP 1          /* unknown operation code (answered EOPNOTSUPP) */
#define PV_BLKIF_E_UNSUPPORTED 2     /* known op the disk does not offer (answered EOPNOTSUPP) */
#define PV_BLKIF_E_NSEG 3            /* direct r/w with 0 or > 11 segments, flush/barrier with > 11 */
#define PV_BLKIF_E_INDIRECT_NSEG 4   /* indirect with 0 or > max_indirect_segments segments */
#define PV_BLKIF_E_INDIRECT_OP 5     /* indirect_op other than READ/WRITE */
#define PV_BLKIF_E_SECT_ORDER 6      /* first_sect > last_sect */
#define PV_BLKIF_E_SECT_PAGE 7       /* last_sect > 7: beyond the 4 KiB page */
#define PV_BLKIF_E_RANGE 8           /* end of the request beyond the end of the disk */
#define PV_BLKIF_E_OVERFLOW 9        /* sector_number + length wraps 2^64 */
#define PV_BLKIF_E_ALIGN 10          /* not aligned to the logical sector size */
#define PV_BLKIF_E_READONLY 11       /* write/discard/barrier/flush-with-data to a read-only disk */
#define PV_BLKIF_E_ABI 12            /* unknown ABI (a caller bug, not a guest's) */
#define PV_BLKIF_E_GRANT 13          /* a grant copy/map of this request failed */
#define PV_BLKIF_E_IO 14             /* the storage returned an error */
#define PV_BLKIF_E_NOMEM 15          /* no bounce memory for this request */
#define PV_BLKIF_NR_REASONS 16

/* What the validator needs to know about the disk.  `sectors` is in 512-byte units. */
struct pv_blkif_disk {
    uint64_t sectors;
    uint32_t sector_size;           /* 512 or 4096 (power of two, >= 512) */
    uint32_t max_indirect_segments; /* 0: indirect not offered */
    uint8_t readonly;
    uint8_t can_flush;
    uint8_t can_barrier;
    uint8_t can_discard;
    uint8_t can_secure_discard;
};

/* One request after copy-out, ABI-neutral.  For INDIRECT, `op` holds indirect_op and `operation` the wire
 * code (echoed in the response); the segments live in the indirect pages, fetched separately. */
struct pv_blkif_req {
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors; /* discard: from the request; r/w: sum of segments, set by validation */
    uint8_t operation;   /* wire code, echoed */
    uint8_t op;          /* effective operation */
    uint8_t flag;        /* discard flags */
    uint8_t indirect;    /* 1 when operation == INDIRECT */
    uint16_t handle;
    uint16_t nr_segments;
    uint8_t nr_indirect_pages;
    uint32_t indirect_grefs[PV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    struct pv_blkif_segment seg[PV_BLKIF_MAX_SEGMENTS_PER_REQUEST]; /* direct requests only */
};

/* Slot and response sizes for an ABI (0 for an unknown ABI). */
uint32_t pv_blkif_slot_size(uint32_t abi);
uint32_t pv_blkif_rsp_size(uint32_t abi);

/* Convert a private copy of one slot (pv_blkif_slot_size(abi) bytes) into `out`.  Never fails except for an
 * unknown ABI (returns PV_BLKIF_E_ABI); the fields are not checked here. */
int pv_blkif_parse(uint32_t abi, const void *slot, struct pv_blkif_req *out);

/* Check everything that can be checked without the indirect pages.  For direct requests this is the whole
 * validation (segments, range, alignment, permissions) and sets nr_sectors; for INDIRECT it checks op,
 * indirect_op, nr_segments against the disk's limit and sets nr_indirect_pages.  Returns PV_BLKIF_OK or a
 * PV_BLKIF_E_* reason. */
int pv_blkif_validate(const struct pv_blkif_disk *disk, struct pv_blkif_req *req);

/* Second stage for INDIRECT: check the `req->nr_segments` segments fetched from the indirect pages (a
 * private copy), then the range; sets nr_sectors. */
int pv_blkif_validate_segments(const struct pv_blkif_disk *disk, struct pv_blkif_req *req,
                               const struct pv_blkif_segment *segs, uint32_t nseg);

/* parse + validate in one call (the test entry point over raw slot bytes). */
int pv_blkif_copy_validate(uint32_t abi, const void *slot, const struct pv_blkif_disk *disk,
                           struct pv_blkif_req *out);

/* Request shapes: the class of a request as it arrived (valid or not), for recording what a frontend really
 * sends: op (read write barrier flush discard discard-secure indirect-read indirect-write other) x segment
 * count (0, 1, 2-11, 12+) x sector_number (zero, inside the disk, max = 2^64-1, beyond the end) x segment fill
 * (- none, full pages, sub-page).  Discards count as 0 segments.  `segs`/`nseg`: the segments to judge the
 * fill by (a private copy; none for an indirect request whose pages were not fetched). */
#define PV_BLKIF_SHAPE_OPS 9
#define PV_BLKIF_SHAPE_SEGS 4
#define PV_BLKIF_SHAPE_SECTORS 4
#define PV_BLKIF_SHAPE_FILLS 3
#define PV_BLKIF_NR_SHAPES 432 /* the product of the four */
uint32_t pv_blkif_shape(const struct pv_blkif_disk *disk, const struct pv_blkif_req *req,
                        const struct pv_blkif_segment *segs, uint32_t nseg);
/* "op/segs/sector/fill", e.g. "flush/0/max/-"; returns its length, or -1 (bad index, buffer too small). */
int pv_blkif_shape_name(uint32_t shape, char *buf, uint32_t len);

/* BLKIF_RSP_* status for a reason: EOPNOTSUPP for unsupported operations, ERROR otherwise. */
int16_t pv_blkif_reason_status(int reason);
const char *pv_blkif_reason_name(int reason);

/* Build one response for `abi` into `out` (pv_blkif_rsp_size(abi) bytes): zeroed first, then the three fields
 * stored one by one, so no byte of ours beyond them ever reaches the guest (XSA-216).  Returns the size. */
uint32_t pv_blkif_make_response(uint32_t abi, void *out, uint64_t id, uint8_t operation, int16_t status);

#endif
