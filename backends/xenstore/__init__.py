"""L3 xenstore: the wire protocol (wire.py), an asyncio client (client.py) and, for the emulated platform, a
xenstored-compatible server (server.py over tree.py).  See docs/DESIGN.md "XenStore".

Nothing is imported here: the platform reads its own domid with the wire codec alone, and the daemon's client
must not drag the server in."""
