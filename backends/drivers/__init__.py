"""L5 drivers: storage (file/blockdev, null; NBD later), network and TPM, each behind a small interface."""
