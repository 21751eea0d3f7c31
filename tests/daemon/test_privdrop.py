"""backends.daemon.privdrop piece by piece: each drop runs in a child process (a drop cannot be undone), checked
by the kernel's /proc/<pid>/status; directories and device-node ACLs as the unprivileged user sees them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.daemon.config import Config, parse_config
from backends.daemon.privdrop import (
    CAPABILITIES,
    PrivDropError,
    Target,
    capability_mask,
    grant_node,
    prepare_dir,
    resolve_user,
)

ROOT = Path(__file__).resolve().parents[2]
NOBODY = Target("nobody", 65534, 65534)

@pytest.fixture
def pub() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="pvpd-", dir="/dev/shm"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), user=NOBODY.uid, group=NOBODY.gid, extra_groups=[], capture_output=True,
                          text=True, timeout=30)


CHILD = """
import json, os, sys, threading
from backends.daemon.privdrop import PrivDropError, Target, drop, read_status
if sys.argv[2] == "thread":
    threading.Thread(target=threading.Event().wait, daemon=True).start()
try:
    drop(Target("nobody", 65534, 65534), [c for c in sys.argv[1].split(",") if c])
except PrivDropError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
st = read_status(os.getpid())
try:
    os.setuid(0)
    regained = True
except PermissionError:
    regained = False
print(json.dumps({"status": st, "regained": regained}))
"""


def child_drop(caps: str, mode: str = "") -> dict[str, object]:
    import json

    res = subprocess.run([sys.executable, "-c", CHILD, caps, mode], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd="/")
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    return out


@pytest.mark.parametrize("caps", ["", "CAP_NET_ADMIN"])
def test_drop_keeps_exactly_the_asked_capabilities(caps: str) -> None:
    out = child_drop(caps)
    st = out["status"]
    assert isinstance(st, dict)
    want = capability_mask([c for c in caps.split(",") if c])
    assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split() == ["65534"] * 4
    assert st["Groups"].split() == ["65534"]  # nobody's own groups (initgroups), root's gone
    assert int(st["CapEff"], 16) == want and int(st["CapPrm"], 16) == want
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0 and int(st["CapBnd"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert out["regained"] is False


def test_drop_refuses_a_second_thread() -> None:
    out = child_drop("CAP_NET_ADMIN", "thread")
    assert "threads alive" in str(out.get("error")), out


def test_unknown_capability_is_refused() -> None:
    with pytest.raises(PrivDropError, match="unknown capability"):
        capability_mask(["CAP_NET_ADMINN"])
    assert capability_mask(["CAP_NET_ADMIN"]) == 1 << CAPABILITIES["CAP_NET_ADMIN"] == 0x1000


def test_resolve_user() -> None:
    assert resolve_user("") is None
    assert resolve_user("root") is None and resolve_user("0") is None  # "drop" to root is no drop
    assert resolve_user("nobody") == NOBODY == resolve_user("65534")
    with pytest.raises(PrivDropError, match="does not exist"):
        resolve_user("pvback-no-such-user")
    # "auto": pvback when it exists (the installed case), else stay as started.
    try:
        import pwd

        pwd.getpwnam("pvback")
    except KeyError:
        assert resolve_user("auto") is None
    assert Config().daemon.user == "auto"
    assert parse_config({"daemon": {"user": "nobody"}}).daemon.user == "nobody"


def test_prepare_dir_hands_root_leftovers_to_the_user(pub: Path) -> None:
    state = pub / "lib" / "vtpm"
    state.mkdir(parents=True, mode=0o700)
    (state / "uuid1").mkdir(mode=0o700)
    (state / "uuid1" / "tpm2-00.permall").write_bytes(b"state")
    os.chmod(state / "uuid1" / "tpm2-00.permall", 0o600)
    other = pub / "someone-elses"
    other.write_text("x")
    os.chown(other, 1234, 1234)
    (state / "link").symlink_to(other)  # a link planted in there must not make root chown its target
    os.lchown(state / "link", NOBODY.uid, NOBODY.gid)
    (state / "theirs").write_text("y")
    os.chown(state / "theirs", 4321, 4321)
    assert as_nobody("cat", str(state / "uuid1" / "tpm2-00.permall")).returncode != 0
    assert prepare_dir(str(state), NOBODY) == 3  # the dir, uuid1, the state file
    res = as_nobody("cat", str(state / "uuid1" / "tpm2-00.permall"))
    assert res.returncode == 0 and res.stdout == "state", res.stderr
    assert other.stat().st_uid == 1234 and (state / "theirs").stat().st_uid == 4321
    assert prepare_dir(str(state), NOBODY) == 0  # idempotent
    fresh = pub / "run" / "net"
    prepare_dir(str(fresh), NOBODY)
    assert fresh.stat().st_uid == NOBODY.uid and fresh.stat().st_mode & 0o777 == 0o700
    assert (pub / "run").stat().st_uid == 0  # parents stay root's


@pytest.mark.parametrize("path", ["/", "/var", "/var/lib/", "relative/dir", "/run"])
def test_prepare_dir_refuses_system_directories(path: str) -> None:
    with pytest.raises(PrivDropError, match="not a directory pvback can own"):
        prepare_dir(path, NOBODY)


def test_grant_node_adds_a_group_acl_entry(pub: Path) -> None:
    node = pub / "evtchn"  # a stand-in for /dev/xen/evtchn: root's, 0600, on a tmpfs like devtmpfs
    node.write_text("")
    node.chmod(0o600)
    assert as_nobody("sh", "-c", f"echo hi >> {node}").returncode != 0
    assert grant_node(str(node), NOBODY) is True
    res = as_nobody("sh", "-c", f"echo hi >> {node} && cat {node}")
    assert res.returncode == 0 and res.stdout == "hi\n", res.stderr
    assert node.stat().st_uid == 0 and node.stat().st_mode & 0o007 == 0  # still root's, others still out
    assert grant_node(str(node), NOBODY) is False  # the entry is there: nothing rewritten
    open_node = pub / "tun"
    open_node.write_text("")
    open_node.chmod(0o666)
    assert grant_node(str(open_node), NOBODY) is False  # /dev/net/tun is usually 0666: nothing to do
