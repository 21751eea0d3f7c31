"""The manager's store: one file per vTPM holding its state key wrapped by the KEK, and `kek.json`, which
says how the KEK is obtained and lets a wrong one be recognised before any vTPM is touched.

A record's key is sealed with AES-256-GCM under the KEK with the record's binding as associated data:
(domain UUID, devid, group, vTPM UUID).  Editing the binding in the file (to hand one guest's key to another)
makes the unwrap fail; so does a wrong KEK.  Records are written whole to a temporary file, fsynced and
renamed, so a crash leaves the old record or the new one.

Delete is crypto-shredding: the record's bytes are overwritten, fsynced and unlinked.  The state files stay
on disk and nobody can decrypt them any more (the key existed nowhere else).  A copy of the store taken
before the delete still holds the wrapped key and opens with the KEK: that is what a backup is for, and why
rotating the KEK after a delete makes old backups useless too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
RECORD_VERSION = 1
CHECK_PLAINTEXT = b"pvback vtpm-manager KEK check v1"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_GROUP = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")
MAX_DEVID = 255


class StoreError(Exception):
    """The store is unusable (permissions, a wrong KEK, a damaged record) or the request names nothing valid."""


class NotProvisioned(StoreError):
    pass


def norm_uuid(text: str, what: str = "UUID") -> str:
    u = text.strip().lower()
    if not _UUID.match(u):
        raise StoreError(f"{what} {text!r} is not a UUID")
    return u


def check_group(group: str) -> str:
    if not _GROUP.match(group):
        raise StoreError(f"group {group!r}: up to 64 of A-Z a-z 0-9 _ . -")
    return group


def check_devid(devid: int) -> int:
    if not 0 <= devid <= MAX_DEVID:
        raise StoreError(f"devid {devid} is outside 0..{MAX_DEVID}")
    return devid


@dataclass
class Record:
    domain_uuid: str
    devid: int
    group: str
    vtpm_uuid: str
    wrapped: str  # base64(nonce || AES-GCM(KEK, key, aad=binding))
    initialized: bool = False
    created: float = 0.0
    version: int = RECORD_VERSION

    @property
    def name(self) -> str:
        return f"{self.domain_uuid}.{self.devid}"

    def binding(self) -> bytes:
        return "\0".join(("pvback-vtpm-key-v1", self.domain_uuid, str(self.devid), self.group,
                          self.vtpm_uuid)).encode()

    def public(self) -> dict[str, Any]:
        """What list/show print: everything but the wrapped key."""
        d = asdict(self)
        del d["wrapped"]
        return d


def wrap(kek: bytes | bytearray, key: bytes | bytearray, aad: bytes) -> str:
    nonce = os.urandom(NONCE_BYTES)
    return base64.b64encode(nonce + AESGCM(bytes(kek)).encrypt(nonce, bytes(key), aad)).decode()


def unwrap(kek: bytes | bytearray, wrapped: str, aad: bytes) -> bytearray:
    try:
        raw = base64.b64decode(wrapped, validate=True)
    except ValueError:
        raise StoreError("a damaged record (not base64)") from None
    if len(raw) < NONCE_BYTES + 16:
        raise StoreError("a damaged record (too short)")
    try:
        return bytearray(AESGCM(bytes(kek)).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad))
    except InvalidTag:
        raise StoreError("the key does not unwrap: a wrong KEK, or a record whose binding was altered") from None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.rename(path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shred(path: Path) -> None:
    """Overwrite in place, fsync, unlink, fsync the directory."""
    with contextlib.suppress(FileNotFoundError):
        size = path.stat().st_size
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, os.urandom(size))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        _fsync_dir(path.parent)


TRANSPORT = "transport.json"


def _transport_key(shared: bytes, eph_pub: bytes, target: bytes) -> bytearray:
    return bytearray(HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=eph_pub + target,
                          info=b"pvback-vtpm-export-v1").derive(shared))


def _write_meta(gen: Path, source: str, kek: bytes | bytearray, extra: dict[str, Any]) -> None:
    meta = {"version": 1, "source": source, **extra, "check": wrap(kek, CHECK_PLAINTEXT, b"kek-check")}
    _write_atomic(gen / "kek.json", json.dumps(meta, indent=1, sort_keys=True).encode())


def check_private_dir(path: Path, *, create: bool) -> None:
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StoreError(f"the manager's state directory {path} does not exist (`pvback vtpm-manager --init` "
                         "makes a new store)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StoreError(f"{path} belongs to uid {st.st_uid}, not the manager's ({os.geteuid()})")
    if st.st_mode & 0o077:
        raise StoreError(f"{path} is mode {stat.S_IMODE(st.st_mode):04o}: others may enter it (chmod 0700)")


class Store:
    """Records and the KEK's description and check value (kek.json) in one generation directory,
    <dir>/keys.<n>, which the symlink <dir>/keys names.  A KEK rotation writes generation n+1 whole (every
    record re-wrapped, a new check value) and then replaces the symlink in one rename: a crash leaves either
    generation complete, never a mix of records under two KEKs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.link = directory / "keys"
        self._kek: bytearray | None = None

    @property
    def keys(self) -> Path:
        return self.dir / os.readlink(self.link) if self.link.is_symlink() else self.link

    @property
    def meta_path(self) -> Path:
        return self.keys / "kek.json"

    def _new_generation(self) -> Path:
        gens = [int(p.name.split(".", 1)[1]) for p in self.dir.glob("keys.*") if p.name.split(".", 1)[1].isdigit()]
        gen = self.dir / f"keys.{max(gens, default=0) + 1}"
        gen.mkdir(mode=0o700)
        return gen

    def _commit(self, gen: Path) -> None:
        """Point `keys` at `gen` (rename of a new symlink over the old one: atomic), then drop the old one."""
        old = self.keys if self.link.is_symlink() else None
        _fsync_dir(gen)
        tmp = self.dir / ".keys.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(gen.name, tmp)
        tmp.rename(self.link)
        _fsync_dir(self.dir)
        if old is not None and old != gen:
            for f in old.iterdir():
                shred(f)
            old.rmdir()

    # -- KEK ----------------------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{self.dir} is not a manager store (no kek.json): `pvback vtpm-manager --init` "
                             "makes one") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.meta_path}: unreadable ({exc})") from None
        if not isinstance(meta, dict):
            raise StoreError(f"{self.meta_path}: not a JSON object")
        return meta

    def initialise(self, source: str, kek: bytes | bytearray, extra: dict[str, Any]) -> None:
        """A new store (refuses an existing one)."""
        check_private_dir(self.dir, create=True)
        if self.link.exists() or self.link.is_symlink():
            raise StoreError(f"{self.dir} already holds a store: refusing to replace its KEK")
        gen = self._new_generation()
        _write_meta(gen, source, kek, extra)
        self._commit(gen)

    def open(self, kek: bytearray) -> None:
        """Take the KEK if it is the store's; a wrong one is refused before any record is read."""
        check_private_dir(self.dir, create=False)
        check_private_dir(self.keys, create=False)
        if not self.check_kek(kek):
            raise StoreError("this is not the store's KEK (wrong key file, passphrase, or host TPM state): "
                             "refusing to serve keys")
        self._kek = kek

    def set_kek(self, source: str, kek: bytearray, extra: dict[str, Any]) -> int:
        """Rotate the KEK: a new generation with every record re-wrapped under the new one (the state keys
        are unchanged, so every vTPM's NV is untouched), committed at once; returns the number of records."""
        old = self._need_kek()
        gen = self._new_generation()
        n = 0
        try:
            for rec in list(self.records()):
                key = unwrap(old, rec.wrapped, rec.binding())
                try:
                    rec.wrapped = wrap(kek, key, rec.binding())
                finally:
                    key[:] = bytes(len(key))
                _write_atomic(gen / self._path(rec.domain_uuid, rec.devid).name,
                              json.dumps(asdict(rec), indent=1, sort_keys=True).encode())
                n += 1
            transport = self.keys / TRANSPORT
            if transport.exists():
                t = json.loads(transport.read_text())
                priv = unwrap(old, str(t["wrapped"]), b"transport")
                try:
                    t["wrapped"] = wrap(kek, priv, b"transport")
                finally:
                    priv[:] = bytes(len(priv))
                _write_atomic(gen / TRANSPORT, json.dumps(t, indent=1, sort_keys=True).encode())
            _write_meta(gen, source, kek, extra)
        except BaseException:
            for f in gen.iterdir():
                shred(f)
            gen.rmdir()
            raise
        self._commit(gen)
        self._kek = kek
        return n

    def drop_stale_generations(self) -> None:
        """Generations a rotation wrote but never committed (it died before the rename)."""
        live = self.keys
        for g in self.dir.glob("keys.*"):
            if g.is_dir() and not g.is_symlink() and g != live:
                for f in g.iterdir():
                    shred(f)
                g.rmdir()

    def check_kek(self, kek: bytes | bytearray) -> bool:
        try:
            return unwrap(kek, str(self.meta().get("check", "")), b"kek-check") == CHECK_PLAINTEXT
        except StoreError:
            return False

    def _need_kek(self) -> bytearray:
        if self._kek is None:
            raise StoreError("the store is not open")
        return self._kek

    # -- records ------------------------------------------------------------------------------------------

    def _path(self, domain_uuid: str, devid: int) -> Path:
        return self.keys / f"{domain_uuid}.{devid}.json"

    def _save(self, rec: Record) -> None:
        _write_atomic(self._path(rec.domain_uuid, rec.devid),
                      json.dumps(asdict(rec), indent=1, sort_keys=True).encode())

    def records(self) -> Iterator[Record]:
        for p in sorted(self.keys.glob("*-*.*.json")):  # <uuid>.<devid>.json, not kek.json/transport.json
            yield self._load(p)

    def _load(self, path: Path) -> Record:
        try:
            d = json.loads(path.read_text())
            rec = Record(**d)
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"{path.name}: a damaged record ({exc})") from None
        if rec.version != RECORD_VERSION:
            raise StoreError(f"{path.name}: record version {rec.version} (this manager knows {RECORD_VERSION})")
        return rec

    def get(self, domain_uuid: str, devid: int) -> Record:
        p = self._path(norm_uuid(domain_uuid, "domain UUID"), check_devid(devid))
        if not p.exists():
            raise NotProvisioned(f"no vTPM is provisioned for domain {domain_uuid} devid {devid}")
        return self._load(p)

    def create(self, domain_uuid: str, devid: int, *, vtpm_uuid: str, group: str = "",
               key: bytes | bytearray | None = None, initialized: bool = False) -> Record:
        domain_uuid = norm_uuid(domain_uuid, "domain UUID")
        vtpm_uuid = norm_uuid(vtpm_uuid, "vTPM UUID")
        rec = Record(domain_uuid=domain_uuid, devid=check_devid(devid), group=check_group(group),
                     vtpm_uuid=vtpm_uuid, wrapped="", initialized=initialized, created=time.time())
        if self._path(domain_uuid, devid).exists():
            raise StoreError(f"domain {domain_uuid} devid {devid} already has a vTPM (delete it first)")
        for other in self.records():
            if other.vtpm_uuid == vtpm_uuid:
                raise StoreError(f"vTPM {vtpm_uuid} is already bound to domain {other.domain_uuid} devid "
                                 f"{other.devid}")
        fresh = bytearray(os.urandom(KEY_BYTES)) if key is None else bytearray(key)
        try:
            if len(fresh) != KEY_BYTES:
                raise StoreError(f"a state key has {KEY_BYTES} bytes, not {len(fresh)}")
            rec.wrapped = wrap(self._need_kek(), fresh, rec.binding())
        finally:
            fresh[:] = bytes(len(fresh))
        self._save(rec)
        return rec

    def key_of(self, rec: Record) -> bytearray:
        return unwrap(self._need_kek(), rec.wrapped, rec.binding())

    def mark_initialized(self, rec: Record) -> None:
        if not rec.initialized:
            rec.initialized = True
            self._save(rec)

    def delete(self, domain_uuid: str, devid: int) -> Record:
        rec = self.get(domain_uuid, devid)
        shred(self._path(rec.domain_uuid, rec.devid))
        return rec

    # -- moving a vTPM to another manager -------------------------------------------------------------------

    def transport_public(self) -> bytes:
        """This manager's X25519 public key, which another manager exports vTPMs to (made on first use; the
        private half is stored wrapped by the KEK like a state key)."""
        path = self.keys / TRANSPORT
        if not path.exists():
            priv = X25519PrivateKey.generate()
            raw = bytearray(priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                               serialization.NoEncryption()))
            pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            try:
                t = {"public": base64.b64encode(pub).decode(), "wrapped": wrap(self._need_kek(), raw, b"transport")}
            finally:
                raw[:] = bytes(len(raw))
            _write_atomic(path, json.dumps(t, indent=1, sort_keys=True).encode())
        return base64.b64decode(json.loads(path.read_text())["public"])

    def export(self, rec: Record, target_public: bytes) -> dict[str, Any]:
        """The record's key wrapped for the manager owning `target_public` (ephemeral X25519 + HKDF +
        AES-GCM, the binding and the target as associated data): only that manager can unwrap it."""
        try:
            target = X25519PublicKey.from_public_bytes(target_public)
        except ValueError:
            raise StoreError("the target's transport key is not an X25519 public key") from None
        eph = X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        wk = _transport_key(eph.exchange(target), eph_pub, target_public)
        key = self.key_of(rec)
        try:
            wrapped = wrap(wk, key, rec.binding() + target_public)
        finally:
            key[:] = bytes(len(key))
            wk[:] = bytes(len(wk))
        return {"version": 1, "domain_uuid": rec.domain_uuid, "devid": rec.devid, "group": rec.group,
                "vtpm_uuid": rec.vtpm_uuid, "initialized": rec.initialized,
                "ephemeral": base64.b64encode(eph_pub).decode(), "target": base64.b64encode(target_public).decode(),
                "wrapped": wrapped}

    def import_(self, bundle: dict[str, Any]) -> Record:
        try:
            if bundle.get("version") != 1:
                raise StoreError(f"an export bundle of version {bundle.get('version')!r}")
            eph_pub = base64.b64decode(str(bundle["ephemeral"]), validate=True)
            target = base64.b64decode(str(bundle["target"]), validate=True)
            probe = Record(domain_uuid=norm_uuid(str(bundle["domain_uuid"])), devid=check_devid(int(bundle["devid"])),
                           group=check_group(str(bundle["group"])), vtpm_uuid=norm_uuid(str(bundle["vtpm_uuid"])),
                           wrapped="")
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"not an export bundle ({exc})") from None
        if target != self.transport_public():
            raise StoreError("this bundle was exported for another manager (its transport key is not ours)")
        t = json.loads((self.keys / TRANSPORT).read_text())
        raw = unwrap(self._need_kek(), str(t["wrapped"]), b"transport")
        try:
            priv = X25519PrivateKey.from_private_bytes(bytes(raw))
        finally:
            raw[:] = bytes(len(raw))
        wk = _transport_key(priv.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, target)
        try:
            key = unwrap(wk, str(bundle["wrapped"]), probe.binding() + target)
        finally:
            wk[:] = bytes(len(wk))
        try:
            return self.create(probe.domain_uuid, probe.devid, vtpm_uuid=probe.vtpm_uuid, group=probe.group,
                               key=key, initialized=bool(bundle.get("initialized")))
        finally:
            key[:] = bytes(len(key))

    def find_vtpm(self, vtpm_uuid: str) -> Record:
        u = norm_uuid(vtpm_uuid, "vTPM UUID")
        for rec in self.records():
            if rec.vtpm_uuid == u:
                return rec
        raise NotProvisioned(f"no vTPM {u} is provisioned")
