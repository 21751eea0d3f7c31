/* netif (xen/include/public/io/netif.h) wire layouts, the TX packet parser with Linux netback's rules, and the
 * response writers.
 *
 * The frontend's TX slots are copied out of shared memory once (ring.c) and only those private copies are
 * parsed here (XSA-155).  A packet is a first slot (its `size` is the whole frame), optional extra-info slots
 * (NETTXF_extra_info, chained with XEN_NETIF_EXTRA_FLAG_MORE), then fragment slots while NETTXF_more_data is
 * set.  Every refusal carries a reason code (PV_NETIF_E_*), the index of the per-queue rule-hit counters; a
 * "fatal" reason means what Linux's xenvif_fatal_tx_err means: the frontend is malicious or broken beyond
 * recovery and the whole vif is disabled (from the control path, never inline: XSA-90).
 *
 * The packed structs mirror the official header byte for byte (tests/conformance compares offsetof() on the
 * real header with ours); they are never used in place on shared memory.
 */
#ifndef PVBACK_NETIF_H
#define PVBACK_NETIF_H

#include <stdint.h>

/* ---- constants from io/netif.h ------------------------------------------------------------------------ */

#define PV_NETTXF_csum_blank 1u
#define PV_NETTXF_data_validated 2u
#define PV_NETTXF_more_data 4u
#define PV_NETTXF_extra_info 8u

#define PV_NETRXF_data_validated 1u
#define PV_NETRXF_csum_blank 2u
#define PV_NETRXF_more_data 4u
#define PV_NETRXF_extra_info 8u
#define PV_NETRXF_gso_prefix 16u

#define PV_NETIF_EXTRA_TYPE_NONE 0
#define PV_NETIF_EXTRA_TYPE_GSO 1
#define PV_NETIF_EXTRA_TYPE_MCAST_ADD 2
#define PV_NETIF_EXTRA_TYPE_MCAST_DEL 3
#define PV_NETIF_EXTRA_TYPE_HASH 4
#define PV_NETIF_EXTRA_TYPE_MAX 5
#define PV_NETIF_EXTRA_FLAG_MORE 1u

#define PV_NETIF_GSO_TYPE_NONE 0
#define PV_NETIF_GSO_TYPE_TCPV4 1
#define PV_NETIF_GSO_TYPE_TCPV6 2

#define PV_NETIF_RSP_DROPPED (-2)
#define PV_NETIF_RSP_ERROR (-1)
#define PV_NETIF_RSP_OKAY 0
#define PV_NETIF_RSP_NULL 1

#define PV_NETIF_NR_SLOTS_MIN 18 /* XEN_NETIF_NR_SLOTS_MIN */
#define PV_NETIF_MAX_TX_SIZE 0xFFFF

#define PV_NETIF_CTRL_TYPE_INVALID 0
#define PV_NETIF_CTRL_TYPE_GET_HASH_FLAGS 1
#define PV_NETIF_CTRL_TYPE_SET_HASH_FLAGS 2
#define PV_NETIF_CTRL_TYPE_SET_HASH_KEY 3
#define PV_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE 4
#define PV_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE 5
#define PV_NETIF_CTRL_TYPE_SET_HASH_MAPPING 6
#define PV_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM 7
#define PV_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE 8
#define PV_NETIF_CTRL_TYPE_ADD_GREF_MAPPING 9
#define PV_NETIF_CTRL_TYPE_DEL_GREF_MAPPING 10
#define PV_NETIF_CTRL_STATUS_SUCCESS 0
#define PV_NETIF_CTRL_STATUS_NOT_SUPPORTED 1
#define PV_NETIF_CTRL_STATUS_INVALID_PARAMETER 2
#define PV_NETIF_CTRL_STATUS_BUFFER_OVERFLOW 3
#define PV_NETIF_CTRL_HASH_TYPE_IPV4 1u
#define PV_NETIF_CTRL_HASH_TYPE_IPV4_TCP 2u
#define PV_NETIF_CTRL_HASH_TYPE_IPV6 4u
#define PV_NETIF_CTRL_HASH_TYPE_IPV6_TCP 8u
#define PV_NETIF_CTRL_HASH_ALGORITHM_NONE 0
#define PV_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ 1

/* Linux netback's limits (drivers/net/xen-netback). */
#define PV_NETIF_LEGACY_SLOTS_MAX 18 /* XEN_NETBK_LEGACY_SLOTS_MAX: the historical MAX_SKB_FRAGS */
#define PV_NETIF_FATAL_SLOTS 20      /* fatal_skb_slots' default */
#define PV_NETIF_ETH_HLEN 14
#define PV_NETIF_PAGE_SIZE 4096u

/* ---- wire layouts ------------------------------------------------------------------------------------- */

struct pv_netif_tx_request {
    uint32_t gref;
    uint16_t offset;
    uint16_t flags;
    uint16_t id;
    uint16_t size;
} __attribute__((packed));

struct pv_netif_tx_response {
    uint16_t id;
    int16_t status;
} __attribute__((packed));

struct pv_netif_rx_request {
    uint16_t id;
    uint16_t pad;
    uint32_t gref;
} __attribute__((packed));

struct pv_netif_rx_response {
    uint16_t id;
    uint16_t offset;
    uint16_t flags;
    int16_t status;
} __attribute__((packed));

struct pv_netif_extra_gso {
    uint16_t size;
    uint8_t type;
    uint8_t pad;
    uint16_t features;
} __attribute__((packed));

struct pv_netif_extra_mcast {
    uint8_t addr[6];
} __attribute__((packed));

struct pv_netif_extra_hash {
    uint8_t type;
    uint8_t algorithm;
    uint8_t value[4];
} __attribute__((packed));

struct pv_netif_extra_info {
    uint8_t type;
    uint8_t flags;
    union {
        struct pv_netif_extra_gso gso;
        struct pv_netif_extra_mcast mcast;
        struct pv_netif_extra_hash hash;
        uint16_t pad[3];
    } u;
} __attribute__((packed));

struct pv_netif_ctrl_request {
    uint16_t id;
    uint16_t type;
    uint32_t data[3];
} __attribute__((packed, aligned(4))); /* aligned: data[] is 4-aligned in the header too */

struct pv_netif_ctrl_response {
    uint16_t id;
    uint16_t type;
    uint32_t status;
    uint32_t data;
} __attribute__((packed));

/* Ring slot = sizeof(union {request, response}). */
#define PV_NETIF_TX_SLOT_SIZE 12
#define PV_NETIF_RX_SLOT_SIZE 8
#define PV_NETIF_CTRL_SLOT_SIZE 16
#define PV_NETIF_TX_RSP_SIZE 4
#define PV_NETIF_RX_RSP_SIZE 8
#define PV_NETIF_CTRL_RSP_SIZE 12

_Static_assert(sizeof(struct pv_netif_tx_request) == PV_NETIF_TX_SLOT_SIZE, "tx request");
_Static_assert(sizeof(struct pv_netif_tx_response) == PV_NETIF_TX_RSP_SIZE, "tx response");
_Static_assert(sizeof(struct pv_netif_rx_request) == PV_NETIF_RX_SLOT_SIZE, "rx request");
_Static_assert(sizeof(struct pv_netif_rx_response) == PV_NETIF_RX_RSP_SIZE, "rx response");
_Static_assert(sizeof(struct pv_netif_extra_info) == 8, "extra info fits a tx request and an rx response");
_Static_assert(sizeof(struct pv_netif_ctrl_request) == PV_NETIF_CTRL_SLOT_SIZE, "ctrl request");
_Static_assert(sizeof(struct pv_netif_ctrl_response) == PV_NETIF_CTRL_RSP_SIZE, "ctrl response");
_Static_assert(__builtin_offsetof(struct pv_netif_tx_request, size) == 10, "tx size");
_Static_assert(__builtin_offsetof(struct pv_netif_rx_response, status) == 6, "rx status");
_Static_assert(__builtin_offsetof(struct pv_netif_extra_info, u.gso.features) == 6, "gso features");
_Static_assert(__builtin_offsetof(struct pv_netif_extra_info, u.hash.value) == 4, "hash value");
_Static_assert(__builtin_offsetof(struct pv_netif_ctrl_response, data) == 8, "ctrl data");

/* ---- TX packet parser --------------------------------------------------------------------------------- */

/* Verdicts.  Drops consume the packet's slots and answer each with NETIF_RSP_ERROR (Linux xenvif_tx_err);
 * fatal ones disable the vif (Linux xenvif_fatal_tx_err). */
#define PV_NETIF_OK 0
#define PV_NETIF_E_SLOTS 1        /* drop: more than 18 slots after the first (XEN_NETBK_LEGACY_SLOTS_MAX) */
#define PV_NETIF_E_SIZE 2         /* drop: a slot larger than what remains of the frame */
#define PV_NETIF_E_SHORT 3        /* drop: first slot shorter than an Ethernet header (tiny header slots) */
#define PV_NETIF_E_EXTRA_REPEAT 4 /* drop: the same extra-info type twice in one packet */
#define PV_NETIF_E_CSUM 5         /* drop: csum_blank/GSO frame without a TCP/UDP header we can find */
#define PV_NETIF_E_GRANT 6        /* drop: a grant copy of the packet failed */
#define PV_NETIF_E_TAP 7          /* drop: the host refused the frame (tap write failed) */
#define PV_NETIF_E_SPOOF 8        /* drop: source MAC is not the vif's */
#define PV_NETIF_E_MCAST 9        /* error response: more than 64 multicast addresses */
#define PV_NETIF_E_FATAL_FIRST 10
#define PV_NETIF_E_FATAL_SLOTS 10 /* fatal: fatal_skb_slots (20) or more slots after the first */
#define PV_NETIF_E_INCOMPLETE 11  /* fatal: the packet runs past the requests the frontend published */
#define PV_NETIF_E_CROSS_PAGE 12  /* fatal: offset + size beyond the 4 KiB page */
#define PV_NETIF_E_EXTRA_TYPE 13  /* fatal: extra-info type 0 or >= XEN_NETIF_EXTRA_TYPE_MAX */
#define PV_NETIF_E_GSO_SIZE 14    /* fatal: GSO extra with size 0 */
#define PV_NETIF_E_GSO_TYPE 15    /* fatal: GSO extra with a type other than TCPv4/TCPv6 */
#define PV_NETIF_E_RING 16        /* fatal: req_prod ran away (more requests than the ring holds) */
#define PV_NETIF_NR_REASONS 17

#define PV_NETIF_MAX_FRAGS (PV_NETIF_LEGACY_SLOTS_MAX + 1) /* the first slot + 18 */

struct pv_netif_tx_frag {
    uint32_t gref;
    uint16_t offset;
    uint16_t size; /* bytes of the frame in this slot (for the first slot: its own share, not the total) */
    uint16_t id;
};

/* One packet as parsed from private slot copies.  `nr_slots` ring slots belong to it whatever the verdict
 * (first, extras, fragments); `ids` of the data slots are in frags[]. */
struct pv_netif_tx_pkt {
    uint32_t nr_slots;
    uint32_t nr_frags;     /* data slots (first included) in frags[] */
    uint32_t len;          /* frame length: the first slot's size */
    uint32_t zero_frags;   /* zero-length data slots (XSA-448: answered, never copied) */
    uint16_t flags;        /* the first slot's NETTXF_* */
    uint16_t first_id;
    uint8_t extra_count;   /* extra-info slots following the first */
    uint8_t extra_types;   /* bit (1 << type) per extra seen */
    uint8_t gso_type;      /* PV_NETIF_GSO_TYPE_* (NONE without a GSO extra) */
    uint8_t hash_type;
    uint16_t gso_size;
    uint16_t gso_features;
    uint32_t hash_value;
    uint8_t mcast_addr[6]; /* MCAST_ADD / MCAST_DEL */
    struct pv_netif_tx_frag frags[PV_NETIF_MAX_FRAGS];
};

/* Parse the packet starting at slots[0], where `avail` private copies (12 bytes each) follow, in Linux
 * netback's order of checks (xenvif_tx_build_gops, xenvif_get_extras, xenvif_count_requests,
 * xenvif_set_skb_gso).  Returns PV_NETIF_OK or a PV_NETIF_E_* reason; pkt->nr_slots says how many slots the
 * packet used (for a drop: all of them, so the caller answers each and goes on). */
int pv_netif_tx_parse(const void *slots, uint32_t avail, struct pv_netif_tx_pkt *pkt);

int pv_netif_reason_fatal(int reason);
const char *pv_netif_reason_name(int reason);

/* Responses built into zeroed buffers of exactly the response size, field by field (XSA-216). */
uint32_t pv_netif_make_tx_response(void *out, uint16_t id, int16_t status);
uint32_t pv_netif_make_rx_response(void *out, uint16_t id, uint16_t offset, uint16_t flags, int16_t status);
/* An RX GSO extra-info slot (8 bytes, the size of an RX response). */
uint32_t pv_netif_make_rx_gso_extra(void *out, uint8_t gso_type, uint16_t gso_size);
uint32_t pv_netif_make_ctrl_response(void *out, uint16_t id, uint16_t type, uint32_t status, uint32_t data);

/* Xen's reference Toeplitz hash (io/netif.h xen_netif_toeplitz_hash). */
uint32_t pv_netif_toeplitz(const uint8_t *key, uint32_t keylen, const uint8_t *buf, uint32_t buflen);

#endif
