/* blkif copy-out, validation and responses; see blkif.h.  Everything here works on private memory only. */
#include "blkif.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

uint32_t pv_blkif_slot_size(uint32_t abi)
{
    switch (abi) {
    case PV_BLKIF_ABI_X86_64:
        return PV_BLKIF_X86_64_SLOT_SIZE;
    case PV_BLKIF_ABI_X86_32:
        return PV_BLKIF_X86_32_SLOT_SIZE;
    default:
        return 0;
    }
}

uint32_t pv_blkif_rsp_size(uint32_t abi)
{
    switch (abi) {
    case PV_BLKIF_ABI_X86_64:
        return PV_BLKIF_X86_64_RSP_SIZE;
    case PV_BLKIF_ABI_X86_32:
        return PV_BLKIF_X86_32_RSP_SIZE;
    default:
        return 0;
    }
}

/* The three request shapes share operation/id/sector_number positions within one ABI, but not the rest, so
 * each ABI gets its own field-by-field conversion (as Linux's blkif_get_x86_{32,64}_req). */
#define PARSE_ABI(REQ, DISC, IND)                                                                              \
    do {                                                                                                       \
        const struct REQ *r = slot;                                                                            \
        out->operation = r->operation;                                                                         \
        out->op = r->operation;                                                                                \
        out->id = r->id;                                                                                       \
        out->sector_number = r->sector_number;                                                                 \
        switch (r->operation) {                                                                                \
        case PV_BLKIF_OP_DISCARD: {                                                                            \
            const struct DISC *d = slot;                                                                       \
            out->flag = d->flag;                                                                               \
            out->handle = d->handle;                                                                           \
            out->nr_sectors = d->nr_sectors;                                                                   \
            break;                                                                                             \
        }                                                                                                      \
        case PV_BLKIF_OP_INDIRECT: {                                                                           \
            const struct IND *in = slot;                                                                       \
            out->indirect = 1;                                                                                 \
            out->op = in->indirect_op;                                                                         \
            out->nr_segments = in->nr_segments;                                                                \
            out->handle = in->handle;                                                                          \
            memcpy(out->indirect_grefs, in->indirect_grefs, sizeof(out->indirect_grefs));                      \
            break;                                                                                             \
        }                                                                                                      \
        default:                                                                                               \
            out->handle = r->handle;                                                                           \
            out->nr_segments = r->nr_segments;                                                                 \
            /* Copy all 11 even if nr_segments says fewer: the count is checked later, on this copy. */       \
            memcpy(out->seg, r->seg, sizeof(out->seg));                                                        \
            break;                                                                                             \
        }                                                                                                      \
    } while (0)

int pv_blkif_parse(uint32_t abi, const void *slot, struct pv_blkif_req *out)
{
    memset(out, 0, sizeof(*out));
    switch (abi) {
    case PV_BLKIF_ABI_X86_64:
        PARSE_ABI(pv_blkif_x86_64_request, pv_blkif_x86_64_request_discard, pv_blkif_x86_64_request_indirect);
        return PV_BLKIF_OK;
    case PV_BLKIF_ABI_X86_32:
        PARSE_ABI(pv_blkif_x86_32_request, pv_blkif_x86_32_request_discard, pv_blkif_x86_32_request_indirect);
        return PV_BLKIF_OK;
    default:
        return PV_BLKIF_E_ABI;
    }
}

/* start + nr (both 512-byte sectors) must fit the disk and be aligned to the logical sector size. */
static int check_range(const struct pv_blkif_disk *disk, uint64_t start, uint64_t nr)
{
    uint64_t end;
    if (__builtin_add_overflow(start, nr, &end))
        return PV_BLKIF_E_OVERFLOW;
    uint64_t per = disk->sector_size >> PV_BLKIF_SECTOR_SHIFT; /* 512-byte sectors per logical sector */
    if (per > 1 && ((start | nr) & (per - 1)))
        return PV_BLKIF_E_ALIGN;
    if (end > __atomic_load_n(&disk->sectors, __ATOMIC_RELAXED)) /* resized from another thread */
        return PV_BLKIF_E_RANGE;
    return PV_BLKIF_OK;
}

int pv_blkif_validate_segments(const struct pv_blkif_disk *disk, struct pv_blkif_req *req,
                               const struct pv_blkif_segment *segs, uint32_t nseg)
{
    uint64_t per = disk->sector_size >> PV_BLKIF_SECTOR_SHIFT;
    uint64_t total = 0;
    for (uint32_t i = 0; i < nseg; i++) {
        uint8_t first = segs[i].first_sect, last = segs[i].last_sect;
        if (last >= PV_BLKIF_SECTORS_PER_PAGE)
            return PV_BLKIF_E_SECT_PAGE;
        if (first > last)
            return PV_BLKIF_E_SECT_ORDER;
        /* Every segment must start and end on a logical-sector boundary, or the I/O below would be a
         * read-modify-write of part of a logical block (and O_DIRECT would refuse it anyway). */
        if (per > 1 && ((first | (uint32_t)(last + 1)) & (per - 1)))
            return PV_BLKIF_E_ALIGN;
        total += (uint64_t)(last - first + 1);
    }
    req->nr_sectors = total;
    /* A request without segments (an empty flush or barrier) carries no range: Linux blkfront leaves the block
     * layer's sector_number of -1 in it, and Linux blkback checks the range only when there are sectors. */
    if (total == 0)
        return PV_BLKIF_OK;
    int rc = check_range(disk, req->sector_number, total);
    if (rc != PV_BLKIF_OK)
        req->nr_sectors = 0;
    return rc;
}

static int validate_rw(const struct pv_blkif_disk *disk, struct pv_blkif_req *req, int min_segs)
{
    if (req->nr_segments < min_segs || req->nr_segments > PV_BLKIF_MAX_SEGMENTS_PER_REQUEST)
        return PV_BLKIF_E_NSEG;
    if (req->op != PV_BLKIF_OP_READ && disk->readonly)
        return PV_BLKIF_E_READONLY;
    return pv_blkif_validate_segments(disk, req, req->seg, req->nr_segments);
}

int pv_blkif_validate(const struct pv_blkif_disk *disk, struct pv_blkif_req *req)
{
    if (disk->sector_size < 512 || (disk->sector_size & (disk->sector_size - 1)))
        return PV_BLKIF_E_ALIGN; /* a configuration error; refuse everything rather than misbehave */
    switch (req->operation) {
    case PV_BLKIF_OP_READ:
    case PV_BLKIF_OP_WRITE:
        return validate_rw(disk, req, 1);
    case PV_BLKIF_OP_WRITE_BARRIER:
        if (!disk->can_barrier)
            return PV_BLKIF_E_UNSUPPORTED;
        return validate_rw(disk, req, 0);
    case PV_BLKIF_OP_FLUSH_DISKCACHE:
        if (!disk->can_flush)
            return PV_BLKIF_E_UNSUPPORTED;
        return validate_rw(disk, req, 0);
    case PV_BLKIF_OP_DISCARD:
        if (!disk->can_discard)
            return PV_BLKIF_E_UNSUPPORTED;
        if ((req->flag & PV_BLKIF_DISCARD_SECURE) && !disk->can_secure_discard)
            return PV_BLKIF_E_UNSUPPORTED;
        if (disk->readonly)
            return PV_BLKIF_E_READONLY;
        return check_range(disk, req->sector_number, req->nr_sectors);
    case PV_BLKIF_OP_INDIRECT:
        if (disk->max_indirect_segments == 0)
            return PV_BLKIF_E_UNSUPPORTED;
        if (req->op != PV_BLKIF_OP_READ && req->op != PV_BLKIF_OP_WRITE)
            return PV_BLKIF_E_INDIRECT_OP;
        if (req->nr_segments == 0 || req->nr_segments > disk->max_indirect_segments ||
            req->nr_segments > PV_BLKIF_MAX_INDIRECT_SEGMENTS)
            return PV_BLKIF_E_INDIRECT_NSEG;
        if (req->op == PV_BLKIF_OP_WRITE && disk->readonly)
            return PV_BLKIF_E_READONLY;
        req->nr_indirect_pages = (uint8_t)((req->nr_segments + PV_BLKIF_SEGS_PER_INDIRECT_FRAME - 1) /
                                           PV_BLKIF_SEGS_PER_INDIRECT_FRAME);
        return PV_BLKIF_OK;
    case PV_BLKIF_OP_RESERVED_1:
        return PV_BLKIF_E_UNSUPPORTED;
    default:
        return PV_BLKIF_E_BAD_OP;
    }
}

int pv_blkif_copy_validate(uint32_t abi, const void *slot, const struct pv_blkif_disk *disk,
                           struct pv_blkif_req *out)
{
    int rc = pv_blkif_parse(abi, slot, out);
    if (rc != PV_BLKIF_OK)
        return rc;
    return pv_blkif_validate(disk, out);
}

/* ---- request shapes ---------------------------------------------------------------------------------- */

_Static_assert(PV_BLKIF_NR_SHAPES == PV_BLKIF_SHAPE_OPS * PV_BLKIF_SHAPE_SEGS * PV_BLKIF_SHAPE_SECTORS * PV_BLKIF_SHAPE_FILLS,
               "shape count");

static const char *const shape_ops[PV_BLKIF_SHAPE_OPS] = {
    "read", "write", "barrier", "flush", "discard", "discard-secure", "indirect-read", "indirect-write", "other",
};
static const char *const shape_segs[PV_BLKIF_SHAPE_SEGS] = {"0", "1", "2-11", "12+"};
static const char *const shape_sectors[PV_BLKIF_SHAPE_SECTORS] = {"zero", "inside", "max", "beyond"};
static const char *const shape_fills[PV_BLKIF_SHAPE_FILLS] = {"-", "full", "sub"};

uint32_t pv_blkif_shape(const struct pv_blkif_disk *disk, const struct pv_blkif_req *req,
                        const struct pv_blkif_segment *segs, uint32_t nseg)
{
    uint32_t op;
    switch (req->operation) {
    case PV_BLKIF_OP_READ:
        op = 0;
        break;
    case PV_BLKIF_OP_WRITE:
        op = 1;
        break;
    case PV_BLKIF_OP_WRITE_BARRIER:
        op = 2;
        break;
    case PV_BLKIF_OP_FLUSH_DISKCACHE:
        op = 3;
        break;
    case PV_BLKIF_OP_DISCARD:
        op = (req->flag & PV_BLKIF_DISCARD_SECURE) ? 5 : 4;
        break;
    case PV_BLKIF_OP_INDIRECT:
        op = req->op == PV_BLKIF_OP_READ ? 6 : req->op == PV_BLKIF_OP_WRITE ? 7 : 8;
        break;
    default:
        op = 8;
        break;
    }
    uint32_t n = req->operation == PV_BLKIF_OP_DISCARD ? 0 : req->nr_segments;
    uint32_t seg = n == 0 ? 0 : n == 1 ? 1 : n <= PV_BLKIF_MAX_SEGMENTS_PER_REQUEST ? 2 : 3;
    uint64_t s = req->sector_number;
    uint64_t size = __atomic_load_n(&disk->sectors, __ATOMIC_RELAXED);
    uint32_t sector = s == 0 ? 0 : s == UINT64_MAX ? 2 : s >= size ? 3 : 1;
    uint32_t fill = 0;
    if (nseg) {
        fill = 1;
        for (uint32_t i = 0; i < nseg; i++)
            if (segs[i].first_sect != 0 || segs[i].last_sect != PV_BLKIF_SECTORS_PER_PAGE - 1) {
                fill = 2;
                break;
            }
    }
    return ((op * PV_BLKIF_SHAPE_SEGS + seg) * PV_BLKIF_SHAPE_SECTORS + sector) * PV_BLKIF_SHAPE_FILLS + fill;
}

int pv_blkif_shape_name(uint32_t shape, char *buf, uint32_t len)
{
    if (shape >= PV_BLKIF_NR_SHAPES || len == 0)
        return -1;
    uint32_t fill = shape % PV_BLKIF_SHAPE_FILLS;
    shape /= PV_BLKIF_SHAPE_FILLS;
    uint32_t sector = shape % PV_BLKIF_SHAPE_SECTORS;
    shape /= PV_BLKIF_SHAPE_SECTORS;
    uint32_t seg = shape % PV_BLKIF_SHAPE_SEGS;
    uint32_t op = shape / PV_BLKIF_SHAPE_SEGS;
    int n = snprintf(buf, len, "%s/%s/%s/%s", shape_ops[op], shape_segs[seg], shape_sectors[sector],
                     shape_fills[fill]);
    return n < 0 || (uint32_t)n >= len ? -1 : n;
}

int16_t pv_blkif_reason_status(int reason)
{
    if (reason == PV_BLKIF_OK)
        return PV_BLKIF_RSP_OKAY;
    if (reason == PV_BLKIF_E_BAD_OP || reason == PV_BLKIF_E_UNSUPPORTED)
        return PV_BLKIF_RSP_EOPNOTSUPP;
    return PV_BLKIF_RSP_ERROR;
}

const char *pv_blkif_reason_name(int reason)
{
    static const char *const names[PV_BLKIF_NR_REASONS] = {
        "ok",           "bad_op",       "unsupported",  "nr_segments", "indirect_nr_segments",
        "indirect_op",  "sect_order",   "sect_page",    "range",       "overflow",
        "align",        "readonly",     "abi",          "grant",       "io",
        "nomem",
    };
    if (reason < 0 || reason >= PV_BLKIF_NR_REASONS)
        return "unknown";
    return names[reason];
}

uint32_t pv_blkif_make_response(uint32_t abi, void *out, uint64_t id, uint8_t operation, int16_t status)
{
    uint32_t size = pv_blkif_rsp_size(abi);
    if (size == 0)
        return 0;
    memset(out, 0, size);
    /* Both ABIs put id at 0, operation at 8, status at 10; only the tail padding differs. */
    struct pv_blkif_x86_32_response *r = out;
    r->id = id;
    r->operation = operation;
    r->status = status;
    return size;
}
