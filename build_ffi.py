"""Builds the cffi modules from csrc/ in out-of-line API mode, and their type stubs from the cdefs.

Two modules, each from its own cdefs and sources:
- `backends._native`, the backend: every csrc/<name>.cdef (what Python may call from csrc/<name>.h) except the
  guest's, every csrc/*.c except the guest's.
- `backends._guest_native`, the guest side (a frontend's C I/O loops): csrc/blkfront_load.* (the blkif load
  generator) and csrc/netfront_io.* (the emulated netfront's data path), plus the shared C they call (ring
  index math, blkif sizes, the ops-table dispatch).  A frontend stands for a foreign guest, so it is kept out
  of the backend's module; shared .c files are compiled into both.

The build needs no Xen libraries: the real-Xen shims load libxengnttab/libxenevtchn with dlopen at run time.
Run directly (`python build_ffi.py`) to build both in place and rewrite backends/<module>.pyi; `--backend-only`
builds only `backends._native` (what dom0 needs).  setup.py uses `ffibuilder` and `guest_ffibuilder`.

The stubs are committed (mypy then works on a fresh clone before any build); tests/test_native_stub.py
regenerates them and fails if they drifted from the cdefs.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

# The guest side: its cdef stems, and every .c it links (it includes no backend code).
GUEST_CDEFS = ("blkfront_load", "netfront_io")
GUEST_SOURCES = ("blkfront_load.c", "blkif.c", "netfront_io.c", "platform.c", "ring.c")
GUEST_ONLY_SOURCES = ("blkfront_load.c", "netfront_io.c")


@dataclass(frozen=True)
class Module:
    name: str  # dotted import name
    cdefs: tuple[Path, ...]
    sources: tuple[Path, ...]

    @property
    def stub_path(self) -> Path:
        return ROOT / Path(*self.name.split(".")).with_suffix(".pyi")


def backend_module() -> Module:
    return Module(
        "backends._native",
        tuple(p for p in sorted(CSRC.glob("*.cdef")) if p.stem not in GUEST_CDEFS),
        tuple(p for p in sorted(CSRC.glob("*.c")) if p.name not in GUEST_ONLY_SOURCES),
    )


def guest_module() -> Module:
    return Module(
        "backends._guest_native",
        tuple(CSRC / f"{s}.cdef" for s in GUEST_CDEFS),
        tuple(CSRC / s for s in GUEST_SOURCES),
    )


def _have_liburing() -> bool:
    return Path("/usr/include/liburing.h").exists() and ctypes.util.find_library("uring") is not None


def _make_builder(mod: Module, absolute: bool) -> FFI:
    ffi = FFI()
    ffi.cdef("\n".join(p.read_text() for p in mod.cdefs))
    headers = "\n".join(f'#include "{p.stem}.h"' for p in mod.cdefs)
    # setuptools wants paths relative to setup.py; a direct compile runs in a temporary directory.
    sources = sorted(str(p if absolute else p.relative_to(ROOT)) for p in mod.sources)
    libraries = ["pthread"]
    define_macros: list[tuple[str, str | None]] = [("_GNU_SOURCE", None)]
    if any(p.name == "ioengine.c" for p in mod.sources) and _have_liburing() \
            and os.environ.get("PVBACK_NO_URING") != "1":
        libraries.append("uring")
        define_macros.append(("PVBACK_HAVE_URING", "1"))
    ffi.set_source(
        mod.name,
        headers,
        sources=sources,
        include_dirs=[str(CSRC)],
        libraries=libraries,
        define_macros=define_macros,
        extra_compile_args=["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    )
    return ffi


# ---- the stub generator -------------------------------------------------------------------------------------
# The cdefs are C plus cffi's `...` ("the compiler knows"); pycparser reads them once that is taken out.

_INT_TYPES = (
    "int8_t", "uint8_t", "int16_t", "uint16_t", "int32_t", "uint32_t", "int64_t", "uint64_t",
    "size_t", "ssize_t", "intptr_t", "uintptr_t", "int", "unsigned int", "long", "unsigned long", "short",
    "unsigned short", "unsigned", "long long", "unsigned long long", "signed char", "unsigned char",
)  # fmt: skip
_FLOAT_TYPES = ("double", "float")
# What pycparser needs to know to parse the cdefs (cffi knows these names itself).
_PRELUDE = "".join(
    f"typedef {base} {name};\n"
    for name, base in [
        ("int8_t", "signed char"), ("uint8_t", "unsigned char"), ("int16_t", "short"),
        ("uint16_t", "unsigned short"), ("int32_t", "int"), ("uint32_t", "unsigned int"), ("int64_t", "long"),
        ("uint64_t", "unsigned long"), ("size_t", "unsigned long"), ("ssize_t", "long"), ("intptr_t", "long"),
        ("uintptr_t", "unsigned long"),
    ]
)  # fmt: skip
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)[ \t]+(.*?)[ \t]*$", re.M)


@dataclass
class _Struct:
    kind: str  # "struct" | "union"
    cname: str  # C name (anonymous: the owner's name + field)
    fields: list[tuple[str, str]]  # (field, Python type) in declaration order; empty for opaque
    complete: bool
    anonymous: bool  # cannot be spelt in C, so no ffi.new/ffi.cast overloads

    @property
    def pyname(self) -> str:
        return f"{self.kind}_{self.cname}"


class _StubWriter:
    def __init__(self) -> None:
        self.structs: dict[tuple[str, str], _Struct] = {}  # (kind, C name) -> struct, first seen first
        self.functions: list[str] = []
        self.constants: list[str] = []

    # -- types
    @staticmethod
    def _names(node: object) -> str:
        from pycparser import c_ast

        assert isinstance(node, c_ast.IdentifierType)
        return " ".join(node.names)

    def _record(self, node: object, owner: str) -> _Struct:
        """Register a struct/union node (definition or reference); returns its entry."""
        from pycparser import c_ast

        assert isinstance(node, c_ast.Struct | c_ast.Union)
        kind = "struct" if isinstance(node, c_ast.Struct) else "union"
        cname = node.name or owner
        entry = self.structs.setdefault((kind, cname), _Struct(kind, cname, [], False, node.name is None))
        if node.decls is not None and not entry.complete:
            entry.complete = True
            entry.fields = [(d.name, self._field_type(d.type, f"{cname}_{d.name}")) for d in node.decls]
        return entry

    def _field_type(self, t: object, owner: str) -> str:
        from pycparser import c_ast

        if isinstance(t, c_ast.PtrDecl):
            target = t.type
            if isinstance(target, c_ast.TypeDecl) and isinstance(target.type, c_ast.Struct | c_ast.Union):
                return f"ptr:{self._record(target.type, owner).pyname}"
            return "CData"
        if isinstance(t, c_ast.ArrayDecl):
            item = t.type
            if isinstance(item, c_ast.PtrDecl):
                return "PtrArray"
            assert isinstance(item, c_ast.TypeDecl)
            if isinstance(item.type, c_ast.Struct | c_ast.Union):
                return f"StructArray[{self._record(item.type, owner).pyname}]"
            name = self._names(item.type)
            return "CharArray" if name == "char" else "IntArray"
        assert isinstance(t, c_ast.TypeDecl)
        if isinstance(t.type, c_ast.Struct | c_ast.Union):
            return self._record(t.type, owner).pyname
        return self._scalar(self._names(t.type))

    @staticmethod
    def _scalar(name: str) -> str:
        if name in _INT_TYPES:
            return "int"
        if name in _FLOAT_TYPES:
            return "float"
        if name == "char":
            return "bytes"
        if name == "void":
            return "None"
        raise ValueError(f"stub: no Python type for C type {name!r}")

    def _param_type(self, t: object) -> str:
        from pycparser import c_ast

        if isinstance(t, c_ast.PtrDecl):
            target = t.type
            # cffi passes bytes to a `const char *`/`const void *` parameter (read-only input).
            if isinstance(target, c_ast.TypeDecl) and "const" in target.quals \
                    and isinstance(target.type, c_ast.IdentifierType) and self._names(target.type) in ("char", "void"):
                return "CData | bytes"
            return "CData"
        if isinstance(t, c_ast.ArrayDecl):
            return "CData"
        assert isinstance(t, c_ast.TypeDecl)
        if isinstance(t.type, c_ast.Struct | c_ast.Union):
            return self._record(t.type, "").pyname
        return self._scalar(self._names(t.type))

    def _return_type(self, t: object) -> str:
        from pycparser import c_ast

        if isinstance(t, c_ast.PtrDecl):
            target = t.type
            if isinstance(target, c_ast.TypeDecl) and isinstance(target.type, c_ast.Struct | c_ast.Union):
                return self._record(target.type, "").pyname
            if isinstance(target, c_ast.TypeDecl) and isinstance(target.type, c_ast.IdentifierType) \
                    and self._names(target.type) == "char":
                return "CharArray"
            return "CData"
        return self._param_type(t)

    # -- declarations
    def add(self, cdef: str) -> None:
        from pycparser import c_ast, c_parser

        for name, value in _DEFINE.findall(cdef):
            if value != "..." and not re.fullmatch(r"-?(0x[0-9A-Fa-f]+|\d+)[uUlL]*", value):
                raise ValueError(f"stub: #define {name} {value}: only integers and `...` are supported")
            self.constants.append(name)
        text = _DEFINE.sub("", cdef)
        text = re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)
        text = re.sub(r"\.\.\.\s*;", "", text).replace("[...]", "[]")
        ast = c_parser.CParser().parse(_PRELUDE + text, "cdef")
        for decl in ast.ext:
            if isinstance(decl, c_ast.Typedef):
                continue
            assert isinstance(decl, c_ast.Decl), decl
            if isinstance(decl.type, c_ast.FuncDecl):
                self.functions.append(self._function(decl.name, decl.type))
            elif isinstance(decl.type, c_ast.Struct | c_ast.Union):
                self._record(decl.type, "")
            else:
                raise ValueError(f"stub: cannot express {decl.name!r} (global variables are not supported)")

    def _function(self, name: str, f: object) -> str:
        from pycparser import c_ast

        assert isinstance(f, c_ast.FuncDecl)
        params: list[str] = []
        for i, p in enumerate(f.args.params if f.args is not None else []):
            if isinstance(p, c_ast.EllipsisParam):
                raise ValueError(f"stub: {name}: variadic functions are not supported")
            if isinstance(p, c_ast.Typename) and isinstance(p.type, c_ast.TypeDecl) \
                    and isinstance(p.type.type, c_ast.IdentifierType) and p.type.type.names == ["void"]:
                continue  # f(void)
            params.append(f"{p.name or f'arg{i}'}: {self._param_type(p.type)}")
        return _method(name, ["self", *params, "/"] if params else ["self"], self._return_type(f.type))

    # -- output
    def render(self, module: str, sources: list[str]) -> str:
        structs = list(self.structs.values())
        out = [
            # The Literal overloads of new/cast come before the `str` one on purpose: they win.
            '# mypy: disable-error-code="overload-overlap"',
            f'"""Types of `{module}` (cffi, out-of-line API mode).',
            "",
            "Generated by build_ffi.py from the cdefs below: do not edit.",
            *(f"    {src}" for src in sources),
            '"""',
            "",
            "from typing import Literal, SupportsIndex, overload",
            "",
            "from backends._cdata import AnyCData as AnyCData",
            "from backends._cdata import CBuffer as CBuffer",
            "from backends._cdata import CData as CData",
            "from backends._cdata import CharArray as CharArray",
            "from backends._cdata import FFIBase",
            "from backends._cdata import IntArray as IntArray",
            "from backends._cdata import IntValue as IntValue",
            "from backends._cdata import PtrArray as PtrArray",
            "from backends._cdata import StructArray as StructArray",
        ]
        for s in structs:
            out += ["", f"class {s.pyname}(CData):"]
            what = "" if s.complete else " (opaque)"
            out.append(f'    """`{s.kind} {s.cname}`{what}; a pointer to it indexes to it."""')
            out.append("")
            for f, t in s.fields:
                if t.startswith("ptr:"):  # reads as the struct; any pointer (NULL too) may be stored
                    out += ["    @property", f"    def {f}(self) -> {t[4:]}: ...",
                            f"    @{f}.setter", f"    def {f}(self, value: CData) -> None: ..."]
                else:
                    out.append(f"    {f}: {t}")
            out.append(f"    def __getitem__(self, index: SupportsIndex) -> {s.pyname}: ...")
        out += ["", "class _FFI(FFIBase):"]
        new_overloads: list[tuple[str, str]] = []
        cast_overloads: list[tuple[str, str]] = []
        for s in structs:
            if s.anonymous:
                continue
            if s.complete:
                new_overloads.append((f"{s.kind} {s.cname} *", s.pyname))
                new_overloads.append((f"{s.kind} {s.cname}[]", f"StructArray[{s.pyname}]"))
            cast_overloads.append((f"{s.kind} {s.cname} *", s.pyname))
        for t in _INT_TYPES:
            new_overloads += [(f"{t} *", "IntArray"), (f"{t}[]", "IntArray")]
            cast_overloads.append((t, "IntValue"))
        new_overloads += [("char[]", "CharArray"), ("void *[]", "PtrArray")]
        cast_overloads += [("char *", "CharArray"), ("void *", "CData")]
        for cdecl, ret in [*new_overloads, ("", "AnyCData")]:
            what = f'Literal["{cdecl}"]' if cdecl else "str"
            out += ["    @overload", _method("new", ["self", f"cdecl: {what}", "init: object = ..."], ret)]
        for cdecl, ret in [*cast_overloads, ("", "AnyCData")]:
            what = f'Literal["{cdecl}"]' if cdecl else "str"
            out += ["    @overload", _method("cast", ["self", f"cdecl: {what}", "value: CData | int"], ret)]
        out += ["", "class _Lib:"]
        out += [f"    {c}: int" for c in self.constants]
        out += self.functions
        out += ["", "ffi: _FFI", "lib: _Lib", ""]
        return "\n".join(out)


def _method(name: str, args: list[str], ret: str) -> str:
    line = f"    def {name}({', '.join(args)}) -> {ret}: ..."
    if len(line) <= 120:
        return line
    return "\n".join([f"    def {name}(", *(f"        {a}," for a in args), f"    ) -> {ret}: ..."])


def stub_text(mod: Module) -> str:
    """The .pyi for `mod`, from its cdefs."""
    w = _StubWriter()
    for p in mod.cdefs:
        w.add(p.read_text())
    return w.render(mod.name, [str(p.relative_to(ROOT)) for p in mod.cdefs])


def check_constants(mod: Module, path: Path) -> None:
    """Every cdef `#define X 5` must equal the header's X: cffi checks each constant only when it is first
    read, so read them all now and fail the build, not some later run."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader(mod.name, str(path))
    spec = importlib.util.spec_from_file_location(mod.name, path, loader=loader)
    assert spec is not None
    built = importlib.util.module_from_spec(spec)
    loader.exec_module(built)
    lib = built.lib
    for name in dir(lib):
        if name.isupper():
            getattr(lib, name)  # ffi.error: "the C compiler says 'X' is equal to ..., but the cdef disagrees"


ffibuilder = _make_builder(backend_module(), absolute=__name__ == "__main__")
guest_ffibuilder = _make_builder(guest_module(), absolute=__name__ == "__main__")

if __name__ == "__main__":
    os.chdir(ROOT)
    backend_only = "--backend-only" in sys.argv
    builds = [(backend_module(), ffibuilder)] + ([] if backend_only else [(guest_module(), guest_ffibuilder)])
    for mod, builder in builds:
        built = builder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose="-v" in sys.argv)
        # compile() leaves the module in tmpdir/backends; install it next to the package sources.
        check_constants(mod, Path(built))
        os.replace(built, ROOT / "backends" / Path(built).name)
        mod.stub_path.write_text(stub_text(mod))
