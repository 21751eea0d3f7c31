/* netif TX parsing, responses and the Toeplitz hash; see netif.h.  Everything here works on private memory. */
#include "netif.h"

#include <string.h>

static const char *const reason_names[PV_NETIF_NR_REASONS] = {
    "ok",          "slots",      "size",         "short",      "extra_repeat", "csum",
    "grant",       "tap",        "spoof",        "mcast",      "fatal_slots",  "incomplete",
    "cross_page",  "extra_type", "gso_size",     "gso_type",   "ring",
};

const char *pv_netif_reason_name(int reason)
{
    if (reason < 0 || reason >= PV_NETIF_NR_REASONS)
        return "unknown";
    return reason_names[reason];
}

int pv_netif_reason_fatal(int reason) { return reason >= PV_NETIF_E_FATAL_FIRST; }

static inline struct pv_netif_tx_request slot_at(const uint8_t *s, uint32_t i)
{
    struct pv_netif_tx_request r;
    memcpy(&r, s + (size_t)i * PV_NETIF_TX_SLOT_SIZE, sizeof(r));
    return r;
}

int pv_netif_tx_parse(const void *slots, uint32_t avail, struct pv_netif_tx_pkt *pkt)
{
    const uint8_t *s = slots;
    memset(pkt, 0, sizeof(*pkt));
    if (avail == 0) {
        pkt->nr_slots = 0;
        return PV_NETIF_E_INCOMPLETE;
    }
    struct pv_netif_tx_request first = slot_at(s, 0);
    uint32_t i = 1;
    int drop = PV_NETIF_OK;
    pkt->flags = first.flags;
    pkt->first_id = first.id;
    pkt->len = first.size;

    /* Extra info (xenvif_get_extras).  A chain running past the published requests is "Missing extra info"
     * and an unknown type "Invalid extra type": both fatal in Linux.  Linux lets a repeated type overwrite the
     * earlier one; we refuse to guess which the frontend meant and drop the packet. */
    if (first.flags & PV_NETTXF_extra_info) {
        uint8_t more;
        do {
            if (i >= avail) {
                pkt->nr_slots = i;
                return PV_NETIF_E_INCOMPLETE;
            }
            struct pv_netif_extra_info ex;
            memcpy(&ex, s + (size_t)i * PV_NETIF_TX_SLOT_SIZE, sizeof(ex));
            i++;
            pkt->extra_count++;
            if (ex.type == PV_NETIF_EXTRA_TYPE_NONE || ex.type >= PV_NETIF_EXTRA_TYPE_MAX) {
                pkt->nr_slots = i;
                return PV_NETIF_E_EXTRA_TYPE;
            }
            if (pkt->extra_types & (1u << ex.type)) {
                if (!drop)
                    drop = PV_NETIF_E_EXTRA_REPEAT;
            } else {
                pkt->extra_types |= (uint8_t)(1u << ex.type);
                switch (ex.type) {
                case PV_NETIF_EXTRA_TYPE_GSO:
                    pkt->gso_size = ex.u.gso.size;
                    pkt->gso_type = ex.u.gso.type;
                    pkt->gso_features = ex.u.gso.features;
                    break;
                case PV_NETIF_EXTRA_TYPE_MCAST_ADD:
                case PV_NETIF_EXTRA_TYPE_MCAST_DEL:
                    memcpy(pkt->mcast_addr, ex.u.mcast.addr, 6);
                    break;
                case PV_NETIF_EXTRA_TYPE_HASH:
                    pkt->hash_type = ex.u.hash.type;
                    memcpy(&pkt->hash_value, ex.u.hash.value, 4);
                    break;
                }
            }
            more = ex.flags & PV_NETIF_EXTRA_FLAG_MORE;
        } while (more);
    }

    /* A multicast control request is the first slot and its extras only (Linux answers it before looking at
     * more_data or size, and never copies any data). */
    if (!drop && (pkt->extra_types & ((1u << PV_NETIF_EXTRA_TYPE_MCAST_ADD) | (1u << PV_NETIF_EXTRA_TYPE_MCAST_DEL)))) {
        pkt->nr_slots = i;
        return PV_NETIF_OK;
    }

    /* Fragments (xenvif_count_requests).  `nfrag` counts the slots after the first, as Linux does. */
    uint32_t remaining = first.size;
    uint32_t nfrag = 0;
    pkt->frags[0] = (struct pv_netif_tx_frag){.gref = first.gref, .offset = first.offset, .id = first.id};
    pkt->nr_frags = 1;
    if (first.flags & PV_NETTXF_more_data) {
        uint16_t more;
        do {
            /* "Asked for %d slots but exceeds this limit": more_data on the last published request.  A
             * frontend pushes whole packets, so this is a broken or hostile one (and we must not wait). */
            if (i + nfrag >= avail) {
                pkt->nr_slots = i + nfrag;
                return PV_NETIF_E_INCOMPLETE;
            }
            /* fatal_skb_slots: "This guest is really using too many slots and considered malicious." */
            if (nfrag >= PV_NETIF_FATAL_SLOTS) {
                pkt->nr_slots = i + nfrag;
                return PV_NETIF_E_FATAL_SLOTS;
            }
            /* The protocol had an implicit dependency on MAX_SKB_FRAGS (18): more slots than that are dropped,
             * but not fatal, up to fatal_skb_slots. */
            if (!drop && nfrag >= PV_NETIF_LEGACY_SLOTS_MAX)
                drop = PV_NETIF_E_SLOTS;
            struct pv_netif_tx_request txp = slot_at(s, i + nfrag);
            /* A frame of 64 KiB or more overflowed first->size, so later slots look larger than the rest of
             * the frame.  Linux: "This cannot be fatal error as there are buggy frontends that do this." */
            if (!drop && txp.size > remaining)
                drop = PV_NETIF_E_SIZE;
            remaining = (uint16_t)(remaining - txp.size);
            nfrag++;
            /* "Cross page boundary": the data of one slot must lie within its granted page. */
            if ((uint32_t)txp.offset + txp.size > PV_NETIF_PAGE_SIZE) {
                pkt->nr_slots = i + nfrag;
                return PV_NETIF_E_CROSS_PAGE;
            }
            more = txp.flags & PV_NETTXF_more_data;
            if (!drop) {
                /* Zero-length fragments are legal and answered, but never become a copy: XSA-448 (a
                 * zero-length frag after the header split dereferenced NULL in Linux). */
                if (txp.size == 0)
                    pkt->zero_frags++;
                pkt->frags[pkt->nr_frags++] = (struct pv_netif_tx_frag){
                    .gref = txp.gref, .offset = txp.offset, .size = txp.size, .id = txp.id};
            }
        } while (more);
    }
    pkt->nr_slots = i + nfrag;
    if (drop)
        return drop;
    pkt->frags[0].size = (uint16_t)remaining;
    /* "Bad packet size": the first slot must hold at least an Ethernet header.  Together with copying the
     * whole frame into one linear buffer (netback.c), this is our answer to headers split over many tiny
     * slots (XSA-423, and XSA-432, the overrun in Linux's fix for it): the host never sees a split header. */
    if (remaining < PV_NETIF_ETH_HLEN)
        return PV_NETIF_E_SHORT;
    /* "No crossing a page as the payload mustn't fragment." */
    if ((uint32_t)first.offset + remaining > PV_NETIF_PAGE_SIZE)
        return PV_NETIF_E_CROSS_PAGE;
    /* xenvif_set_skb_gso: both failures are fatal. */
    if (pkt->extra_types & (1u << PV_NETIF_EXTRA_TYPE_GSO)) {
        if (pkt->gso_size == 0)
            return PV_NETIF_E_GSO_SIZE;
        if (pkt->gso_type != PV_NETIF_GSO_TYPE_TCPV4 && pkt->gso_type != PV_NETIF_GSO_TYPE_TCPV6)
            return PV_NETIF_E_GSO_TYPE;
    }
    return PV_NETIF_OK;
}

uint32_t pv_netif_make_tx_response(void *out, uint16_t id, int16_t status)
{
    struct pv_netif_tx_response r;
    memset(&r, 0, sizeof(r));
    r.id = id;
    r.status = status;
    memcpy(out, &r, sizeof(r));
    return sizeof(r);
}

uint32_t pv_netif_make_rx_response(void *out, uint16_t id, uint16_t offset, uint16_t flags, int16_t status)
{
    struct pv_netif_rx_response r;
    memset(&r, 0, sizeof(r));
    r.id = id;
    r.offset = offset;
    r.flags = flags;
    r.status = status;
    memcpy(out, &r, sizeof(r));
    return sizeof(r);
}

uint32_t pv_netif_make_rx_gso_extra(void *out, uint8_t gso_type, uint16_t gso_size)
{
    struct pv_netif_extra_info e;
    memset(&e, 0, sizeof(e));
    e.type = PV_NETIF_EXTRA_TYPE_GSO;
    e.u.gso.type = gso_type;
    e.u.gso.size = gso_size;
    memcpy(out, &e, sizeof(e));
    return sizeof(e);
}

uint32_t pv_netif_make_ctrl_response(void *out, uint16_t id, uint16_t type, uint32_t status, uint32_t data)
{
    struct pv_netif_ctrl_response r;
    memset(&r, 0, sizeof(r));
    r.id = id;
    r.type = type;
    r.status = status;
    r.data = data;
    memcpy(out, &r, sizeof(r));
    return sizeof(r);
}

uint32_t pv_netif_toeplitz(const uint8_t *key, uint32_t keylen, const uint8_t *buf, uint32_t buflen)
{
    uint32_t keyi;
    uint64_t prefix = 0, hash = 0;
    for (keyi = 0; keyi < 8; keyi++) {
        prefix <<= 8;
        prefix |= (keyi < keylen) ? key[keyi] : 0;
    }
    for (uint32_t bufi = 0; bufi < buflen; bufi++) {
        uint8_t byte = buf[bufi];
        for (int bit = 0; bit < 8; bit++) {
            if (byte & 0x80)
                hash ^= prefix;
            prefix <<= 1;
            byte <<= 1;
        }
        prefix |= (keyi < keylen) ? key[keyi] : 0;
        keyi++;
    }
    return (uint32_t)(hash >> 32);
}
