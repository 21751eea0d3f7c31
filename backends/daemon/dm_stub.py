"""`pvback dm-stub`: what xl's `device_model_override` points at when pvback serves a PV guest's qdisk disks.

For a PV guest with `backendtype=qdisk` disks libxl starts QEMU as the disks' backend, with QEMU's arguments
(`-xen-domid D -chardev socket,id=libxl-cmd,path=...,server=on,wait=off -mon chardev=libxl-cmd,mode=control
...`), waits for `device-model/D/state = running` in xenstore, then talks QMP on that socket.  The disks
themselves are served by `pvback serve`, which watches `backend/qdisk`; this process only has to stand where
QEMU would: say "running", answer libxl's QMP, and live as long as the domain (libxl kills it on destroy).

It answers what libxl sends a PV guest's device model (greeting, qmp_capabilities, query-chardev, query-status,
quit, ...) and, like QEMU, `CommandNotFound` to anything else; every command is logged on stderr, which libxl
writes to /var/log/xen/qemu-dm-<name>.log.

In a driver domain `xl devd` starts "QEMU" itself for each guest with qdisk backends there, from libxl's fixed
qemu-xen path and with `-xen-attach` and no QMP monitor (docs/driver-domain.md): installed at that path
(contrib/xen/qemu-dm-pvback), the stub then only says "running" and waits for libxl's SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}  # what Debian 12's qemu-system-xen reports
MAX_LINE = 1 << 20  # a QMP command from libxl is a few hundred bytes; more is a broken or hostile peer


class DmStubError(Exception):
    """The arguments do not describe a device model the stub can stand in for."""


@dataclass
class DmArgs:
    domid: int
    qmp: list[str] = field(default_factory=list)  # unix socket paths to listen on
    qmp_fds: list[int] = field(default_factory=list)  # listening sockets libxl opened for us
    pidfile: str | None = None
    attach: bool = False  # -xen-attach: the domain exists already (xl devd's qdisk backend in a driver domain)


def _opts(spec: str) -> tuple[str, dict[str, str]]:
    """`socket,id=x,path=/p,server=on` -> ("socket", {...}); a bare `server`/`nowait` flag counts as on."""
    head, *rest = spec.split(",")
    out: dict[str, str] = {}
    for kv in rest:
        k, sep, v = kv.partition("=")
        out[k] = v if sep else "on"
    return head, out


def _is_on(v: str | None) -> bool:
    return v is not None and v in ("on", "yes", "true", "")


def parse_args(argv: Sequence[str]) -> DmArgs:
    """The QMP endpoints and the domain among QEMU's arguments; everything else QEMU would take is ignored."""
    domid = -1
    chardevs: dict[str, dict[str, str]] = {}
    monitors: list[str] = []
    qmp_direct: list[str] = []
    pidfile = None
    attach = False
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        val = argv[i + 1] if i + 1 < len(argv) else None
        if a in ("-xen-domid", "-chardev", "-mon", "-qmp", "-pidfile") and val is None:
            raise DmStubError(f"{a} needs a value")
        if a == "-xen-domid":
            assert val is not None
            if not val.isdigit() or not 0 < int(val) < 0x7FF0:
                raise DmStubError(f"-xen-domid {val!r}: not a guest domain id")
            domid = int(val)
        elif a == "-chardev":
            assert val is not None
            kind, opts = _opts(val)
            if kind == "socket" and "id" in opts:
                chardevs[opts["id"]] = opts
        elif a == "-mon":
            assert val is not None
            _, opts = _opts("mon," + val)
            if opts.get("mode", "readline") == "control" and "chardev" in opts:
                monitors.append(opts["chardev"])
        elif a == "-qmp":
            assert val is not None
            kind, opts = _opts(val)
            if kind.startswith("unix:") and _is_on(opts.get("server")):
                qmp_direct.append(kind[len("unix:"):])
        elif a == "-pidfile":
            pidfile = val
        elif a == "-xen-attach":
            attach = True
            continue  # a flag: no value to skip
        else:
            continue
        next(it, None)  # the value
    if domid < 0:
        raise DmStubError("no -xen-domid: libxl passes it to every device model it starts")
    out = DmArgs(domid=domid, qmp=qmp_direct, pidfile=pidfile, attach=attach)
    for cid in monitors:
        if cid not in chardevs:
            raise DmStubError(f"-mon chardev={cid}: no -chardev socket with that id")
        opts = chardevs[cid]
        if not _is_on(opts.get("server")):
            raise DmStubError(f"-chardev {cid}: only server sockets are supported (libxl connects to QEMU)")
        if "fd" in opts:
            if not opts["fd"].isdigit():
                raise DmStubError(f"-chardev {cid}: fd={opts['fd']!r} is not a file descriptor number")
            out.qmp_fds.append(int(opts["fd"]))
        elif "path" in opts:
            out.qmp.append(opts["path"])
        else:
            raise DmStubError(f"-chardev {cid}: neither path= nor fd=")
    if not out.qmp and not out.qmp_fds and not attach:
        raise DmStubError("no QMP monitor (-chardev socket,...,server=on + -mon chardev=...,mode=control): "
                          "libxl would wait for one")
    return out


def _err(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


class QmpSession:
    """One QMP connection: the capabilities handshake, then one reply per command (sans-IO: bytes in, bytes out)."""

    COMMANDS = ("qmp_capabilities", "query-chardev", "query-status", "query-version", "query-commands",
                "query-vnc", "query-name", "quit", "stop", "cont")

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.negotiated = False
        self.quit = False
        self._buf = ""
        self._dec = json.JSONDecoder()

    @staticmethod
    def greeting() -> bytes:
        return _line({"QMP": {"version": {"qemu": QEMU_VERSION, "package": "pvback dm-stub"}, "capabilities": []}})

    def feed(self, data: bytes) -> tuple[list[bytes], list[str]]:
        """Replies to the complete commands in `data`, and the names received (for the log)."""
        self._buf += data.decode("utf-8", errors="replace")
        if len(self._buf) > MAX_LINE:
            raise DmStubError(f"QMP peer sent {len(self._buf)} bytes without a complete command")
        replies: list[bytes] = []
        names: list[str] = []
        while True:
            self._buf = self._buf.lstrip()
            if not self._buf:
                break
            try:
                cmd, end = self._dec.raw_decode(self._buf)
            except json.JSONDecodeError:
                if "\n" in self._buf and not self._buf.startswith("{"):
                    # Not JSON and never will be: answer like QEMU and drop the line.
                    self._buf = self._buf.split("\n", 1)[1]
                    replies.append(_line(_err("GenericError", "JSON parse error")))
                    continue
                break
            self._buf = self._buf[end:]
            reply = self.handle(cmd)
            name = str(cmd.get("execute")) if isinstance(cmd, dict) else repr(cmd)[:40]
            if "error" in reply:
                name += f" -> error {reply['error']['class']}"
            names.append(name)
            replies.append(_line(reply))
        return replies, names

    def handle(self, cmd: object) -> dict[str, Any]:
        if not isinstance(cmd, dict) or not isinstance(cmd.get("execute"), str):
            return _err("GenericError", "QMP input must be a JSON object with an 'execute' string")
        name = cmd["execute"]
        out = self._dispatch(name, cmd.get("arguments") or {})
        if "id" in cmd:
            out["id"] = cmd["id"]
        return out

    def _dispatch(self, name: str, _args: object) -> dict[str, Any]:
        if name == "qmp_capabilities":
            self.negotiated = True
            return {"return": {}}
        if not self.negotiated:
            return _err("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        ret: object
        if name == "query-chardev":
            ret = []  # no serial/console chardevs: a PV guest's console is xenconsoled's
        elif name == "query-status":
            ret = {"status": "running", "singlestep": False, "running": True}
        elif name == "query-version":
            ret = {"qemu": QEMU_VERSION, "package": "pvback dm-stub"}
        elif name == "query-commands":
            ret = [{"name": c} for c in self.COMMANDS]
        elif name == "query-vnc":
            ret = {"enabled": False}
        elif name == "query-name":
            ret = {"name": f"domain-{self.domid}"}
        elif name in ("stop", "cont"):
            ret = {}  # no emulated devices to pause; the disks follow the ring, not the device model
        elif name == "quit":
            self.quit = True
            ret = {}
        else:
            return _err("CommandNotFound", f"The command {name} has not been found")
        return {"return": ret}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\r\n"


def _log(domid: int, msg: str) -> None:
    print(f"pvback dm-stub: domid={domid} {msg}", file=sys.stderr, flush=True)


class DmStub:
    def __init__(self, args: DmArgs) -> None:
        self.args = args
        self.done = asyncio.Event()
        self.servers: list[asyncio.AbstractServer] = []

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = QmpSession(self.args.domid)
        try:
            writer.write(QmpSession.greeting())
            await writer.drain()
            while not session.quit:
                data = await reader.read(65536)
                if not data:
                    break
                replies, names = session.feed(data)
                for n in names:
                    _log(self.args.domid, f"qmp {n}")
                writer.write(b"".join(replies))
                await writer.drain()
        except (DmStubError, ConnectionError) as exc:
            _log(self.args.domid, f"qmp connection dropped: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        if session.quit:
            _log(self.args.domid, "quit requested")
            self.done.set()

    async def _listen(self) -> None:
        for path in self.args.qmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a socket left by a previous device model of a reused domid
            try:
                self.servers.append(await asyncio.start_unix_server(self._client, path=path))
            except OSError as exc:
                raise DmStubError(f"cannot listen for QMP on {path}: {exc.strerror or exc}") from exc
        for fd in self.args.qmp_fds:
            try:
                sock = socket.socket(fileno=fd)
                self.servers.append(await asyncio.start_unix_server(self._client, sock=sock))
            except OSError as exc:
                raise DmStubError(f"fd {fd} given for QMP is not a listening socket: {exc.strerror or exc}") from exc

    async def _announce(self, xs: Any) -> str:
        # Relative, as QEMU writes it: xenstored puts it under our own domain (dom0, or a driver domain).
        path = f"device-model/{self.args.domid}/state"
        await xs.write(path, "running")
        return path

    async def _watch_domain(self, xs: Any) -> None:
        """Exit when the domain is gone, should libxl not be there to kill us (xl crashed, domain died)."""
        from backends.xenstore.client import XenStoreError

        try:
            watch = await xs.watch("@releaseDomain")
        except XenStoreError as exc:
            # A driver domain may not be allowed to watch it (or read the guest's home): xl devd's SIGHUP it is.
            _log(self.args.domid, f"cannot watch @releaseDomain ({exc}): stopping on libxl's signal only")
            return
        try:
            async for _ in watch:
                try:
                    gone = not await xs.exists(f"/local/domain/{self.args.domid}")
                except XenStoreError as exc:
                    _log(self.args.domid, f"cannot look at the domain ({exc}): stopping on libxl's signal only")
                    return
                if gone:
                    _log(self.args.domid, "domain gone")
                    self.done.set()
                    return
        finally:
            await watch.close()

    async def run(self) -> int:
        from backends.xenstore.client import XenStoreClient, XenStoreError

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            loop.add_signal_handler(sig, self.done.set)  # libxl stops its device model with SIGHUP
        if self.args.pidfile:
            with open(self.args.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        await self._listen()
        try:
            xs = await asyncio.wait_for(XenStoreClient.connect(), 10)
        except (OSError, TimeoutError) as exc:
            raise DmStubError(f"cannot reach xenstored: {exc}") from exc
        watcher: asyncio.Task[None] | None = None
        try:
            try:
                path = await self._announce(xs)
            except XenStoreError as exc:
                raise DmStubError(f"cannot write the device-model state: {exc}") from exc
            qmp = ", ".join(self.args.qmp) or ("inherited fds" if self.args.qmp_fds else "none (-xen-attach)")
            _log(self.args.domid, f"running ({path}); QMP on {qmp}")
            watcher = asyncio.ensure_future(self._watch_domain(xs))
            await self.done.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, XenStoreError):
                    await watcher
            for srv in self.servers:
                srv.close()
            for p in self.args.qmp:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            await xs.close()
        _log(self.args.domid, "stopped")
        return 0


def main(argv: Sequence[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: pvback dm-stub QEMU-ARGS...\n\n" + (__doc__ or "").strip())
        return 0
    try:
        args = parse_args(argv)
        return asyncio.run(DmStub(args).run())
    except DmStubError as exc:
        print(f"pvback dm-stub: {exc}", file=sys.stderr)
        return 1
