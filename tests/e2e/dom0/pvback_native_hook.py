"""dom0 only: resolve `backends._native` to the build made inside the dom0 rootfs.

The `backends` package is imported from the project tree shared over 9p, but the C module in that tree was
compiled for the host's interpreter.  This finder (installed from a .pth file) answers for that one module
name and leaves every other import alone.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

NATIVE_DIR = "/opt/pvback-native/backends"


class _NativeFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "backends._native":
            return None
        found = sorted(glob.glob(f"{NATIVE_DIR}/_native.*.so"))
        if not found:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, found[0])
        return importlib.util.spec_from_file_location(fullname, found[0], loader=loader)


sys.meta_path.insert(0, _NativeFinder())
