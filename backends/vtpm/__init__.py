"""L4 vTPM backend (tpmif v2 over one shared page): `proto` (pure page layout, checks and the command state
machine), `device` (the DeviceClass: page mapping, event handler, one swtpm per vTPM through the TPM driver)."""
