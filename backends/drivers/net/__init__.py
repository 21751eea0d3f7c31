"""Network drivers: the host side of a guest NIC (a tap now; an OVS port comes on top of it)."""
