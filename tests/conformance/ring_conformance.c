/* Conformance of csrc/ring.c against Xen's public io/ring.h, and of our mirrored structs against the official
 * headers.  Built by tests/conformance/test_ring_conformance.py (native and -m32); not part of the product.
 *
 * Ring behaviour is checked differentially: four pairs of (front, back) run the same random operation
 * sequence, each pair on its own shared page:
 *     XX  Xen-macro front + Xen-macro back   (the oracle)
 *     OX  our front       + Xen-macro back
 *     XO  Xen-macro front + our back
 *     OO  our front       + our back
 * After every step the return values (counts, notify decisions, final checks), the copied-out bytes, every
 * private index and the whole shared area (header and slot bytes) of OX/XO/OO must equal XX.  Because the
 * Xen side of each mixed pair reads and writes the same page as our side, a disagreement about where the
 * indices or slots live, or when to notify, shows up as a byte difference on the page or a wrong decision.
 *
 * Usage: ring_conformance SEED STEPS
 * Output: "LAYOUT name value" lines (measured from the official headers, for cross-ABI comparison by the test),
 * "FAIL ..." lines, and a final "SUMMARY ..." line.  Exit status 0 only when nothing failed.
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* io/ring.h leaves the barriers to the includer: xen_mb() and friends, which it maps to mb()/rmb()/wmb() for
 * the default (old) interface version. */
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xengnttab.h>

#include "platform.h"
#include "ring.h"

#ifdef PVBACK_HAVE_BLKIF_H
#include "blkif.h"
#endif

#define PAGE 4096u
#define MAX_PAGES 16u
#define MAX_FAILS 30

static unsigned long failures;
static unsigned long checks;

#define FAIL(...)                                                                                              \
    do {                                                                                                       \
        failures++;                                                                                            \
        if (failures <= MAX_FAILS) {                                                                           \
            printf("FAIL ");                                                                                   \
            printf(__VA_ARGS__);                                                                               \
            printf("\n");                                                                                      \
        }                                                                                                      \
    } while (0)

#define EXPECT_EQ(what, a, b)                                                                                  \
    do {                                                                                                       \
        unsigned long long a_ = (unsigned long long)(a), b_ = (unsigned long long)(b);                         \
        checks++;                                                                                              \
        if (a_ != b_)                                                                                          \
            FAIL("%s: %llu != %llu (%s vs %s)", what, a_, b_, #a, #b);                                         \
    } while (0)

/* ------------------------------------------------------------------------------------------------------------
 * Layouts
 */

#define LAYOUT(name, v) printf("LAYOUT %s %llu\n", name, (unsigned long long)(v))

/* Field of our struct at the same offset and with the same size as the official one. */
#define SAME_FIELD(ours, theirs, ofield, tfield)                                                               \
    do {                                                                                                       \
        EXPECT_EQ(#ours "." #ofield " offset", offsetof(ours, ofield), offsetof(theirs, tfield));              \
        EXPECT_EQ(#ours "." #ofield " size", sizeof(((ours *)0)->ofield), sizeof(((theirs *)0)->tfield));      \
    } while (0)

#define SRING_LAYOUT(tag)                                                                                      \
    do {                                                                                                       \
        SAME_FIELD(struct pv_sring, struct tag##_sring, req_prod, req_prod);                                   \
        SAME_FIELD(struct pv_sring, struct tag##_sring, req_event, req_event);                                 \
        SAME_FIELD(struct pv_sring, struct tag##_sring, rsp_prod, rsp_prod);                                   \
        SAME_FIELD(struct pv_sring, struct tag##_sring, rsp_event, rsp_event);                                 \
        SAME_FIELD(struct pv_sring, struct tag##_sring, pvt, pvt);                                             \
        SAME_FIELD(struct pv_sring, struct tag##_sring, pad, __pad);                                           \
        EXPECT_EQ("pv_sring.ring vs " #tag, offsetof(struct pv_sring, ring), offsetof(struct tag##_sring, ring)); \
        EXPECT_EQ("PV_RING_HEADER_SIZE vs " #tag, PV_RING_HEADER_SIZE, offsetof(struct tag##_sring, ring));    \
    } while (0)

/* pv_ring_size() against __CONST_RING_SIZE and against RING_SIZE() of a ring attached with FRONT_RING_INIT. */
#define RING_SIZE_CHECK(tag, pages)                                                                            \
    do {                                                                                                       \
        static union {                                                                                         \
            struct tag##_sring s;                                                                              \
            uint8_t b[(pages) * PAGE];                                                                         \
        } pg_;                                                                                                 \
        struct tag##_front_ring fr_;                                                                           \
        FRONT_RING_INIT(&fr_, &pg_.s, (pages) * PAGE);                                                         \
        uint32_t ours_ = pv_ring_size(pages, sizeof(union tag##_sring_entry));                                 \
        EXPECT_EQ("pv_ring_size " #tag " " #pages "p vs __CONST_RING_SIZE", ours_,                            \
                  __CONST_RING_SIZE(tag, (pages) * PAGE));                                                     \
        EXPECT_EQ("pv_ring_size " #tag " " #pages "p vs RING_SIZE", ours_, RING_SIZE(&fr_));                   \
        LAYOUT("ring_size_" #tag "_" #pages "p", ours_);                                                       \
    } while (0)

#define OFF(name, type, field) LAYOUT(name, offsetof(type, field))
#define SZ(name, type) LAYOUT(name, sizeof(type))

static void check_layouts(void)
{
    SRING_LAYOUT(blkif);
    SRING_LAYOUT(netif_tx);
    SRING_LAYOUT(netif_rx);
    SRING_LAYOUT(xen_netif_ctrl);

    SAME_FIELD(struct pv_grant_entry_v1, grant_entry_v1_t, flags, flags);
    SAME_FIELD(struct pv_grant_entry_v1, grant_entry_v1_t, domid, domid);
    SAME_FIELD(struct pv_grant_entry_v1, grant_entry_v1_t, frame, frame);
    EXPECT_EQ("sizeof pv_grant_entry_v1", sizeof(struct pv_grant_entry_v1), sizeof(grant_entry_v1_t));
    EXPECT_EQ("PV_GTF_permit_access", PV_GTF_permit_access, GTF_permit_access);
    EXPECT_EQ("PV_GTF_readonly", PV_GTF_readonly, GTF_readonly);
    EXPECT_EQ("PV_GTF_reading", PV_GTF_reading, GTF_reading);
    EXPECT_EQ("PV_GTF_writing", PV_GTF_writing, GTF_writing);
    EXPECT_EQ("PV_GTF_type_mask", PV_GTF_type_mask, GTF_type_mask);
    EXPECT_EQ("PV_GNTST_bad_gntref", (int)PV_GNTST_bad_gntref, (int)GNTST_bad_gntref);
    EXPECT_EQ("PV_GNTST_bad_domain", (int)PV_GNTST_bad_domain, (int)GNTST_bad_domain);
    EXPECT_EQ("PV_GNTST_permission_denied", (int)PV_GNTST_permission_denied, (int)GNTST_permission_denied);
    EXPECT_EQ("PV_GNTST_general_error", (int)PV_GNTST_general_error, (int)GNTST_general_error);
    EXPECT_EQ("PV_GNTST_bad_copy_arg", (int)PV_GNTST_bad_copy_arg, (int)GNTST_bad_copy_arg);
    EXPECT_EQ("PV_GNTST_eagain", (int)PV_GNTST_eagain, (int)GNTST_eagain);
    EXPECT_EQ("PV_GNTST_no_space", (int)PV_GNTST_no_space, (int)GNTST_no_space);
    EXPECT_EQ("PV_GCOPY_SOURCE_GREF", PV_GCOPY_SOURCE_GREF, GNTCOPY_source_gref);
    EXPECT_EQ("PV_GCOPY_DEST_GREF", PV_GCOPY_DEST_GREF, GNTCOPY_dest_gref);

    typedef xengnttab_grant_copy_segment_t X;
    SAME_FIELD(struct pv_gcopy_seg, X, source, source);
    SAME_FIELD(struct pv_gcopy_seg, X, source.virt, source.virt);
    SAME_FIELD(struct pv_gcopy_seg, X, source.foreign.ref, source.foreign.ref);
    SAME_FIELD(struct pv_gcopy_seg, X, source.foreign.offset, source.foreign.offset);
    SAME_FIELD(struct pv_gcopy_seg, X, source.foreign.domid, source.foreign.domid);
    SAME_FIELD(struct pv_gcopy_seg, X, dest, dest);
    SAME_FIELD(struct pv_gcopy_seg, X, dest.virt, dest.virt);
    SAME_FIELD(struct pv_gcopy_seg, X, dest.foreign.ref, dest.foreign.ref);
    SAME_FIELD(struct pv_gcopy_seg, X, dest.foreign.offset, dest.foreign.offset);
    SAME_FIELD(struct pv_gcopy_seg, X, dest.foreign.domid, dest.foreign.domid);
    SAME_FIELD(struct pv_gcopy_seg, X, len, len);
    SAME_FIELD(struct pv_gcopy_seg, X, flags, flags);
    SAME_FIELD(struct pv_gcopy_seg, X, status, status);
    EXPECT_EQ("sizeof pv_gcopy_seg", sizeof(struct pv_gcopy_seg), sizeof(X));
    EXPECT_EQ("alignof pv_gcopy_seg", _Alignof(struct pv_gcopy_seg), _Alignof(X));

    RING_SIZE_CHECK(blkif, 1);
    RING_SIZE_CHECK(blkif, 2);
    RING_SIZE_CHECK(blkif, 4);
    RING_SIZE_CHECK(blkif, 8);
    RING_SIZE_CHECK(blkif, 16);
    RING_SIZE_CHECK(netif_tx, 1);
    RING_SIZE_CHECK(netif_rx, 1);
    RING_SIZE_CHECK(xen_netif_ctrl, 1);
    EXPECT_EQ("pv_ring_size 0 pages", pv_ring_size(0, 112), 0);
    EXPECT_EQ("pv_ring_size slot larger than page", pv_ring_size(1, PAGE), 0);

    /* Official numbers of this ABI (the test compares the -m32 run with the native one and with
     * csrc/blkif.h's packed mirrors). */
    SZ("sz_sring_hdr", struct blkif_sring);
    SZ("sz_blkif_request", struct blkif_request);
    OFF("off_blkreq_operation", struct blkif_request, operation);
    OFF("off_blkreq_nr_segments", struct blkif_request, nr_segments);
    OFF("off_blkreq_handle", struct blkif_request, handle);
    OFF("off_blkreq_id", struct blkif_request, id);
    OFF("off_blkreq_sector_number", struct blkif_request, sector_number);
    OFF("off_blkreq_seg", struct blkif_request, seg);
    SZ("sz_blkif_request_segment", struct blkif_request_segment);
    OFF("off_blkseg_gref", struct blkif_request_segment, gref);
    OFF("off_blkseg_first_sect", struct blkif_request_segment, first_sect);
    OFF("off_blkseg_last_sect", struct blkif_request_segment, last_sect);
    SZ("sz_blkif_request_discard", struct blkif_request_discard);
    OFF("off_blkdisc_operation", struct blkif_request_discard, operation);
    OFF("off_blkdisc_flag", struct blkif_request_discard, flag);
    OFF("off_blkdisc_handle", struct blkif_request_discard, handle);
    OFF("off_blkdisc_id", struct blkif_request_discard, id);
    OFF("off_blkdisc_sector_number", struct blkif_request_discard, sector_number);
    OFF("off_blkdisc_nr_sectors", struct blkif_request_discard, nr_sectors);
    SZ("sz_blkif_request_indirect", struct blkif_request_indirect);
    OFF("off_blkind_operation", struct blkif_request_indirect, operation);
    OFF("off_blkind_indirect_op", struct blkif_request_indirect, indirect_op);
    OFF("off_blkind_nr_segments", struct blkif_request_indirect, nr_segments);
    OFF("off_blkind_id", struct blkif_request_indirect, id);
    OFF("off_blkind_sector_number", struct blkif_request_indirect, sector_number);
    OFF("off_blkind_handle", struct blkif_request_indirect, handle);
    OFF("off_blkind_indirect_grefs", struct blkif_request_indirect, indirect_grefs);
    SZ("sz_blkif_response", struct blkif_response);
    OFF("off_blkrsp_id", struct blkif_response, id);
    OFF("off_blkrsp_operation", struct blkif_response, operation);
    OFF("off_blkrsp_status", struct blkif_response, status);
    SZ("sz_blkif_sring_entry", union blkif_sring_entry);
    SZ("sz_netif_tx_request", struct netif_tx_request);
    OFF("off_txreq_gref", struct netif_tx_request, gref);
    OFF("off_txreq_offset", struct netif_tx_request, offset);
    OFF("off_txreq_flags", struct netif_tx_request, flags);
    OFF("off_txreq_id", struct netif_tx_request, id);
    OFF("off_txreq_size", struct netif_tx_request, size);
    SZ("sz_netif_tx_response", struct netif_tx_response);
    SZ("sz_netif_rx_request", struct netif_rx_request);
    OFF("off_rxreq_gref", struct netif_rx_request, gref);
    SZ("sz_netif_rx_response", struct netif_rx_response);
    OFF("off_rxrsp_offset", struct netif_rx_response, offset);
    OFF("off_rxrsp_flags", struct netif_rx_response, flags);
    OFF("off_rxrsp_status", struct netif_rx_response, status);
    SZ("sz_netif_tx_sring_entry", union netif_tx_sring_entry);
    SZ("sz_netif_rx_sring_entry", union netif_rx_sring_entry);
    SZ("sz_ctrl_req", struct xen_netif_ctrl_request);
    SZ("sz_ctrl_rsp", struct xen_netif_ctrl_response);
    SZ("sz_ctrl_entry", union xen_netif_ctrl_sring_entry);
    SZ("sz_grant_entry_v1", grant_entry_v1_t);
    SZ("sz_gcopy_seg", xengnttab_grant_copy_segment_t);
}

/* csrc/blkif.h's packed x86_32 / x86_64 mirrors against the official layout.  One compile sees only its own
 * ABI's official structs, so the mirror of the native ABI is checked field by field here (offset and size),
 * and the offsets of both mirrors are printed as "LAYOUT pv_<abi>.<name>" lines: the test compares them with
 * the official numbers the native and the -m32 builds print.  Compiled in when csrc/blkif.h exists (the test
 * passes -DPVBACK_HAVE_BLKIF_H). */
#ifdef PVBACK_HAVE_BLKIF_H
#define MIRROR_LAYOUTS(abi)                                                                                    \
    do {                                                                                                       \
        SZ("pv_" #abi ".sz_blkif_request", struct pv_blkif_##abi##_request);                                   \
        OFF("pv_" #abi ".off_blkreq_operation", struct pv_blkif_##abi##_request, operation);                   \
        OFF("pv_" #abi ".off_blkreq_nr_segments", struct pv_blkif_##abi##_request, nr_segments);               \
        OFF("pv_" #abi ".off_blkreq_handle", struct pv_blkif_##abi##_request, handle);                         \
        OFF("pv_" #abi ".off_blkreq_id", struct pv_blkif_##abi##_request, id);                                 \
        OFF("pv_" #abi ".off_blkreq_sector_number", struct pv_blkif_##abi##_request, sector_number);           \
        OFF("pv_" #abi ".off_blkreq_seg", struct pv_blkif_##abi##_request, seg);                               \
        SZ("pv_" #abi ".sz_blkif_request_segment", struct pv_blkif_segment);                                   \
        OFF("pv_" #abi ".off_blkseg_gref", struct pv_blkif_segment, gref);                                     \
        OFF("pv_" #abi ".off_blkseg_first_sect", struct pv_blkif_segment, first_sect);                         \
        OFF("pv_" #abi ".off_blkseg_last_sect", struct pv_blkif_segment, last_sect);                           \
        SZ("pv_" #abi ".sz_blkif_request_discard", struct pv_blkif_##abi##_request_discard);                   \
        OFF("pv_" #abi ".off_blkdisc_operation", struct pv_blkif_##abi##_request_discard, operation);          \
        OFF("pv_" #abi ".off_blkdisc_flag", struct pv_blkif_##abi##_request_discard, flag);                    \
        OFF("pv_" #abi ".off_blkdisc_handle", struct pv_blkif_##abi##_request_discard, handle);                \
        OFF("pv_" #abi ".off_blkdisc_id", struct pv_blkif_##abi##_request_discard, id);                        \
        OFF("pv_" #abi ".off_blkdisc_sector_number", struct pv_blkif_##abi##_request_discard, sector_number);  \
        OFF("pv_" #abi ".off_blkdisc_nr_sectors", struct pv_blkif_##abi##_request_discard, nr_sectors);        \
        SZ("pv_" #abi ".sz_blkif_request_indirect", struct pv_blkif_##abi##_request_indirect);                 \
        OFF("pv_" #abi ".off_blkind_operation", struct pv_blkif_##abi##_request_indirect, operation);          \
        OFF("pv_" #abi ".off_blkind_indirect_op", struct pv_blkif_##abi##_request_indirect, indirect_op);      \
        OFF("pv_" #abi ".off_blkind_nr_segments", struct pv_blkif_##abi##_request_indirect, nr_segments);      \
        OFF("pv_" #abi ".off_blkind_id", struct pv_blkif_##abi##_request_indirect, id);                        \
        OFF("pv_" #abi ".off_blkind_sector_number", struct pv_blkif_##abi##_request_indirect, sector_number);  \
        OFF("pv_" #abi ".off_blkind_handle", struct pv_blkif_##abi##_request_indirect, handle);                \
        OFF("pv_" #abi ".off_blkind_indirect_grefs", struct pv_blkif_##abi##_request_indirect, indirect_grefs); \
        SZ("pv_" #abi ".sz_blkif_response", struct pv_blkif_##abi##_response);                                 \
        OFF("pv_" #abi ".off_blkrsp_id", struct pv_blkif_##abi##_response, id);                                \
        OFF("pv_" #abi ".off_blkrsp_operation", struct pv_blkif_##abi##_response, operation);                  \
        OFF("pv_" #abi ".off_blkrsp_status", struct pv_blkif_##abi##_response, status);                        \
    } while (0)

#define MIRROR_FIELDS(abi)                                                                                     \
    do {                                                                                                       \
        typedef struct pv_blkif_##abi##_request RQ;                                                            \
        typedef struct pv_blkif_##abi##_request_discard DQ;                                                    \
        typedef struct pv_blkif_##abi##_request_indirect IQ;                                                   \
        typedef struct pv_blkif_##abi##_response RS;                                                           \
        SAME_FIELD(RQ, struct blkif_request, operation, operation);                                            \
        SAME_FIELD(RQ, struct blkif_request, nr_segments, nr_segments);                                        \
        SAME_FIELD(RQ, struct blkif_request, handle, handle);                                                  \
        SAME_FIELD(RQ, struct blkif_request, id, id);                                                          \
        SAME_FIELD(RQ, struct blkif_request, sector_number, sector_number);                                    \
        SAME_FIELD(RQ, struct blkif_request, seg, seg);                                                        \
        SAME_FIELD(RQ, struct blkif_request, seg[1].gref, seg[1].gref);                                        \
        SAME_FIELD(RQ, struct blkif_request, seg[1].first_sect, seg[1].first_sect);                            \
        SAME_FIELD(RQ, struct blkif_request, seg[1].last_sect, seg[1].last_sect);                              \
        EXPECT_EQ("sizeof mirror " #abi " request", sizeof(RQ), sizeof(struct blkif_request));                 \
        EXPECT_EQ("sizeof mirror segment", sizeof(struct pv_blkif_segment), sizeof(struct blkif_request_segment)); \
        SAME_FIELD(DQ, struct blkif_request_discard, operation, operation);                                    \
        SAME_FIELD(DQ, struct blkif_request_discard, flag, flag);                                              \
        SAME_FIELD(DQ, struct blkif_request_discard, handle, handle);                                          \
        SAME_FIELD(DQ, struct blkif_request_discard, id, id);                                                  \
        SAME_FIELD(DQ, struct blkif_request_discard, sector_number, sector_number);                            \
        SAME_FIELD(DQ, struct blkif_request_discard, nr_sectors, nr_sectors);                                  \
        EXPECT_EQ("sizeof mirror " #abi " discard", sizeof(DQ), sizeof(struct blkif_request_discard));         \
        SAME_FIELD(IQ, struct blkif_request_indirect, operation, operation);                                   \
        SAME_FIELD(IQ, struct blkif_request_indirect, indirect_op, indirect_op);                               \
        SAME_FIELD(IQ, struct blkif_request_indirect, nr_segments, nr_segments);                               \
        SAME_FIELD(IQ, struct blkif_request_indirect, id, id);                                                 \
        SAME_FIELD(IQ, struct blkif_request_indirect, sector_number, sector_number);                           \
        SAME_FIELD(IQ, struct blkif_request_indirect, handle, handle);                                         \
        SAME_FIELD(IQ, struct blkif_request_indirect, indirect_grefs, indirect_grefs);                         \
        EXPECT_EQ("sizeof mirror " #abi " indirect", sizeof(IQ), sizeof(struct blkif_request_indirect));      \
        SAME_FIELD(RS, struct blkif_response, id, id);                                                         \
        SAME_FIELD(RS, struct blkif_response, operation, operation);                                           \
        SAME_FIELD(RS, struct blkif_response, status, status);                                                 \
        EXPECT_EQ("sizeof mirror " #abi " response", sizeof(RS), sizeof(struct blkif_response));               \
        EXPECT_EQ("mirror " #abi " slot size", sizeof(RQ), sizeof(union blkif_sring_entry));                   \
    } while (0)
#endif

static int check_pvback_blkif_layouts(void)
{
#ifdef PVBACK_HAVE_BLKIF_H
#if defined(__x86_64__)
    MIRROR_FIELDS(x86_64);
    EXPECT_EQ("PV_BLKIF_X86_64_SLOT_SIZE", PV_BLKIF_X86_64_SLOT_SIZE, sizeof(union blkif_sring_entry));
    EXPECT_EQ("PV_BLKIF_X86_64_RSP_SIZE", PV_BLKIF_X86_64_RSP_SIZE, sizeof(struct blkif_response));
#elif defined(__i386__)
    MIRROR_FIELDS(x86_32);
    EXPECT_EQ("PV_BLKIF_X86_32_SLOT_SIZE", PV_BLKIF_X86_32_SLOT_SIZE, sizeof(union blkif_sring_entry));
    EXPECT_EQ("PV_BLKIF_X86_32_RSP_SIZE", PV_BLKIF_X86_32_RSP_SIZE, sizeof(struct blkif_response));
#endif
    MIRROR_LAYOUTS(x86_64);
    MIRROR_LAYOUTS(x86_32);
    EXPECT_EQ("PV_BLKIF_MAX_SEGMENTS_PER_REQUEST", PV_BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_MAX_SEGMENTS_PER_REQUEST);
    EXPECT_EQ("PV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST", PV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
              BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    EXPECT_EQ("PV_BLKIF_OP_READ", PV_BLKIF_OP_READ, BLKIF_OP_READ);
    EXPECT_EQ("PV_BLKIF_OP_WRITE", PV_BLKIF_OP_WRITE, BLKIF_OP_WRITE);
    EXPECT_EQ("PV_BLKIF_OP_WRITE_BARRIER", PV_BLKIF_OP_WRITE_BARRIER, BLKIF_OP_WRITE_BARRIER);
    EXPECT_EQ("PV_BLKIF_OP_FLUSH_DISKCACHE", PV_BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_FLUSH_DISKCACHE);
    EXPECT_EQ("PV_BLKIF_OP_DISCARD", PV_BLKIF_OP_DISCARD, BLKIF_OP_DISCARD);
    EXPECT_EQ("PV_BLKIF_OP_INDIRECT", PV_BLKIF_OP_INDIRECT, BLKIF_OP_INDIRECT);
    EXPECT_EQ("PV_BLKIF_DISCARD_SECURE", PV_BLKIF_DISCARD_SECURE, BLKIF_DISCARD_SECURE);
    EXPECT_EQ("PV_BLKIF_RSP_OKAY", (int)PV_BLKIF_RSP_OKAY, (int)BLKIF_RSP_OKAY);
    EXPECT_EQ("PV_BLKIF_RSP_ERROR", (int)PV_BLKIF_RSP_ERROR, (int)BLKIF_RSP_ERROR);
    EXPECT_EQ("PV_BLKIF_RSP_EOPNOTSUPP", (int)PV_BLKIF_RSP_EOPNOTSUPP, (int)BLKIF_RSP_EOPNOTSUPP);
    EXPECT_EQ("PV_VDISK_CDROM", PV_VDISK_CDROM, VDISK_CDROM);
    EXPECT_EQ("PV_VDISK_REMOVABLE", PV_VDISK_REMOVABLE, VDISK_REMOVABLE);
    EXPECT_EQ("PV_VDISK_READONLY", PV_VDISK_READONLY, VDISK_READONLY);
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------------------------------
 * Random numbers: splitmix64, so a seed reproduces a run on any libc.
 */
static uint64_t rng_state;
static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint32_t rnd_below(uint32_t n) { return n ? (uint32_t)(rnd() % n) : 0; }
static void rnd_bytes(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)rnd();
}

/* ------------------------------------------------------------------------------------------------------------
 * The Xen-macro side, one small vtable per ring type so the driver below is generic while every operation is
 * the real macro applied to the real DEFINE_RING_TYPES types.
 */
struct xen_ops {
    const char *name;
    uint32_t req_size, rsp_size, slot_size;
    void (*init)(void *page, uint32_t start); /* SHARED_RING_INIT, then the indices moved to `start` */
    void (*front_attach)(void *fr, void *page, uint32_t start, uint32_t bytes);
    void (*back_attach)(void *br, void *page, uint32_t start, uint32_t bytes);
    uint32_t (*size)(void *r); /* RING_SIZE (front and back private structs share the layout) */
    /* front */
    uint32_t (*f_put)(void *fr, const uint8_t *reqs, uint32_t n);
    int (*f_push)(void *fr);
    int32_t (*f_consume)(void *fr, uint8_t *out, uint32_t max); /* -1: RING_RESPONSE_PROD_OVERFLOW */
    int (*f_final)(void *fr);
    void (*f_idx)(void *fr, uint32_t *req_prod_pvt, uint32_t *rsp_cons);
    /* back */
    int32_t (*b_consume)(void *br, uint8_t *out, uint32_t max); /* -1: RING_REQUEST_PROD_OVERFLOW */
    void (*b_put)(void *br, const uint8_t *rsps, uint32_t n);
    int (*b_push)(void *br);
    int32_t (*b_final)(void *br); /* -1: RING_REQUEST_PROD_OVERFLOW */
    void (*b_idx)(void *br, uint32_t *req_cons, uint32_t *rsp_prod_pvt);
};

#define XEN_OPS(tag, req_t, rsp_t)                                                                             \
    _Static_assert(sizeof(struct tag##_front_ring) <= 32, "front ring private struct");                       \
    _Static_assert(sizeof(struct tag##_back_ring) <= 32, "back ring private struct");                         \
    static void tag##_init(void *page, uint32_t start)                                                         \
    {                                                                                                          \
        struct tag##_sring *s = page;                                                                          \
        SHARED_RING_INIT(s);                                                                                   \
        s->req_prod = s->rsp_prod = start;                                                                     \
        s->req_event = s->rsp_event = start + 1;                                                               \
    }                                                                                                          \
    static void tag##_front_attach(void *fr, void *page, uint32_t start, uint32_t bytes)                       \
    {                                                                                                          \
        struct tag##_front_ring *r = fr;                                                                       \
        FRONT_RING_ATTACH(r, (struct tag##_sring *)page, start, bytes);                                        \
    }                                                                                                          \
    static void tag##_back_attach(void *br, void *page, uint32_t start, uint32_t bytes)                        \
    {                                                                                                          \
        struct tag##_back_ring *r = br;                                                                        \
        BACK_RING_ATTACH(r, (struct tag##_sring *)page, start, bytes);                                         \
    }                                                                                                          \
    static uint32_t tag##_size(void *fr) { return RING_SIZE((struct tag##_front_ring *)fr); }                  \
    static uint32_t tag##_f_put(void *fr, const uint8_t *reqs, uint32_t n)                                     \
    {                                                                                                          \
        struct tag##_front_ring *r = fr;                                                                       \
        uint32_t i;                                                                                            \
        for (i = 0; i < n && !RING_FULL(r); i++) {                                                             \
            req_t *q = RING_GET_REQUEST(r, r->req_prod_pvt);                                                   \
            memcpy(q, reqs + (size_t)i * sizeof(req_t), sizeof(req_t));                                        \
            r->req_prod_pvt++;                                                                                 \
        }                                                                                                      \
        return i;                                                                                              \
    }                                                                                                          \
    static int tag##_f_push(void *fr)                                                                          \
    {                                                                                                          \
        struct tag##_front_ring *r = fr;                                                                       \
        int notify;                                                                                            \
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(r, notify);                                                        \
        return notify;                                                                                         \
    }                                                                                                          \
    static int32_t tag##_f_consume(void *fr, uint8_t *out, uint32_t max)                                       \
    {                                                                                                          \
        struct tag##_front_ring *r = fr;                                                                       \
        RING_IDX rp = r->sring->rsp_prod;                                                                      \
        xen_rmb();                                                                                             \
        if (RING_RESPONSE_PROD_OVERFLOW(r, rp))                                                                \
            return -1;                                                                                         \
        uint32_t n = 0;                                                                                        \
        while (r->rsp_cons != rp && n < max) {                                                                 \
            rsp_t c;                                                                                           \
            RING_COPY_RESPONSE(r, r->rsp_cons, &c);                                                            \
            memcpy(out + (size_t)n * sizeof(rsp_t), &c, sizeof(rsp_t));                                        \
            r->rsp_cons++;                                                                                     \
            n++;                                                                                               \
        }                                                                                                      \
        return (int32_t)n;                                                                                     \
    }                                                                                                          \
    static int tag##_f_final(void *fr)                                                                         \
    {                                                                                                          \
        struct tag##_front_ring *r = fr;                                                                       \
        unsigned int work;                                                                                     \
        RING_FINAL_CHECK_FOR_RESPONSES(r, work);                                                               \
        return work != 0;                                                                                      \
    }                                                                                                          \
    static void tag##_f_idx(void *fr, uint32_t *a, uint32_t *b)                                                \
    {                                                                                                          \
        struct tag##_front_ring *r = fr;                                                                       \
        *a = r->req_prod_pvt;                                                                                  \
        *b = r->rsp_cons;                                                                                      \
    }                                                                                                          \
    /* Consumer loop shaped like Linux blkback's __do_block_io_op: it bounds with CONS_OVERFLOW rather than    \
     * the min() of RING_HAS_UNCONSUMED_REQUESTS, a second formulation of the same rule. */                    \
    static int32_t tag##_b_consume(void *br, uint8_t *out, uint32_t max)                                       \
    {                                                                                                          \
        struct tag##_back_ring *r = br;                                                                        \
        RING_IDX rp = r->sring->req_prod;                                                                      \
        xen_rmb();                                                                                             \
        if (RING_REQUEST_PROD_OVERFLOW(r, rp))                                                                 \
            return -1;                                                                                         \
        uint32_t n = 0;                                                                                        \
        while (r->req_cons != rp && n < max) {                                                                 \
            if (RING_REQUEST_CONS_OVERFLOW(r, r->req_cons))                                                    \
                break;                                                                                         \
            req_t c;                                                                                           \
            RING_COPY_REQUEST(r, r->req_cons, &c);                                                             \
            memcpy(out + (size_t)n * sizeof(req_t), &c, sizeof(req_t));                                        \
            r->req_cons++;                                                                                     \
            n++;                                                                                               \
        }                                                                                                      \
        return (int32_t)n;                                                                                     \
    }                                                                                                          \
    static void tag##_b_put(void *br, const uint8_t *rsps, uint32_t n)                                         \
    {                                                                                                          \
        struct tag##_back_ring *r = br;                                                                        \
        for (uint32_t i = 0; i < n; i++) {                                                                     \
            /* Zero the whole union first, as a careful backend must (no request bytes leak back). */          \
            union tag##_sring_entry *e = &r->sring->ring[r->rsp_prod_pvt & (RING_SIZE(r) - 1)];                \
            memset(e, 0, sizeof(*e));                                                                          \
            memcpy(RING_GET_RESPONSE(r, r->rsp_prod_pvt), rsps + (size_t)i * sizeof(rsp_t), sizeof(rsp_t));    \
            r->rsp_prod_pvt++;                                                                                 \
        }                                                                                                      \
    }                                                                                                          \
    static int tag##_b_push(void *br)                                                                          \
    {                                                                                                          \
        struct tag##_back_ring *r = br;                                                                        \
        int notify;                                                                                            \
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(r, notify);                                                       \
        return notify;                                                                                         \
    }                                                                                                          \
    static int32_t tag##_b_final(void *br)                                                                     \
    {                                                                                                          \
        struct tag##_back_ring *r = br;                                                                        \
        if (RING_REQUEST_PROD_OVERFLOW(r, r->sring->req_prod))                                                 \
            return -1;                                                                                         \
        unsigned int work;                                                                                     \
        RING_FINAL_CHECK_FOR_REQUESTS(r, work);                                                                \
        if (RING_REQUEST_PROD_OVERFLOW(r, r->sring->req_prod))                                                 \
            return -1;                                                                                         \
        return (int32_t)work;                                                                                  \
    }                                                                                                          \
    static void tag##_b_idx(void *br, uint32_t *a, uint32_t *b)                                                \
    {                                                                                                          \
        struct tag##_back_ring *r = br;                                                                        \
        *a = r->req_cons;                                                                                      \
        *b = r->rsp_prod_pvt;                                                                                  \
    }                                                                                                          \
    static const struct xen_ops tag##_ops = {                                                                  \
        #tag,           sizeof(req_t),     sizeof(rsp_t),       sizeof(union tag##_sring_entry),               \
        tag##_init,     tag##_front_attach, tag##_back_attach,  tag##_size,                                    \
        tag##_f_put,    tag##_f_push,      tag##_f_consume,     tag##_f_final,                                 \
        tag##_f_idx,    tag##_b_consume,   tag##_b_put,         tag##_b_push,                                  \
        tag##_b_final,  tag##_b_idx,                                                                           \
    };

XEN_OPS(blkif, struct blkif_request, struct blkif_response)
XEN_OPS(netif_tx, struct netif_tx_request, struct netif_tx_response)
XEN_OPS(netif_rx, struct netif_rx_request, struct netif_rx_response)
XEN_OPS(xen_netif_ctrl, struct xen_netif_ctrl_request, struct xen_netif_ctrl_response)

/* ------------------------------------------------------------------------------------------------------------
 * One (front, back) pair on one shared area.
 */
struct pair {
    const char *name;
    int our_front, our_back;
    uint8_t *page;
    _Alignas(16) uint8_t xf[32];
    _Alignas(16) uint8_t xb[32];
    struct pv_front_ring of;
    struct pv_back_ring ob;
    int back_dead; /* Xen-macro back: a bogus req_prod stops the ring for good, as Linux blkback does */
};

enum { XX, OX, XO, OO, NPAIRS };

struct ctx {
    const struct xen_ops *x;
    uint32_t pages, bytes, start, size;
    unsigned long seq_seed;
    int step;
    const char *op;
    struct pair p[NPAIRS];
};

static void pair_setup(struct ctx *c, struct pair *p, const char *name, int of, int ob)
{
    p->name = name;
    p->our_front = of;
    p->our_back = ob;
    p->back_dead = 0;
    memset(p->page, 0xa5, c->bytes); /* init must clear what it owns; slots keep the garbage */
    if (of)
        pv_sring_init_at(p->page, c->start);
    else
        c->x->init(p->page, c->start);
    c->x->front_attach(p->xf, p->page, c->start, c->bytes);
    c->x->back_attach(p->xb, p->page, c->start, c->bytes);
    pv_front_ring_attach(&p->of, p->page, c->pages, c->x->slot_size, c->start);
    pv_back_ring_attach(&p->ob, p->page, c->pages, c->x->slot_size, c->start);
}

#define CTXFMT "ring=%s pages=%u start=%#x seed=%lu step=%d op=%s pair=%s"
#define CTXARGS(c, p) (c)->x->name, (c)->pages, (c)->start, (c)->seq_seed, (c)->step, (c)->op, (p)->name

static uint32_t front_put(struct ctx *c, struct pair *p, const uint8_t *reqs, uint32_t n)
{
    if (p->our_front)
        return pv_front_ring_put_requests(&p->of, reqs, n, c->x->req_size);
    return c->x->f_put(p->xf, reqs, n);
}
static int front_push(struct ctx *c, struct pair *p)
{
    return p->our_front ? pv_front_ring_push(&p->of) : c->x->f_push(p->xf);
}
static int32_t front_consume(struct ctx *c, struct pair *p, uint8_t *out, uint32_t max)
{
    if (p->our_front) {
        int32_t n = pv_front_ring_consume(&p->of, out, max, c->x->rsp_size);
        return n < 0 ? -1 : n;
    }
    return c->x->f_consume(p->xf, out, max);
}
static int front_final(struct ctx *c, struct pair *p)
{
    return p->our_front ? pv_front_ring_final_check(&p->of) != 0 : c->x->f_final(p->xf);
}
static int32_t back_consume(struct ctx *c, struct pair *p, uint8_t *out, uint32_t max)
{
    if (p->our_back) {
        int32_t n = pv_back_ring_consume(&p->ob, out, max);
        return n < 0 ? -1 : n;
    }
    if (p->back_dead)
        return -1;
    int32_t n = c->x->b_consume(p->xb, out, max);
    if (n < 0)
        p->back_dead = 1;
    return n;
}
static void back_put(struct ctx *c, struct pair *p, const uint8_t *rsps, uint32_t n)
{
    if (p->our_back)
        pv_back_ring_put_responses(&p->ob, rsps, n, c->x->rsp_size);
    else
        c->x->b_put(p->xb, rsps, n);
}
static int back_push(struct ctx *c, struct pair *p)
{
    return p->our_back ? pv_back_ring_push(&p->ob) : c->x->b_push(p->xb);
}
static int32_t back_final(struct ctx *c, struct pair *p)
{
    if (p->our_back) {
        int32_t n = pv_back_ring_final_check(&p->ob);
        return n < 0 ? -1 : n;
    }
    if (p->back_dead)
        return -1;
    int32_t n = c->x->b_final(p->xb);
    if (n < 0)
        p->back_dead = 1;
    return n;
}
static void front_idx(struct ctx *c, struct pair *p, uint32_t *prod_pvt, uint32_t *cons)
{
    if (p->our_front) {
        *prod_pvt = p->of.req_prod_pvt;
        *cons = p->of.rsp_cons;
    } else {
        c->x->f_idx(p->xf, prod_pvt, cons);
    }
}
static void back_idx(struct ctx *c, struct pair *p, uint32_t *cons, uint32_t *prod_pvt)
{
    if (p->our_back) {
        *cons = p->ob.req_cons;
        *prod_pvt = p->ob.rsp_prod_pvt;
    } else {
        c->x->b_idx(p->xb, cons, prod_pvt);
    }
}

static int compare_pairs(struct ctx *c, const long long *rets, uint8_t (*outs)[MAX_PAGES * PAGE], size_t out_len)
{
    const struct pair *ref = &c->p[XX];
    const struct pv_sring *rs = (const void *)ref->page;
    uint32_t rfp, rfc, rbc, rbp;
    front_idx(c, &c->p[XX], &rfp, &rfc);
    back_idx(c, &c->p[XX], &rbc, &rbp);
    unsigned long before = failures;
    for (int i = 1; i < NPAIRS; i++) {
        struct pair *p = &c->p[i];
        const struct pv_sring *s = (const void *)p->page;
        checks++;
        if (rets && rets[i] != rets[XX])
            FAIL(CTXFMT ": result %lld, Xen macros %lld", CTXARGS(c, p), rets[i], rets[XX]);
        if (outs && out_len && memcmp(outs[i], outs[XX], out_len) != 0)
            FAIL(CTXFMT ": copied-out bytes differ from the Xen macros'", CTXARGS(c, p));
        if (s->req_prod != rs->req_prod || s->req_event != rs->req_event || s->rsp_prod != rs->rsp_prod ||
            s->rsp_event != rs->rsp_event)
            FAIL(CTXFMT ": shared indices req_prod=%#x req_event=%#x rsp_prod=%#x rsp_event=%#x, Xen macros "
                        "%#x %#x %#x %#x",
                 CTXARGS(c, p), s->req_prod, s->req_event, s->rsp_prod, s->rsp_event, rs->req_prod,
                 rs->req_event, rs->rsp_prod, rs->rsp_event);
        else if (memcmp(p->page, ref->page, c->bytes) != 0) {
            size_t off = 0;
            while (p->page[off] == ref->page[off])
                off++;
            FAIL(CTXFMT ": shared page differs at byte %zu (slot %zu)", CTXARGS(c, p), off,
                 off < 64 ? (size_t)-1 : (off - 64) / c->x->slot_size);
        }
        uint32_t fp, fc, bc, bp;
        front_idx(c, p, &fp, &fc);
        back_idx(c, p, &bc, &bp);
        if (fp != rfp || fc != rfc || bc != rbc || bp != rbp)
            FAIL(CTXFMT ": private indices req_prod_pvt=%#x rsp_cons=%#x req_cons=%#x rsp_prod_pvt=%#x, Xen "
                        "macros %#x %#x %#x %#x",
                 CTXARGS(c, p), fp, fc, bc, bp, rfp, rfc, rbc, rbp);
    }
    return failures == before;
}

static uint8_t outs[NPAIRS][MAX_PAGES * PAGE];
static uint8_t payload[MAX_PAGES * PAGE];
static uint8_t pages_mem[NPAIRS][MAX_PAGES * PAGE] __attribute__((aligned(4096)));

static void ctx_init(struct ctx *c, const struct xen_ops *x, uint32_t pages, uint32_t start)
{
    static const char *names[NPAIRS] = {"XX", "OX", "XO", "OO"};
    memset(c, 0, sizeof(*c));
    c->x = x;
    c->pages = pages;
    c->bytes = pages * PAGE;
    c->start = start;
    c->seq_seed = (unsigned long)rng_state;
    c->op = "attach";
    for (int i = 0; i < NPAIRS; i++) {
        c->p[i].page = pages_mem[i];
        pair_setup(c, &c->p[i], names[i], i == OX || i == OO, i == XO || i == OO);
    }
    c->size = x->size(c->p[XX].xf);
    EXPECT_EQ("ring size (ours vs RING_SIZE)", c->p[OO].of.size, c->size);
    EXPECT_EQ("back ring size (ours vs RING_SIZE)", c->p[OO].ob.size, c->size);
}

/* One well-behaved random sequence: any interleaving of the frontend's and backend's operations, with the
 * only constraint the protocol puts on the callers (a backend answers only what it consumed). */
static int run_sequence(const struct xen_ops *x, uint32_t pages, uint32_t start, int steps, unsigned long *nsteps)
{
    struct ctx c;
    ctx_init(&c, x, pages, start);
    long long rets[NPAIRS];
    if (!compare_pairs(&c, NULL, NULL, 0))
        return 0;
    for (c.step = 0; c.step < steps; c.step++) {
        uint32_t op = rnd_below(100);
        uint32_t k = 1 + rnd_below(c.size + 4); /* sometimes more than fits: the callers clamp */
        size_t out_len = 0;
        if (op < 22) {
            c.op = "front_put";
            rnd_bytes(payload, (size_t)k * x->req_size);
            for (int i = 0; i < NPAIRS; i++)
                rets[i] = front_put(&c, &c.p[i], payload, k);
        } else if (op < 36) {
            c.op = "front_push";
            for (int i = 0; i < NPAIRS; i++)
                rets[i] = front_push(&c, &c.p[i]);
        } else if (op < 52) {
            c.op = "back_consume";
            for (int i = 0; i < NPAIRS; i++)
                rets[i] = back_consume(&c, &c.p[i], outs[i], k);
            out_len = rets[XX] > 0 ? (size_t)rets[XX] * x->slot_size : 0;
        } else if (op < 66) {
            c.op = "back_put";
            uint32_t bc, bp;
            back_idx(&c, &c.p[XX], &bc, &bp);
            uint32_t n = rnd_below(bc - bp + 1);
            rnd_bytes(payload, (size_t)n * x->rsp_size);
            for (int i = 0; i < NPAIRS; i++) {
                back_put(&c, &c.p[i], payload, n);
                rets[i] = n;
            }
        } else if (op < 76) {
            c.op = "back_push";
            for (int i = 0; i < NPAIRS; i++)
                rets[i] = back_push(&c, &c.p[i]);
        } else if (op < 84) {
            c.op = "back_final_check";
            for (int i = 0; i < NPAIRS; i++)
                rets[i] = back_final(&c, &c.p[i]);
        } else if (op < 94) {
            c.op = "front_consume";
            for (int i = 0; i < NPAIRS; i++)
                rets[i] = front_consume(&c, &c.p[i], outs[i], k);
            out_len = rets[XX] > 0 ? (size_t)rets[XX] * x->rsp_size : 0;
        } else {
            c.op = "front_final_check";
            for (int i = 0; i < NPAIRS; i++)
                rets[i] = front_final(&c, &c.p[i]);
        }
        if (rets[XX] < 0)
            FAIL(CTXFMT ": the Xen macros reported an overflow in a well-behaved sequence", CTXARGS(&c, &c.p[XX]));
        (*nsteps)++;
        if (!compare_pairs(&c, rets, outs, out_len))
            return 0;
    }
    const struct pv_sring *s = (const void *)c.p[XX].page;
    return s->rsp_prod < start ? 2 : 1; /* fewer than 2^31 steps: a smaller index means it wrapped */
}

/* A hostile frontend: it scribbles on req_prod (near the window or anywhere) and on the slots.  Our back must
 * take the same decisions as the Xen-macro back with Linux blkback's rule (PROD_OVERFLOW stops the ring for
 * good), never read more than the ring size, and stay dead once dead. */
static int run_hostile_back(const struct xen_ops *x, uint32_t pages, uint32_t start, int steps, unsigned long *nsteps)
{
    struct ctx c;
    ctx_init(&c, x, pages, start);
    long long rets[NPAIRS];
    int dead_seen = 0;
    for (c.step = 0; c.step < steps; c.step++) {
        uint32_t op = rnd_below(100);
        uint32_t k = 1 + rnd_below(c.size + 4);
        size_t out_len = 0;
        uint32_t bc, bp;
        back_idx(&c, &c.p[XX], &bc, &bp);
        if (op < 30) {
            c.op = "hostile_req_prod";
            uint32_t v;
            switch (rnd_below(4)) {
            case 0: v = (uint32_t)rnd(); break;                               /* anywhere */
            case 1: v = bp + c.size + 1 + rnd_below(8); break;                /* just past the window */
            case 2: v = bc - rnd_below(c.size + 1); break;                    /* backwards */
            default: v = bp + rnd_below(c.size + 1); break;                   /* inside the window */
            }
            size_t slots = (size_t)c.size * x->slot_size;
            rnd_bytes(payload, slots);
            for (int i = 0; i < NPAIRS; i++) {
                struct pv_sring *s = (void *)c.p[i].page;
                memcpy(s->ring, payload, slots);
                s->req_prod = v;
                rets[i] = 0;
            }
        } else if (op < 60) {
            c.op = "back_consume";
            for (int i = 0; i < NPAIRS; i++)
                rets[i] = back_consume(&c, &c.p[i], outs[i], k);
            out_len = rets[XX] > 0 ? (size_t)rets[XX] * x->slot_size : 0;
            if (rets[XX] > (long long)c.size)
                FAIL(CTXFMT ": consumed more than the ring size", CTXARGS(&c, &c.p[XX]));
        } else if (op < 75) {
            c.op = "back_put+push";
            uint32_t n = rnd_below(bc - bp + 1);
            rnd_bytes(payload, (size_t)n * x->rsp_size);
            for (int i = 0; i < NPAIRS; i++) {
                back_put(&c, &c.p[i], payload, n);
                rets[i] = back_push(&c, &c.p[i]);
            }
        } else {
            c.op = "back_final_check";
            for (int i = 0; i < NPAIRS; i++)
                rets[i] = back_final(&c, &c.p[i]);
        }
        dead_seen |= c.p[XX].back_dead;
        (*nsteps)++;
        /* The fronts are not used here; only the back's view and the shared page must agree. */
        if (!compare_pairs(&c, rets, outs, out_len))
            return 0;
    }
    return 1 + dead_seen;
}

/* A hostile backend: rsp_prod scribbled.  Xen's RING_RESPONSE_PROD_OVERFLOW is "more than the ring size";
 * ours is stricter ("more than were requested"), so: whenever Xen flags, we flag; when neither flags, both
 * copy the same responses; when only ours flags, there really are more responses than requests. */
static void run_hostile_front(const struct xen_ops *x, uint32_t pages, uint32_t start, int steps,
                              unsigned long *nsteps)
{
    struct ctx c;
    ctx_init(&c, x, pages, start);
    struct pair *ref = &c.p[XX], *our = &c.p[OX];
    c.op = "hostile_rsp_prod";
    for (c.step = 0; c.step < steps; c.step++) {
        /* Some requests outstanding, so "more than requested" and "more than size" differ. */
        uint32_t n = rnd_below(c.size + 1);
        rnd_bytes(payload, (size_t)n * x->req_size);
        front_put(&c, ref, payload, n);
        front_put(&c, our, payload, n);
        front_push(&c, ref);
        front_push(&c, our);
        uint32_t rfp, rfc;
        front_idx(&c, ref, &rfp, &rfc);
        uint32_t v;
        switch (rnd_below(3)) {
        case 0: v = (uint32_t)rnd(); break;
        case 1: v = rfc + rnd_below(c.size + 2); break;
        default: v = rfc + rnd_below(rfp - rfc + 1); break;
        }
        size_t slots = (size_t)c.size * x->slot_size;
        rnd_bytes(payload, slots);
        for (int i = 0; i < NPAIRS; i++) {
            struct pv_sring *s = (void *)c.p[i].page;
            memcpy(s->ring, payload, slots);
            s->rsp_prod = v;
        }
        uint32_t max = 1 + rnd_below(c.size + 1);
        int32_t xr = front_consume(&c, ref, outs[XX], max);
        int32_t orr = front_consume(&c, our, outs[OX], max);
        checks++;
        (*nsteps)++;
        if (xr < 0 && orr >= 0)
            FAIL(CTXFMT ": Xen flags rsp_prod=%#x as overflow, ours consumed %d", CTXARGS(&c, our), v, orr);
        else if (xr >= 0 && orr >= 0 &&
                 (xr != orr || memcmp(outs[XX], outs[OX], (size_t)xr * x->rsp_size) != 0))
            FAIL(CTXFMT ": consumed %d responses, Xen macros %d (or different bytes)", CTXARGS(&c, our), orr, xr);
        else if (xr >= 0 && orr < 0 && (uint32_t)(v - rfc) <= (uint32_t)(rfp - rfc))
            FAIL(CTXFMT ": ours flagged rsp_prod=%#x although it is within the requests", CTXARGS(&c, our), v);
        /* Start the next round from a sane ring at a nearby index. */
        c.start = rfc + rnd_below(7);
        for (int i = 0; i < NPAIRS; i++)
            pair_setup(&c, &c.p[i], c.p[i].name, c.p[i].our_front, c.p[i].our_back);
    }
}

/* A front whose put added work after the back's final check said "sleep" must be told to notify: the
 * lost-wakeup property, checked on our pair on both ends. */
static void check_no_lost_wakeup(const struct xen_ops *x, uint32_t pages, uint32_t start, unsigned long *nsteps)
{
    struct ctx c;
    ctx_init(&c, x, pages, start);
    struct pair *p = &c.p[OO];
    static const uint8_t req[128];
    for (int round = 0; round < 3 * (int)c.size; round++) {
        uint32_t burst = 1 + rnd_below(c.size);
        for (uint32_t i = 0; i < burst; i++)
            pv_front_ring_put_requests(&p->of, req, 1, x->req_size);
        pv_front_ring_push(&p->of);
        while (pv_back_ring_consume(&p->ob, outs[OO], c.size) > 0)
            ;
        checks++;
        if (pv_back_ring_final_check(&p->ob) != 0)
            FAIL("%s: back final check found work on a drained ring", x->name);
        pv_back_ring_put_responses(&p->ob, payload, pv_back_ring_outstanding(&p->ob), x->rsp_size);
        pv_back_ring_push(&p->ob);
        while (pv_front_ring_consume(&p->of, outs[OO], c.size, x->rsp_size) > 0)
            ;
        checks++;
        if (pv_front_ring_final_check(&p->of) != 0)
            FAIL("%s: front final check found work on a drained ring", x->name);
        if (pv_front_ring_put_requests(&p->of, req, 1, x->req_size) != 1 || !pv_front_ring_push(&p->of))
            FAIL("%s: push after the back went to sleep did not ask for a notify", x->name);
        while (pv_back_ring_consume(&p->ob, outs[OO], c.size) > 0)
            ;
        pv_back_ring_put_responses(&p->ob, payload, 1, x->rsp_size);
        if (!pv_back_ring_push(&p->ob))
            FAIL("%s: response after the front went to sleep did not ask for a notify", x->name);
        while (pv_front_ring_consume(&p->of, outs[OO], c.size, x->rsp_size) > 0)
            ;
        (*nsteps)++;
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s SEED STEPS\n", argv[0]);
        return 2;
    }
    unsigned long seed = strtoul(argv[1], NULL, 0);
    int steps = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("SEED %lu ABI %s\n", seed, sizeof(void *) == 8 ? "x86_64" : "x86_32");

    check_layouts();
    printf("BLKIF_MIRRORS %d\n", check_pvback_blkif_layouts());

    static const struct {
        const struct xen_ops *x;
        uint32_t pages;
    } rings[] = {
        {&blkif_ops, 1}, {&blkif_ops, 2},    {&blkif_ops, 4},         {&blkif_ops, 16},
        {&netif_tx_ops, 1}, {&netif_rx_ops, 1}, {&xen_netif_ctrl_ops, 1},
    };
    /* Near the top, at the top, across the sign bit, at zero, anywhere. */
    const uint32_t bases[] = {0xffffff00u, 0xffffffc0u, 0x7fffff80u, 0u, 0u};
    const size_t nbases = sizeof(bases) / sizeof(bases[0]);
    unsigned long sequences = 0, nsteps = 0, hostile_dead = 0, wrapped = 0;
    rng_state = seed;
    for (size_t r = 0; r < sizeof(rings) / sizeof(rings[0]); r++) {
        for (size_t b = 0; b < nbases; b++) {
            uint32_t start = b + 1 == nbases ? (uint32_t)rnd() : bases[b] + rnd_below(64);
            int w = run_sequence(rings[r].x, rings[r].pages, start, steps, &nsteps);
            wrapped += w == 2;
            int h = run_hostile_back(rings[r].x, rings[r].pages, start, steps / 2, &nsteps);
            hostile_dead += h == 2;
            run_hostile_front(rings[r].x, rings[r].pages, start, steps / 8 + 1, &nsteps);
            check_no_lost_wakeup(rings[r].x, rings[r].pages, start, &nsteps);
            sequences += 4;
        }
    }
    printf("SUMMARY abi=%s sequences=%lu steps=%lu checks=%lu wrapped=%lu hostile_dead=%lu failures=%lu\n",
           sizeof(void *) == 8 ? "x86_64" : "x86_32", sequences, nsteps, checks, wrapped, hostile_dead, failures);
    return failures ? 1 : 0;
}
