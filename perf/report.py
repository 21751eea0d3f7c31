"""The report of a run: the console table, the target lines, perf/RESULTS.md's markdown and the PNG plots.

Sections render from what the result holds (a store, a latency or ring section a run did not measure is left
out), so a device type's cells reuse them and add sections of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def f2(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def goal_op(t: dict[str, Any]) -> str:
    # Latency targets are ceilings, the rest floors; the row's name says which (the JSON has no field for it).
    return "<=" if "ping-pong" in t["target"] else ">="


def spread(t: dict[str, Any], fmt: Callable[[Any], str] = f2) -> str:
    """ "min-max over N runs" of a target judged per run ("" for a single value)."""
    if "n_runs" not in t:
        return ""
    if not t["n_runs"]:
        return "0 runs"
    return f"{fmt(t['min'])}-{fmt(t['max'])} over {t['n_runs']} run{'s' if t['n_runs'] != 1 else ''}"


def verdict(t: dict[str, Any]) -> str:
    if t["held"] is None:
        return "not judged" if t.get("n_runs") else "n/a"
    return "yes" if t["held"] else "NO"


def target_lines(targets: list[dict[str, Any]]) -> list[str]:
    out = []
    for t in targets:
        mark = "HOLDS" if t["held"] else ("n/a" if t["held"] is None else "MISSES")
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        sp = spread(t)
        sp = f" [{sp}{'; < 3 runs: not judged' if t.get('n_runs') and t['held'] is None else ''}]" if sp else ""
        out.append(f"  [{mark:6s}] {t['target']}: {v}{sp} (goal {goal_op(t)} {t['goal']}) {t['detail']}")
    return out


def targets_table(result: dict[str, Any], *, fmt: Callable[[Any], str] = f2, failures: bool = False) -> list[str]:
    """The markdown table of a result's targets (values through `fmt`), then its failures when asked.  Targets
    judged per run show the median, its spread and how many runs it rests on."""
    per_run = any("n_runs" in t for t in result["targets"])
    if per_run:
        lines = ["", "Targets (median of the per-run ratios; holds only if it holds in every run, >= 3 runs)", "",
                 "| target | median | min-max (runs) | goal | holds | detail |", "|---|---|---|---|---|---|"]
    else:
        lines = ["", "Targets", "", "| target | value | goal | holds | detail |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        mid = f" {spread(t, fmt)} |" if per_run else ""
        lines.append(f"| {t['target']} | {fmt(t['value'])} |{mid} {goal_op(t)} {t['goal']} | "
                     f"{verdict(t)} | {t['detail']} |")
    if failures and result.get("failures"):
        lines += ["", "Failures: " + "; ".join(result["failures"])]
    return lines


def table(cells: list[dict[str, Any]]) -> str:
    hdr = (f"{'store':5s} {'workload':10s} {'system':17s} {'n':>2s} {'IOPS':>10s} {'MB/s':>9s} {'p50 us':>9s} "
           f"{'p99 us':>9s} {'CPU us/op':>9s} {'CPU s/GB':>8s} {'vs fio':>6s} {'vs nbd':>6s}")
    lines = [hdr, "-" * len(hdr)]
    for c in cells:
        rf = c.get("ratio_to_fio")
        rn = c.get("ratio_to_nbd")
        lines.append(
            f"{c['store']:5s} {c['workload']:10s} {c['system']:17s} {c['n']:2d} {c['iops']:10.0f} {c['mb_s']:9.1f} "
            f"{c['p50_us']:9.1f} {c['p99_us']:9.1f} {c['cpu_us_per_op']:9.2f} {c['cpu_s_per_gb']:8.2f} "
            f"{'' if rf is None else f'{rf:6.2f}':>6s} {'' if rn is None else f'{rn:6.2f}':>6s}")
    return "\n".join(lines)


def plots(result: dict[str, Any], out_dir: Path, workload_order: list[str]) -> list[str]:
    """ratios.png (IOPS over the best fio engine per store), latency.png (CDFs of rep 0), placement.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    cells = result["cells"]
    stores = [s for s in ("tmpfs", "disk", "null") if any(c["store"] == s for c in cells)]
    systems = sorted({c["system"] for c in cells if c["system"].startswith(("blk-", "nbd"))})
    fig, axes = plt.subplots(1, max(1, len([s for s in stores if s != "null"])), figsize=(13, 4.5), squeeze=False)
    for ax, store in zip(axes[0], [s for s in stores if s != "null"], strict=False):
        wls = [w for w in workload_order if any(c["store"] == store and c["workload"] == w for c in cells)]
        width = 0.8 / max(1, len(systems))
        for i, sysname in enumerate(systems):
            vals = []
            for wl in wls:
                c = next((c for c in cells if c["store"] == store and c["workload"] == wl and c["system"] == sysname),
                         None)
                vals.append(c.get("ratio_to_fio") or 0.0 if c else 0.0)
            ax.bar([x + i * width for x in range(len(wls))], vals, width, label=sysname)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(wls))], wls, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{store}: IOPS / best fio engine")
        ax.set_ylabel("ratio")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "ratios.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(str(p))

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for k, wl in enumerate(("rr4k_qd1", "rr4k_qd32")):
        for s in result["samples"]:
            if s["workload"] == wl and s["hist_ns"] and s["rep"] == 0 and s["store"] in ("tmpfs", "null"):
                xs, cum, total = [], 0, sum(n for _, n in s["hist_ns"])
                ys = []
                for v, n in s["hist_ns"]:
                    cum += n
                    xs.append(v / 1e3)
                    ys.append(cum / total)
                ax[k].plot(xs, ys, label=f"{s['store']} {s['system']}", lw=1)
        for s in result["samples"]:
            if s["workload"] == wl and s["rep"] == 0 and s["store"] == "tmpfs" and not s["hist_ns"]:
                ax[k].scatter([s["p50_us"], s["p99_us"]], [0.5, 0.99], marker="x", s=20, label=f"{s['system']} p50/p99")
        ax[k].set_xscale("log")
        ax[k].set_xlabel("latency (us)")
        ax[k].set_ylabel("CDF")
        ax[k].set_title(f"{wl}: latency distribution (unpinned)")
        if ax[k].get_legend_handles_labels()[0]:
            ax[k].legend(fontsize=6)
    fig.tight_layout()
    p = out_dir / "latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(str(p))

    lat = result.get("latency", {}).get("blk", [])
    if lat:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in lat:
            xs, ys, cum = [], [], 0
            total = sum(n for _, n in row["hist_ns"]) or 1
            for v, n in row["hist_ns"]:
                cum += n
                xs.append(v / 1e3)
                ys.append(cum / total)
            ax.plot(xs, ys, label=f"{row['placement']}/{row['wait']} (ping-pong p50 {row['pingpong_p50_us']:.1f} us)")
        ax.set_xscale("log")
        ax.set_xlabel("round trip (us)")
        ax.set_ylabel("CDF")
        ax.set_title("QD1 4 KiB tmpfs: placement and polling")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / "placement.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(str(p))
    return files


def markdown(result: dict[str, Any]) -> str:
    """perf/RESULTS.md's tables from a bench.json."""
    h = result["host"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Host: {h['cpu_model']}, {h['cpus_online']} vCPUs ({h['virtualization']}), {h['mem_gib']} GiB, "
        f"kernel {h['kernel']}, {h['os']}; {h['fio']}, {h['nbdkit']}; stores: "
        + ", ".join(f"{k} = {v['dir']} ({v['fs']})" for k, v in h["stores"].items()) + "  ",
        f"Plan: {result['plan']['reps']} repetitions x {result['plan']['seconds']:g} s "
        f"(+{result['plan']['warmup']:g} s warm-up) per cell, {result['plan']['image_mib']} MiB images of random "
        "data; cells are medians (IOPS min-max over the repetitions).",
        "",
        "| store | workload | system | IOPS (min-max) | MB/s | p50 us | p99 us | CPU us/op | backend CPU us/op | "
        "CPU s/GB | vs fio | vs fio per run (min-max) | vs fio per CPU-s | vs nbd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    for c in result["cells"]:
        runs = c.get("ratio_to_fio_runs") or []
        per_run = f"{min(runs):.2f}-{max(runs):.2f} ({len(runs)})" if runs else ""
        lines.append(
            f"| {c['store']} | {c['workload']} | {c['system']} | {c['iops']:.0f} ({c['iops_min']:.0f}-"
            f"{c['iops_max']:.0f}) | {c['mb_s']:.1f} | {c['p50_us']:.1f} | {c['p99_us']:.1f} | "
            f"{c['cpu_us_per_op']:.2f} | {f2(c.get('backend_cpu_us_per_op'))} | {c['cpu_s_per_gb']:.2f} | "
            f"{f2(c.get('ratio_to_fio'))} | {per_run} | {f2(c.get('per_cpu_ratio_to_fio'))} | "
            f"{f2(c.get('ratio_to_nbd'))} |")
    lines += ["", "Null driver (backend CPU only): IOPS per backend core", "",
              "| workload | system | IOPS | backend CPU us/op | IOPS per backend core |", "|---|---|---|---|---|"]
    for c in result["cells"]:
        if c["store"] == "null":
            lines.append(f"| {c['workload']} | {c['system']} | {c['iops']:.0f} | {f2(c['backend_cpu_us_per_op'])} | "
                         f"{c['iops_per_backend_core'] or 0:.0f} |")
    lat = result.get("latency", {})
    lines += ["", "QD1 4 KiB random read on tmpfs, by CPU placement (eventfd ping-pong measured in the same run)", "",
              "| placement | wait | backend poll_us | frontend spin_us | IOPS | p50 us | p99 us | ping-pong p50 us | "
              "ratio p50 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in lat.get("blk", []):
        lines.append(f"| {r['placement']} (be cpu{r['backend_cpu']}, fe cpu{r['frontend_cpu']}) | {r['wait']} | "
                     f"{r['backend_poll_us']} | {r['frontend_spin_us']} | {r['iops']:.0f} | {r['p50_us']:.2f} | "
                     f"{r['p99_us']:.2f} | {r['pingpong_p50_us']:.2f} | {r['ratio_p50_to_pingpong']:.2f} |")
    ring = result.get("ring") or {}
    if ring:
        lines += ["", f"Ring: pure C loop {ring['c_slots_per_s'] / 1e6:.2f} M slots/s, cffi batch of 32 "
                      f"{ring['cffi_slots_per_s'] / 1e6:.2f} M slots/s, ratio {ring['ratio']:.2f}."]
    lines += targets_table(result)
    return "\n".join(lines) + "\n"


def tpm_markdown(result: dict[str, Any]) -> str:
    """`pvback bench tpm`'s tables from a bench-tpm.json."""
    h = result["host"]
    pp = result["pingpong"]
    ref = result["pingpong_ref"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Host: {h['cpu_model']}, {h['cpus_online']} vCPUs ({h['virtualization']}), {h['mem_gib']} GiB, "
        f"kernel {h['kernel']}, {h['os']}; {result.get('swtpm', '')}  ",
        f"Plan: {result['plan']['reps']} repetition(s) x {result['plan']['rounds']} commands "
        f"(+{result['plan']['warmup']} warm-up) per cell; cells are medians over the repetitions.  ",
        "eventfd ping-pong: " + ", ".join(f"{m} p50 {r['p50_us']:.2f} us p99 {r['p99_us']:.2f} us"
                                          for m, r in pp.items()) + f" (reference: {ref})  ",
        "the same after the latency cells: " + ", ".join(f"{m} p50 {r['p50_us']:.2f} us"
                                                         for m, r in (result.get("pingpong_after") or {}).items())
        + "; 1-min load average: " + ", ".join(f"{k} {v:.1f}" for k, v in (result.get("loadavg_1min") or {}).items())
        + "  ",
        "",
        "| command | path | cmds/s | p50 us | p99 us | CPU us/cmd | daemon CPU us/cmd | added p50 us | added p99 us | "
        "p50 vs peer | added p50 / ping-pong p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        path = c["system"] + (" (1 vCPU)" if c["store"] != "tpm" else "")
        lines.append(
            f"| {c['workload']} | {path} | {c['iops']:.0f} | {c['p50_us']:.1f} | {c['p99_us']:.1f} | "
            f"{c['cpu_us_per_op']:.1f} | {f2(c.get('backend_cpu_us_per_op'))} | {f2(c.get('added_p50_us'))} | "
            f"{f2(c.get('added_p99_us'))} | "
            f"{f2(c.get('ratio_p50_to_direct'))} | {f2(c.get('ratio_added_p50_to_pingpong'))} |")
    lines += ["", "added = p50 - the p50 of the direct path that waits the same way (peer): guest vs direct (both "
                  "block in poll/recv), guest-asyncio vs direct-asyncio (both wait from an asyncio loop), "
                  "direct-asyncio vs direct.  Unpinned rows are related to the cross-CPU ping-pong; (1 vCPU) rows "
                  "(frontend, daemon and swtpm pinned to one vCPU, like the direct client and its swtpm) to the "
                  "same-CPU ping-pong."]
    sc = result.get("scale") or {}
    if sc and "error" not in sc:
        lines += ["", f"Scale: {sc['n']} vTPMs attached at once (attach -> first answered command; "
                      "swtpm_setup + swtpm start + xenbus connect)", "",
                  "| vTPMs | all up (s) | wall / N (s) | InitWait max (s) | start-up p50 (s) | start-up max (s) | "
                  "swtpm RSS / vTPM (KiB) | daemon RSS growth / vTPM (KiB) | memory / vTPM (KiB) |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| {sc['n']} | {sc['wall_s']:.2f} | {sc['wall_per_vtpm_s']:.2f} | "
                  f"{max(sc.get('initwait_s') or [0.0]):.2f} | {sc['startup_p50_s']:.2f} | "
                  f"{sc['startup_max_s']:.2f} | {sc['swtpm_rss_per_vtpm_kib']:.0f} | "
                  f"{sc['daemon_rss_growth_per_vtpm_kib']:.0f} | {sc['memory_per_vtpm_kib']:.0f} |"]
    elif sc:
        lines += ["", f"Scale: {sc['n']} vTPMs FAILED: {sc['error']}"]
    lines += targets_table(result, failures=True)
    return "\n".join(lines) + "\n"


def kpps(c: dict[str, Any], udp: bool) -> str:
    if udp:
        return f"{c['iops'] / 1e3:.1f}"
    return f"{c['ring_pps'] / 1e3:.1f}" if c.get("ring_pps") else "-"


def net_markdown(result: dict[str, Any]) -> str:
    """`pvback bench net`'s tables from a bench-net.json."""
    h = result["host"]
    co = result.get("costs") or {}
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Host: {h['cpu_model']}, {h['cpus_online']} vCPUs ({h['virtualization']}), {h['mem_gib']} GiB, "
        f"kernel {h['kernel']}, {h['os']}; {result.get('iperf3', '')}  ",
        f"Plan: {result['plan']['reps']} repetition(s) x {result['plan']['seconds']:g} s of iperf3 per cell; cells "
        "are medians over the repetitions. UDP: 18-byte payloads (64-byte frames), unpaced, packets/s as received "
        "(sent: what the sender managed). "
        "TCP: GSO/checksum offload negotiated. CPU: iperf3 (both ends) + the daemon + the netfront, per received "
        "packet and GB.",
        "",
        "| workload | path | Gbit/s | kpps | sent kpps | vs veth | CPU us/pkt | CPU s/GB | iperf3 s/GB | "
        "netfront s/GB | daemon CPU (cores) | daemon us/netif pkt | daemon s/GB | B/netif pkt | daemon wake-ups/pkt | "
        "netfront wake-ups/pkt | notifies/pkt | tap syscalls/pkt |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        udp = not c["workload"].startswith("tcp")
        sent = f"{c['sent_pps'] / 1e3:.1f}" if c.get("sent_pps") else "-"
        lines.append(
            f"| {c['workload']} | {c['system']} | {c['mb_s'] * 8 / 1e3:.2f} | "
            f"{kpps(c, udp)} | {sent} | "
            f"{f2(c.get('ratio_to_veth'))} | "
            f"{f2(c.get('cpu_us_per_op')) if udp else '-'} | {f2(c.get('cpu_s_per_gb'))} | "
            f"{f2(c.get('iperf_cpu_s_per_gb'))} | {f2(c.get('front_cpu_s_per_gb'))} | "
            f"{f2(c.get('daemon_cores'))} | {f2(c.get('daemon_cpu_us_per_packet'))} | "
            f"{f2(c.get('daemon_cpu_s_per_gb'))} | {f2(c.get('bytes_per_ring_packet'))} | "
            f"{f2(c.get('daemon_wakeups_per_packet'))} | {f2(c.get('front_wakeups_per_packet'))} | "
            f"{f2(c.get('front_notifies_per_packet'))} | {f2(c.get('front_tap_syscalls_per_packet'))} |")
    lines += ["", "TCP kpps of netback = netif packets/s (a GSO frame of up to 64 KiB is one packet)."]
    probes = co.get("syscall_probes") or []
    if probes:
        lines += ["", "The daemon's syscalls and context switches per netif packet (`perf stat -e "
                  "raw_syscalls:sys_enter -e context-switches -p <daemon>` over one extra run per workload, outside "
                  "the samples):", "",
                  "| workload | Gbit/s (probed run) | netif packets | syscalls/pkt | context switches/pkt |",
                  "|---|---|---|---|---|"]
        for p in probes:
            lines.append(f"| {p['workload']} | {p['gbit_s']:.2f} | {p['packets']:.0f} | "
                         f"{p['syscalls_per_packet']:.2f} | {p['context_switches_per_packet']:.3f} |")
    if co:
        lines += ["", "Physical costs measured in the same run: "
                  f"memcpy {co['memcpy_ns_per_kib']:.1f} ns/KiB (64 KiB blocks); the emulated grant copy "
                  f"{co.get('grant_copy_ns_per_kib', 0.0):.1f} ns/KiB (16 x 4 KiB segments per call); one write() "
                  f"of a 64-byte frame into a tap {co['tap_write_net_ns']:.0f} ns "
                  f"(loop cost {co['loop_ns']:.0f} ns subtracted); one eventfd wake-up {co['wakeup_us']:.2f} us "
                  "(half the ping-pong's p50)."]
    lines += targets_table(result, failures=True)
    return "\n".join(lines) + "\n"


def rerender(path: str, aggregate: Callable[[list[dict[str, Any]], list[dict[str, Any]]], Any],
             evaluate_targets: Callable[[Any], list[dict[str, Any]]],
             markdown: Callable[[dict[str, Any]], str]) -> str:
    """The cells, targets and markdown again from a bench JSON's raw samples and details (after a change to the
    aggregation or the report); rewrites the JSON and the markdown next to it, returns the markdown."""
    import json

    p = Path(path)
    result = json.loads(p.read_text())
    result["cells"] = aggregate(result["samples"], result["details"])
    result["targets"] = evaluate_targets(result["cells"])
    p.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    p.with_suffix(".md").write_text(md)
    return md
