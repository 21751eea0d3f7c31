"""Where the manager's key-encryption key (KEK) comes from: a key file only the manager can read, a passphrase
given at start-up (stretched with scrypt), or a blob sealed to the host's TPM 2.0 under a PCR policy
(tpm2-tools).  Each source either yields the 32-byte KEK or raises KekError; none ever creates a KEK unless asked
to initialise a new store (a missing key file must not silently become a new, empty manager: every vTPM would
then look unknown, which is how Xen's vtpmmgr loses guests' state).

The KEK travels only through memory and pipes: tpm2-tools get it on stdin (tpm2_create -i -) and give it back on
stdout (tpm2_unseal), never on a command line or in a file.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import stat
import subprocess
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

KEK_BYTES = 32
# scrypt cost: ~0.1 s and 32 MiB here; an offline guess costs the same.
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
TPM_TIMEOUT_S = 60.0


class KekError(Exception):
    """The KEK cannot be had (missing, unreadable, unsafe permissions, wrong, or the TPM refused)."""


# -- key file ---------------------------------------------------------------------------------------------


def read_key_file(path: Path) -> bytearray:
    """The KEK from a file the manager alone can read: owned by the effective uid, no group or other access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KekError(f"the KEK file {path} does not exist (a new store: `pvback vtpm-manager --init`; an "
                       "existing one: restore the file from its backup)") from None
    except OSError as exc:
        raise KekError(f"cannot open the KEK file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KekError(f"the KEK file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise KekError(f"the KEK file {path} belongs to uid {st.st_uid}, not the manager's ({os.geteuid()})")
        if st.st_mode & 0o077:
            raise KekError(f"the KEK file {path} is mode {stat.S_IMODE(st.st_mode):04o}: others may read it "
                           "(chmod 0600)")
        data = bytearray(os.read(fd, 256))
    finally:
        os.close(fd)
    if len(data) == KEK_BYTES:
        return data
    raise KekError(f"the KEK file {path} holds {len(data)} bytes, not {KEK_BYTES}")


def create_key_file(path: Path) -> bytearray:
    """A new random KEK in a new file (0600; never overwrites)."""
    kek = bytearray(os.urandom(KEK_BYTES))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise KekError(f"the KEK file {path} already exists: refusing to replace a KEK") from None
    try:
        os.write(fd, kek)
        os.fsync(fd)
    finally:
        os.close(fd)
    return kek


# -- passphrase -------------------------------------------------------------------------------------------


def from_passphrase(passphrase: bytes | bytearray, salt: bytes) -> bytearray:
    if not passphrase:
        raise KekError("an empty passphrase")
    return bytearray(Scrypt(salt=salt, length=KEK_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        bytes(passphrase)))


def read_passphrase(fd: int | None) -> bytearray:
    """From `fd` (up to a newline or EOF), else from the controlling tty without echo; never from argv/env."""
    if fd is not None:
        buf = bytearray()
        while len(buf) < 4096:
            chunk = os.read(fd, 4096 - len(buf))
            if not chunk:
                break
            buf += chunk
            if b"\n" in chunk:
                break
        line = buf.split(b"\n", 1)[0]
        buf[:] = bytes(len(buf))
        return bytearray(line)
    try:
        return bytearray(getpass.getpass("vTPM manager passphrase: ").encode())
    except (EOFError, OSError) as exc:
        raise KekError(f"no passphrase: no tty to ask on and no --passphrase-fd ({exc})") from None


# -- sealed to the host TPM -------------------------------------------------------------------------------


def _tpm2(argv: list[str], tcti: str, *, stdin: bytes = b"", cwd: Path) -> bytes:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPM2TOOLS_")}
    env["TPM2TOOLS_TCTI"] = tcti  # where the TPM is, not a secret
    env["TSS2_LOG"] = "all+none"
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, env=env, cwd=cwd, timeout=TPM_TIMEOUT_S,
                              check=False)
    except FileNotFoundError:
        raise KekError(f"{argv[0]} not found: install tpm2-tools") from None
    except subprocess.TimeoutExpired:
        raise KekError(f"{argv[0]} did not finish in {TPM_TIMEOUT_S:.0f} s (host TPM at {tcti})") from None
    if proc.returncode != 0:
        raise KekError(f"{argv[0]} failed ({proc.returncode}): "
                       f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
    return proc.stdout


def _primary(tcti: str, work: Path) -> Path:
    """The owner hierarchy's ECC primary: the same template gives the same key on every call."""
    ctx = work / "primary.ctx"
    _tpm2(["tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", str(ctx)], tcti, cwd=work)
    return ctx


def seal(kek: bytes | bytearray, *, tcti: str, pcrs: str, out_dir: Path, stem: str = "kek") -> None:
    """Seal `kek` under the current values of `pcrs` into out_dir/<stem>.pub + <stem>.priv (useless off this
    TPM)."""
    with tempfile.TemporaryDirectory(prefix="pvback-seal-") as tmp:
        work = Path(tmp)
        _tpm2(["tpm2_flushcontext", "-t"], tcti, cwd=work)
        primary = _primary(tcti, work)
        _tpm2(["tpm2_flushcontext", "-t"], tcti, cwd=work)
        policy = work / "pcr.policy"
        _tpm2(["tpm2_createpolicy", "--policy-pcr", "-l", pcrs, "-L", str(policy)], tcti, cwd=work)
        pub, priv = out_dir / f"{stem}.pub.tmp", out_dir / f"{stem}.priv.tmp"
        _tpm2(["tpm2_create", "-C", str(primary), "-L", str(policy), "-a", "fixedtpm|fixedparent|adminwithpolicy",
               "-i", "-", "-u", str(pub), "-r", str(priv)], tcti, stdin=bytes(kek), cwd=work)
        _tpm2(["tpm2_flushcontext", "-t"], tcti, cwd=work)
        for f in (pub, priv):
            os.chmod(f, 0o600)
            f.rename(f.with_suffix(""))


def unseal(*, tcti: str, pcrs: str, blob_dir: Path, stem: str = "kek") -> bytearray:
    pub, priv = blob_dir / f"{stem}.pub", blob_dir / f"{stem}.priv"
    if not pub.exists() or not priv.exists():
        raise KekError(f"no sealed KEK in {blob_dir} ({stem}.pub/{stem}.priv)")
    with tempfile.TemporaryDirectory(prefix="pvback-unseal-") as tmp:
        work = Path(tmp)
        with contextlib.suppress(KekError):
            _tpm2(["tpm2_flushcontext", "-t"], tcti, cwd=work)
        primary = _primary(tcti, work)
        _tpm2(["tpm2_flushcontext", "-t"], tcti, cwd=work)
        obj = work / "kek.ctx"
        _tpm2(["tpm2_load", "-C", str(primary), "-u", str(pub), "-r", str(priv), "-c", str(obj)], tcti, cwd=work)
        _tpm2(["tpm2_flushcontext", "-t"], tcti, cwd=work)
        try:
            out = _tpm2(["tpm2_unseal", "-c", str(obj), "-p", f"pcr:{pcrs}"], tcti, cwd=work)
        except KekError as exc:
            raise KekError(f"the host TPM refused to unseal the KEK (a PCR in {pcrs} changed, or another TPM): "
                           f"{exc}") from None
        finally:
            with contextlib.suppress(KekError):
                _tpm2(["tpm2_flushcontext", "-t"], tcti, cwd=work)
    kek = bytearray(out)
    if len(kek) != KEK_BYTES:
        raise KekError(f"the unsealed KEK has {len(kek)} bytes, not {KEK_BYTES}")
    return kek
