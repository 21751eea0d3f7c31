"""Who is asking for a key, as xenstore's trusted nodes say, checked by the manager itself.

The vTPM backend names only the device's backend path; everything else is read here, and only from nodes the
guest cannot write: the backend directory (owned by the backend domain, readable by the guest: `uuid`,
`frontend-id`) and the toolstack's /local/domain/<domid>/vm and /vm/<uuid> (owned by dom0).  Each node's ACL
is checked: owner dom0 (or the backend domain for the backend directory), no write access for the guest,
no write access for everyone.  Nothing is read from the guest's frontend directory or from any node the guest
owns: a guest that writes another guest's UUID into its own directory changes nothing this module reads, and a
guest that owns its `vm` node (a toolstack that forgot its ACL) is refused outright.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backends.xenstore.client import Perm, Transaction, XenStoreClient, XenStoreError

_BACKEND = re.compile(r"^/local/domain/(\d{1,5})/backend/vtpm/(\d{1,5})/(\d{1,3})$")
_VM = re.compile(r"^/vm/([0-9a-fA-F-]{36})$")
MAX_VALUE = 128


class IdentityError(Exception):
    """The device's identity cannot be established from trusted nodes; the message says which and why."""


@dataclass(frozen=True)
class Identity:
    frontend_domid: int
    devid: int
    domain_uuid: str
    vtpm_uuid: str


def _writable_by(perms: list[Perm], domid: int) -> bool:
    owner = perms[0]
    if owner.domid == domid:
        return True
    if owner.access in ("w", "b"):  # everyone not listed may write
        return True
    return any(p.domid == domid and p.access in ("w", "b") for p in perms[1:])


async def _trusted(xs: Transaction, path: str, *, guest: int, owners: tuple[int, ...]) -> str:
    """The node's value, if its ACL makes it the toolstack's (or the backend's) and not the guest's."""
    try:
        perms = await xs.get_perms(path)
        value = await xs.read_str(path)
    except XenStoreError as exc:
        raise IdentityError(f"{path}: {exc}") from None
    if value is None or not perms:
        raise IdentityError(f"{path} does not exist")
    if perms[0].domid not in owners:
        raise IdentityError(f"{path} is owned by domain {perms[0].domid}, not by "
                            f"{' or '.join(f'domain {o}' for o in owners)}: not trusted")
    if _writable_by(perms, guest):
        raise IdentityError(f"{path} is writable by domain {guest} (ACL {' '.join(str(p) for p in perms)}): "
                            "not trusted")
    if len(value) > MAX_VALUE:
        raise IdentityError(f"{path} is too long")
    return value


async def identify(xs: XenStoreClient, backend_path: str, *, backend_domid: int) -> Identity:
    """Read in one transaction: the ACLs and the values checked are one snapshot."""
    return await xs.transaction(lambda tx: _identify(tx, backend_path, backend_domid))


async def _identify(xs: Transaction, backend_path: str, backend_domid: int) -> Identity:
    m = _BACKEND.match(backend_path)
    if m is None:
        raise IdentityError(f"{backend_path!r} is not a vTPM backend path "
                            "(/local/domain/<backend>/backend/vtpm/<domid>/<devid>)")
    bdom, fdom, devid = int(m[1]), int(m[2]), int(m[3])
    if bdom != backend_domid:
        raise IdentityError(f"{backend_path} is not below backend domain {backend_domid}'s directory")
    if fdom == backend_domid or fdom == 0:
        raise IdentityError(f"{backend_path}: a vTPM for domain {fdom} is not served")
    owners = tuple(sorted({0, bdom}))
    fe_id = await _trusted(xs, f"{backend_path}/frontend-id", guest=fdom, owners=owners)
    if fe_id != str(fdom):
        raise IdentityError(f"{backend_path}/frontend-id is {fe_id!r}, not {fdom}")
    vtpm_uuid = (await _trusted(xs, f"{backend_path}/uuid", guest=fdom, owners=owners)).strip().lower()
    vm = await _trusted(xs, f"/local/domain/{fdom}/vm", guest=fdom, owners=(0,))
    vm_m = _VM.match(vm)
    if vm_m is None:
        raise IdentityError(f"/local/domain/{fdom}/vm is {vm!r}, not /vm/<uuid>")
    domain_uuid = vm_m[1].lower()
    named = await _trusted(xs, f"{vm}/uuid", guest=fdom, owners=(0,))
    if named.strip().lower() != domain_uuid:
        raise IdentityError(f"{vm}/uuid says {named!r}")
    return Identity(frontend_domid=fdom, devid=devid, domain_uuid=domain_uuid, vtpm_uuid=vtpm_uuid)
