"""L2: the platform seam.  `open_platform()` picks real Xen or the emulated platform once at start-up."""
