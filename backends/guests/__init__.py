"""Emulated guests and their frontends (blkfront now; netfront and tpmfront next): the other end of the rings,
for tests, the demo and `pvback guest`.  The backend never imports this package."""
