"""`pvback serve` without root: once the platform and the xenstore are open, become the daemon's user and keep
only the capabilities the served device types declare (`DeviceType.privileges`).

What is opened before the drop, as root, and kept: the platform (Xen: the gntdev handle, and the xenstore
socket or /dev/xen/xenbus, both root-only on a stock dom0; emulated: the broker connection) and the xenstore
connection.  What is opened after it, as the user: every event channel on Xen (one /dev/xen/evtchn handle per
bound port: `Platform.reopened_nodes`), taps through /dev/net/tun (with CAP_NET_ADMIN), images at attach (the
operator gives the user access to them, e.g. a group), the vTPM state and run directories (swtpm runs as the
user), qemu-nbd's socket directory under the private /tmp.  So before the drop, as root, this module makes the
declared directories and hands them (and whatever a root-run daemon left in them) to the user, and gives the
user's group read/write on the declared device nodes with a POSIX ACL entry when its mode does not already.

The drop itself is libcap-ng's `capng_change_id` (Debian's libcap-ng0, which util-linux already pulls in,
through ctypes): the keep-caps dance of setresgid/initgroups/setresuid/capset in the order the kernel needs,
written and kept by people who maintain exactly that (OVS, QEMU's bridge helper, dhcpd use it the same
way).  python3-cap-ng would be the same library but lives outside the venv; python-prctl needs libcap's
headers to build and is unmaintained.  PR_SET_NO_NEW_PRIVS on top: children (swtpm, qemu-nbd) can never gain
privileges through a set-uid binary or file capabilities.  Capabilities are kept permitted+effective only,
never inheritable or ambient, and the bounding set is cleared: children start with none.

capset() only changes the calling thread, so the drop refuses to run with a second thread alive.  The result
is read back from /proc/self/status and any difference from what was asked for is fatal.  The process stays
non-dumpable (the kernel's rule after a uid change): a compromised swtpm running as the same user cannot
ptrace the daemon that holds CAP_NET_ADMIN and guest memory.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("pvback.privdrop")

DEFAULT_USER = "pvback"
# capability numbers (linux/capability.h) of the names a device type may ask for; anything else is refused.
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14,
                "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24}

# libcap-ng's enums (cap-ng.h)
_CAPNG_ADD = 1
_CAPNG_EFFECTIVE, _CAPNG_PERMITTED = 1, 2
_CAPNG_SELECT_BOTH = 48
_CAPNG_CLEAR_BOUNDING, _CAPNG_INIT_SUPP_GRP, _CAPNG_CLEAR_AMBIENT = 2, 4, 8
_CHANGE_ID_ERRORS = {-1: "libcap-ng not initialised", -2: "PR_SET_KEEPCAPS failed", -3: "setresgid failed",
                     -4: "dropping supplementary groups failed", -5: "setresuid failed",
                     -6: "clearing PR_SET_KEEPCAPS failed", -7: "applying the capabilities failed",
                     -8: "clearing the bounding set failed", -9: "initgroups failed",
                     -10: "clearing the ambient set failed"}
_PR_SET_NO_NEW_PRIVS = 38

# Directories whose contents the daemon would hand to its user: a configured path must be below these, never
# one of them (a typo must not chown /var).
_NEVER_CHOWN = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt", "/proc",
                "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib", "/var/run",
                "/var/tmp", "/var/cache", "/var/log", "/run/user"}


class PrivDropError(RuntimeError):
    """The daemon cannot become its user as configured; it must not serve (it would keep root)."""


@dataclass(frozen=True)
class Target:
    name: str
    uid: int
    gid: int


@dataclass
class Needs:
    """The union of what the served types and the platform need after the drop."""

    capabilities: set[str] = field(default_factory=set)
    device_nodes: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    def add(self, capabilities: Iterable[str] = (), device_nodes: Iterable[str] = (),
            dirs: Iterable[str] = ()) -> None:
        self.capabilities.update(capabilities)
        self.device_nodes += [n for n in device_nodes if n not in self.device_nodes]
        self.dirs += [d for d in dirs if d and d not in self.dirs]


def resolve_user(setting: str) -> Target | None:
    """The configured `[daemon] user` -> the target, or None to stay as started."""
    if setting == "":
        return None
    name = DEFAULT_USER if setting == "auto" else setting
    try:
        pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        if setting == "auto":
            return None
        raise PrivDropError(f"[daemon] user {setting!r} does not exist: create it (contrib/sysusers.d/pvback.conf, "
                            "`systemd-sysusers`) or set [daemon] user = \"\" to stay root") from None
    if pw.pw_uid == 0:
        return None
    return Target(pw.pw_name, pw.pw_uid, pw.pw_gid)


def capability_mask(names: Iterable[str]) -> int:
    mask = 0
    for n in names:
        if n not in CAPABILITIES:
            raise PrivDropError(f"unknown capability {n!r} (known: {', '.join(sorted(CAPABILITIES))})")
        mask |= 1 << CAPABILITIES[n]
    return mask


# -- before the drop, as root ---------------------------------------------------------------------------------


def prepare_dir(path: str, target: Target) -> int:
    """Make `path` (parents 0755 root, itself 0700) and give it and what root left in it (a daemon that ran as
    root before) to the user; returns how many entries changed owner.  fd-relative and without following
    links: the user may own some of what is in there, and a link it planted must not make root chown
    something else.  Subdirectories root cannot read are skipped (fwalk ignores them)."""
    p = Path(os.path.normpath(path))
    if not p.is_absolute() or str(p) in _NEVER_CHOWN:
        raise PrivDropError(f"{path}: not a directory pvback can own (give it a directory of its own, e.g. "
                            f"/var/lib/pvback/...)")
    p.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        p.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(p)
    if not stat.S_ISDIR(st.st_mode):
        raise PrivDropError(f"{path}: not a directory")
    if st.st_uid != 0:
        # Already the user's (handed over by an earlier start), or someone else's choice.  Not walked: root
        # could not even list a 0700 directory of the user's without CAP_DAC_READ_SEARCH, which the unit
        # does not grant.
        return 0
    changed = 0
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # Bottom-up: a directory handed over is 0700 the user's, root could not enter it afterwards.
        for _root, dirs, files, dirfd in os.fwalk(".", topdown=False, dir_fd=fd):
            for name in dirs + files:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                # Only root's entries (a daemon that ran as root before): anything else is someone's choice.
                if st.st_uid == 0 and not stat.S_ISLNK(st.st_mode):
                    os.chown(name, target.uid, target.gid, dir_fd=dirfd, follow_symlinks=False)
                    changed += 1
        os.fchown(fd, target.uid, target.gid)
        changed += 1
    finally:
        os.close(fd)
    return changed


_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_ACL_UNDEFINED = 0xFFFFFFFF
_RW = 6


def _may_rw(st: os.stat_result, target: Target, groups: set[int]) -> bool:
    """Classic mode bits; an ACL granting the group is looked at by grant_node."""
    if st.st_uid == target.uid:
        return st.st_mode & 0o600 == 0o600
    if st.st_gid in groups:
        return st.st_mode & 0o060 == 0o060
    return st.st_mode & 0o006 == 0o006


def _acl_entries(path: str, st: os.stat_result) -> dict[tuple[int, int], int]:
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
        raw = b""
    if len(raw) >= 4 and struct.unpack_from("<I", raw)[0] == _ACL_VERSION:
        return {(tag, ident): perm for tag, perm, ident in struct.iter_unpack("<HHI", raw[4:])}
    m = st.st_mode
    return {(_ACL_USER_OBJ, _ACL_UNDEFINED): (m >> 6) & 7, (_ACL_GROUP_OBJ, _ACL_UNDEFINED): (m >> 3) & 7,
            (_ACL_OTHER, _ACL_UNDEFINED): m & 7}


def grant_node(path: str, target: Target) -> bool:
    """Give the user's group read/write on a device node it opens after the drop; False when it had it."""
    st = os.stat(path)
    groups = {target.gid, *os.getgrouplist(target.name, target.gid)}
    if _may_rw(st, target, groups):
        return False
    entries = _acl_entries(path, st)
    mask_now = entries.get((_ACL_MASK, _ACL_UNDEFINED), 0)
    if entries.get((_ACL_GROUP, target.gid), 0) & mask_now & _RW == _RW:
        return False
    entries[(_ACL_GROUP, target.gid)] = entries.get((_ACL_GROUP, target.gid), 0) | _RW
    # The mask bounds every named entry and the owning group: recomputed as setfacl does.
    mask = 0
    for (tag, _ident), perm in entries.items():
        if tag in (_ACL_USER, _ACL_GROUP, _ACL_GROUP_OBJ):
            mask |= perm
    entries[(_ACL_MASK, _ACL_UNDEFINED)] = mask
    raw = struct.pack("<I", _ACL_VERSION) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for (tag, ident), perm in sorted(entries.items()))
    try:
        os.setxattr(path, _ACL_XATTR, raw)
    except OSError as exc:
        raise PrivDropError(f"{path}: cannot give group {target.gid} access ({exc.strerror}): make it group "
                            f"{target.name} mode 0660 (a udev rule) or set [daemon] user = \"\"") from exc
    return True


# -- the drop ---------------------------------------------------------------------------------------------------


def _capng() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcap-ng.so.0", use_errno=True)
    except OSError as exc:
        raise PrivDropError(f"libcap-ng is not installed ({exc}): apt-get install libcap-ng0, or set "
                            "[daemon] user = \"\" to stay root") from exc
    lib.capng_clear.argtypes = [ctypes.c_int]
    lib.capng_clear.restype = None
    lib.capng_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    lib.capng_change_id.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def drop(target: Target, capabilities: Iterable[str]) -> None:
    """Become `target` with exactly `capabilities` (effective and permitted), nothing inheritable, ambient or
    in the bounding set, and no_new_privs; verified, PrivDropError otherwise (the caller must then exit)."""
    want = capability_mask(capabilities)
    if _threads() != 1:
        raise PrivDropError(f"{_threads()} threads alive at the privilege drop: capset() would leave the others "
                            "with root's capabilities")
    lib = _capng()
    lib.capng_clear(_CAPNG_SELECT_BOTH)
    for name in capabilities:
        if lib.capng_update(_CAPNG_ADD, _CAPNG_EFFECTIVE | _CAPNG_PERMITTED, CAPABILITIES[name]) != 0:
            raise PrivDropError(f"libcap-ng refused {name}")
    rc = lib.capng_change_id(target.uid, target.gid,
                             _CAPNG_CLEAR_BOUNDING | _CAPNG_INIT_SUPP_GRP | _CAPNG_CLEAR_AMBIENT)
    if rc != 0:
        why = _CHANGE_ID_ERRORS.get(rc, f"error {rc}")
        raise PrivDropError(f"cannot become {target.name}: {why} ({os.strerror(ctypes.get_errno())})")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise PrivDropError(f"PR_SET_NO_NEW_PRIVS: {os.strerror(ctypes.get_errno())}")
    check(os.getpid(), target, want)


def read_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def check(pid: int, target: Target, want: int) -> None:
    """What the kernel says `pid` holds is exactly the drop's result (also the tests' oracle)."""
    st = read_status(pid)
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    caps = {k: int(st[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    groups = {int(g) for g in st.get("Groups", "").split()}
    problems = []
    if uids != {target.uid}:
        problems.append(f"uids {sorted(uids)}")
    if gids != {target.gid}:
        problems.append(f"gids {sorted(gids)}")
    if 0 in groups:
        problems.append("still in group root")
    if caps["CapEff"] != want or caps["CapPrm"] != want:
        problems.append(f"CapEff {caps['CapEff']:#x} CapPrm {caps['CapPrm']:#x} (want {want:#x})")
    if caps["CapInh"] or caps["CapAmb"] or caps["CapBnd"] & ~want:
        problems.append(f"CapInh {caps['CapInh']:#x} CapAmb {caps['CapAmb']:#x} CapBnd {caps['CapBnd']:#x}")
    if st.get("NoNewPrivs") != "1":
        problems.append("no_new_privs not set")
    if problems:
        raise PrivDropError(f"privilege drop to {target.name} incomplete: {', '.join(problems)}")


def cap_names(mask: int) -> list[str]:
    return [n for n, bit in sorted(CAPABILITIES.items(), key=lambda kv: kv[1]) if mask >> bit & 1]


def drop_privileges(setting: str, needs: Needs) -> Target | None:
    """The daemon's entry point: None when it stays as started (not root, or no user configured)."""
    if os.geteuid() != 0:
        return None
    target = resolve_user(setting)
    if target is None:
        if setting == "auto":
            log.warning("running as root: create the pvback user (contrib/sysusers.d/pvback.conf) to drop "
                        "privileges, or set [daemon] user")
        return None
    for d in needs.dirs:
        n = prepare_dir(d, target)
        if n:
            log.info("handed to the daemon's user", extra={"dir": d, "entries": n, "user": target.name})
    for node in needs.device_nodes:
        if not os.path.exists(node):
            # e.g. ovsdb-server or the vTPM manager not started yet: what needs it will fail with EACCES.
            log.warning("not there at start: the daemon's user may not be able to open it later",
                        extra={"node": node, "user": target.name})
        elif grant_node(node, target):
            log.info("device node opened to the daemon's group", extra={"node": node, "group": target.gid})
    drop(target, sorted(needs.capabilities))
    # Modules are imported lazily everywhere (device drivers at realize, the stdlib's own): an interpreter or
    # a package the user cannot read fails here, once, rather than at some guest's first device.
    import backends

    for where in (os.path.dirname(os.__file__), os.path.dirname(os.path.dirname(backends.__file__))):
        if not os.access(where, os.R_OK | os.X_OK):
            raise PrivDropError(f"user {target.name} cannot read {where}: install Python and pvback where the "
                                "daemon's user can read them")
    log.info("dropped privileges", extra={"user": target.name, "uid": target.uid, "gid": target.gid,
                                          "capabilities": ",".join(sorted(needs.capabilities)) or "none"})
    return target


__all__ = ["Needs", "PrivDropError", "Target", "cap_names", "capability_mask", "check", "drop",
           "drop_privileges", "grant_node", "prepare_dir", "read_status", "resolve_user"]
