"""The toolstack's half of a device's life, as libxl does it (libxl_device.c), for the emulated platform,
the tests and `pvback` device commands.

add: both directories in one transaction, frontend owned by the frontend domain and readable by the backend,
backend owned by the backend domain and readable by the frontend, `state=1` on both and `online=1`.
remove: `online=0`, `state=5` unless the backend is already Closed, wait for Closed (10 s,
LIBXL_DESTROY_TIMEOUT), then remove both directories whether or not it came (libxl's forced remove).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backends.xenbus.state import XenbusState

if TYPE_CHECKING:
    from backends.xenstore.client import Transaction, XenStoreClient

log = logging.getLogger("pvback.toolstack")

# The backend key `pvback attach` adds to the devices it creates: when their domain dies, the daemon removes
# them, as libxl removes the devices it created itself.
ATTACHED_MARK = "pvback-attached"

LIBXL_INIT_TIMEOUT = 10.0
LIBXL_DESTROY_TIMEOUT = 10.0


@dataclass(frozen=True)
class DevicePaths:
    backend: str
    frontend: str


def device_paths(*, backend_domid: int, frontend_domid: int, type_name: str, devid: int,
                 frontend_type: str | None = None) -> DevicePaths:
    """qdisk is served as backend/qdisk but seen by the guest as device/vbd: pass frontend_type="vbd"."""
    return DevicePaths(
        backend=f"/local/domain/{backend_domid}/backend/{type_name}/{frontend_domid}/{devid}",
        frontend=f"/local/domain/{frontend_domid}/device/{frontend_type or type_name}/{devid}",
    )


async def add_device(xs: XenStoreClient, *, backend_domid: int, frontend_domid: int, type_name: str, devid: int,
                     backend: dict[str, str] | None = None, frontend: dict[str, str] | None = None,
                     frontend_type: str | None = None) -> DevicePaths:
    """Create the device's two directories in one transaction; the caller's keys (params, mode,
    virtual-device, ...) go in with the standard ones."""
    from backends.xenstore.client import Perm

    paths = device_paths(backend_domid=backend_domid, frontend_domid=frontend_domid, type_name=type_name,
                         devid=devid, frontend_type=frontend_type)
    fe_keys = {**(frontend or {}), "backend": paths.backend, "backend-id": str(backend_domid),
               "state": str(int(XenbusState.INITIALISING))}
    be_keys = {**(backend or {}), "frontend": paths.frontend, "frontend-id": str(frontend_domid),
               "online": "1", "state": str(int(XenbusState.INITIALISING))}

    dirs = ((paths.frontend, frontend_domid, backend_domid, fe_keys),
            (paths.backend, backend_domid, frontend_domid, be_keys))

    async def body(tx: Transaction) -> None:
        # Two round trips, not one per node: the requests are sent back to back on the connection (the server
        # runs them in order) and then awaited together.  Concurrent attaches conflict by construction (each
        # adds a child to backend/<type>), and a short transaction loses less often.
        stale = await asyncio.gather(*(tx.exists(d[0]) for d in dirs))
        ops: list[Awaitable[None]] = []
        for (path, owner, reader, keys), old in zip(dirs, stale, strict=True):
            if old:  # an earlier device's keys would leak into this one
                ops.append(tx.rm(path))
            ops += [tx.mkdir(path), tx.set_perms(path, [Perm(owner, "n"), Perm(reader, "r")])]
            ops += [tx.write(f"{path}/{k}", v) for k, v in keys.items()]
        await asyncio.gather(*ops)

    await xs.transaction(body)
    return paths


async def read_state(xs: XenStoreClient, path: str) -> XenbusState:
    """`<path>/state`; absent or garbage reads as Unknown."""
    raw = await xs.read_str(f"{path}/state")
    if raw is None or not raw.isascii() or not raw.isdigit() or int(raw) > max(XenbusState):
        return XenbusState.UNKNOWN
    return XenbusState(int(raw))


async def wait_for_state(xs: XenStoreClient, path: str, states: XenbusState | Collection[XenbusState],
                         timeout: float) -> XenbusState:
    """Wait until `<path>/state` is one of `states`; TimeoutError otherwise.  Watch-driven (the watch's
    initial event covers a state that is already there)."""
    wanted = {states} if isinstance(states, XenbusState) else set(states)
    watch = await xs.watch(f"{path}/state")
    try:
        async with asyncio.timeout(timeout):
            async for _ in watch:
                state = await read_state(xs, path)
                if state in wanted:
                    return state
    except TimeoutError:
        last = await read_state(xs, path)
        raise TimeoutError(
            f"{path}/state is {last.name}, waited {timeout} s for {'/'.join(s.name for s in sorted(wanted))}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await watch.close()
    raise ConnectionError("xenstore watch ended")


async def remove_device(xs: XenStoreClient, *, backend_domid: int, frontend_domid: int, type_name: str,
                        devid: int, frontend_type: str | None = None,
                        timeout: float = LIBXL_DESTROY_TIMEOUT) -> bool:
    """Unplug and destroy a device.  True if the backend reached Closed in time; the directories are removed
    either way (like libxl's forced remove after LIBXL_DESTROY_TIMEOUT)."""
    paths = device_paths(backend_domid=backend_domid, frontend_domid=frontend_domid, type_name=type_name,
                         devid=devid, frontend_type=frontend_type)

    async def unplug(tx: Transaction) -> bool:
        if not await tx.exists(paths.backend):
            return False
        await tx.write(f"{paths.backend}/online", "0")
        state = await tx.read_str(f"{paths.backend}/state")
        if state != str(int(XenbusState.CLOSED)):
            await tx.write(f"{paths.backend}/state", str(int(XenbusState.CLOSING)))
        return True

    clean = True
    if await xs.transaction(unplug):
        try:
            await wait_for_state(xs, paths.backend, XenbusState.CLOSED, timeout)
        except TimeoutError as exc:
            log.warning("backend did not close, removing the device anyway: %s", exc)
            clean = False

    async def destroy(tx: Transaction) -> None:
        for path in (paths.frontend, paths.backend):
            if await tx.exists(path):
                await tx.rm(path)

    await xs.transaction(destroy)
    return clean


async def write_domain_identity(xs: XenStoreClient, domid: int, domain_uuid: str, name: str | None = None) -> None:
    """What libxl writes when it creates a domain, and what the vTPM manager identifies a guest by:
    /vm/<uuid>/{uuid,name} and /local/domain/<domid>/vm = "/vm/<uuid>", all owned by dom0 and only readable by
    the domain (the emulated platform makes /local/domain/<domid> the guest's own: the ACLs are set here)."""
    from backends.xenstore.client import Perm

    vm = f"/vm/{domain_uuid}"
    ro = [Perm(0, "n"), Perm(domid, "r")]
    keys = {f"{vm}/uuid": domain_uuid, **({f"{vm}/name": name} if name is not None else {})}

    async def body(tx: Transaction) -> None:
        # One transaction: a guest that planted its own `vm` node first loses it (rm), and none can slip a
        # value in between the write and the ACL.
        dom_vm = f"/local/domain/{domid}/vm"
        if await tx.exists(dom_vm):
            await tx.rm(dom_vm)
        await tx.mkdir(vm)
        await tx.set_perms(vm, ro)
        for path, value in (*keys.items(), (dom_vm, vm)):
            await tx.write(path, value)
            await tx.set_perms(path, ro)

    await xs.transaction(body)
