"""pvback: userspace Xen paravirtual backends (blkback, netback, vTPM) with a C fast path."""

__version__ = "0.1.0"
