#!/usr/bin/env python3
"""The chart of a `scale.sh --million` run as one SVG (no packages beyond the standard library):
three panels over time, connections, memory (relay private, rings, kernel slab growth, client)
and CPU (relay, client), one line style per variant.

  python3 tools/bench/million_chart.py OUTDIR   redraws OUTDIR/million.svg from the
                                                OUTDIR/VARIANT/samples.tsv of a run
"""

import os
import sys
from xml.sax.saxutils import escape

W, PANEL_H, LEFT, RIGHT, TOP, GAP = 900, 190, 70, 190, 40, 50
COLORS = {"conns": "#1f77b4", "relay_private_mib": "#d62728", "rings_mib": "#ff7f0e",
          "slab_delta_mib": "#7f7f7f", "client_rss_mib": "#2ca02c", "relay_cpu_pct": "#d62728",
          "client_cpu_pct": "#2ca02c", "supervisor_mib": "#9467bd", "socket_slabs_mib": "#8c564b"}
LABELS = {"conns": "connections open in the relay", "relay_private_mib": "relay private (Pss_Anon)",
          "rings_mib": "rings + stats (Pss_Shmem)", "slab_delta_mib": "kernel slab growth",
          "socket_slabs_mib": "kernel socket caches",
          "client_rss_mib": "client RSS", "supervisor_mib": "supervisor RSS",
          "relay_cpu_pct": "relay CPU", "client_cpu_pct": "client CPU"}
PANELS = [
    ("connections", ["conns"], 1, ""),
    ("memory, MiB", ["relay_private_mib", "rings_mib", "supervisor_mib", "slab_delta_mib",
                     "socket_slabs_mib", "client_rss_mib"], 1, ""),
    ("CPU, % of one core", ["relay_cpu_pct", "client_cpu_pct"], 1, "%"),
]
DASHES = ["", "6,4", "2,3", "10,3,2,3"]


def nice_max(v):
    if v <= 0:
        return 1
    mag = 10 ** len(str(int(v))) / 10
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * mag:
            return m * mag
    return v


def write_svg(path, columns, series, conns_target=None):
    """`series`: {variant: rows}, each row a list in the order of `columns`."""
    idx = {c: i for i, c in enumerate(columns)}
    tmax = max([r[0] for rows in series.values() for r in rows] + [1])
    h = TOP + len(PANELS) * (PANEL_H + GAP) + 20
    pw = W - LEFT - RIGHT
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{h}" fill="white"/>',
         f'<text x="{LEFT}" y="20" font-size="14">shmrelay: {escape(", ".join(series))} '
         f'(line styles), time in seconds from the start of the ramp</text>']
    for k, (title, cols, _, unit) in enumerate(PANELS):
        y0 = TOP + k * (PANEL_H + GAP)
        cols = [c for c in cols if c in idx]  # older runs lack some columns
        vals = [float(r[idx[c]]) for rows in series.values() for r in rows for c in cols]
        if title == "connections" and conns_target:
            vals.append(conns_target)
        vmax = nice_max(max(vals + [0]))
        # Machine-wide deltas can go below zero (other work freed memory).
        vmin = -nice_max(-min(vals + [0])) if min(vals + [0]) < 0 else 0
        x = lambda t: LEFT + pw * t / tmax  # noqa: E731
        y = lambda v: y0 + PANEL_H - PANEL_H * (v - vmin) / (vmax - vmin)  # noqa: E731
        s.append(f'<text x="{LEFT}" y="{y0 - 6}" font-weight="bold">{escape(title)}</text>')
        s.append(f'<rect x="{LEFT}" y="{y0}" width="{pw}" height="{PANEL_H}" fill="none" stroke="#999"/>')
        for i in range(5):
            v = vmin + (vmax - vmin) * i / 4
            s.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
            s.append(f'<text x="{LEFT - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:,.0f}{unit}</text>')
        for i in range(6):
            t = tmax * i / 5
            s.append(f'<text x="{x(t):.1f}" y="{y0 + PANEL_H + 13}" text-anchor="middle">{t:.0f}</text>')
        if title == "connections" and conns_target:
            s.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(conns_target):.1f}" '
                     f'y2="{y(conns_target):.1f}" stroke="#1f77b4" stroke-opacity="0.3"/>')
        ly = y0 + 10
        for vi, (variant, rows) in enumerate(series.items()):
            dash = DASHES[vi % len(DASHES)]
            for c in cols:
                pts = " ".join(f"{x(float(r[0])):.1f},{y(float(r[idx[c]])):.1f}" for r in rows)
                if pts:
                    s.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS[c]}" '
                             f'stroke-width="1.5" stroke-dasharray="{dash}"/>')
                s.append(f'<line x1="{LEFT + pw + 10}" x2="{LEFT + pw + 34}" y1="{ly}" y2="{ly}" '
                         f'stroke="{COLORS[c]}" stroke-width="1.5" stroke-dasharray="{dash}"/>')
                s.append(f'<text x="{LEFT + pw + 38}" y="{ly + 4}">{escape(LABELS[c])} ({escape(variant)})</text>')
                ly += 14
    s.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(s) + "\n")


def read_tsv(path):
    with open(path) as f:
        lines = f.read().split("\n")
    cols = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        if line.strip():
            rows.append([v if i == 1 else float(v) for i, v in enumerate(line.split("\t"))])
    return cols, rows


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    out = sys.argv[1]
    series, cols = {}, None
    for v in sorted(os.listdir(out)):
        p = os.path.join(out, v, "samples.tsv")
        if os.path.exists(p):
            cols, series[v] = read_tsv(p)
    if not series:
        sys.exit(f"no */samples.tsv under {out}")
    write_svg(os.path.join(out, "million.svg"), cols, series)
    print(os.path.join(out, "million.svg"))


if __name__ == "__main__":
    main()
