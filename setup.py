import os

from setuptools import setup

# The cffi extensions backends._native (the backend) and backends._guest_native (the benchmark guest's C
# loop) are described in build_ffi.py (out-of-line API mode).  ./dev builds them in place itself
# (PVBACK_SKIP_CFFI=1 for the editable install) so one copy of each module exists.
if os.environ.get("PVBACK_SKIP_CFFI") == "1":
    setup()
else:
    setup(cffi_modules=["build_ffi.py:ffibuilder", "build_ffi.py:guest_ffibuilder"])
