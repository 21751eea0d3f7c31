"""L6: the pvback daemon and command line (serve, sim, attach/detach, guest, status, demo, bench)."""
