"""L3 xenstore: the wire protocol (wire.py), an asyncio client (client.py) and, for the emulated platform, a
xenstored-compatible server (server.py over tree.py).  See docs/DESIGN.md "XenStore"."""

from backends.xenstore.client import Transaction, Watch, XenStoreClient, XenStoreError
from backends.xenstore.server import XenStoreServer
from backends.xenstore.tree import Quotas
from backends.xenstore.wire import Perm

__all__ = ["Perm", "Quotas", "Transaction", "Watch", "XenStoreClient", "XenStoreError", "XenStoreServer"]
