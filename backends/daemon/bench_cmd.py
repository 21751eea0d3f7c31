"""`pvback bench`: the benchmark matrix (perf/matrix.py) against fio, nbdkit and the null driver; `pvback bench
tpm`: the vTPM latency and scale benchmark (perf/tpm_cells.py); `pvback bench net`: netback against a veth pair
(perf/net_cells.py); `pvback bench net --switch ovs`: netback plugged into a private Open vSwitch against a veth
port on it (perf/net_switch.py); `pvback bench net --switch ovn`: netback's vifs on two OVN hosts vs veth ports on
the same path (perf/net_ovn.py).

The benchmark code lives in the source tree's perf/ directory (it builds small C programs and drives fio and
nbdkit); this command finds it next to the `backends` package and runs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def cmd_bench(args: argparse.Namespace) -> int:
    if not (ROOT / "perf" / "matrix.py").exists():
        print(f"pvback bench: the perf/ directory is not next to the backends package ({ROOT}): run it from a "
              "source checkout (./dev bench)", file=sys.stderr)
        return 1
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if getattr(args, "guests", None) and getattr(args, "what", "blk") != "blk":
        print("pvback bench: --guests is the blk many-guests benchmark: drop the device kind or --guests",
              file=sys.stderr)
        return 2
    if getattr(args, "placement", "shared") != "shared" and not getattr(args, "guests", None):
        print("pvback bench: --placement is for the many-guests benchmark (--guests N...)", file=sys.stderr)
        return 2
    switch = getattr(args, "switch", None)
    if switch is not None and getattr(args, "what", "blk") != "net":
        print("pvback bench: --switch is for `pvback bench net`", file=sys.stderr)
        return 2
    if getattr(args, "what", "blk") == "tpm":
        from perf import tpm_cells

        argv = ["pvback", "bench", "tpm"] + (["--quick"] if args.quick else []) + ["--out", str(args.out)]
        return tpm_cells.main(bool(args.quick), str(args.out), argv=argv)
    if switch == "ovn":
        from perf import net_ovn

        argv = ["pvback", "bench", "net", "--switch", "ovn"] + (["--quick"] if args.quick else []) + \
            ["--out", str(args.out)]
        return net_ovn.main(bool(args.quick), str(args.out), argv=argv)
    if getattr(args, "what", "blk") == "net":
        from perf import net_cells

        argv = ["pvback", "bench", "net"] + (["--switch", switch] if switch else []) + \
            (["--quick"] if args.quick else []) + ["--out", str(args.out)]
        return net_cells.main(bool(args.quick), str(args.out), argv=argv, switch=switch)
    if getattr(args, "guests", None):
        from perf import blk_guests

        return blk_guests.cli_main(list(args.guests), bool(args.quick), str(args.out),
                                   placement=str(getattr(args, "placement", "shared")))
    from perf import matrix

    argv = ["pvback", "bench"] + (["--quick"] if args.quick else []) + ["--out", str(args.out)]
    try:
        plan = matrix.Plan.make(bool(args.quick), reps=getattr(args, "reps", None),
                                workloads=_names(getattr(args, "workloads", None)),
                                stores=_names(getattr(args, "stores", None)),
                                variants=_names(getattr(args, "variants", None)),
                                latency=not getattr(args, "no_latency", False))
    except ValueError as exc:
        print(f"pvback bench: {exc}", file=sys.stderr)
        return 2
    for opt in ("reps", "workloads", "stores", "variants"):
        if getattr(args, opt, None) is not None:
            argv += [f"--{opt}", str(getattr(args, opt))]
    if getattr(args, "no_latency", False):
        argv.append("--no-latency")
    return matrix.main(bool(args.quick), str(args.out), disk_dir=getattr(args, "disk_dir", None), argv=argv,
                       plan=plan)


def _names(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None
