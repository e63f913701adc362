#!/usr/bin/env python3
"""Memory touched per wake-up of a server's event loop (issue 15), counted by valgrind.

At a million connections over 56 fronts each front wakes for about one heartbeat, after
dozens of other processes ran on its core: what it touches is cold (cache lines, TLB entries,
page-table lines). So the CPU of a beat follows the distinct lines and pages a wake touches
more than the instructions it executes, and neither is visible to `perf` on this VM (no
hardware counters). This script counts them deterministically: the server's event-loop
process runs under `valgrind --tool=lackey --trace-mem=yes` while `relaybench hold` keeps
--conns connections beating every --beat seconds; the trace of the hold window is cut at every
entry to `epoll_wait`, and per wake it counts instructions, distinct code lines (64 B) and code
pages (4 KiB), distinct data lines and data pages, with the data split by mapping (stack, heap,
shared memory, the binary's own data, libc).

  --server relay   shmrelay --fronts 1 --workers 2 (the million's per-front shape), the
                   front under lackey (the supervisor too: it is the front's parent; workers not)
  --server cecho   examples/c/epoll-echo.c in one process: the floor's server

Printed: the median and the mean per wake over the wakes of the window, the data lines per
wake by mapping, and per function (instructions, code lines, data lines; --top N rows).
--pages lists the data pages most wakes touch (with the source lines that touch them first),
--where N the N instructions that first touch the most data lines, --by-source N the
instructions and first-touched data lines per wake grouped by the outermost N source lines of
each instruction's inline chain. The defaults are the million's per-front shape (18,000
connections; a beat every 90 s rather than 60: lackey slows the front some 100x, and a faster
beat batches several per wake). --order-file PATH writes the binary's functions run in the
window, hottest first, for lld's --symbol-ordering-file.
Compare builds with this script: the counts do not depend on the machine's load, as long as
wakes hold the same number of beats (see the wakes printed); timings come from
`scale.sh --million`.

Usage: tools/bench/footprint.py [--server relay|cecho] [--conns N (18000)] [--beat S (90)]
                                [--seconds S (20)] [--bin DIR (target/release)] [--out DIR]
                                [--top N] [--pages] [--where N] [--by-source N]
                                [--order-file PATH]
The window starts once the last connection's first beat is due (1.1 x --beat after the ramp).
Needs valgrind, binutils and a C compiler (cecho).
"""

import argparse
import bisect
import collections
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LINE, PAGE = 64, 4096
# The servers' own executables (told apart from libraries in the traced process's mappings).
BINARIES = ("/shmrelay", "/epoll-echo")


def die(msg):
    print(f"footprint.py: {msg}", file=sys.stderr)
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, secs=120):
    deadline = time.time() + secs
    while time.time() < deadline:
        if proc.poll() is not None:
            die("the server exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    die(f"nothing listens on {port} after {secs} s")


def traced_pid(outdir, word):
    """The pid of the lackey trace whose command (in its header) contains `word` (waits)."""
    for _ in range(600):
        for name in os.listdir(outdir):
            m = re.match(r"trace\.(\d+)$", name)
            if not m:
                continue
            with open(os.path.join(outdir, name), errors="replace") as f:
                head = f.read(4096)
            if any(line.split("Command: ", 1)[-1].startswith(word)
                   for line in head.splitlines() if "Command: " in line):
                return int(m.group(1))
        time.sleep(0.1)
    die(f"no traced process runs '{word}'")


def maps_of(pid):
    """[(start, end, name)] of the process's mappings; anonymous ones named by kind."""
    out = []
    for line in open(f"/proc/{pid}/maps"):
        f = line.split()
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        path = f[5] if len(f) > 5 else ""
        if path.startswith("/dev/shm/") or path.startswith("/memfd:"):
            name = "shared memory"
        elif "libc.so" in path or "ld-linux" in path:
            name = "libc"
        elif path == "[stack]":
            name = "stack"
        elif path == "[heap]":
            name = "heap"
        elif path == "":
            name = "anonymous (mmap: stacks, big allocations)"
        elif path.startswith("["):
            name = path.strip("[]")
        else:
            name = "binary" if path.endswith(BINARIES) else os.path.basename(path)
        out.append((lo, hi, name))
    return out


def file_bases(pid):
    """{path: load address} of the files mapped from their start in the traced process."""
    out = {}
    for line in open(f"/proc/{pid}/maps"):
        f = line.split()
        if len(f) > 5 and f[2] == "00000000" and f[5].startswith("/") and f[5] not in out:
            out[f[5]] = int(f[0].split("-")[0], 16)
    return out


def functions(path, base, demangle=True, dynamic=False):
    """Sorted [(start, end, name)] of the functions in `path`, at their addresses in the
    traced process (loaded at `base`): demangled with the hash cut, or linker names."""
    pie = b"DYN" in subprocess.run(["readelf", "-h", path], capture_output=True).stdout
    nm = ["nm", "-S", "--defined-only"] + (["-C"] if demangle else []) + (["-D"] if dynamic else [])
    out = []
    for line in subprocess.run(nm + [path], capture_output=True, text=True).stdout.splitlines():
        f = line.split(maxsplit=3)
        if len(f) == 4 and f[2] in "tTwW":
            lo = int(f[0], 16) + (base if pie else 0)
            name = re.sub(r"::h[0-9a-f]{16}$", "", f[3]) if demangle else f[3]
            out.append((lo, lo + int(f[1], 16), name))
    out.sort()
    return out


def finder(table):
    """A function from an address to the name of the entry of sorted `table` holding it ("?")."""
    starts = [x[0] for x in table]
    cache = {}

    def find(addr):
        name = cache.get(addr)
        if name is None:
            i = bisect.bisect_right(starts, addr) - 1
            name = table[i][2] if i >= 0 and addr < table[i][1] else "?"
            cache[addr] = name
        return name
    return find


def epoll_wait_range(bases):
    """Address range of libc's epoll_wait in the traced process (its entries cut the trace)."""
    libc = next((p for p in bases if "libc.so" in p), None)
    if libc is None:
        die("no libc mapped in the traced process")
    for lo, hi, name in functions(libc, bases[libc], demangle=False, dynamic=True):
        if name.split("@")[0] == "epoll_wait":
            return lo, hi
    die(f"no epoll_wait in {libc}")


def symbols(bases):
    """Sorted [(start, end, name)] of the functions of the binary and libc (demangled)."""
    out = []
    for path, base in bases.items():
        if path.endswith(BINARIES):
            out += functions(path, base)
        elif "libc.so" in path:
            out += functions(path, base) + functions(path, base, dynamic=True)
    out.sort()
    return out


def analyse(trace, start, end, ew, maps, syms):
    """Per-wake counts over trace bytes [start, end): lists of dicts."""
    lo, hi = ew
    wakes, cur, inside = [], None, False
    fn = finder(syms)
    here = "?"
    pc = 0
    first_touch = collections.Counter()  # instruction -> data lines it touched first in a wake
    executed = collections.Counter()  # instruction -> times executed
    page_pcs = collections.defaultdict(collections.Counter)  # page -> first-touching pcs
    with open(trace, "rb") as f:
        f.seek(start)
        f.readline()  # the first line may be cut
        data = f.read(end - f.tell())
    for raw in data.split(b"\n"):
        if len(raw) < 4 or raw[0] == 61:  # '=': valgrind's own messages
            continue
        kind = raw[:2]
        try:
            addr = int(raw[3:].split(b",")[0], 16)
        except ValueError:
            continue
        if kind == b"I ":
            now_inside = lo <= addr < hi
            if now_inside and not inside:
                if cur is not None:
                    wakes.append(cur)
                cur = {"instr": 0, "ilines": set(), "dlines": set(), "fn": {}}
            inside = now_inside
            if cur is not None:
                here = fn(addr)
                pc = addr
                executed[addr] += 1
                cur["instr"] += 1
                cur["ilines"].add(addr // LINE)
                f_ = cur["fn"].setdefault(here, [set(), set(), 0])
                f_[0].add(addr // LINE)
                f_[2] += 1
        elif cur is not None:
            size = int(raw[3:].split(b",")[1])
            if addr // LINE not in cur["dlines"]:
                first_touch[pc] += 1
                page_pcs[addr // PAGE][pc] += 1
            cur["dlines"].add(addr // LINE)
            cur["fn"].setdefault(here, [set(), set(), 0])[1].add(addr // LINE)
            if (addr + size - 1) // LINE != addr // LINE:  # an access across two lines
                cur["dlines"].add((addr + size - 1) // LINE)
    pages = collections.defaultdict(lambda: [0, 0])  # data page -> wakes, lines
    for w in wakes:
        per = collections.Counter(x * LINE // PAGE for x in w["dlines"])
        for pg, n in per.items():
            pages[pg][0] += 1
            pages[pg][1] += n
    rows = []
    for w in wakes:
        by_map = collections.Counter()
        for line in w["dlines"]:
            a = line * LINE
            by_map[next((n for s, e, n in maps if s <= a < e), "other")] += 1
        rows.append({
            "instructions": w["instr"],
            "code lines": len(w["ilines"]),
            "code pages": len({x * LINE // PAGE for x in w["ilines"]}),
            "data lines": len(w["dlines"]),
            "data pages": len({x * LINE // PAGE for x in w["dlines"]}),
            "by_map": by_map,
            "by_fn": {k: (len(v[0]), len(v[1]), v[2]) for k, v in w["fn"].items()},
        })
    return rows, first_touch, executed, pages, page_pcs


def where(pcs, pid_maps_bin):
    """addr2line of instruction addresses in the binary: {pc: 'innermost <- callers'}."""
    path, base = pid_maps_bin
    if not pcs:
        return {}
    r = subprocess.run(["addr2line", "-e", path, "-i", "-f", "-C", "-a"]
                       + [hex(p - base) for p in pcs], capture_output=True, text=True).stdout
    out, cur, chain = {}, None, []
    lines = r.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("0x"):
            if cur is not None:
                out[cur] = " <- ".join(chain)
            cur, chain = int(lines[i], 16) + base, []
            i += 1
            continue
        loc = lines[i + 1] if i + 1 < len(lines) else "?"
        loc = loc.split(" (")[0]
        loc = "/".join(loc.split("/")[-2:])
        chain.append(f"{loc}")
        i += 2
    if cur is not None:
        out[cur] = " <- ".join(chain)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", choices=["relay", "cecho"], default="relay")
    ap.add_argument("--conns", type=int, default=18000)
    ap.add_argument("--beat", type=float, default=90)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--where", type=int, default=0, help="source of the N instructions that "
                    "first touch the most data lines")
    ap.add_argument("--by-source", type=int, default=0, metavar="N",
                    help="instructions by the outermost N frames of each instruction's inline "
                    "chain")
    ap.add_argument("--pages", action="store_true", help="the data pages of most wakes")
    ap.add_argument("--order-file", metavar="PATH", help="write the binary's functions run "
                    "in the window, hottest first (an lld --symbol-ordering-file)")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "footprint"))
    o = ap.parse_args()
    out = os.path.abspath(os.path.join(o.out, o.server))
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith("trace."):
            os.unlink(os.path.join(out, name))
    port = free_port()
    vg = ["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={out}/trace.%p"]
    if o.server == "relay":
        cmd = vg + ["--trace-children=yes", "--trace-children-skip-by-arg=worker",
                    f"{o.bin}/shmrelay", "--listen", f"127.0.0.1:{port}", "--fronts", "1",
                    "--workers", "2", "--instance", f"fp-{os.getpid()}",
                    "--set", "kill_hung=false", "--set", "hang_timeout_ms=600000",
                    "--set", "ping_min_ms=60000"]
        word = f"{o.bin}/shmrelay front "
    else:
        exe = os.path.join(out, "epoll-echo")
        subprocess.run(["cc", "-O2", "-o", exe, os.path.join(ROOT, "examples/c/epoll-echo.c")],
                       check=True)
        cmd = vg + [exe, "--listen", f"127.0.0.1:{port}"]
        word = exe
    server = subprocess.Popen(cmd, stdout=open(f"{out}/server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, server)
        pid = traced_pid(out, word)
        trace = f"{out}/trace.{pid}"
        hold_log = f"{out}/hold.log"
        hold = subprocess.Popen(
            [f"{o.bin}/relaybench", "hold", "--addr", f"127.0.0.1:{port}", "--conns",
             str(o.conns), "--heartbeat", str(o.beat), "--seconds", str(1.1 * o.beat + o.seconds + 5),
             "--connect-concurrency", "16", "--ramp-limit", "600"],
            stdout=open(f"{out}/hold.out", "w"), stderr=open(hold_log, "w"))
        while "holding for" not in open(hold_log).read():
            if hold.poll() is not None:
                die("relaybench hold ended before its hold:\n" + open(hold_log).read())
            time.sleep(0.5)
        # A connection's first beat comes a beat interval (+-10%) after it connected: the rate
        # is steady once the last connection's first beat is due.
        time.sleep(1.1 * o.beat)
        start = os.path.getsize(trace)
        time.sleep(o.seconds)
        end = os.path.getsize(trace)
        maps = maps_of(pid)
        bases = file_bases(pid)
        ew = epoll_wait_range(bases)
        syms = symbols(bases)
        binmap = next(((p, b) for p, b in bases.items() if p.endswith(BINARIES)), None)
        hold.wait()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    rows, first_touch, executed, pages, page_pcs = analyse(trace, start, end, ew, maps, syms)
    if len(rows) < 10:
        die(f"only {len(rows)} wakes in the window")
    keys = ["instructions", "code lines", "code pages", "data lines", "data pages"]
    print(f"{o.server}: {len(rows)} wakes in {o.seconds:g} s "
          f"({o.conns} connections beating every {o.beat:g} s)")
    print(f"{'per wake':<14}{'median':>9}{'mean':>9}")
    for k in keys:
        v = [r[k] for r in rows]
        print(f"{k:<14}{statistics.median(v):>9.0f}{statistics.mean(v):>9.1f}")
    total = collections.Counter()
    for r in rows:
        total.update(r["by_map"])
    print("data lines per wake by mapping (mean):")
    for name, n in total.most_common():
        print(f"  {name:<24}{n / len(rows):>7.1f}")
    fns = collections.defaultdict(lambda: [0, 0, 0])
    for r in rows:
        for k, (c, d, n) in r["by_fn"].items():
            fns[k][0] += c
            fns[k][1] += d
            fns[k][2] += n
    print("per wake by function (mean; a data line counts in every function that touched it):")
    print(f"  {'instr':>6} {'code':>6} {'data':>6}  function")
    for name, (c, d, n) in sorted(fns.items(), key=lambda x: -(x[1][0] + x[1][1]))[:o.top]:
        print(f"  {n / len(rows):>6.0f} {c / len(rows):>6.1f} {d / len(rows):>6.1f}  {name[:110]}")
    if o.pages:
        print("data pages touched in most wakes: share of wakes, lines per wake touched")
        n = len(rows)
        rest = [0, 0]
        common = [(pg, k, lines) for pg, (k, lines) in sorted(pages.items(), key=lambda x: -x[1][0])]
        for pg, k, lines in common:
            if k < n / 2:
                rest[0] += k
                rest[1] += lines
        common = [(pg, k, lines) for pg, k, lines in common if k >= n / 2]
        tops = {pg: [p for p, _ in page_pcs[pg].most_common(3)] for pg, _, _ in common}
        at = where([p for pcs in tops.values() for p in pcs if p >= binmap[1]],
                   binmap) if binmap else {}
        for pg, k, lines in common:
            a = pg * PAGE
            m = next(((nm, s_, a - s_) for s_, e, nm in maps if s_ <= a < e), ("other", 0, 0))
            pcs = tops[pg]
            src = "; ".join(at.get(p, hex(p)).split(" <- ")[0] + " <- "
                            + at.get(p, "?").split(" <- ")[-1] for p in pcs)
            print(f"  {k / n:>5.0%} {lines / n:>6.1f}  {m[0][:12]} {m[1]:#x}+{m[2]:#x}  {src[:150]}")
        print(f"  the rest: {rest[0] / n:.1f} pages and {rest[1] / n:.1f} lines per wake")
    if o.where and binmap:
        top = [pc for pc, _ in first_touch.most_common(o.where)]
        at = where([p for p in top if p >= binmap[1]], binmap)
        print("data lines per wake by the instruction that touched them first (mean):")
        for pc in top:
            print(f"  {first_touch[pc] / len(rows):>6.2f}  {at.get(pc, hex(pc))[:220]}")
    if o.by_source and binmap:
        pcs = [p for p in executed if p >= binmap[1]]
        at = where(pcs, binmap)
        groups = collections.Counter()
        dgroups = collections.Counter()
        for p in pcs:
            chain = at.get(p, "?").split(" <- ")
            key = " <- ".join(chain[-o.by_source:])
            groups[key] += executed[p]
            dgroups[key] += first_touch.get(p, 0)
        print(f"instructions and data lines per wake by the outermost {o.by_source} source "
              "lines of the inline chain:")
        for key, n in groups.most_common(o.top):
            print(f"  {n / len(rows):>7.1f} {dgroups[key] / len(rows):>6.2f}  {key[:200]}")
    if o.order_file and binmap:
        # The binary's functions by instructions executed per wake, hottest first, by their
        # linker names: a `--symbol-ordering-file` for lld that packs the wake's code together.
        linker_name = finder(functions(*binmap, demangle=False))
        heat = collections.Counter()
        for pc, n in executed.items():
            heat[linker_name(pc)] += n
        heat.pop("?", None)
        with open(o.order_file, "w") as f:
            for name, _ in heat.most_common():
                f.write(name + "\n")
        print(f"{len(heat)} functions written to {o.order_file}")
    os.unlink(trace)


if __name__ == "__main__":
    main()
