"""L3 xenstore: the wire protocol (wire.py), an asyncio client (client.py) and, for the emulated platform, a
xenstored-compatible server (server.py, tree.py).  See docs/DESIGN.md "XenStore"."""

from backends.xenstore.client import Transaction, Watch, XenStoreClient, XenStoreError
from backends.xenstore.tree import Quotas
from backends.xenstore.wire import Perm

__all__ = ["Perm", "Quotas", "Transaction", "Watch", "XenStoreClient", "XenStoreError", "XenStoreServer"]


def __getattr__(name: str) -> object:
    # The server is only needed by the emulated platform and tests; a backend on real Xen never loads it.
    if name == "XenStoreServer":
        from backends.xenstore.server import XenStoreServer

        return XenStoreServer
    raise AttributeError(name)
