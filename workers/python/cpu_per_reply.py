"""CPU per reply of the Python echo worker and of its front, for builds of the binding
compared side by side (issue 18): what the worker's per-frame path costs, measured in a way
that the load of a shared machine disturbs far less than throughput.

    python workers/python/cpu_per_reply.py PY_A PY_B [ROUNDS] [SECONDS] [DEPTH]

PY_A, PY_B: interpreters with different builds of shmrelay_worker installed (e.g. two venvs
made by ci-setup.sh with SHMRELAY_VENV). Each gets a relay (`--workers 1`, one front, the
worker running examples/echo.py) on a free loopback port, both started once; each round runs
`relaybench load` (1,000 connections, 64 B, closed loop, 2 threads, 1 s warm-up) against each
in turn, the order alternating, at nice -10, and divides the worker's and the front's CPU time
(utime + stime from /proc/PID/stat, over the whole run) by the replies the load generator got.
Needs the release build: cargo build --release -p shmrelay -p shmrelay-tools.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
RELEASE = os.path.join(TARGET, "release")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stat_fields(pid):
    st = open(f"/proc/{pid}/stat").read()
    return st[st.rindex(")") + 2 :].split()


def children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(stat_fields(d)[1]) == pid:
                    kids.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def cpu_seconds(pid):
    f = stat_fields(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def cmdline(pid):
    return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")


def main():
    pys = sys.argv[1:3]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    secs = sys.argv[4] if len(sys.argv) > 4 else "5"
    depth = sys.argv[5] if len(sys.argv) > 5 else "16"
    echo = os.path.join(ROOT, "workers/python/examples/echo.py")
    relays = []
    for i, py in enumerate(pys):
        port = free_port()
        p = subprocess.Popen(
            ["nice", "-n", "-10", os.path.join(RELEASE, "shmrelay"), "--listen", f"127.0.0.1:{port}",
             "--instance", f"cpr{i}-{os.getpid()}", "--workers", "1", "--worker-cmd", f"{py} {echo}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="error"))
        relays.append((py, port, p))
    time.sleep(3)  # the workers import after the relay listens
    procs = {}
    for py, port, p in relays:
        kids = children(p.pid)
        worker = [k for k in kids if "echo.py" in cmdline(k)][0]
        front = [k for k in kids if k != worker][0]
        procs[py] = (worker, front)
    results = {py: [] for py in pys}
    try:
        for r in range(rounds):
            for py, port, _ in relays if r % 2 == 0 else relays[::-1]:
                worker, front = procs[py]
                load = open("/proc/loadavg").read().split()[0]
                before = (cpu_seconds(worker), cpu_seconds(front))
                out = subprocess.run(
                    ["nice", "-n", "-10", os.path.join(RELEASE, "relaybench"), "load", "--addr", f"127.0.0.1:{port}",
                     "--conns", "1000", "--size", "64", "--depth", depth, "--seconds", secs, "--warmup", "1",
                     "--threads", "2", "--json"], capture_output=True, text=True, check=True)
                after = (cpu_seconds(worker), cpu_seconds(front))
                d = json.loads(out.stdout)
                n = d["replies"]
                w_us = (after[0] - before[0]) / n * 1e6
                f_us = (after[1] - before[1]) / n * 1e6
                results[py].append((w_us, f_us))
                print(f"round {r + 1} {py}: worker {w_us:.3f} us/reply, front {f_us:.3f} us/reply, "
                      f"{d['req_per_sec']:,.0f} req/s, errors {d['errors']}, load {load}", flush=True)
    finally:
        for _, _, p in relays:
            p.terminate()
        for _, _, p in relays:
            p.wait()
    for py in pys:
        w = [x[0] for x in results[py]]
        f = [x[1] for x in results[py]]
        print(f"{py}: worker median {statistics.median(w):.3f} us/reply ({min(w):.3f}-{max(w):.3f}), "
              f"front median {statistics.median(f):.3f} us/reply ({min(f):.3f}-{max(f):.3f})")


if __name__ == "__main__":
    main()
