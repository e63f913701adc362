#!/usr/bin/env python3
"""Report of tools/bench/compare.sh: reads OUT/runs.jsonl (and OUT/machine.txt), writes
OUT/results.json, OUT/table.md (also printed) and OUT/compare.svg (throughput and p99 by system
for every case). Standard library only.

Usage: compare_report.py OUT_DIR [--title TEXT]
       compare_report.py --chart DEST.svg OUT_DIR1 OUT_DIR2 ... [--title TEXT]
         (one chart of several runs of the script, one bar per run)
"""
import json
import os
import statistics
import sys
from xml.sax.saxutils import escape

ORDER = ["shmrelay", "shmrelay-base", "haproxy", "nginx", "tokio", "cepoll", "shmrelay-ws", "nginx-ws", "ws-echo"]
LABEL = {
    "shmrelay": "shmrelay (1 front + 1 worker)",
    "shmrelay-base": "shmrelay baseline build (--baseline-bin)",
    "haproxy": "HAProxy + tokio-echo",
    "nginx": "nginx stream + tokio-echo",
    "tokio": "tokio-echo alone",
    "cepoll": "C epoll echo alone",
    "shmrelay-ws": "shmrelay websocket",
    "nginx-ws": "nginx ws + ws-echo",
    "ws-echo": "ws-echo alone",
}
COLOR = {"shmrelay": "#d95f02", "shmrelay-base": "#e6ab02", "haproxy": "#1b9e77", "nginx": "#7570b3", "tokio": "#888888",
         "cepoll": "#444444", "shmrelay-ws": "#e7298a", "nginx-ws": "#66a61e", "ws-echo": "#a6761d"}
# The io_uring echo prototype (issue 14), next to the C epoll echo.
ORDER.insert(ORDER.index("cepoll") + 1, "uring")
LABEL["uring"] = "io_uring echo alone (uring-echo)"
COLOR["uring"] = "#1f78b4"


def size_label(size):
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def load_runs(out):
    runs = []
    with open(os.path.join(out, "runs.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    return runs


def machine(out):
    m = {}
    path = os.path.join(out, "machine.txt")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                k, _, v = line.rstrip("\n").partition("=")
                m[k] = v
    return m


def ratios(ld, ref):
    """(req/s, p99, CPU per request) of a run's load figures over a reference run's."""
    def over(a, b):
        return a / b if a and b else None
    return (over(ld["req_per_sec"], ref["req_per_sec"]), over(ld["p99_us"], ref["p99_us"]),
            over(ref.get("req_per_server_cpu_sec"), ld.get("req_per_server_cpu_sec")))


def rows_of(runs):
    cases = []
    for r in runs:
        key = (r["size"], r["conns"])
        if key not in cases:
            cases.append(key)
    cases.sort()
    rows = []
    for size, conns in cases:
        groups = {}
        for r in runs:
            if (r["size"], r["conns"]) == (size, conns):
                groups.setdefault(r["system"], []).append(r)
        # Several runs per case (--repeat): the one with the median req/s stands for the system.
        by_sys = {}
        for name, rs in groups.items():
            rs = sorted(rs, key=lambda x: x["load"]["req_per_sec"])
            by_sys[name] = rs[(len(rs) - 1) // 2]
        # A WebSocket-only run compares with the relay's websocket listener.
        base = by_sys.get("shmrelay") or by_sys.get("shmrelay-ws")
        cep = by_sys.get("cepoll")
        for sys_name in sorted(by_sys, key=lambda s: ORDER.index(s) if s in ORDER else 99):
            r = by_sys[sys_name]
            reps = groups[sys_name]
            ld = r["load"]
            row = {
                "system": sys_name,
                "size": size,
                "conns": conns,
                "depth": r["depth"],
                "req_per_sec": ld["req_per_sec"],
                "p50_us": ld["p50_us"],
                "p99_us": ld["p99_us"],
                "server_cpu_seconds": ld.get("server_cpu_seconds"),
                "req_per_server_cpu_sec": ld.get("req_per_server_cpu_sec"),
                "client_cpu_seconds": ld.get("client_cpu_seconds"),
                "errors": ld["errors"],
                "mismatches": ld["mismatches"],
                "connected": ld["connected"],
                "loadavg_before": r["loadavg_before"],
                "loadavg_after": r["loadavg_after"],
                "reps": len(reps),
                "rps_min": min(x["load"]["req_per_sec"] for x in reps),
                "rps_max": max(x["load"]["req_per_sec"] for x in reps),
                "p99_min_us": min(x["load"]["p99_us"] for x in reps),
                "p99_max_us": max(x["load"]["p99_us"] for x in reps),
                "copied_ratio": None,
                "rps_vs_shmrelay": None,
                "p99_vs_shmrelay": None,
                "eff_vs_shmrelay": None,
                # Server CPU (user + system of every server process, from /proc) per request.
                "cpu_us_per_req": (1e6 / ld["req_per_server_cpu_sec"]) if ld.get("req_per_server_cpu_sec") else None,
                "rps_vs_cepoll": None,
                "p99_vs_cepoll": None,
                "cpu_per_req_vs_cepoll": None,
            }
            if r.get("shmrelay"):
                # Over all runs of the case.
                cp = sum(x["shmrelay"]["bytes_copied"] for x in reps)
                rl = sum(x["shmrelay"]["bytes_relayed"] for x in reps)
                row["copied_ratio"] = cp / rl if rl else 0.0
            if base:
                row["rps_vs_shmrelay"], row["p99_vs_shmrelay"], eff = ratios(ld, base["load"])
                row["eff_vs_shmrelay"] = None if eff is None else 1 / eff
            if cep:
                row["rps_vs_cepoll"], row["p99_vs_cepoll"], row["cpu_per_req_vs_cepoll"] = ratios(ld, cep["load"])
            rows.append(row)
    return rows


def fmt_ms(us):
    ms = us / 1000.0
    if ms >= 100:
        return f"{ms:.0f}"
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def fmt_x(v):
    return "" if v is None else f"{v:.2f}x"


def table(rows):
    """Markdown table of the rows; with several runs per case (--repeat) also the ranges."""
    multi = any(r["reps"] > 1 for r in rows)
    head = ["system", "payload", "conns"]
    if multi:
        head += ["req/s (median)", "req/s range", "p50 ms", "p99 ms", "p99 range ms"]
    else:
        head += ["req/s", "p50 ms", "p99 ms"]
    head += ["server CPU s", "req per server CPU-s", "req/s vs shmrelay", "p99 vs shmrelay",
             "req/CPU-s vs shmrelay", "copied/relayed", "load avg (1/5/15 min)"]
    cep = any(r["rps_vs_cepoll"] is not None for r in rows)
    if cep:
        head += ["server CPU us/req", "req/s vs C epoll", "p99 vs C epoll", "CPU/req vs C epoll"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---|---|" + "--:|" * (len(head) - 3) + "---|",
    ]
    for r in rows:
        cpu = r["server_cpu_seconds"]
        eff = r["req_per_server_cpu_sec"]
        cr = r["copied_ratio"]
        note = ""
        if r["errors"] or r["mismatches"] or r["connected"] != r["conns"]:
            note = f" (errors {r['errors']}, mismatches {r['mismatches']}, connected {r['connected']})"
        cells = [f"{r['system']}{note}", size_label(r["size"]), f"{r['conns']}", f"{r['req_per_sec']:,.0f}"]
        if multi:
            cells.append(f"{human(r['rps_min'])}-{human(r['rps_max'])}")
        cells += [fmt_ms(r["p50_us"]), fmt_ms(r["p99_us"])]
        if multi:
            cells.append(f"{fmt_ms(r['p99_min_us'])}-{fmt_ms(r['p99_max_us'])}")
        cells += [
            "" if cpu is None else f"{cpu:.2f}",
            "" if eff is None else f"{eff:,.0f}",
            fmt_x(r["rps_vs_shmrelay"]),
            fmt_x(r["p99_vs_shmrelay"]),
            fmt_x(r["eff_vs_shmrelay"]),
            "" if cr is None else f"{cr * 100:.3f}%",
            r["loadavg_before"],
        ]
        if cep:
            c = r["cpu_us_per_req"]
            cells += ["" if c is None else f"{c:.2f}", fmt_x(r["rps_vs_cepoll"]),
                      fmt_x(r["p99_vs_cepoll"]), fmt_x(r["cpu_per_req_vs_cepoll"])]
        lines.append("| " + " | ".join(cells) + " |")
    if multi:
        reps = max(r["reps"] for r in rows)
        lines.append("")
        lines.append(f"Median of {reps} runs per system and case (the row shows that run's figures; "
                     "ranges over all runs).")
    return "\n".join(lines)


def per_round(runs, a, b, size, conns):
    """`a`'s req/s over `b`'s, round by round (runs of the same `rep`), as
    " (per round: median M [min-max])", or "" without two paired rounds. The systems alternate
    within a round, so a change in the host's speed between rounds cancels out of each ratio:
    on a shared host this is steadier than the ratio of the two medians."""
    def by_rep(name):
        return {r.get("rep", 1): r["load"]["req_per_sec"] for r in runs
                if r["system"] == name and (r["size"], r["conns"]) == (size, conns)}
    ra, rb = by_rep(a), by_rep(b)
    xs = sorted(ra[k] / rb[k] for k in ra if k in rb and rb[k])
    if len(xs) < 2:
        return ""
    return f" (per round: median {statistics.median(xs):.2f}x [{xs[0]:.2f}-{xs[-1]:.2f}])"


def targets(rows, runs=()):
    """The issue's targets, checked on whatever cases were run; with `runs`, each ratio also
    as the median of its per-round ratios."""
    out = []
    get = {(r["system"], r["size"], r["conns"]): r for r in rows}
    s = get.get(("shmrelay", 64, 1000))
    h = get.get(("haproxy", 64, 1000))
    t = get.get(("tokio", 64, 1000))
    if s and h:
        ratio = s["req_per_sec"] / h["req_per_sec"]
        out.append(
            f"- 64 B, 1,000 conns: shmrelay / HAProxy req/s = {ratio:.2f}x (target >= 2x: "
            f"{'met' if ratio >= 2 else 'MISSED'}){per_round(runs, 'shmrelay', 'haproxy', 64, 1000)}; p99 {fmt_ms(s['p99_us'])} ms vs "
            f"{fmt_ms(h['p99_us'])} ms (target lower: {'met' if s['p99_us'] < h['p99_us'] else 'MISSED'})"
        )
    if s and t:
        ratio = s["req_per_sec"] / t["req_per_sec"]
        out.append(
            f"- 64 B, 1,000 conns: shmrelay / tokio-echo req/s = {ratio:.2f}x (target >= 0.7x: "
            f"{'met' if ratio >= 0.7 else 'MISSED'})"
        )
    # Issue 16's WebSocket targets: shmrelay-ws against each peer, at least `want` times its req/s.
    sw = get.get(("shmrelay-ws", 64, 1000))
    for peer, want in (("nginx-ws", 2.0), ("ws-echo", 0.8)):
        p = get.get((peer, 64, 1000))
        if sw and p:
            x = sw["req_per_sec"] / p["req_per_sec"]
            verdict = "met" if x >= want else "MISSED"
            out.append(f"- WebSocket, 64 B, 1,000 conns: shmrelay / {peer} req/s = {x:.2f}x (target >= {want:g}x: {verdict})")
    for (sys_name, size, conns), r in sorted(get.items()):
        c = get.get(("cepoll", size, conns))
        if sys_name == "shmrelay" and c:
            ratio = r["req_per_sec"] / c["req_per_sec"]
            line = (f"- {size_label(size)}, {conns} conns: shmrelay / C epoll echo req/s = {ratio:.2f}x "
                    f"(target >= 1x: {'met' if ratio >= 1 else 'MISSED'})"
                    f"{per_round(runs, 'shmrelay', 'cepoll', size, conns)}; p99 {fmt_ms(r['p99_us'])} ms vs "
                    f"{fmt_ms(c['p99_us'])} ms")
            if size >= 4096:
                line += f" (target no worse: {'met' if r['p99_us'] <= c['p99_us'] else 'MISSED'})"
            if r["cpu_us_per_req"] and c["cpu_us_per_req"]:
                line += (f"; server CPU per request {r['cpu_us_per_req']:.2f} us (all relay processes) "
                         f"vs {c['cpu_us_per_req']:.2f} us")
            out.append(line)
    for (sys_name, size, conns), r in sorted(get.items()):
        b = get.get(("shmrelay-base", size, conns))
        if sys_name == "shmrelay" and b:
            ratio = r["req_per_sec"] / b["req_per_sec"]
            out.append(
                f"- {size_label(size)}, {conns} conns: shmrelay / baseline build req/s = "
                f"{ratio:.3f}x (target within 5%: {'met' if ratio >= 0.95 else 'MISSED'})"
                f"{per_round(runs, 'shmrelay', 'shmrelay-base', size, conns)}"
            )
    for r in rows:
        if r["system"] == "shmrelay" and r["size"] >= 4096 and r["copied_ratio"] is not None:
            out.append(
                f"- {size_label(r['size'])}, {r['conns']} conns: shmrelay copied/relayed = "
                f"{r['copied_ratio'] * 100:.3f}% (target < 1%: {'met' if r['copied_ratio'] < 0.01 else 'MISSED'})"
            )
    return "\n".join(out)


def axis_ms(us):
    ms = us / 1000.0
    return f"{ms:g}"


def human(v):
    if v >= 1e6:
        return f"{v / 1e6:.2f}".rstrip("0").rstrip(".") + "M"
    if v >= 1e3:
        return f"{v / 1e3:.0f}k"
    return f"{v:.0f}"


def nice_max(v):
    """A round axis maximum >= v (1, 2, 4, 6, 8 x 10^k) so the 4 grid steps are round too."""
    import math
    if v <= 0:
        return 1
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 4, 6, 8, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def svg(runs_rows, title, subtitle=""):
    """Grid: one column per case (its own scale), throughput above, p99 below. `runs_rows` is
    a list of row lists, one per run of the script: each system gets one bar per run (later
    runs lighter), so run-to-run spread is visible."""
    cases = []
    for rows in runs_rows:
        for r in rows:
            if (r["size"], r["conns"]) not in cases:
                cases.append((r["size"], r["conns"]))
    cases.sort()
    systems = [s for s in ORDER if any(r["system"] == s for rows in runs_rows for r in rows)]
    gets = [{(r["system"], r["size"], r["conns"]): r for r in rows} for rows in runs_rows]
    nruns = len(runs_rows)
    W, top, left, right, gap = 980, 64, 70, 16, 28
    panel_h = 215
    H = top + 2 * panel_h + 70
    col_w = (W - left - right - gap * (len(cases) - 1)) / max(len(cases), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">{escape(title)}</text>',
        f'<text x="{W / 2}" y="42" text-anchor="middle" fill="#444">{escape(subtitle)}</text>',
    ]

    def panel(y0, metric, ylabel, fmt, axis_fmt):
        h = panel_h - 55
        parts.append(f'<text x="16" y="{y0 + h / 2}" transform="rotate(-90 16 {y0 + h / 2})" '
                     f'text-anchor="middle">{escape(ylabel)}</text>')
        for ci, (size, conns) in enumerate(cases):
            x0 = left + ci * (col_w + gap)
            vals = [g[(s, size, conns)][metric] for g in gets for s in systems if (s, size, conns) in g]
            vmax = nice_max((max(vals) if vals else 1) * 1.12)
            for i in range(5):
                v = vmax * i / 4
                y = y0 + h - h * i / 4
                parts.append(f'<line x1="{x0:.1f}" x2="{x0 + col_w:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
                parts.append(f'<text x="{x0 - 4:.1f}" y="{y + 4:.1f}" text-anchor="end" fill="#555" '
                             f'font-size="10">{axis_fmt(v)}</text>')
            slot = col_w * 0.92 / max(len(systems), 1)
            bar_w = slot * 0.9 / nruns
            for si, s in enumerate(systems):
                for ri, g in enumerate(gets):
                    r = g.get((s, size, conns))
                    if not r:
                        continue
                    v = r[metric]
                    bh = h * v / vmax
                    x = x0 + col_w * 0.04 + si * slot + ri * bar_w
                    op = 1.0 if ri == 0 else 0.55
                    parts.append(f'<rect x="{x:.1f}" y="{y0 + h - bh:.1f}" width="{bar_w - 1:.1f}" height="{bh:.1f}" '
                                 f'fill="{COLOR.get(s, "#333")}" fill-opacity="{op}"><title>{escape(s)}, run {ri + 1}: '
                                 f'{fmt(v)}</title></rect>')
                    parts.append(f'<text x="{x + (bar_w - 1) / 2:.1f}" y="{y0 + h - bh - 3:.1f}" text-anchor="middle" '
                                 f'font-size="{9 if nruns > 1 else 10}">{fmt(v)}</text>')
            parts.append(f'<line x1="{x0:.1f}" x2="{x0 + col_w:.1f}" y1="{y0 + h}" y2="{y0 + h}" stroke="#333"/>')
            parts.append(f'<text x="{x0 + col_w / 2:.1f}" y="{y0 + h + 17}" text-anchor="middle" font-weight="bold">'
                         f'{size_label(size)}, {conns:,} conns</text>')

    panel(top, "req_per_sec", "requests/s (higher is better)", human, axis_fmt=human)
    panel(top + panel_h, "p99_us", "p99 latency, ms (lower is better)", fmt_ms, axis_fmt=axis_ms)
    ly = top + 2 * panel_h + 8
    # Five systems (a WebSocket run with the length-prefixed pair) share the width.
    step = min(215, (W - left - right) // max(1, len(systems)))
    for i, s in enumerate(systems):
        x = left + i * step
        parts.append(f'<rect x="{x:.1f}" y="{ly}" width="14" height="14" fill="{COLOR.get(s, "#333")}"/>')
        parts.append(f'<text x="{x + 20:.1f}" y="{ly + 12}">{escape(LABEL.get(s, s))}</text>')
    if nruns > 1:
        parts.append(f'<text x="{left}" y="{ly + 36}" fill="#444">Each system: one bar per run, '
                     f'first run solid, later runs lighter ({nruns} runs of the same command).</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def subtitle_of(m, all_rows):
    loads = sorted(float(r["loadavg_before"].split()[0]) for r in all_rows)
    return (f"{m.get('nproc', '?')} cores, {m.get('cpu', '?')}, {m.get('kernel', '?')}; "
            f"1-minute load average {loads[0]:.2f} to {loads[-1]:.2f} before the runs")


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    title = None
    if "--title" in sys.argv:
        title = sys.argv[sys.argv.index("--title") + 1]
    if sys.argv[1] == "--chart":
        # compare_report.py --chart OUT.svg DIR1 DIR2 ...: one chart of several runs.
        dest, dirs = sys.argv[2], [a for a in sys.argv[3:] if a != "--title" and a != title]
        all_runs = [load_runs(d) for d in dirs]
        rows = [rows_of(r) for r in all_runs]
        m = machine(dirs[0])
        r0 = all_runs[0][0]
        reps = max(x.get("rep", 1) for rs in all_runs for x in rs)
        if title is None:
            title = (f"Echo through one core's worth of server: closed loop, depth {r0['depth']}, "
                     f"{r0['load']['seconds']:g} s per measurement"
                     + (f", median of {reps}" if reps > 1 else "") + f"; {len(dirs)} runs")
        with open(dest, "w") as f:
            f.write(svg(rows, title, subtitle_of(m, [x for rr in rows for x in rr])))
        print(f"written: {dest}")
        return
    out = sys.argv[1]
    runs = load_runs(out)
    if not runs:
        sys.exit("compare_report.py: no runs in runs.jsonl")
    rows = rows_of(runs)
    m = machine(out)
    depth = runs[0]["depth"]
    secs = runs[0]["load"]["seconds"]
    if title is None:
        reps = max(x.get("rep", 1) for x in runs)
        title = (f"Echo through one core's worth of server: closed loop, depth {depth}, {secs:g} s per measurement"
                 + (f", median of {reps}" if reps > 1 else ""))
    tbl = table(rows)
    tg = targets(rows, runs)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"machine": m, "rows": rows, "runs": runs}, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(tbl + "\n\n" + tg + "\n")
    with open(os.path.join(out, "compare.svg"), "w") as f:
        f.write(svg([rows], title, subtitle_of(m, rows)))
    for k in ("nproc", "cpu", "kernel", "haproxy", "nginx", "git", "command"):
        if k in m:
            print(f"{k}: {m[k]}")
    print()
    print(tbl)
    print()
    print(tg)
    print(f"\nwritten: {out}/results.json, {out}/table.md, {out}/compare.svg")


if __name__ == "__main__":
    main()
