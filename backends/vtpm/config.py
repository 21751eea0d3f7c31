"""The vTPM backend's configuration section, `[vtpm]`, with every default documented here."""

from __future__ import annotations

from dataclasses import dataclass

# Backend directory types the vTPM backend serves: what libxl writes for `vtpm=[...]`.
VTPM_BACKEND_TYPES = ("vtpm",)


@dataclass
class VtpmConfig:
    # Persistent vTPM state, one 0700 directory per vTPM UUID (<state_dir>/<uuid>/tpm2 or tpm12).
    state_dir: str = "/var/lib/pvback/vtpm"
    # Runtime files (swtpm sockets, pid files, logs), one 0700 directory per vTPM UUID.
    run_dir: str = "/run/pvback/vtpm"
    # TPM version of a device whose backend dir says none ("2.0" or "1.2"; `pvback attach tpm --version`).
    default_version: str = "2.0"
    # Localities a guest may send commands from, comma-separated digits 0-3 (4 is never allowed).  Linux
    # xen-tpmfront always uses 0.
    localities: str = "0"
    # Longest a single TPM command may take before the guest gets an error (RSA key generation: < 1 s).
    command_timeout_s: float = 120.0
    swtpm: str = "swtpm"
    swtpm_setup: str = "swtpm_setup"
    # swtpm_setup --config; empty: a private one whose local CA (the EK certificates' issuer) lives in
    # <state_dir>/ca, 0700.
    setup_config: str = ""
    # The vTPM manager's socket (`pvback vtpm-manager`): every vTPM's state is then encrypted with a key the
    # manager releases for that guest only, handed to swtpm by fd.  "": no manager, state in the clear.
    manager_socket: str = ""
    # How long a device waits for a manager that is down (retrying, counted in `pvback status`) before it fails.
    manager_wait_s: float = 300.0


VTPM_CHOICES: dict[str, tuple[str, ...]] = {"default_version": ("2.0", "1.2")}
