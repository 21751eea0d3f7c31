"""The private network namespaces of the tests.  They live in backends/guests/netns.py (the demo and the
benchmark make the same ones for an emulated guest; tests may import anything, the backends nothing of tests/)."""

from backends.guests.netns import CLONE_NEWNET, NetNS

__all__ = ["CLONE_NEWNET", "NetNS"]
