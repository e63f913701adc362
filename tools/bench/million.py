#!/usr/bin/env python3
"""One million connections held on this machine (issue 15): `tools/bench/scale.sh --million`.

For each variant (`beats`: clients beat every 60 s; `pings`: clients send no beats and only
answer the front's pings) it starts a fresh shmrelay, measures it idle, opens --conns
connections with `relaybench hold` from many processes over many 127.0.0.x source addresses,
holds them --seconds, and samples every --sample seconds: connections open in the relay,
relay private memory (Pss_Anon of all its processes), ring memory (Pss_Shmem: every shared
page counted once over the processes that map it), supervisor RSS, kernel slab (/proc/meminfo,
machine-wide, both ends of loopback, reported separately), relay and client CPU, load
average. It prints a summary (closes by reason, the client's report, bytes per connection
against the anchors of the issue) and writes, in --out:

  summary.md       the summary (the figures for BENCHMARKS.md)
  million.svg      connections, memory and CPU over time, both variants
  VARIANT/         samples.tsv, hold.json, hold.log, relay.log, report-*.json, nstat-*.txt

Options (defaults in brackets):
  --conns N [1000000]        --seconds S [600]        --variants beats,pings [both]
  --fronts F|auto [auto if the relay takes it, else conns / 18000]   --workers W [2]
  --procs P [conns / 16000]  --src-ips LIST [127.0.0.2-127.0.0.101]  --sample S [10]
  --beat S [60]              --connect-concurrency N [1024]          --ramp-limit S [900]
  --connect-timeout S [30]   (one attempt; relaybench's 5 s default failed 119 of 1,000,000
                              connects at load 100)
  --relay-set KEY=VALUE      (repeatable, shmrelay --set; default ping_min_ms=60000 so the
                              front pings idle clients every 60 s, the rate of the beats)
  --out DIR                  --no-build (use the release binaries already built)
  --bin DIR                  (use the binaries in DIR, e.g. target/debug, without building)
  --no-sysctl                (check the kernel settings but do not change them)
  --floor / --no-floor       [--floor] measure the heartbeat floor first (below)
  --floor-server cepoll|tokio [cepoll]  --floor-seconds S [240 for cepoll, 60 for tokio]
  --floor-conns N [16000]    (tokio only: the floor's server is one process, relaybench one
                             too: both under the 20,000 open-files limit)

CPU per heartbeat: issue 15 asks for steady relay CPU per heartbeat within 1.2x of the floor
measured in the same run, as % of a core at 1M with 60-s beats. Before the variants, the floor
is measured at the million run's scale and beat rate: tools/bench/million_floor.sh holds the
same --conns connections with the same client command against examples/c/epoll-echo.c in
SO_REUSEPORT processes (64 at 1M, as many per connection for fewer: one cannot hold a million
sockets under the open-files limit), so the
floor pays what a million sockets cost the kernel too. `--floor-server tokio` measures the
small-scale floor instead: tools/bench/heartbeat_floor.sh --servers tokio (a one-thread tokio
echo answering length-0 frames) at the same beat rate (conns / beat per second, 16,667/s for
1M at 60 s) with fewer connections (--floor-conns beating every floor-conns / rate s, 0.96 s
by default), which leaves out the cost of cold socket memory. Per variant the summary gives the relay's steady CPU divided by the
heartbeat exchanges it answered per second over the same samples (length-0 frames in; in
`pings` those are the answers to its pings), the floor's CPU per heartbeat, their ratio, the
relay's CPU as % of a core, and both projected to 1M with 60-s beats (CPU per heartbeat x
16,667/s).

The kernel settings a million loopback connections need are checked first and, as root,
raised (never lowered) with a note of the old value: net.core.somaxconn,
net.ipv4.tcp_max_syn_backlog, net.core.netdev_max_backlog, net.ipv4.ip_local_port_range,
fs.nr_open, fs.file-max (and net.netfilter.nf_conntrack_max where conntrack is loaded).
Everything started is stopped on exit.
"""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import million_chart  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# What a million connections need from the kernel: (setting, wanted, how to compare).
SYSCTLS = [
    ("net.core.somaxconn", "65535", "min"),
    ("net.ipv4.tcp_max_syn_backlog", "65535", "min"),
    ("net.core.netdev_max_backlog", "65536", "min"),
    ("net.ipv4.ip_local_port_range", "10000 65000", "range"),
    ("fs.nr_open", "1100000", "min"),
    ("fs.file-max", "2500000", "min"),
    # Only where conntrack is loaded: a full table drops SYNs silently.
    ("net.netfilter.nf_conntrack_max", "2200000", "min"),
]

# Bytes per connection of the peers (issue 15, /work/shared/ANCHORS.md).
ANCHORS = [
    ("the Go design this project was seeded with (64 cores, 256 GB)", "~16 KB, kernel included"),
    ("Phoenix channels, 2M websockets", "~42 KB, kernel included"),
    ("Centrifugo, 1M WebSockets on 20 pods", "~30 KB"),
    ("EMQX (MQTT)", "4-13 KB"),
    ("Pushpin, 1M on 8 vCPU / 32 GB", "under 32 KB (machine size)"),
    ("nbio / 1m-go-websockets (epoll)", "under 1 KB user space"),
    ("tokio, a task per connection", "~1.4 KB (1M sleeping tasks 1.4 GiB)"),
    ("Linux, an idle TCP socket", "~3 KB or more (kernel)"),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def die(msg):
    log("million: " + msg)
    sys.exit(1)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="scale.sh --million", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--variants", default="beats,pings")
    ap.add_argument("--fronts")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--procs", type=int)
    ap.add_argument("--src-ips", default="127.0.0.2-127.0.0.101")
    ap.add_argument("--sample", type=float, default=10.0)
    ap.add_argument("--beat", type=float, default=60.0)
    ap.add_argument("--connect-concurrency", type=int, default=1024)
    ap.add_argument("--connect-timeout", type=float, default=30.0)
    ap.add_argument("--ramp-limit", type=float, default=900.0)
    ap.add_argument("--relay-set", action="append", default=[])
    ap.add_argument("--out")
    ap.add_argument("--bin")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-sysctl", action="store_true")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--floor-server", choices=("cepoll", "tokio"), default="cepoll")
    ap.add_argument("--floor-conns", type=int, default=16_000)
    ap.add_argument("--floor-seconds", type=float)
    a = ap.parse_args(argv)
    o = dict(vars(a))
    o["variants"] = [v for v in a.variants.split(",") if v]
    if any(v not in ("beats", "pings") for v in o["variants"]):
        ap.error("--variants takes beats, pings or both")
    o["concurrency"], o["sets"] = a.connect_concurrency, list(a.relay_set)
    o["build"] = not (a.no_build or a.bin)
    o["sysctl"] = not a.no_sysctl
    if not any(s.startswith("ping_min_ms=") for s in o["sets"]):
        o["sets"].append("ping_min_ms=60000")
    if o["procs"] is None:
        o["procs"] = max(1, math.ceil(o["conns"] / 16000))
    if o["floor_seconds"] is None:
        o["floor_seconds"] = 240.0 if o["floor_server"] == "cepoll" else 60.0
    return o


# --- the kernel -----------------------------------------------------------------------------

def sysctl_path(name):
    return "/proc/sys/" + name.replace(".", "/")


def check_sysctls(change, notes):
    """Raises what is too low (as root, if `change`); returns the settings as they are."""
    now = {}
    for name, want, how in SYSCTLS:
        try:
            with open(sysctl_path(name)) as f:
                cur = " ".join(f.read().split())
        except OSError:
            if not name.startswith("net.netfilter."):
                notes.append(f"{name}: not readable here")
            continue
        if how == "min":
            low = int(cur) < int(want)
        else:
            lo, hi = map(int, cur.split())
            wlo, whi = map(int, want.split())
            low = lo > wlo or hi < whi
            want = f"{min(lo, wlo)} {max(hi, whi)}"
        if low and change and os.geteuid() == 0:
            try:
                with open(sysctl_path(name), "w") as f:
                    f.write(want)
                notes.append(f"{name}: raised from {cur} to {want} (not restored afterwards)")
                cur = want
            except OSError as e:
                notes.append(f"{name}: {cur}, below {want}, and could not be raised: {e}")
        elif low:
            notes.append(f"{name}: {cur}, below the {want} a million connections need")
        now[name] = cur
    return now


def meminfo_kb(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# The slab caches a connected TCP socket allocates from (its sock, inode, file, epoll item,
# bind bucket): less noisy than the Slab line, which other work on the machine moves too.
SOCKET_SLABS = ("TCP", "request_sock_TCP", "sock_inode_cache", "filp", "eventpoll_epi",
                "eventpoll_pwq", "tcp_bind_bucket", "tcp_bind2_bucket")


def socket_slabs_kb():
    """Memory of the objects in use in SOCKET_SLABS (/proc/slabinfo, root only), KiB; None if
    unreadable."""
    try:
        total = 0
        with open("/proc/slabinfo") as f:
            for line in f:
                w = line.split()
                if w and w[0] in SOCKET_SLABS:
                    total += int(w[1]) * int(w[3])
        return total // 1024
    except (OSError, ValueError, IndexError):
        return None


def sockstat():
    """TCP sockets in use and the pages their buffers hold, from /proc/net/sockstat."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                w = line.split()
                d = dict(zip(w[1::2], map(int, w[2::2])))
                return d.get("inuse", 0), d.get("mem", 0)
    return 0, 0


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def nstat(path):
    """Saves the kernel's absolute network counters; returns them ({} without nstat)."""
    if not shutil.which("nstat"):
        return {}
    r = subprocess.run(["nstat", "-az"], capture_output=True, text=True)
    with open(path, "w") as f:
        f.write(r.stdout)
    out = {}
    for line in r.stdout.splitlines():
        w = line.split()
        if len(w) >= 2 and w[1].isdigit():
            out[w[0]] = int(w[1])
    return out


# Kernel counters that tell why connections fail or are dropped (machine-wide).
NSTAT_KEYS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPAbortOnTimeout",
              "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose", "TcpEstabResets",
              "TcpAttemptFails", "TcpExtTCPTimeouts", "TcpExtTCPReqQFullDrop",
              "TcpExtTCPBacklogDrop", "TcpExtSyncookiesSent")


# --- processes ------------------------------------------------------------------------------

def all_procs():
    """{pid: (ppid, cpu ticks, user-space cpu ticks)} of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2:].split()
        out[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[11]))
    return out


def tree(root, procs):
    keep = {root} if root in procs else set()
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, _) in procs.items():
            if pid not in keep and ppid in keep:
                keep.add(pid)
                changed = True
    return keep


def rollup(pid):
    """Pss_Anon, Pss_Shmem and Rss of a process, KiB (0s if it is gone)."""
    r = {"Pss_Anon": 0, "Pss_Shmem": 0, "Rss": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in r:
                    r[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return r


class Usage:
    """Memory and CPU of a process tree at one moment."""

    def __init__(self, root, procs):
        pids = tree(root, procs)
        self.ticks = sum(procs[p][1] for p in pids)
        self.uticks = sum(procs[p][2] for p in pids)
        self.nprocs = len(pids)
        self.anon = self.shmem = self.rss = 0
        for p in pids:
            r = rollup(p)
            self.anon += r["Pss_Anon"]
            self.shmem += r["Pss_Shmem"]
            self.rss += r["Rss"]
        self.root_rss = rollup(root)["Rss"] if root in procs else 0


# --- the relay ------------------------------------------------------------------------------

def relay_takes_auto(binary):
    h = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
    return "--fronts <N|auto>" in h


def relay_report(bin_dir, instance):
    r = subprocess.run([f"{bin_dir}/relayctl", "--json", "stat", "--interval", "0", instance],
                       capture_output=True, text=True)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None


def sum_fronts(rep, key):
    """A per-front map of the report (`closes` by reason, `io_errors` by errno class) summed
    over the fronts, non-zero entries only."""
    out = {}
    for f in (rep or {}).get("fronts", []):
        for k, v in (f.get(key) or {}).items():
            if v:
                out[k] = out.get(k, 0) + v
    return out


def start_relay(o, bin_dir, fronts, instance, outdir):
    args = [f"{bin_dir}/shmrelay", "--fronts", str(fronts), "--workers", str(o["workers"]),
            "--max-conns", str(o["conns"] + o["conns"] // 100 + 100), "--instance", instance,
            "--listen", "127.0.0.1:0"]
    for s in o["sets"]:
        args += ["--set", s]
    logf = open(os.path.join(outdir, "relay.log"), "w")
    p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        with open(os.path.join(outdir, "relay.log")) as f:
            for line in f:
                if line.startswith("shmrelay: listening on "):
                    return p, args, line.split()[3]
        if p.poll() is not None:
            die("shmrelay exited at start:\n" + open(os.path.join(outdir, "relay.log")).read())
        time.sleep(0.2)
    die("shmrelay did not listen within 120 s")


def stop(p, sig=signal.SIGTERM, wait=30):
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(sig)
        p.wait(wait)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# --- one variant ----------------------------------------------------------------------------

COLUMNS = ["t_s", "phase", "conns", "relay_private_mib", "rings_mib", "supervisor_mib",
           "slab_delta_mib", "socket_slabs_mib", "tcp_mem_mib", "relay_cpu_pct", "client_cpu_pct", "client_rss_mib",
           "load1", "beats_per_s", "relay_user_pct"]


def run_variant(o, variant, bin_dir, fronts, outdir):
    os.makedirs(outdir, exist_ok=True)
    instance = f"million-{variant}-{os.getpid()}"
    res = {"variant": variant}
    relay = hold = None
    try:
        relay, relay_args, addr = start_relay(o, bin_dir, fronts, instance, outdir)
        res["relay_cmd"] = " ".join(relay_args)
        log(f"[{variant}] shmrelay pid {relay.pid} on {addr}, {fronts} fronts")
        time.sleep(3)
        procs = all_procs()
        idle = Usage(relay.pid, procs)
        res["idle"] = {"private_kb": idle.anon, "shmem_kb": idle.shmem,
                       "supervisor_kb": idle.root_rss, "nprocs": idle.nprocs}
        slab0 = meminfo_kb("Slab")
        sock0 = socket_slabs_kb()
        _, tcpmem0 = sockstat()
        ns0 = nstat(os.path.join(outdir, "nstat-before.txt"))
        beat = o["beat"] if variant == "beats" else 0
        hold_args = [f"{bin_dir}/relaybench", "hold", "--addr", addr, "--conns", str(o["conns"]),
                     "--procs", str(o["procs"]), "--src-ips", o["src_ips"],
                     "--seconds", str(o["seconds"]), "--heartbeat", str(beat),
                     "--connect-concurrency", str(o["concurrency"]),
                     "--connect-timeout", str(o["connect_timeout"]),
                     "--ramp-limit", str(o["ramp_limit"]), "--bucket", "60",
                     "--server-pid", str(relay.pid), "--json"]
        res["hold_cmd"] = "relaybench " + " ".join(hold_args[1:])
        log(f"[{variant}] {res['hold_cmd']}")
        hold_out = open(os.path.join(outdir, "hold.json"), "w")
        hold_log = os.path.join(outdir, "hold.log")
        hold = subprocess.Popen(hold_args, stdout=hold_out, stderr=open(hold_log, "w"),
                                start_new_session=True)
        t0 = time.time()
        rows, hold_at, prev, prev_beats = [], None, None, None
        tsv = open(os.path.join(outdir, "samples.tsv"), "w")
        tsv.write("\t".join(COLUMNS) + "\n")
        log(" ".join(f"{c[:9]:>9}" for c in COLUMNS))
        next_t = 0.0
        while hold.poll() is None:
            now = time.time() - t0
            if hold_at is None and "holding for" in open(hold_log).read():
                hold_at = now
                res["ramp_seen_s"] = now
                next_t = now
            if now < next_t:
                time.sleep(0.25)
                continue
            procs = all_procs()
            u = Usage(relay.pid, procs)
            c = Usage(hold.pid, procs)
            rep = relay_report(bin_dir, instance)
            conns = rep.get("connections", 0) if rep else 0
            # Heartbeat exchanges: length-0 frames in (beats, and answers to the front's pings).
            beats = sum(f.get("heartbeats", 0) for f in rep.get("fronts", [])) if rep else None
            _, tcpmem = sockstat()
            if prev is not None:
                dt = now - prev[0]
                rcpu = 100 * (u.ticks - prev[1]) / CLK_TCK / dt
                ccpu = 100 * (c.ticks - prev[2]) / CLK_TCK / dt
                ucpu = 100 * (u.uticks - prev[3]) / CLK_TCK / dt
            else:
                rcpu = ccpu = ucpu = 0.0
            prev = (now, u.ticks, c.ticks, u.uticks)
            bps = None
            if beats is not None:
                if prev_beats is not None:
                    bps = max(0, beats - prev_beats[1]) / (now - prev_beats[0])
                prev_beats = (now, beats)
            phase = "ramp" if hold_at is None else (
                "hold" if now <= hold_at + o["seconds"] else "end")
            row = [round(now, 1), phase, conns, u.anon / 1024, u.shmem / 1024, u.root_rss / 1024,
                   (meminfo_kb("Slab") - slab0) / 1024,
                   ((socket_slabs_kb() or 0) - (sock0 or 0)) / 1024,
                   (tcpmem - tcpmem0) * PAGE / 2**20,
                   rcpu, ccpu, c.rss / 1024, load1(), bps, ucpu]
            rows.append(row)
            tsv.write("\t".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + "\n")
            tsv.flush()
            log(" ".join(f"{v:>9.1f}" if isinstance(v, float) else f"{str(v):>9}" for v in row))
            if rep is not None:
                with open(os.path.join(outdir, "report-last.json"), "w") as f:
                    json.dump(rep, f)
                if phase == "hold":
                    with open(os.path.join(outdir, "report-hold.json"), "w") as f:
                        json.dump(rep, f)
                    res["steady"] = {"t": now, "conns": conns, "private_kb": u.anon,
                                     "shmem_kb": u.shmem, "supervisor_kb": u.root_rss,
                                     "slab_kb": meminfo_kb("Slab") - slab0,
                                     "socket_slabs_kb": None if sock0 is None
                                     else socket_slabs_kb() - sock0,
                                     "client_rss_kb": c.rss, "load1": load1(),
                                     "per_front": [f["connections"]["open"] for f in rep.get("fronts", [])]}
            next_t = now + o["sample"]
        ns1 = nstat(os.path.join(outdir, "nstat-after.txt"))
        res["nstat"] = {k: ns1.get(k, 0) - ns0.get(k, 0) for k in NSTAT_KEYS
                        if ns1.get(k, 0) - ns0.get(k, 0)}
        res["rows"] = rows
        res["hold_rc"] = hold.returncode
        # The relay's closes of the clients' cut are counted once its connections are gone.
        deadline = time.time() + 60
        while True:
            rep = relay_report(bin_dir, instance)
            if not rep or rep.get("connections", 0) == 0 or time.time() > deadline:
                break
            time.sleep(1)
        res["closes"] = sum_fronts(rep, "closes")
        res["io_errors"] = sum_fronts(rep, "io_errors")
        res["problems"] = (rep or {}).get("problems", [])
        try:
            res["hold"] = json.load(open(os.path.join(outdir, "hold.json")))
        except ValueError:
            res["hold"] = None
            log(f"[{variant}] relaybench hold failed ({hold.returncode}):\n" + open(hold_log).read())
        # CPU over the steady part of the hold window: from one beat interval into it (at most
        # half the window) to its end. A connection's first liveness check comes one ping
        # interval (the beat's, by default) after it connected, and takes its one TCP_INFO
        # sample (RTT): for the connections of the ramp's end that falls inside the hold's
        # first minute, and is part of connecting, not of holding.
        hold_rows = [r for r in rows if r[1] == "hold"]
        settle = min(max(60.0, o["beat"]), o["seconds"] / 2)
        res["settle"] = settle
        steady = [r for r in hold_rows if hold_at is not None and r[0] >= hold_at + settle]
        ci, li = COLUMNS.index("relay_cpu_pct"), COLUMNS.index("load1")
        res["steady_cpu"] = (sum(r[ci] for r in steady) / len(steady)) if steady else None
        ui = COLUMNS.index("relay_user_pct")
        res["steady_user_cpu"] = (sum(r[ui] for r in steady) / len(steady)) if steady else None
        res["steady_load"] = (sum(r[li] for r in steady) / len(steady)) if steady else None
        bi = COLUMNS.index("beats_per_s")
        rated = [r[bi] for r in steady if r[bi] is not None]
        res["steady_beats_per_s"] = (sum(rated) / len(rated)) if rated else None
    finally:
        stop(hold)
        stop(relay)
        for f in os.listdir("/dev/shm"):
            if f.startswith(f"shmrelay.{instance}."):
                try:
                    os.unlink(os.path.join("/dev/shm", f))
                except OSError:
                    pass
    return res


# --- the heartbeat floor --------------------------------------------------------------------

def measure_floor(o, bin_dir, outdir):
    """CPU per heartbeat of the floor at the million run's beat rate: the C epoll echo holding
    the same connections (tools/bench/million_floor.sh), or with `--floor-server tokio` a
    one-thread tokio echo with --floor-conns connections (tools/bench/heartbeat_floor.sh)."""
    os.makedirs(outdir, exist_ok=True)
    rate = o["conns"] / o["beat"]
    path = os.path.join(outdir, "floor.json")
    if os.path.exists(path):
        os.unlink(path)
    if o["floor_server"] == "cepoll":
        conns, beat, script = o["conns"], o["beat"], "million_floor.sh"
        # As many server processes per connection as at 1M (64: 15,625 each, under the
        # open-files limit), so a smaller run is not charged 64 processes' wake-ups.
        procs = max(1, math.ceil(conns / 15_625))
        args = ["--no-build", "--conns", str(conns), "--procs", str(procs), "--beat", f"{beat:g}", "--seconds",
                f"{o['floor_seconds']:g}", "--client-procs", str(o["procs"]), "--src-ips",
                o["src_ips"], "--json", path]
        what = f"C epoll echo in {procs} processes, {conns:,} connections beating every {beat:g} s"
    else:
        conns = min(o["floor_conns"], o["conns"])
        beat, script = conns / rate, "heartbeat_floor.sh"
        args = ["--servers", "tokio", "--bin", os.path.abspath(bin_dir), "--conns", str(conns),
                "--heartbeat", f"{beat:g}", "--seconds", f"{o['floor_seconds']:g}", "--rounds", "1",
                "--json", path]
        what = f"one-thread tokio echo, {conns:,} connections beating every {beat:g} s"
    res = {"cmd": f"tools/bench/{script} " + " ".join(args), "conns": conns,
           "heartbeat": beat, "rate": rate, "what": what}
    log(f"[floor] {res['cmd']}")
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.dirname(os.path.abspath(bin_dir)))
    with open(os.path.join(outdir, "floor.log"), "w") as logf:
        rc = subprocess.run([os.path.join(HERE, script)] + args, stdout=logf,
                            stderr=subprocess.STDOUT, env=env).returncode
    try:
        with open(path) as f:
            row = json.loads(f.readline())
    except (OSError, ValueError):
        res["error"] = f"{script} failed ({rc}), see {outdir}/floor.log"
        log(f"[floor] {res['error']}")
        return res
    res.update({k: row[k] for k in ("us_per_beat", "beats_per_s", "cpu_percent", "closes", "load1")})
    log(f"[floor] {res['us_per_beat']:.2f} µs of CPU per heartbeat at {res['beats_per_s']:,.0f}/s "
        f"({res['cpu_percent']:.1f}% of one core, load {res['load1']:.2f})")
    return res


# Heartbeats per second of a million connections beating every 60 s: the rate issue 15 asks
# CPU at.
MILLION_RATE = 1_000_000 / 60


def cpu_rows(r, floor):
    """The summary rows of CPU per heartbeat for variant result `r` against the floor."""
    out = []
    cpu, bps = r.get("steady_cpu"), r.get("steady_beats_per_s")
    if cpu is None or not bps:
        return ["| relay CPU per heartbeat | n/a (no heartbeat exchanges in the steady samples: in "
                "`pings` the front pings a connection after ping_min_ms of silence, so the window "
                "must be longer than that) |"]
    us = cpu / 100 * 1e6 / bps
    what = "answered ping" if r["variant"] == "pings" else "heartbeat"
    out.append(f"| relay CPU per {what} (steady CPU / heartbeat exchanges per second) | "
               f"{us:.2f} µs ({cpu:.1f}% of one core at {bps:,.0f}/s) |")
    if r.get("steady_user_cpu") is not None:
        user = r["steady_user_cpu"]
        out.append(f"| of which user space (the relay's own code; the rest is the kernel's) | "
                   f"{user / 100 * 1e6 / bps:.2f} µs ({user:.1f}% of one core) |")
    if floor and floor.get("us_per_beat"):
        f = floor["us_per_beat"]
        out.append(f"| floor: {floor['what']} | {f:.2f} µs ({floor['cpu_percent']:.1f}% of one core at "
                   f"{floor['beats_per_s']:,.0f}/s, load {floor['load1']:.2f}) |")
        out.append(f"| **relay / floor, CPU per heartbeat** (target at most 1.2x) | **{us / f:.2f}x** |")
        out.append(f"| at 1M with 60-s beats ({MILLION_RATE:,.0f}/s, projected) | relay "
                   f"{us * MILLION_RATE / 1e4:.1f}% of one core; floor {f * MILLION_RATE / 1e4:.1f}% |")
    else:
        out.append(f"| floor | {'not measured (--no-floor)' if floor is None else floor.get('error', 'n/a')} |")
        out.append(f"| at 1M with 60-s beats ({MILLION_RATE:,.0f}/s, projected) | relay "
                   f"{us * MILLION_RATE / 1e4:.1f}% of one core |")
    return out


# --- the summary ----------------------------------------------------------------------------

def per_conn(kb, n):
    return f"{kb * 1024 / n:,.0f} B" if n else "n/a"


def summary(o, results, notes, fronts, floor=None):
    out = []
    p = out.append
    p(f"## One million connections (issue 15): {o['conns']:,} connections, {fronts} fronts, "
      f"{o['workers']} workers, hold {o['seconds']:.0f} s")
    p("")
    p(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {os.cpu_count()} cores, "
      f"{meminfo_kb('MemTotal') / 2**20:.1f} GiB, kernel {os.uname().release}; "
      f"`tools/bench/scale.sh --million {' '.join(sys.argv[1:])}`")
    for n in notes:
        p(f"- {n}")
    if floor is not None:
        p(f"- heartbeat floor, measured first at {floor['rate']:,.0f} heartbeats/s: `{floor['cmd']}`")
    for r in results:
        h = r.get("hold") or {}
        v = r["variant"]
        p("")
        p(f"### Variant `{v}`: " + ("clients beat every %g s" % o["beat"] if v == "beats"
                                     else "clients send no beats, only answer the front's pings"))
        p("")
        p(f"    {r.get('relay_cmd', '?')}")
        p(f"    {r.get('hold_cmd', '?')}")
        p("")
        p("| figure | value |")
        p("|---|---|")
        p(f"| opened / open at the end of the window | {h.get('opened', '?'):,} / {h.get('open_at_end', '?'):,} (ramp {h.get('ramp_secs', 0):.1f} s, {connect_rate(h)}) |"
          if h else "| relaybench hold | failed, see hold.log |")
        if h:
            p(f"| connect errors | {h['connect_errors']:,} {fmt_kinds(h.get('connect_error_kinds'))} |")
            p(f"| closed by the server (client's count) | {h['server_closes']:,} (during the ramp {h['closes_during_ramp']:,}; resets {h['reset_closes']:,} {fmt_kinds(h.get('reset_kinds'))}) |")
            p(f"| closes in the window by minute | {', '.join('%d-%d s: %d' % (b['from_secs'], b['to_secs'], b['closes']) for b in h['closes_by_time']) or 'none'} |")
            p(f"| heartbeats sent / answered / skipped; pings answered | {h['heartbeats_sent']:,} / {h['heartbeats_answered']:,} / {h['heartbeats_skipped']:,}; {h['pings_answered']:,} |")
        p(f"| relay closes by reason (the clients' own closes at the end included) | {fmt_kinds(r.get('closes')) or 'none'} |")
        if r.get("io_errors"):
            p(f"| of which io_error, by errno class | {fmt_kinds(r['io_errors'])} |")
        p(f"| problems relayctl listed | {'; '.join(r.get('problems', [])) or 'none'} |")
        p(f"| kernel TCP counters over the run (nstat, machine-wide, non-zero only) | {fmt_kinds(r.get('nstat')) or 'none'} |")
        st = r.get("steady")
        if st:
            n = st["conns"]
            pf = st["per_front"]
            if pf:
                p(f"| connections per front (min / mean / max) | {min(pf):,} / {sum(pf) / len(pf):,.0f} / {max(pf):,} |")
            p(f"| relay CPU, steady hold (from {r.get('settle', 60):.0f} s in) | {fmt(r.get('steady_cpu'), '%.1f')}% of one core (load {fmt(r.get('steady_load'), '%.2f')}) |")
            for row in cpu_rows(r, floor):
                p(row)
            if h:
                p(f"| relay CPU over the whole window (relaybench) | {fmt(h.get('server_cpu_percent'), '%.1f')}% of one core |")
                p(f"| client CPU over the window | {h['client_cpu_seconds']:.1f} s |")
            idle = r["idle"]
            p(f"| relay private memory (Pss_Anon, all processes) | {st['private_kb'] / 1024:,.0f} MiB at {n:,} ({per_conn(st['private_kb'] - idle['private_kb'], n)} per connection over idle) |")
            p(f"| ring and stats memory (Pss_Shmem) | {st['shmem_kb'] / 1024:,.0f} MiB (idle {idle['shmem_kb'] / 1024:,.0f} MiB) |")
            p(f"| relay total (private + shared) | {(st['private_kb'] + st['shmem_kb']) / 1024:,.0f} MiB ({per_conn(st['private_kb'] + st['shmem_kb'], n)} per connection) |")
            p(f"| supervisor RSS | {st['supervisor_kb'] / 1024:,.0f} MiB (idle {idle['supervisor_kb'] / 1024:,.0f} MiB) |")
            p(f"| kernel slab growth (machine-wide, both ends of loopback; other work moves it) | {st['slab_kb'] / 1024:,.0f} MiB ({per_conn(st['slab_kb'], n)} per connection) |")
            if st.get("socket_slabs_kb") is not None:
                p(f"| of which socket caches ({', '.join(SOCKET_SLABS[:6])}; both ends) | {st['socket_slabs_kb'] / 1024:,.0f} MiB ({per_conn(st['socket_slabs_kb'], n)} per connection) |")
            p(f"| client RSS (all relaybench processes) | {st['client_rss_kb'] / 1024:,.0f} MiB ({per_conn(st['client_rss_kb'], n)} per connection) |")
            p("")
            p("Bytes per connection against the anchors:")
            p("")
            p("| who | bytes per connection |")
            p("|---|---|")
            p(f"| **shmrelay, private memory** (target at most 256 B) | **{per_conn(st['private_kb'] - idle['private_kb'], n)}** |")
            p(f"| **shmrelay, all its memory with rings** (target: 1 GiB at 1M, 1,074 B) | **{per_conn(st['private_kb'] + st['shmem_kb'], n)}** |")
            p(f"| **kernel, both ends of loopback** (slab growth; socket caches) | **{per_conn(st['slab_kb'], n)}; {per_conn(st.get('socket_slabs_kb') or 0, n)}** |")
            p(f"| **relaybench hold, the client** (target at most 1 KiB) | **{per_conn(st['client_rss_kb'], n)}** |")
            for who, fig in ANCHORS:
                p(f"| {who} | {fig} |")
        else:
            p("| steady state | never reached (no sample inside the hold window) |")
    return "\n".join(out) + "\n"


def connect_rate(h):
    """Connections opened per second of the ramp (relaybench's own figure where it has one)."""
    if h.get("connect_rate"):
        return f"{h['connect_rate']:,.0f} connects/s"
    ramp = h.get("ramp_secs") or 0
    return f"{h.get('opened', 0) / ramp:,.0f} connects/s" if ramp > 0 else "connect rate n/a"


def fmt(v, f):
    return "n/a" if v is None else f % v


def fmt_kinds(m):
    if not m:
        return ""
    return "(" + ", ".join(f"{k}: {v:,}" for k, v in sorted(m.items())) + ")"


def main():
    o = parse_args(sys.argv[1:])
    out = o["out"] or subprocess.run(["mktemp", "-d", f"{os.environ.get('TMPDIR', '/tmp')}/shmrelay-million.XXXXXX"],
                                     capture_output=True, text=True).stdout.strip()
    os.makedirs(out, exist_ok=True)
    notes = []
    check_sysctls(o["sysctl"], notes)
    for n in notes:
        log("million: " + n)
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    if o["build"]:
        log("building (release)...")
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "shmrelay", "-p", "shmrelay-tools"]
                       + (["-p", "shmrelay-examples"] if o["floor"] and o["floor_server"] == "tokio" else []),
                       cwd=ROOT, check=True)
    bin_dir = o["bin"] or os.path.join(target, "release")
    tokio_floor = o["floor"] and o["floor_server"] == "tokio"
    for b in ("shmrelay", "relaybench", "relayctl") + (("tokio-echo",) if tokio_floor else ()):
        if not os.access(os.path.join(bin_dir, b), os.X_OK):
            die(f"{bin_dir}/{b} not found (build it, or drop --no-build"
                + ("; tokio-echo: cargo build -p shmrelay-examples, or --no-floor)" if b == "tokio-echo" else ")"))
    fronts = o["fronts"]
    if fronts is None:
        fronts = "auto" if relay_takes_auto(os.path.join(bin_dir, "shmrelay")) else None
    if fronts is None:
        fronts = str(math.ceil(o["conns"] / 18000))
        notes.append(f"this shmrelay does not take `--fronts auto`: {fronts} fronts (18,000 connections each)")
    log(f"load average {open('/proc/loadavg').read().strip()}; output in {out}")
    floor = measure_floor(o, bin_dir, os.path.join(out, "floor")) if o["floor"] else None
    results = []
    for v in o["variants"]:
        results.append(run_variant(o, v, bin_dir, fronts, os.path.join(out, v)))
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, default=str)
    text = summary(o, results, notes, fronts, floor)
    million_chart.write_svg(os.path.join(out, "million.svg"), COLUMNS,
                            {r["variant"]: r.get("rows", []) for r in results}, o["conns"])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    log(f"chart: {out}/million.svg; raw data: {out}")
    ok = all((r.get("hold") or {}).get("open_at_end") == o["conns"]
             and (r.get("hold") or {}).get("server_closes") == 0 for r in results)
    if not ok:
        log("million: not every connection was opened and held")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
