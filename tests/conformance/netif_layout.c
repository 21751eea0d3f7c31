/* Prints the netif layouts of Xen's official io/netif.h next to csrc/netif.h's mirrors (test_netif_layout.py). */
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/io/netif.h>

#include "netif.h"

#define PAIR(name, official, mirror) printf("%s %zu %zu\n", name, (size_t)(official), (size_t)(mirror))
#define SZ(name, a, b) PAIR("sz_" name, sizeof(a), sizeof(b))
#define OFF(name, a, b, f) PAIR("off_" name "_" #f, offsetof(a, f), offsetof(b, f))
#define VAL(name, a, b) PAIR("val_" name, (a), (b))

int main(void)
{
    SZ("netif_tx_request", struct netif_tx_request, struct pv_netif_tx_request);
    OFF("txreq", struct netif_tx_request, struct pv_netif_tx_request, gref);
    OFF("txreq", struct netif_tx_request, struct pv_netif_tx_request, offset);
    OFF("txreq", struct netif_tx_request, struct pv_netif_tx_request, flags);
    OFF("txreq", struct netif_tx_request, struct pv_netif_tx_request, id);
    OFF("txreq", struct netif_tx_request, struct pv_netif_tx_request, size);
    SZ("netif_tx_response", struct netif_tx_response, struct pv_netif_tx_response);
    OFF("txrsp", struct netif_tx_response, struct pv_netif_tx_response, status);
    SZ("netif_rx_request", struct netif_rx_request, struct pv_netif_rx_request);
    OFF("rxreq", struct netif_rx_request, struct pv_netif_rx_request, gref);
    SZ("netif_rx_response", struct netif_rx_response, struct pv_netif_rx_response);
    OFF("rxrsp", struct netif_rx_response, struct pv_netif_rx_response, offset);
    OFF("rxrsp", struct netif_rx_response, struct pv_netif_rx_response, flags);
    OFF("rxrsp", struct netif_rx_response, struct pv_netif_rx_response, status);
    SZ("netif_extra_info", struct netif_extra_info, struct pv_netif_extra_info);
    OFF("extra", struct netif_extra_info, struct pv_netif_extra_info, flags);
    OFF("extra", struct netif_extra_info, struct pv_netif_extra_info, u.gso.size);
    OFF("extra", struct netif_extra_info, struct pv_netif_extra_info, u.gso.type);
    OFF("extra", struct netif_extra_info, struct pv_netif_extra_info, u.gso.features);
    OFF("extra", struct netif_extra_info, struct pv_netif_extra_info, u.mcast.addr);
    OFF("extra", struct netif_extra_info, struct pv_netif_extra_info, u.hash.type);
    OFF("extra", struct netif_extra_info, struct pv_netif_extra_info, u.hash.algorithm);
    OFF("extra", struct netif_extra_info, struct pv_netif_extra_info, u.hash.value);
    SZ("ctrl_req", struct xen_netif_ctrl_request, struct pv_netif_ctrl_request);
    OFF("ctrlreq", struct xen_netif_ctrl_request, struct pv_netif_ctrl_request, type);
    OFF("ctrlreq", struct xen_netif_ctrl_request, struct pv_netif_ctrl_request, data);
    SZ("ctrl_rsp", struct xen_netif_ctrl_response, struct pv_netif_ctrl_response);
    OFF("ctrlrsp", struct xen_netif_ctrl_response, struct pv_netif_ctrl_response, status);
    OFF("ctrlrsp", struct xen_netif_ctrl_response, struct pv_netif_ctrl_response, data);
    SZ("netif_tx_sring_entry", union netif_tx_sring_entry, char[PV_NETIF_TX_SLOT_SIZE]);
    SZ("netif_rx_sring_entry", union netif_rx_sring_entry, char[PV_NETIF_RX_SLOT_SIZE]);
    SZ("ctrl_entry", union xen_netif_ctrl_sring_entry, char[PV_NETIF_CTRL_SLOT_SIZE]);
    VAL("NETTXF", NETTXF_csum_blank | NETTXF_data_validated << 4 | NETTXF_more_data << 8 | NETTXF_extra_info << 12,
        PV_NETTXF_csum_blank | PV_NETTXF_data_validated << 4 | PV_NETTXF_more_data << 8 | PV_NETTXF_extra_info << 12);
    VAL("NETRXF", NETRXF_data_validated | NETRXF_csum_blank << 5 | NETRXF_more_data << 10 | NETRXF_extra_info << 15 |
        NETRXF_gso_prefix << 20, PV_NETRXF_data_validated | PV_NETRXF_csum_blank << 5 | PV_NETRXF_more_data << 10 |
        PV_NETRXF_extra_info << 15 | PV_NETRXF_gso_prefix << 20);
    VAL("extra_types", XEN_NETIF_EXTRA_TYPE_GSO | XEN_NETIF_EXTRA_TYPE_MCAST_ADD << 4 |
        XEN_NETIF_EXTRA_TYPE_MCAST_DEL << 8 | XEN_NETIF_EXTRA_TYPE_HASH << 12 | XEN_NETIF_EXTRA_TYPE_MAX << 16,
        PV_NETIF_EXTRA_TYPE_GSO | PV_NETIF_EXTRA_TYPE_MCAST_ADD << 4 | PV_NETIF_EXTRA_TYPE_MCAST_DEL << 8 |
        PV_NETIF_EXTRA_TYPE_HASH << 12 | PV_NETIF_EXTRA_TYPE_MAX << 16);
    VAL("gso_types", XEN_NETIF_GSO_TYPE_TCPV4 | XEN_NETIF_GSO_TYPE_TCPV6 << 4,
        PV_NETIF_GSO_TYPE_TCPV4 | PV_NETIF_GSO_TYPE_TCPV6 << 4);
    VAL("rsp_status", (NETIF_RSP_DROPPED + 8) | (NETIF_RSP_ERROR + 8) << 4 | NETIF_RSP_OKAY << 8 | NETIF_RSP_NULL << 12,
        (PV_NETIF_RSP_DROPPED + 8) | (PV_NETIF_RSP_ERROR + 8) << 4 | PV_NETIF_RSP_OKAY << 8 | PV_NETIF_RSP_NULL << 12);
    VAL("nr_slots_min", XEN_NETIF_NR_SLOTS_MIN, PV_NETIF_NR_SLOTS_MIN);
    VAL("ctrl_set_mapping", XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING, PV_NETIF_CTRL_TYPE_SET_HASH_MAPPING);
    VAL("ctrl_del_gref", XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING, PV_NETIF_CTRL_TYPE_DEL_GREF_MAPPING);
    VAL("ctrl_status_overflow", XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW, PV_NETIF_CTRL_STATUS_BUFFER_OVERFLOW);
    VAL("hash_types", XEN_NETIF_CTRL_HASH_TYPE_IPV4 | XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP | XEN_NETIF_CTRL_HASH_TYPE_IPV6
        | XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP << 8, PV_NETIF_CTRL_HASH_TYPE_IPV4 | PV_NETIF_CTRL_HASH_TYPE_IPV4_TCP |
        PV_NETIF_CTRL_HASH_TYPE_IPV6 | PV_NETIF_CTRL_HASH_TYPE_IPV6_TCP << 8);
    return 0;
}
