"""L4 block backend: `proto` (pure blkif facts and parsing), `dataplane` (one queue's ring pump over the C
data path), `device` (the DeviceClass)."""
