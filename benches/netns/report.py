#!/usr/bin/env python3
"""Turns run.sh's raw lines into the Markdown results table.

usage: report.py RAW KERNEL CPU
"""
import sys

# (key, label, unit, higher is better)
METRICS = [
    ("down1", "1 stream, server to client", "MiB/s", True),
    ("up1", "1 stream, client to server", "MiB/s", True),
    ("down8", "8 streams, server to client", "MiB/s", True),
    ("conn_per_s", "connections (hello + 1 KiB answer, 64 clients)", "conn/s", True),
    ("ttfb_p50_ms", "time to first byte, p50", "ms", False),
    ("ttfb_p99_ms", "time to first byte, p99", "ms", False),
    ("cpu_s_per_gib", "gateway CPU per GiB moved", "s", False),
    ("cpu_s_per_10k_conn", "gateway CPU per 10k connections", "s", False),
    ("kib_per_idle_conn", "gateway memory per idle connection (RSS)", "KiB", False),
]
# The kernel alone has no process to charge: its forwarding runs in the
# senders' softirq context, and its memory is not in any RSS.
NOT_ATTRIBUTABLE = {"cpu_s_per_gib", "cpu_s_per_10k_conn", "kib_per_idle_conn"}


def main():
    raw, kernel, cpu = sys.argv[1:4]
    runs = {}
    for line in open(raw):
        fields = dict(kv.split("=", 1) for kv in line.split())
        gateway = fields.pop("gateway")
        runs[gateway] = {k: float(v) for k, v in fields.items()}
    gateways = list(runs)
    peers = [g for g in gateways if g not in ("kernel", "portcullis")]

    def cell(gw, key):
        if gw == "kernel" and key in NOT_ATTRIBUTABLE:
            return "n/a"
        return f"{runs[gw][key]:g}"

    print(f"Run on Linux {kernel}, {cpu}. Every gateway carried the same traffic in the same run.\n")
    print("| workload | unit | " + " | ".join(gateways) + " |")
    print("|---|---|" + "---|" * len(gateways))
    for key, label, unit, _ in METRICS:
        print(f"| {label} | {unit} | " + " | ".join(cell(g, key) for g in gateways) + " |")

    if "portcullis" not in runs:
        return
    p = runs["portcullis"]
    print("\nportcullis relative to each: above 1.00 means portcullis is better.\n")
    others = [g for g in ["kernel"] + peers if g in runs]
    print("| workload | " + " | ".join(f"vs {g}" for g in others) + " |")
    print("|---|" + "---|" * len(others))
    for key, label, _, higher in METRICS:
        cells = []
        for g in others:
            x = runs[g][key]
            if (g == "kernel" and key in NOT_ATTRIBUTABLE) or x == 0 or p[key] == 0:
                cells.append("n/a")
            else:
                cells.append(f"{(p[key] / x if higher else x / p[key]):.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if "kernel" in runs:
        added = [f"{g} +{runs[g]['ttfb_p50_ms'] - runs['kernel']['ttfb_p50_ms']:.3f} ms" for g in gateways if g != "kernel"]
        print("\nTime to first byte added over the kernel alone (p50): " + ", ".join(added) + ".")


main()
