import os

from setuptools import setup

# The cffi extension backends._native is described in build_ffi.py (out-of-line API mode).  ./dev builds it
# in place itself (PVBACK_SKIP_CFFI=1 for the editable install) so one copy of the module exists.
if os.environ.get("PVBACK_SKIP_CFFI") == "1":
    setup()
else:
    setup(cffi_modules=["build_ffi.py:ffibuilder"])
