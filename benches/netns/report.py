#!/usr/bin/env python3
"""Turns run.sh's raw lines into the Markdown results table (stdout) and
a bar chart (SVG) of every gateway on every workload.

usage: report.py RAW KERNEL CPU SVG [PINNING]

PINNING, if given, holds run.sh's paired lines: portcullis with
--verify-dst pin and then off, back to back.
"""
import os
import html
import statistics
import sys

# (key, label, unit, higher is better)
METRICS = [
    ("down1", "1 stream, server to client", "MiB/s", True),
    ("up1", "1 stream, client to server", "MiB/s", True),
    ("down8", "8 streams, server to client", "MiB/s", True),
    ("conn_per_s", "connections (hello + 1 KiB answer, 64 clients)", "conn/s", True),
    ("ttfb_p50_ms", "time to first byte, one client, p50", "ms", False),
    ("ttfb_p99_ms", "time to first byte, one client, p99", "ms", False),
    ("cpu_s_per_gib", "gateway CPU per GiB moved", "s", False),
    ("cpu_s_per_10k_conn", "gateway CPU per 10k connections", "s", False),
    ("user_cpu_s_per_10k_conn", "of which in user space (the proxy's own code)", "s", False),
    ("packets_per_conn", "packets through the gateway per connection", "count", False),
    ("kib_per_idle_conn", "gateway memory per idle connection (RSS)", "KiB", False),
    ("kib_per_idle_http_conn", "memory per idle kept-alive HTTP connection, after a 256 KiB answer (portcullis only)", "KiB", False),
]
# The kernel alone has no process to charge: its forwarding runs in the
# senders' softirq context, and its memory is not in any RSS.
NOT_ATTRIBUTABLE = {"cpu_s_per_gib", "cpu_s_per_10k_conn", "user_cpu_s_per_10k_conn", "kib_per_idle_conn", "kib_per_idle_http_conn"}
# Not proxies under test but references: routing alone, and a proxy that
# only moves the bytes (which runs only the stream workloads).
REFERENCES = ("kernel", "relay")
# portcullis with --verify-dst off: against the default, what pinning costs.
UNPINNED = "portcullis_off"


def measured(runs, gateway, key):
    return key in runs[gateway] and not (gateway == "kernel" and key in NOT_ATTRIBUTABLE)


def main():
    raw, kernel, cpu, svg = sys.argv[1:5]
    # One line per gateway per round; each number is its median over the
    # rounds, so one noisy moment on a shared machine cannot decide a ratio.
    rounds = {}
    for line in open(raw):
        fields = dict(kv.split("=", 1) for kv in line.split())
        gateway = fields.pop("gateway")
        rounds.setdefault(gateway, []).append({k: float(v) for k, v in fields.items()})
    runs = {g: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for g, rs in rounds.items()}
    # How sure each number is: its lowest and highest round.
    spread = {g: {k: (min(r[k] for r in rs), max(r[k] for r in rs)) for k in rs[0]} for g, rs in rounds.items()}
    n_rounds = min(len(rs) for rs in rounds.values())
    gateways = list(runs)
    peers = [g for g in gateways if g not in REFERENCES + ("portcullis", UNPINNED)]
    with open(svg, "w") as out:
        out.write(chart(runs, f"Linux {kernel}, {cpu}"))

    def cell(gw, key):
        if not measured(runs, gw, key):
            return "n/a"
        low, high = spread[gw][key]
        if n_rounds < 2 or low == high:
            return f"{runs[gw][key]:g}"
        return f"{runs[gw][key]:g} ({low:g}–{high:g})"

    print(f"Run on Linux {kernel}, {cpu}. Every gateway carried the same traffic in the same run;")
    print(f"each number is the median of {n_rounds} rounds that take the gateways in turn"
          + (",\nwith the lowest and highest round in brackets." if n_rounds > 1 else "."))
    print("Every proxy wrote one log line per connection (to /dev/null), as an audited gateway must.")
    if "relay" in runs:
        print("relay is a bare splice relay (no parsing, policy or log): what a proxy that does")
        print("nothing but move the bytes reaches here. It runs the stream workloads only.")
    print()
    print("| workload | unit | " + " | ".join(gateways) + " |")
    print("|---|---|" + "---|" * len(gateways))
    for key, label, unit, _ in METRICS:
        print(f"| {label} | {unit} | " + " | ".join(cell(g, key) for g in gateways) + " |")

    if "portcullis" not in runs:
        return
    p = runs["portcullis"]
    print("\nportcullis relative to each: above 1.00 means portcullis is better. The ratio of the")
    print("medians, and in brackets the lowest and highest of the rounds' own ratios (each round")
    print("measures every gateway within a minute or so, so its ratio is one like-for-like sample).\n")
    others = [g for g in list(REFERENCES) + peers if g in runs]
    print("| workload | " + " | ".join(f"vs {g}" for g in others) + " |")
    print("|---|" + "---|" * len(others))
    for key, label, _, higher in METRICS:
        cells = []
        for g in others:
            x = runs[g].get(key, 0)
            if not measured(runs, g, key) or x == 0 or p.get(key, 0) == 0:
                cells.append("n/a")
                continue
            text = f"{ratio(p[key], x, higher):.2f}"
            per_round = [
                ratio(a[key], b[key], higher)
                for a, b in zip(rounds["portcullis"], rounds[g])
                if a.get(key, 0) > 0 and b.get(key, 0) > 0
            ]
            if len(per_round) > 1:
                text += f" ({min(per_round):.2f}–{max(per_round):.2f})"
            cells.append(text)
        print(f"| {label} | " + " | ".join(cells) + " |")
    if all("busy_pct_down1" in r for r in runs.values()):
        busy = [f"{g} {runs[g]['busy_pct_down1']:.0f}%" for g in gateways]
        print("\nMachine CPU busy during the single stream (client, server and gateway share it): " + ", ".join(busy) + ".")
    pinning = sys.argv[5] if len(sys.argv) > 5 else None
    if pinning and os.path.exists(pinning) and os.path.getsize(pinning) > 0:
        print_pinning(pinning)
    duels = sys.argv[6] if len(sys.argv) > 6 else None
    if duels and os.path.exists(duels) and os.path.getsize(duels) > 0:
        print_duels(duels)
    if "kernel" in runs:
        added = [f"{g} +{runs[g]['ttfb_p50_ms'] - runs['kernel']['ttfb_p50_ms']:.3f} ms" for g in gateways if g != "kernel" and "ttfb_p50_ms" in runs[g]]
        print("\nTime to first byte added over the kernel alone (p50): " + ", ".join(added) + ".")


def ratio(ours, theirs, higher):
    """Above 1 when ours is better."""
    return ours / theirs if higher else theirs / ours


def numbered_lines(path):
    """Each line of `key=number ...` fields as a dict of floats."""
    return [{k: float(v) for k, v in (kv.split("=", 1) for kv in line.split())} for line in open(path)]


def print_pinning(path):
    """The paired comparison of --verify-dst pin (the default) and off:
    each pair's ratio and differences, then their medians."""
    pairs = numbered_lines(path)
    rate = [q["pin_conn_per_s"] / q["off_conn_per_s"] for q in pairs]
    p50 = [1000 * (q["pin_ttfb_p50_ms"] - q["off_ttfb_p50_ms"]) for q in pairs]
    p99 = [1000 * (q["pin_ttfb_p99_ms"] - q["off_ttfb_p99_ms"]) for q in pairs]
    print(
        f"\nWhat pinning costs: portcullis with its default --verify-dst pin against --verify-dst off, "
        f"in {len(pairs)} pairs run back to back, in alternating order (every name a DNS cache hit "
        f"after its first connection); the median of the pairs:\n"
    )
    print("| | median | pairs |")
    print("|---|---|---|")
    print(f"| connections/s, pin / off | {statistics.median(rate):.3f} | " + ", ".join(f"{r:.2f}" for r in rate) + " |")
    print(f"| time to first byte p50, pin - off | {statistics.median(p50):+.0f} us | " + ", ".join(f"{d:+.0f}" for d in p50) + " |")
    print(f"| time to first byte p99, pin - off | {statistics.median(p99):+.0f} us | " + ", ".join(f"{d:+.0f}" for d in p99) + " |")


def print_duels(path):
    """The head-to-head sets: portcullis against each rival, one ratio per
    set (above 1: portcullis is better), and their median."""
    sets = numbered_lines(path)
    rows = [
        ("connections/s, portcullis / nginx", "conn_per_s", "nginx"),
        ("connections/s, portcullis / haproxy", "conn_per_s", "haproxy"),
        ("8 streams, portcullis / relay", "down8", "relay"),
    ]
    shown = []
    for label, key, rival in rows:
        ratios = [q[f"portcullis_{key}"] / q[f"{rival}_{key}"] for q in sets if q.get(f"{rival}_{key}", 0) > 0 and f"portcullis_{key}" in q]
        if ratios:
            shown.append((label, ratios))
    if not shown:
        return
    print(
        f"\nHead to head: portcullis and each rival run back to back in {len(sets)} set{'s' if len(sets) != 1 else ''}, the order "
        f"rotated each set, so that each ratio compares moments seconds apart; the median of the sets "
        f"(above 1.00: portcullis is better):\n"
    )
    print("| | median | sets |")
    print("|---|---|---|")
    for label, ratios in shown:
        print(f"| {label} | {statistics.median(ratios):.2f} | " + ", ".join(f"{r:.2f}" for r in ratios) + " |")


COLOURS = {"kernel": "#9e9e9e", "relay": "#bdbdbd", "portcullis": "#1565c0", "portcullis_off": "#64b5f6", "nginx": "#2e7d32", "haproxy": "#ef6c00", "squid": "#6a1b9a"}


def chart(runs, machine):
    """One group of bars per workload; each bar is the gateway's score
    against the best gateway on that workload (1 = best), labelled with
    its value. The kernel is left out where its cost is not attributable."""
    row, bar, left, width = 26, 16, 330, 420
    gateways = list(runs)
    height = 70 + len(METRICS) * (len(gateways) * bar + row + 18)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 140}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="15" font-weight="bold">Egress gateways on the same traffic (longer is better)</text>',
        f'<text x="10" y="38" fill="#555">{html.escape(machine)}</text>',
    ]
    y = 60
    for key, label, unit, higher in METRICS:
        shown = [g for g in gateways if measured(runs, g, key) and runs[g][key] > 0]
        if not shown:
            continue
        values = {g: runs[g][key] for g in shown}
        best = max(values.values()) if higher else min(values.values())
        parts.append(f'<text x="10" y="{y + 12}" font-weight="bold">{html.escape(label)} ({unit})</text>')
        y += 18
        for g in shown:
            v = values[g]
            score = v / best if higher else best / v
            w = max(1, int(width * score))
            parts.append(f'<text x="{left - 8}" y="{y + 12}" text-anchor="end">{g}</text>')
            parts.append(f'<rect x="{left}" y="{y + 2}" width="{w}" height="{bar - 4}" fill="{COLOURS.get(g, "#333")}"/>')
            parts.append(f'<text x="{left + w + 6}" y="{y + 12}">{v:g}</text>')
            y += bar
        y += row
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


main()
