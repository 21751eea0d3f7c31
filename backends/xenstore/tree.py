"""The server's node tree: per-node permissions checked the way cxenstored checks them, transactions with
generation-based conflict detection, and per-domain node accounting.

Every operation costs O(path depth) plus the nodes it touches: there is no whole-tree work per request.
Transactions do not copy the tree: a transaction records the generation of each node it looks at (or that it
was absent) and keeps private copies of the nodes it changes; commit re-checks those generations (EAGAIN if any
moved) and then installs the copies.  This is cxenstored's scheme, and it makes two transactions that add
children to the same directory conflict, as they do there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from backends.xenstore.wire import (
    PERM_BOTH,
    PERM_NONE,
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    join_path,
    parent_path,
)

# A node's ACL: ((owner, default access mask), (domid, mask), ...).  Tuples so nodes can share them.
Perms = tuple[tuple[int, int], ...]

ABSENT = -1  # the generation recorded for a node a transaction found missing


class XsError(Exception):
    """A request failed with one of the wire protocol's error names (wire.ERROR_NAMES)."""

    def __init__(self, name: str, why: str = "") -> None:
        super().__init__(f"{name}: {why}" if why else name)
        self.name = name


@dataclass(frozen=True)
class Quotas:
    """Limits applied to unprivileged domains.  The defaults are cxenstored's (xenstored_core.c); the last
    two have no cxenstored counterpart (it bounds them by memory quota and a 20 s event timeout)."""

    nodes: int = 1000  # nodes owned per domain (ENOSPC)
    watches: int = 128  # watches per domain (E2BIG)
    entry_size: int = 2048  # bytes of one node's value (ENOSPC)
    transactions: int = 10  # open transactions per domain (ENOSPC)
    transaction_nodes: int = 1024  # nodes one transaction may touch (ENOSPC)
    outstanding: int = 20  # replies queued for a guest that does not read them: beyond, stop reading it
    perms_per_node: int = 5  # ACL entries (ENOSPC)
    path_max: int = 2048  # path length below /local/domain/<id>/ (EINVAL)
    pending_watch_events: int = 1024  # events queued for a guest that does not read them: beyond, dropped


class Node:
    __slots__ = ("children", "gen", "perms", "value")

    def __init__(self, value: bytes, perms: Perms, children: dict[str, None], gen: int) -> None:
        self.value = value
        self.perms = perms
        self.children = children  # insertion-ordered, like cxenstored's child list
        self.gen = gen

    def copy(self) -> Node:
        return Node(self.value, self.perms, dict(self.children), self.gen)

    @property
    def owner(self) -> int:
        return self.perms[0][0]


class Caller:
    """Who is asking: a connection's domain and whether it is privileged (dom0)."""

    __slots__ = ("domid", "privileged")

    def __init__(self, domid: int, privileged: bool) -> None:
        self.domid = domid
        self.privileged = privileged


def perm_for(caller: Caller, perms: Perms) -> int:
    """cxenstored's perm_for_conn: privileged callers and the owner get everything; otherwise the first ACL
    entry after the owner that names the caller, else the owner entry's access (the default)."""
    if caller.privileged or perms[0][0] == caller.domid:
        return PERM_BOTH | PERM_OWNER
    for domid, mask in perms[1:]:
        if domid == caller.domid:
            return mask
    return perms[0][1]


# One watch-relevant change: (path, exact, perms whose readers may see it).  "exact" events (descendants of a
# removed subtree) only reach watches on that very path, the others also reach watches on its ancestors.
Change = tuple[str, bool, tuple[Perms, ...]]


class Transaction:
    __slots__ = ("accessed", "caller", "changes", "delta", "events", "id", "limited")

    def __init__(self, tx_id: int, caller: Caller) -> None:
        self.id = tx_id
        self.caller = caller
        self.limited = not caller.privileged
        self.accessed: dict[str, int] = {}  # path -> generation when first seen (ABSENT if missing)
        self.changes: dict[str, Node | None] = {}  # private copies; None = removed
        self.delta: dict[int, int] = {}  # owned-node count changes per domid
        self.events: list[Change] = []  # fired at commit


class Store:
    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self._gen = 0
        root: Perms = ((0, PERM_NONE),)
        self.nodes: dict[str, Node] = {}
        self.owned: dict[int, int] = {}
        # cxenstored's initial tree.
        for path, child in (("/", "tool"), ("/tool", "xenstored"), ("/tool/xenstored", None)):
            self.nodes[path] = Node(b"", root, {child: None} if child else {}, self._next_gen())
        self.owned[0] = len(self.nodes)

    def _next_gen(self) -> int:
        self._gen += 1
        return self._gen

    # --- the view a caller sees (the tree, or the tree overlaid with a transaction's changes) -------------

    def get(self, path: str, tx: Transaction | None) -> Node | None:
        if tx is None:
            return self.nodes.get(path)
        if path in tx.changes:
            return tx.changes[path]
        node = self.nodes.get(path)
        if path not in tx.accessed:
            if tx.limited and len(tx.accessed) >= self.quotas.transaction_nodes:
                raise XsError("ENOSPC", "too many nodes in one transaction")
            tx.accessed[path] = node.gen if node is not None else ABSENT
        return node

    def _mutable(self, path: str, node: Node, tx: Transaction | None) -> Node:
        """`node` (the view's node at `path`) in a form the caller may change."""
        if tx is None:
            node.gen = self._next_gen()
            return node
        if tx.changes.get(path) is node:
            return node
        mine = node.copy()
        tx.changes[path] = mine
        return mine

    def _insert(self, path: str, node: Node, tx: Transaction | None) -> None:
        if tx is None:
            node.gen = self._next_gen()
            self.nodes[path] = node
        else:
            tx.changes[path] = node

    def _remove(self, path: str, tx: Transaction | None) -> None:
        if tx is None:
            del self.nodes[path]
        else:
            tx.changes[path] = None

    def _account(self, domid: int, delta: int, tx: Transaction | None) -> None:
        counts = self.owned if tx is None else tx.delta
        n = counts.get(domid, 0) + delta
        if n:
            counts[domid] = n
        else:
            counts.pop(domid, None)

    def owned_count(self, domid: int, tx: Transaction | None = None) -> int:
        return self.owned.get(domid, 0) + (tx.delta.get(domid, 0) if tx is not None else 0)

    # --- permission checks ------------------------------------------------------------------------------

    def _ancestor_perm(self, caller: Caller, path: str, tx: Transaction | None) -> int:
        p = path
        while p != "/":
            p = parent_path(p)
            node = self.get(p, tx)
            if node is not None:
                return perm_for(caller, node.perms)
        return PERM_NONE  # unreachable: "/" always exists

    def _denied(self, caller: Caller, path: str, node: Node | None, want: int, tx: Transaction | None) -> str | None:
        """None if `caller` may do `want` on the existing `node`; else the error to give.  A missing node is
        ENOENT only to callers whose nearest existing ancestor grants them `want` (cxenstored's
        errno_from_parents), so a guest learns nothing about trees it cannot see."""
        if node is not None and perm_for(caller, node.perms) & want == want:
            return None
        err = "EACCES" if node is not None else "ENOENT"
        if err == "ENOENT" and self._ancestor_perm(caller, path, tx) & want:
            return "ENOENT"
        return "EACCES"

    def checked(self, caller: Caller, path: str, want: int, tx: Transaction | None) -> Node:
        node = self.get(path, tx)
        err = self._denied(caller, path, node, want, tx)
        if err is not None:
            raise XsError(err, path)
        assert node is not None
        return node

    def watch_visible(self, caller: Caller, path: str, perms: tuple[Perms, ...]) -> bool:
        """cxenstored's watch_permitted: the watcher can read the node (now or before a permission change)
        or its parent."""
        for p in perms:
            if perm_for(caller, p) & PERM_READ:
                return True
        parent = self.nodes.get(parent_path(path))
        return parent is not None and bool(perm_for(caller, parent.perms) & PERM_READ)

    # --- operations ---------------------------------------------------------------------------------------

    def read(self, caller: Caller, path: str, tx: Transaction | None) -> bytes:
        return self.checked(caller, path, PERM_READ, tx).value

    def directory(self, caller: Caller, path: str, tx: Transaction | None) -> Node:
        return self.checked(caller, path, PERM_READ, tx)

    def get_perms(self, caller: Caller, path: str, tx: Transaction | None) -> Perms:
        return self.checked(caller, path, PERM_READ, tx).perms

    def write(self, caller: Caller, path: str, value: bytes, tx: Transaction | None) -> list[Change]:
        if not caller.privileged and len(value) > self.quotas.entry_size:
            raise XsError("ENOSPC", f"value of {len(value)} bytes is over the entry size quota")
        node = self.get(path, tx)
        err = self._denied(caller, path, node, PERM_WRITE, tx)
        if err is None:
            assert node is not None
            mine = self._mutable(path, node, tx)
            mine.value = value
            return [(path, False, (mine.perms,))]
        if err != "ENOENT":
            raise XsError(err, path)
        created = self._create(caller, path, value, tx)
        return [(path, False, (created.perms,))]

    def mkdir(self, caller: Caller, path: str, tx: Transaction | None) -> list[Change]:
        node = self.get(path, tx)
        err = self._denied(caller, path, node, PERM_WRITE, tx)
        if err is None:
            return []
        if err != "ENOENT":
            raise XsError(err, path)
        created = self._create(caller, path, b"", tx)
        return [(path, False, (created.perms,))]

    def _create(self, caller: Caller, path: str, value: bytes, tx: Transaction | None) -> Node:
        """Create `path` and any missing parents.  New nodes inherit their parent's ACL; a node an unprivileged
        domain creates is owned by it (cxenstored's construct_node), a privileged creator keeps the
        parent's owner."""
        missing = [path]
        p = parent_path(path)
        parent = self.get(p, tx)
        while parent is None:
            missing.append(p)
            p = parent_path(p)
            parent = self.get(p, tx)
        if not caller.privileged and self.owned_count(caller.domid, tx) + len(missing) > self.quotas.nodes:
            raise XsError("ENOSPC", f"domain {caller.domid} is over its node quota")
        parent = self._mutable(p, parent, tx)
        node = parent
        for name in reversed(missing):
            perms = parent.perms
            if not caller.privileged and perms[0][0] != caller.domid:
                perms = ((caller.domid, perms[0][1]), *perms[1:])
            node = Node(b"", perms, {}, 0)
            parent.children[name[name.rfind("/") + 1 :]] = None
            self._insert(name, node, tx)
            self._account(node.owner, 1, tx)
            parent = node
        node.value = value
        return node

    def rm(self, caller: Caller, path: str, tx: Transaction | None) -> list[Change]:
        node = self.get(path, tx)
        err = self._denied(caller, path, node, PERM_WRITE, tx)
        if err is not None:
            # Removing a missing node is fine as long as its parent exists.
            if err == "ENOENT" and self.get(parent_path(path), tx) is not None:
                return []
            raise XsError(err, path)
        assert node is not None
        if path == "/":
            raise XsError("EINVAL", "cannot remove /")
        changes: list[Change] = []
        for sub, subnode in self._postorder(path, node, tx):
            self._remove(sub, tx)
            self._account(subnode.owner, -1, tx)
            changes.append((sub, sub != path, (subnode.perms,)))
        parent_name = parent_path(path)
        parent = self.get(parent_name, tx)
        assert parent is not None
        self._mutable(parent_name, parent, tx).children.pop(path[path.rfind("/") + 1 :], None)
        return changes

    def _postorder(self, path: str, node: Node, tx: Transaction | None) -> Iterator[tuple[str, Node]]:
        """The subtree at `path`, children before parents (snapshotted first so removal can follow)."""
        order: list[tuple[str, Node]] = []
        stack = [(path, node)]
        while stack:
            p, n = stack.pop()
            order.append((p, n))
            for child in n.children:
                cp = join_path(p, child)
                cn = self.get(cp, tx)
                if cn is not None:
                    stack.append((cp, cn))
        return reversed(order)

    def set_perms(self, caller: Caller, path: str, perms: Perms, tx: Transaction | None) -> list[Change]:
        if not caller.privileged and len(perms) > self.quotas.perms_per_node:
            raise XsError("ENOSPC", "too many permission entries")
        node = self.checked(caller, path, PERM_WRITE | PERM_OWNER, tx)
        if not caller.privileged and perms[0][0] != node.owner:
            raise XsError("EPERM", "only a privileged domain may change a node's owner")
        old = node.perms
        mine = self._mutable(path, node, tx)
        if perms[0][0] != old[0][0]:
            self._account(old[0][0], -1, tx)
            self._account(perms[0][0], 1, tx)
        mine.perms = perms
        return [(path, False, (perms, old))]

    # --- transactions -------------------------------------------------------------------------------------

    def commit(self, tx: Transaction) -> None:
        for path, gen in tx.accessed.items():
            node = self.nodes.get(path)
            if (node.gen if node is not None else ABSENT) != gen:
                raise XsError("EAGAIN", f"{path} changed during the transaction")
        if tx.limited:
            domid = tx.caller.domid
            if tx.delta.get(domid, 0) > 0 and self.owned_count(domid, tx) > self.quotas.nodes:
                raise XsError("ENOSPC", f"domain {domid} is over its node quota")
        for path, node in tx.changes.items():
            if node is None:
                self.nodes.pop(path, None)
            else:
                node.gen = self._next_gen()
                self.nodes[path] = node
        for domid, delta in tx.delta.items():
            self._account(domid, delta, None)

    # --- domain lifecycle ---------------------------------------------------------------------------------

    def disown(self, domid: int, new_owner: int = 0) -> int:
        """Hand every node `domid` owns to `new_owner` (after the domain is gone, so that a later domain
        given the same id does not inherit them).  O(tree), but only on domain release."""
        moved = 0
        for node in self.nodes.values():
            if node.perms[0][0] == domid:
                node.perms = ((new_owner, node.perms[0][1]), *node.perms[1:])
                node.gen = self._next_gen()
                moved += 1
        if moved:
            self._account(domid, -moved, None)
            self._account(new_owner, moved, None)
        return moved
