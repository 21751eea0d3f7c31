"""The private two-host OVN of the OVN tests.  It lives in perf/ovn.py (the benchmark `pvback bench net --switch
ovn` starts the same one, and perf/ imports nothing from tests/)."""

from perf.ovn import OvnHost, TwoHostOvn, missing

__all__ = ["OvnHost", "TwoHostOvn", "missing"]
