"""netback: Xen paravirtual NICs (netif) served through a tap."""
