#!/usr/bin/python3
"""A stand-in for QEMU as libxl's device model of a PV guest with `backendtype=qdisk` disks.

libxl spawns `device_model_override` with QEMU's arguments, waits for
/local/domain/0/device-model/<domid>/state = "running", then talks QMP on the `-chardev socket,...,server=on`
it named.  The disks themselves are served by the pvback process already watching backend/qdisk, so this only
has to say "running" and answer QMP: the greeting, qmp_capabilities, query-chardev ([]), anything else {}.
It lives until libxl kills it (domain destroy / poweroff).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys


def parse_args(argv: list[str]) -> tuple[int, list[str]]:
    domid = -1
    sockets: list[str] = []
    for i, a in enumerate(argv):
        if a == "-xen-domid" and i + 1 < len(argv):
            domid = int(argv[i + 1])
        if a == "-chardev" and i + 1 < len(argv) and argv[i + 1].startswith("socket,"):
            opts = dict(kv.split("=", 1) for kv in argv[i + 1].split(",")[1:] if "=" in kv)
            if "path" in opts and opts.get("server", "on") in ("on", "yes", "") :
                sockets.append(opts["path"])
    return domid, sockets


def reply(cmd: dict[str, object]) -> dict[str, object]:
    name = cmd.get("execute")
    ret: object = {}
    if name == "query-chardev":
        ret = []
    elif name == "query-status":
        ret = {"status": "running", "singlestep": False, "running": True}
    out: dict[str, object] = {"return": ret}
    if "id" in cmd:
        out["id"] = cmd["id"]
    return out


def main() -> int:
    domid, paths = parse_args(sys.argv[1:])
    if domid < 0:
        print(f"dm-stub: no -xen-domid in {sys.argv[1:]}", file=sys.stderr)
        return 2
    sel = selectors.DefaultSelector()
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(p)
        s.listen(4)
        sel.register(s, selectors.EVENT_READ, None)
    subprocess.run(["xenstore-write", f"/local/domain/0/device-model/{domid}/state", "running"], check=True)
    greeting = json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "pvback"},
                                   "capabilities": []}}).encode() + b"\r\n"
    buffers: dict[int, bytes] = {}
    dec = json.JSONDecoder()
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:  # listening socket
                conn, _ = sock.accept()
                conn.sendall(greeting)
                buffers[conn.fileno()] = b""
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            data = sock.recv(65536)
            if not data:
                sel.unregister(sock)
                buffers.pop(sock.fileno(), None)
                sock.close()
                continue
            buf = (buffers[sock.fileno()] + data).decode(errors="replace").lstrip()
            while buf:
                try:
                    cmd, end = dec.raw_decode(buf)
                except json.JSONDecodeError:
                    break
                buf = buf[end:].lstrip()
                if isinstance(cmd, dict):
                    sock.sendall(json.dumps(reply(cmd)).encode() + b"\r\n")
            buffers[sock.fileno()] = buf.encode()


if __name__ == "__main__":
    sys.exit(main())
