"""`pvback vtpm-manager`: the process that alone holds the KEK and releases a vTPM's state key to the vTPM
backend for the device it is connecting, after checking the device's identity in xenstore itself.

Start-up order: xenstore and the socket are opened first (they may need root), then the process drops to its
own user, then the KEK is obtained and checked against the store (a wrong one: exit, nothing touched).  One
request per connection (drivers/tpm/keymgr.py has the wire format); every request is checked by the peer's
SO_PEERCRED uid: key releases only to [manager] release_uids, administration only to admin_uids.  Each
request is logged with its peer and outcome, never with a key.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures.thread  # noqa: F401  (asyncio.to_thread imports it lazily: before dropping privileges)
import contextlib
import logging
import os
import pwd
import signal
import socket
import stat
import struct
import uuid as uuidlib
from pathlib import Path
from typing import Any

from backends.drivers.tpm.keymgr import MAX_MESSAGE, ManagerError, b64, decode, encode, unb64
from backends.vtpmmgr import kek as keksrc
from backends.vtpmmgr.config import ManagerConfig
from backends.vtpmmgr.identity import IdentityError, identify
from backends.vtpmmgr.store import NotProvisioned, Record, Store, StoreError, check_private_dir, shred
from backends.xenstore.client import XenStoreClient, XenStoreError

log = logging.getLogger("pvback.vtpm-manager")

REQUEST_TIMEOUT_S = 10.0
RELEASE_OPS = frozenset({"release", "initialized"})
ADMIN_OPS = frozenset({"create", "list", "show", "delete", "ping", "rotate", "transport-key", "export", "import"})


class ManagerFatal(Exception):
    """The manager cannot run (configuration, KEK, store); the message is for the operator."""


class Refused(Exception):
    pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, as the kernel saw it connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def obtain_kek(cfg: ManagerConfig, store: Store, *, init: bool, passphrase_fd: int | None) -> bytearray:
    """The KEK, checked against the store (or a new store made with it when `init`)."""
    state_dir = Path(cfg.state_dir)
    try:
        if init:
            extra: dict[str, Any] = {}
            if cfg.kek_source == "file":
                path = Path(cfg.kek_file)
                kek = keksrc.read_key_file(path) if path.exists() else keksrc.create_key_file(path)
            elif cfg.kek_source == "passphrase":
                salt = os.urandom(16)
                phrase = keksrc.read_passphrase(passphrase_fd)
                try:
                    kek = keksrc.from_passphrase(phrase, salt)
                finally:
                    phrase[:] = bytes(len(phrase))
                extra = {"salt": base64.b64encode(salt).decode()}
            else:
                check_private_dir(state_dir, create=True)
                kek = bytearray(os.urandom(keksrc.KEK_BYTES))
                keksrc.seal(kek, tcti=cfg.tpm_tcti, pcrs=cfg.tpm_pcrs, out_dir=state_dir)
                extra = {"pcrs": cfg.tpm_pcrs}
            store.initialise(cfg.kek_source, kek, extra)
            log.info("a new store", extra={"dir": str(state_dir), "kek_source": cfg.kek_source})
        else:
            meta = store.meta()
            if meta.get("source") != cfg.kek_source:
                raise ManagerFatal(f"the store's KEK comes from {meta.get('source')!r}, the configuration says "
                                   f"{cfg.kek_source!r}")
            if cfg.kek_source == "file":
                kek = keksrc.read_key_file(Path(cfg.kek_file))
                if not store.check_kek(kek) and _pending_file(cfg).exists():
                    kek = _finish_rotation(cfg, store)
            elif cfg.kek_source == "passphrase":
                phrase = keksrc.read_passphrase(passphrase_fd)
                try:
                    kek = keksrc.from_passphrase(phrase, base64.b64decode(str(meta.get("salt", ""))))
                finally:
                    phrase[:] = bytes(len(phrase))
            else:
                pcrs = str(meta.get("pcrs", cfg.tpm_pcrs))
                if (state_dir / "kek.new.pub").exists():  # a rotation may have committed before its rename
                    with contextlib.suppress(keksrc.KekError):
                        nxt = keksrc.unseal(tcti=cfg.tpm_tcti, pcrs=pcrs, blob_dir=state_dir, stem="kek.new")
                        if store.check_kek(nxt):
                            for ext in (".pub", ".priv"):
                                (state_dir / f"kek.new{ext}").rename(state_dir / f"kek{ext}")
                            log.warning("completed an interrupted KEK rotation")
                kek = keksrc.unseal(tcti=cfg.tpm_tcti, pcrs=pcrs, blob_dir=state_dir)
        store.open(kek)
        store.drop_stale_generations()
    except (keksrc.KekError, StoreError) as exc:
        raise ManagerFatal(str(exc)) from None
    return kek


def _pending_file(cfg: ManagerConfig) -> Path:
    path = Path(cfg.kek_file)
    return path.with_name(path.name + ".new")


def _finish_rotation(cfg: ManagerConfig, store: Store) -> bytearray:
    """The key file does not open the store but <kek_file>.new does: a rotation committed the store and
    stopped before renaming the new key file into place.  Finish it."""
    nxt = keksrc.read_key_file(_pending_file(cfg))
    if not store.check_kek(nxt):
        raise keksrc.KekError(f"neither {cfg.kek_file} nor {_pending_file(cfg)} is the store's KEK")
    _pending_file(cfg).rename(cfg.kek_file)
    log.warning("completed an interrupted KEK rotation", extra={"kek_file": cfg.kek_file})
    return nxt


def rotate_kek(cfg: ManagerConfig, store: Store) -> int:
    """A new KEK from the configured source; every record re-wrapped under it (state keys and so the vTPMs'
    NV unchanged).  The new KEK is saved beside the old one first, the store then switches generation in one
    rename, and only then does the new KEK replace the old: a crash anywhere leaves a store that opens."""
    new = bytearray(os.urandom(keksrc.KEK_BYTES))
    try:
        if cfg.kek_source == "file":
            nxt = _pending_file(cfg)
            shred(nxt)  # a rotation that died before its commit: the store never used that key
            fd = os.open(nxt, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, new)
                os.fsync(fd)
            finally:
                os.close(fd)
            n = store.set_kek("file", new, {})
            nxt.rename(cfg.kek_file)
        elif cfg.kek_source == "tpm":
            state_dir = Path(cfg.state_dir)
            keksrc.seal(new, tcti=cfg.tpm_tcti, pcrs=cfg.tpm_pcrs, out_dir=state_dir, stem="kek.new")
            n = store.set_kek("tpm", new, {"pcrs": cfg.tpm_pcrs})  # the config's PCRs from now on
            for ext in (".pub", ".priv"):
                (state_dir / f"kek.new{ext}").rename(state_dir / f"kek{ext}")
        else:
            raise Refused("rotating a passphrase KEK is not supported yet: make a new store and import")
    except keksrc.KekError as exc:
        raise Refused(f"cannot rotate the KEK: {exc}") from None
    return n


class Manager:
    def __init__(self, cfg: ManagerConfig, store: Store, xs: XenStoreClient) -> None:
        self.cfg = cfg
        self.store = store
        self.xs = xs
        self.server: asyncio.AbstractServer | None = None
        self.requests = 0
        self.refusals = 0
        # One request at a time past the peer check: a KEK rotation (in a thread) must not interleave with a
        # release reading the generation it replaces.  Requests are rare (one per vTPM start).
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        path = Path(self.cfg.socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ManagerFatal(f"{path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                except OSError:
                    path.unlink()  # a stale socket of a manager that died
                else:
                    raise ManagerFatal(f"another vTPM manager already listens on {path}")
        old = os.umask(0o117)
        try:
            # Bound now (it may need root), served only once the KEK checked out (serve()).
            self.server = await asyncio.start_unix_server(self._client, path=str(path), limit=MAX_MESSAGE,
                                                          start_serving=False)
        finally:
            os.umask(old)
        os.chmod(path, 0o660)

    async def serve(self) -> None:
        assert self.server is not None
        await self.server.start_serving()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
            # After dropping privileges the socket's directory may be root's: the next start removes it then.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                Path(self.cfg.socket).unlink()

    # -- one connection ----------------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        sock = writer.get_extra_info("socket")
        pid, uid, _gid = peer_credentials(sock)
        op = "?"
        answer: dict[str, Any]
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                line = await reader.readline()
            msg = decode(line)
            op = str(msg.get("op", ""))
            async with self._lock:
                answer = {"ok": True, **await self._handle(op, msg, uid)}
            log.info("request", extra={"op": op, "peer_uid": uid, "peer_pid": pid,
                                       "backend": msg.get("backend"), "result": "ok"})
        except (Refused, StoreError, IdentityError, ManagerError, XenStoreError) as exc:
            self.refusals += 1
            answer = {"ok": False, "error": str(exc)}
            log.warning("refused", extra={"op": op, "peer_uid": uid, "peer_pid": pid, "reason": str(exc)})
        except (TimeoutError, ValueError, TypeError, KeyError, asyncio.LimitOverrunError,
                asyncio.IncompleteReadError) as exc:
            self.refusals += 1
            answer = {"ok": False, "error": f"a malformed request ({type(exc).__name__})"}
            log.warning("malformed request", extra={"op": op, "peer_uid": uid, "peer_pid": pid})
        except Exception as exc:  # a bug or a damaged store fails this request, never the manager
            self.refusals += 1
            answer = {"ok": False, "error": f"internal error ({type(exc).__name__}); see the manager's log"}
            log.exception("request failed", extra={"op": op, "peer_uid": uid, "peer_pid": pid})
        try:
            writer.write(encode(answer))
            await writer.drain()
        except OSError:
            pass
        finally:
            if "key" in answer:
                answer["key"] = ""
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _handle(self, op: str, msg: dict[str, Any], uid: int) -> dict[str, Any]:
        if op in RELEASE_OPS:
            if uid not in self.cfg.release_uids:
                raise Refused(f"uid {uid} may not ask for vTPM keys (release_uids)")
        elif op in ADMIN_OPS:
            if uid not in self.cfg.admin_uids:
                raise Refused(f"uid {uid} may not administer vTPMs (admin_uids)")
        else:
            raise Refused(f"unknown operation {op!r}")
        if op == "ping":
            return {"records": sum(1 for _ in self.store.records())}
        if op == "release":
            rec = await self._bound_record(str(msg.get("backend", "")))
            key = self.store.key_of(rec)
            try:
                return {"key": b64(key), "vtpm_uuid": rec.vtpm_uuid, "domain_uuid": rec.domain_uuid,
                        "initialized": rec.initialized}
            finally:
                key[:] = bytes(len(key))
        if op == "initialized":
            rec = await self._bound_record(str(msg.get("backend", "")))
            self.store.mark_initialized(rec)
            return {}
        if op == "create":
            given = unb64(msg["key"], "key") if msg.get("key") is not None else None
            rec = self.store.create(str(msg.get("domain_uuid", "")), _int(msg.get("devid", 0)),
                                    vtpm_uuid=str(msg.get("vtpm_uuid") or uuidlib.uuid4()),
                                    group=str(msg.get("group", "")), key=given)
            log.info("provisioned", extra=_fields(rec))
            return {"record": rec.public()}
        if op == "list":
            return {"records": [r.public() for r in self.store.records()]}
        if op == "transport-key":
            return {"public": b64(self.store.transport_public())}
        if op == "import":
            bundle = msg.get("bundle")
            if not isinstance(bundle, dict):
                raise Refused("import needs a bundle")
            rec = self.store.import_(bundle)
            log.info("imported", extra=_fields(rec))
            return {"record": rec.public()}
        if op == "rotate":
            n = await asyncio.to_thread(rotate_kek, self.cfg, self.store)
            log.info("KEK rotated", extra={"records": n, "kek_source": self.cfg.kek_source})
            return {"records": n}
        rec = self._named(msg)
        if op == "show":
            return {"record": rec.public()}
        if op == "export":
            bundle = self.store.export(rec, bytes(unb64(msg.get("target"), "target")))
            log.info("exported", extra=_fields(rec))
            return {"bundle": bundle}
        if op == "delete":
            self.store.delete(rec.domain_uuid, rec.devid)
            log.info("deleted (key shredded)", extra=_fields(rec))
            return {"record": rec.public()}
        raise Refused(f"unknown operation {op!r}")

    def _named(self, msg: dict[str, Any]) -> Record:
        if msg.get("vtpm_uuid"):
            return self.store.find_vtpm(str(msg["vtpm_uuid"]))
        return self.store.get(str(msg.get("domain_uuid", "")), _int(msg.get("devid", 0)))

    async def _bound_record(self, backend: str) -> Record:
        if self.xs.closed:
            raise Refused("the manager lost its xenstore connection")
        ident = await identify(self.xs, backend, backend_domid=self.cfg.backend_domid)
        try:
            rec = self.store.get(ident.domain_uuid, ident.devid)
        except NotProvisioned:
            if not self.cfg.auto_provision:
                raise Refused(f"no vTPM is provisioned for domain {ident.domain_uuid} (domid "
                              f"{ident.frontend_domid}) devid {ident.devid}: `pvback vtpm create --domain-uuid "
                              f"{ident.domain_uuid} --devid {ident.devid} --vtpm-uuid {ident.vtpm_uuid}`") from None
            rec = self.store.create(ident.domain_uuid, ident.devid, vtpm_uuid=ident.vtpm_uuid,
                                    group=self.cfg.default_group)
            log.info("auto-provisioned", extra=_fields(rec))
        if rec.vtpm_uuid != ident.vtpm_uuid:
            raise Refused(f"domain {ident.domain_uuid} devid {ident.devid} is bound to vTPM {rec.vtpm_uuid}, but "
                          f"its backend names vTPM {ident.vtpm_uuid}")
        return rec


def _fields(rec: Record) -> dict[str, Any]:
    return {"domain_uuid": rec.domain_uuid, "devid": rec.devid, "group": rec.group, "vtpm_uuid": rec.vtpm_uuid}


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise Refused(f"not an integer: {v!r}")
    try:
        return int(v)
    except ValueError:
        raise Refused(f"not an integer: {v!r}") from None


def drop_privileges(user: str) -> None:
    """setgroups/setgid/setuid to `user`.  Everything the manager imports is imported before (the Python
    installation may not be readable by that user)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ManagerFatal(f"[manager] user {user!r} does not exist") from None
    if os.geteuid() == pw.pw_uid:
        return
    if os.geteuid() != 0:
        raise ManagerFatal(f"cannot become {user!r}: not started as root")
    os.initgroups(user, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    log.info("running as", extra={"user": user, "uid": pw.pw_uid})


async def run_manager(cfg: ManagerConfig, *, init: bool = False, passphrase_fd: int | None = None,
                      ready: asyncio.Event | None = None) -> int:
    try:
        xs = await XenStoreClient.connect(cfg.xenstore or None)
    except XenStoreError as exc:
        raise ManagerFatal(f"cannot reach xenstore: {exc}") from None
    store = Store(Path(cfg.state_dir))
    manager: Manager | None = None
    try:
        manager = Manager(cfg, store, xs)
        await manager.start()
        if cfg.user:
            if Path(cfg.socket).exists():
                try:
                    os.chown(cfg.socket, pwd.getpwnam(cfg.user).pw_uid, -1)
                except KeyError:
                    raise ManagerFatal(f"[manager] user {cfg.user!r} does not exist") from None
            drop_privileges(cfg.user)
        kek = await asyncio.to_thread(obtain_kek, cfg, store, init=init, passphrase_fd=passphrase_fd)
        del kek  # the store holds it
        await manager.serve()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("vtpm-manager ready", extra={"socket": cfg.socket, "records": sum(1 for _ in store.records()),
                                              "kek_source": cfg.kek_source, "auto_provision": cfg.auto_provision})
        if ready is not None:
            ready.set()
        waiter = asyncio.ensure_future(stop.wait())
        lost = asyncio.ensure_future(_xenstore_lost(xs))
        try:
            done, _ = await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, lost):
                t.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if lost in done and not stop.is_set():
            log.error("lost the xenstore connection: exiting (a supervisor restarts the manager)")
            return 1
        return 0
    finally:
        if manager is not None:
            await manager.close()
        await xs.close()


async def _xenstore_lost(xs: XenStoreClient) -> None:
    while not xs.closed:
        await asyncio.sleep(1.0)
