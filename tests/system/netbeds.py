"""A NetBed (tests/system/test_net.py) with a daemon config of the test's choosing: the `nbed` fixture's
namespaces and daemon, plus `[net]` settings (e.g. a short rx_drain_timeout_ms for the hostile suite)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tests.net.netns import NetNS
from tests.system.conftest import SimProc
from tests.system.test_net import NetBed, NetnsServe

SERVE_VIF = '[serve]\nbackend_types = ["vif"]\n'


@contextlib.contextmanager
def net_bed(sim: SimProc, tmp_path: Path, net: str = "") -> Iterator[NetBed]:
    tag = f"{os.getpid()}"
    with NetNS(f"pvbs-g-{tag}") as g, NetNS(f"pvbs-p-{tag}") as p:
        serve = NetnsServe(sim, tmp_path, p, SERVE_VIF + (f"[net]\n{net}\n" if net else ""))
        serve.start()
        bed = NetBed(sim, serve, tmp_path, g=g, p=p)
        try:
            yield bed
        finally:
            alive = serve.alive
            rc = serve.stop()
            if not serve.killed:
                assert alive and rc == 0, f"pvback serve died or failed to stop ({rc}):\n{serve.log_text()[-3000:]}"
