"""TPM drivers: one swtpm per vTPM (`swtpm.Swtpm`).  They move TPM command bytes and know no tpmif."""
