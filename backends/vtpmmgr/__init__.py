"""The vTPM manager (`pvback vtpm-manager`): a process of its own that alone holds the key-encryption key and
releases each vTPM's state key only to the vTPM backend serving that vTPM's guest, after checking the guest's
identity in xenstore itself.  A program beside the daemon (layer 5, like the emulated machine): it uses the
xenstore client and the TPM drivers' wire format, no device package, and nothing but the CLI imports it."""
