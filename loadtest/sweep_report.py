#!/usr/bin/env python3
"""Summarises a loadtest/sweep.sh run: sweep.md (one table per scenario) and SVG plots
of throughput and p50/p99 latency against the link's round-trip time.

Reads every report.json under the sweep directory (laid out by sweep.sh as
rtt-<RTT>/c<CLIENTS>/<MODE>/<scenario>-<mode>-<time>/report.json). Ratios are the
loadtest's own: the median of the per-round ratios, with the per-round spread; the
pass-through against PgBouncer ratio is computed the same way from the rounds' tps.
Standard library only, so it runs wherever the sweep does.
"""

import json
import os
import re
import statistics
import sys
from collections import defaultdict


def rtt_ms(label):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|us|s)?", label)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2) or "ms"
    return value * {"ms": 1.0, "us": 0.001, "s": 1000.0}[unit]


def load(root):
    runs = []
    for dirpath, _, files in os.walk(root):
        if "report.json" not in files:
            continue
        parts = os.path.relpath(dirpath, root).split(os.sep)
        if len(parts) < 4 or not parts[0].startswith("rtt-"):
            continue
        with open(os.path.join(dirpath, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
        report["_rtt"] = parts[0][len("rtt-"):]
        runs.append(report)
    return runs


def per_round_ratio(num, den):
    ratios = [a["tps"] / b["tps"] for a, b in zip(num["rounds"], den["rounds"]) if b["tps"] > 0]
    if not ratios:
        return None
    return statistics.median(ratios), min(ratios), max(ratios)


def fmt_ratio(r):
    if r is None:
        return "–"
    med, lo, hi = r
    return f"{med:.2f}× ({lo:.2f}–{hi:.2f})"


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def lat(t, q):
    return (t.get("latency_ms") or {}).get(q)


def table(runs, out):
    by_scenario = defaultdict(list)
    for r in runs:
        by_scenario[r["scenario"]["name"]].append(r)
    for name in sorted(by_scenario):
        rows = sorted(
            by_scenario[name],
            key=lambda r: (r["settings"]["mode"], r["settings"]["clients"], rtt_ms(r["_rtt"])),
        )
        out.append(f"\n### {name}\n")
        extra = name == "point-read"
        head = "| mode | clients | RTT | direct tps | spillway / direct | p50 / p99 direct (ms) | p50 / p99 spillway (ms) | PG CPU µs/op direct / spillway |"
        if extra:
            head += " PgBouncer / direct | pass-through / PgBouncer |"
        out.append(head)
        out.append("|" + "---|" * (head.count("|") - 1))
        for r in rows:
            t = {x["name"]: x for x in r["targets"]}
            d, s = t.get("direct"), t.get("spillway")
            if not d or not s:
                continue
            line = (
                f"| {r['settings']['mode']} | {r['settings']['clients']} | {r['_rtt']} "
                f"| {fmt(d.get('median_tps'), 0)} | {fmt_ratio(per_round_ratio(s, d))} "
                f"| {fmt(lat(d, 'p50'))} / {fmt(lat(d, 'p99'))} "
                f"| {fmt(lat(s, 'p50'))} / {fmt(lat(s, 'p99'))} "
                f"| {fmt(d.get('pg_cpu_us_per_op'), 1)} / {fmt(s.get('pg_cpu_us_per_op'), 1)} |"
            )
            if extra:
                pb, pt = t.get("pgbouncer"), t.get("passthrough")
                line += f" {fmt_ratio(per_round_ratio(pb, d)) if pb else '–'} |"
                line += f" {fmt_ratio(per_round_ratio(pt, pb)) if pb and pt else '–'} |"
            if r.get("correctness_ok") is False:
                line += " **correctness check failed**"
            errors = sum(x.get("error_total", 0) for x in r["targets"])
            if errors:
                line += f" ({errors} errors)"
            out.append(line)


COLOURS = {"direct": "#555555", "spillway": "#1f77b4", "pgbouncer": "#2ca02c", "passthrough": "#ff7f0e"}


def svg_plot(path, title, series, ylabel):
    """series: {label: [(x, y)]}; a plain line chart, x = round trip in ms."""
    w, h, left, bottom, top, right = 560, 340, 70, 40, 30, 150
    points = [p for pts in series.values() for p in pts if p[1] is not None]
    if not points:
        return False
    xmax = max(p[0] for p in points) or 1.0
    ymax = max(p[1] for p in points) or 1.0
    sx = lambda x: left + (w - left - right) * x / xmax
    sy = lambda y: h - bottom - (h - top - bottom) * y / ymax
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="13">{title}</text>',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
        f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">round trip (ms)</text>',
        f'<text x="14" y="{(top + h - bottom) / 2}" transform="rotate(-90 14 {(top + h - bottom) / 2})" text-anchor="middle">{ylabel}</text>',
    ]
    for i in range(5):
        y = ymax * i / 4
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4}" text-anchor="end">{y:.3g}</text>')
    for x in sorted({p[0] for p in points}):
        parts.append(f'<text x="{sx(x)}" y="{h - bottom + 14}" text-anchor="middle">{x:g}</text>')
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts = sorted(p for p in pts if p[1] is not None)
        colour = COLOURS.get(label.split()[0], "#9467bd")
        dash = ' stroke-dasharray="4 3"' if "p99" in label else ""
        if len(pts) > 1:
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, y in pts:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        ly = top + 14 * i
        parts.append(f'<line x1="{w - right + 10}" y1="{ly}" x2="{w - right + 30}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{w - right + 34}" y="{ly + 4}">{label}</text>')
    parts.append("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return True


def plots(runs, root, out):
    groups = defaultdict(list)
    for r in runs:
        groups[(r["scenario"]["name"], r["settings"]["mode"], r["settings"]["clients"])].append(r)
    os.makedirs(os.path.join(root, "plots"), exist_ok=True)
    made = []
    for (name, mode, clients), rs in sorted(groups.items()):
        if len({r["_rtt"] for r in rs}) < 2:
            continue
        tps, latency = defaultdict(list), defaultdict(list)
        for r in rs:
            x = rtt_ms(r["_rtt"])
            for t in r["targets"]:
                tps[t["name"]].append((x, t.get("median_tps")))
                if t["name"] in ("direct", "spillway"):
                    latency[f"{t['name']} p50"].append((x, lat(t, "p50")))
                    latency[f"{t['name']} p99"].append((x, lat(t, "p99")))
        base = f"{name}-{mode}-c{clients}"
        if svg_plot(os.path.join(root, "plots", base + "-tps.svg"), f"{name}, {mode}, {clients} clients: throughput", tps, "operations/s"):
            made.append(base + "-tps.svg")
        if svg_plot(os.path.join(root, "plots", base + "-latency.svg"), f"{name}, {mode}, {clients} clients: latency", latency, "ms"):
            made.append(base + "-latency.svg")
    if made:
        out.append("\n## Plots\n")
        out.extend(f"- [plots/{m}](plots/{m})" for m in made)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: sweep_report.py SWEEP_DIR")
    root = sys.argv[1]
    runs = load(root)
    env = {}
    env_path = os.path.join(root, "sweep.env")
    if os.path.exists(env_path):
        with open(env_path, encoding="utf-8") as f:
            env = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    out = [
        "# Deployment sweep",
        "",
        f"Commit `{env.get('commit', '?')}`, `{env.get('command', '?')}`, {env.get('cores', '?')} cores, "
        f"load average {env.get('load_start', '?')} at the start and {env.get('load_end', '?')} at the end. "
        "Ratios: median of the per-round ratios (lowest–highest round).",
    ]
    table(runs, out)
    plots(runs, root, out)
    with open(os.path.join(root, "sweep.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
