"""The layer rules of ARCHITECTURE.md as a test: every import under backends/ (module level, inside functions,
under `if TYPE_CHECKING:`), read with `ast`, must point down or sideways where allowed.

Layers, by the longest matching module prefix:

    0  backends._native            the cffi module (C)
    5  backends._guest_native      the benchmark guest's C loop (its own cffi module: a frontend's code)
    1  backends.native             its one typed wrapper; backends.xenstore.wire, the pure wire codec the
                                   platform reads its own domid with
    2  backends.platform           the seam: grants, events, where xenstore is, features (+ the broker client)
    3  backends.xenstore, .xenbus  the store client/server, the generic device and the bus
    4  device packages, .drivers   one package per device type (blk, ...) and the drivers behind them
    5  backends.sim, .guests       the emulated machine (broker, sim runner) and the emulated guests/frontends
    6  backends.daemon             CLI, daemon, config, metrics

Any other package under backends/ is a device package: adding a device type needs no change here.  Rules
beyond "only down": the store never imports the bus; drivers know no protocol (they import only the native
layer); a device package never imports another one; nothing below the daemon imports the emulated machine
or the guests (the backend never imports a frontend), and those two never import each other; only the
wrapper imports `backends._native`, and only the guests import `backends._guest_native`; no module imports
another module's private (`_name`) names.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INFRA = {
    "backends._native": 0,
    "backends.native": 1,
    "backends.xenstore.wire": 1,
    "backends.platform": 2,
    "backends.xenstore": 3,
    "backends.xenbus": 3,
    "backends.drivers": 4,
    "backends.sim": 5,
    "backends.guests": 5,
    "backends.vtpmmgr": 5,
    "backends._guest_native": 5,
    "backends.daemon": 6,
}
DEVICE_LAYER = 4


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module (or module.name) imported
    names: tuple[str, ...]  # for `from X import a, b`
    line: int


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> list[Import]:
    """Every import statement anywhere in the file (function bodies and TYPE_CHECKING blocks included)."""
    mod = module_name(root, path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [Import(mod, a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append(Import(mod, base, tuple(a.name for a in node.names), node.lineno))
    return out


def top_package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else module


def layer(module: str) -> int:
    best = ""
    for prefix in INFRA:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return INFRA[best] if best else DEVICE_LAYER


def is_device(module: str) -> bool:
    return module.startswith("backends.") and not any(
        module == p or module.startswith(p + ".") for p in INFRA)


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def check(imp: Import, known: set[str]) -> list[str]:
    """The rules one import breaks."""
    src, dst = imp.importer, imp.imported
    if not under(dst, "backends"):
        return []
    where = f"{src}:{imp.line} imports {dst}"
    bad = []
    # `from pkg import submodule` is checked against the submodule (the package's __init__ is checked on its own).
    subs = [f"{dst}.{n}" for n in imp.names if f"{dst}.{n}" in known]
    targets = subs if subs and len(subs) == len(imp.names) else [dst, *subs]
    for target in targets:
        if layer(target) > layer(src):
            bad.append(f"{where}: upward ({layer(src)} -> {layer(target)})")
    if under(dst, "backends._native") and not under(src, "backends.native"):
        bad.append(f"{where}: only backends.native imports the cffi module")
    if under(dst, "backends._guest_native") and not under(src, "backends.guests"):
        bad.append(f"{where}: only the guests import the guest's cffi module")
    if under(src, "backends.xenstore") and under(dst, "backends.xenbus"):
        bad.append(f"{where}: the store knows no devices or bus")
    if under(src, "backends.drivers") and not under(dst, "backends.drivers", "backends.native"):
        bad.append(f"{where}: drivers know no protocol (they import only the native layer)")
    if is_device(src) and is_device(dst) and top_package(src) != top_package(dst):
        bad.append(f"{where}: a device package never imports another")
    if layer(src) < INFRA["backends.daemon"] and under(dst, "backends.sim", "backends.guests"):
        if not (under(src, "backends.guests") and under(dst, "backends.guests")) and \
                not (under(src, "backends.sim") and under(dst, "backends.sim")):
            bad.append(f"{where}: the backend never imports the emulated machine or a frontend")
    if under(src, "backends.vtpmmgr") and not under(dst, "backends.vtpmmgr", "backends.xenstore",
                                                       "backends.drivers.tpm"):
        bad.append(f"{where}: the vTPM manager uses only the xenstore client and the TPM drivers' wire format")
    if under(dst, "backends.vtpmmgr") and not under(src, "backends.vtpmmgr", "backends.daemon"):
        bad.append(f"{where}: only the CLI runs the vTPM manager")
    private = [n for n in imp.names if n.startswith("_") and not n.startswith("__") and f"{dst}.{n}" not in known]
    if private and dst != src:
        bad.append(f"{where}: private name(s) {', '.join(private)} of another module")
    return bad


def violations(root: Path) -> list[str]:
    files = sorted((root / "backends").rglob("*.py"))
    known = {module_name(root, p) for p in files}
    out = []
    for path in files:
        for imp in imports_of(root, path):
            out += check(imp, known)
    return out


def test_backends_keep_the_layer_rules() -> None:
    found = violations(ROOT)
    assert not found, "layer rules broken:\n  " + "\n  ".join(found)


def test_every_infrastructure_package_exists() -> None:
    """A renamed package must not silently fall out of the rules (it would count as a device package)."""
    for prefix in INFRA:
        if prefix in ("backends._native", "backends._guest_native"):
            continue
        path = ROOT / Path(*prefix.split("."))
        assert path.is_dir() or path.with_suffix(".py").is_file(), prefix


@pytest.mark.parametrize("victim,planted,rule", [
    ("backends/native/ring.py", "from backends.daemon import cli", "upward"),
    ("backends/xenbus/state.py", "    from backends.blk import proto", "upward"),
    ("backends/platform/base.py", "if TYPE_CHECKING:\n    from backends.xenbus.device import XenBus", "upward"),
    ("backends/drivers/storage/null.py", "from backends.xenstore.client import XenStoreClient", "no protocol"),
    ("backends/xenstore/client.py", "from backends.xenbus import state", "knows no devices"),
    ("backends/blk/proto.py", "from backends.guests.blkfront import BlkFront", "never imports"),
    ("backends/daemon/serve.py", "from backends.daemon.cli import _overrides", "private name"),
    ("backends/blk/device.py", "from backends._native import lib", "only backends.native"),
    ("backends/native/ring.py", "from backends._guest_native import lib", "upward"),
    ("backends/sim/broker.py", "from backends._guest_native import lib", "only the guests"),
    ("backends/vtpmmgr/store.py", "from backends.vtpm import proto", "only the xenstore client"),
    ("backends/vtpmmgr/store.py", "from backends.xenbus import device", "only the xenstore client"),
    ("backends/vtpm/device.py", "from backends.vtpmmgr import store", "upward"),
    ("backends/sim/broker.py", "from backends.vtpmmgr import store", "only the CLI"),
])
def test_a_planted_breach_is_caught(tmp_path: Path, victim: str, planted: str, rule: str) -> None:
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "backends", copy / "backends", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert violations(copy) == []
    target = copy / victim
    text = target.read_text()
    if planted.startswith("    "):  # inside a function
        planted = "\n\ndef _planted() -> None:\n" + planted + "\n"
    target.write_text(text + "\n" + planted + "\n")
    found = violations(copy)
    assert found and any(rule in v for v in found), found


def test_a_new_device_package_is_ruled_like_blk(tmp_path: Path) -> None:
    """A package nobody listed is a device package: it may use the bus, and the bus may not use it."""
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "backends", copy / "backends", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (copy / "backends" / "toy").mkdir()
    (copy / "backends" / "toy" / "__init__.py").write_text("from backends.xenbus.device import DeviceError\n")
    assert violations(copy) == []
    (copy / "backends" / "xenbus" / "device.py").write_text(
        (copy / "backends" / "xenbus" / "device.py").read_text() + "\nimport backends.toy\n")
    assert any("upward" in v for v in violations(copy))
    (copy / "backends" / "toy" / "__init__.py").write_text("from backends.blk import proto\n")
    assert any("another" in v for v in violations(copy))


def shipped_imports_of_tests(root: Path) -> list[str]:
    """Imports of the test tree from what ships (backends/) or runs as `pvback bench` (perf/)."""
    out = []
    for top in ("backends", "perf"):
        for path in sorted((root / top).rglob("*.py")):
            for imp in imports_of(root, path):
                if imp.imported == "tests" or imp.imported.startswith("tests."):
                    out.append(f"{imp.importer}:{imp.line} imports {imp.imported}")
    return out


def test_backends_and_perf_never_import_tests(tmp_path: Path) -> None:
    """`pvback bench` runs from an installed tree, which has no tests/: what a benchmark shares with the tests
    (the private OVS and OVN, the namespaces) lives under perf/ or backends/ and tests/ re-exports it."""
    assert shipped_imports_of_tests(ROOT) == []
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "perf", copy / "perf", ignore=shutil.ignore_patterns("__pycache__", "results"))
    (copy / "backends").mkdir()
    with (copy / "perf" / "ovn.py").open("a") as f:
        f.write("\n\ndef _planted() -> None:\n    from tests.net import netns\n")
    found = shipped_imports_of_tests(copy)
    assert len(found) == 1 and found[0].startswith("perf.ovn:") and found[0].endswith("imports tests.net"), found
