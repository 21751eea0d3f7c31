"""The private Open vSwitch of the OVS tests.  It lives in perf/ovs.py (the benchmark `pvback bench net --switch
ovs` starts the same one, and perf/ imports nothing from tests/)."""

from perf.ovs import NEEDED, SCHEMA, PrivateOvs, missing, veth_peer

__all__ = ["NEEDED", "SCHEMA", "PrivateOvs", "missing", "veth_peer"]
