#!/usr/bin/env bash
# Python benchmark (issue 18): the Python echo worker behind shmrelay against a Python asyncio
# echo server doing the same work alone, in one run, alternating, with `relaybench load`.
#
#   pyshmrelay  shmrelay --fronts 1 --workers 1 --worker-cmd "$PY workers/python/examples/echo.py"
#               (one Rust front, one Python worker process; without --fronts, "auto" would start
#               as many fronts as 100,000 connections need under the open-files limit: 6 here)
#   asyncio     $PY workers/python/examples/asyncio_echo.py (one process)
#
# Both are started once on free loopback ports and stay idle while the other is measured; each
# round measures both, the order alternating between rounds. Every server process is passed as
# --server-pid (the relay's supervisor, whose descendants are the front and the worker), so the
# server CPU seconds are comparable. The 1-minute load average is recorded before each run.
#
# Usage: [ROUNDS=3] [RUN_SECONDS=5] [WARMUP=1] [CONNS=1000] [SIZE=64] [DEPTH=16] [THREADS=2]
#        [FRONTS=1] [WORKERS=1] [NICE=0] [OUT=DIR] [SHMRELAY_PYTHON=PY] workers/python/bench.sh
# PY defaults to target/pyvenv/bin/python (see ci-setup.sh); THREADS are the load generator's;
# FRONTS and WORKERS the relay's fronts and Python workers. NICE=-10 (root) runs servers and load generator at that
# niceness, in a session of their own whose autogroup gets it too (as compare.sh --nice), so
# other work on a shared machine disturbs the runs less.
# Needs the release build: cargo build --release -p shmrelay -p shmrelay-tools.
# Output: OUT/runs.jsonl (relaybench JSON plus system, round, load average) and a summary table.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
PY=${SHMRELAY_PYTHON:-$root/target/pyvenv/bin/python}
ROUNDS=${ROUNDS:-3} SECS=${RUN_SECONDS:-5} WARMUP=${WARMUP:-1} CONNS=${CONNS:-1000}
SIZE=${SIZE:-64} DEPTH=${DEPTH:-16} THREADS=${THREADS:-2} OUT=${OUT:-}
FRONTS=${FRONTS:-1} WORKERS=${WORKERS:-1} NICE=${NICE:-0}
RUN=()
if [ "$NICE" != 0 ]; then
    if [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ] && [ -z "${PYBENCH_SESSION:-}" ]; then
        PYBENCH_SESSION=1 exec setsid -w "$0" "$@"
    fi
    [ -n "${PYBENCH_SESSION:-}" ] && echo "$NICE" >/proc/self/autogroup
    RUN=(nice -n "$NICE")
fi
OUT=${OUT:-$target/pybench-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
relay="$target/release/shmrelay"
bench="$target/release/relaybench"
for b in "$relay" "$bench"; do
    [ -x "$b" ] || { echo "bench.sh: $b missing (cargo build --release -p shmrelay -p shmrelay-tools)" >&2; exit 1; }
done
"$PY" -c 'import shmrelay_worker' || { echo "bench.sh: $PY cannot import shmrelay_worker (run ci-setup.sh)" >&2; exit 1; }

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_listening() { # PORT
    for _ in $(seq 100); do
        "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),timeout=1).close()" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench.sh: nothing listens on $1" >&2; exit 1
}

port_relay=$(free_port)
RUST_LOG=error "${RUN[@]}" "$relay" --listen "127.0.0.1:$port_relay" --instance "pybench-$$" --fronts "$FRONTS" --workers "$WORKERS" \
    --worker-cmd "$PY $root/workers/python/examples/echo.py" >"$OUT/shmrelay.log" 2>&1 &
pid_relay=$!; pids+=("$pid_relay")
port_aio=$(free_port)
"${RUN[@]}" "$PY" "$root/workers/python/examples/asyncio_echo.py" "127.0.0.1:$port_aio" >"$OUT/asyncio.log" 2>&1 &
pid_aio=$!; pids+=("$pid_aio")
wait_listening "$port_relay"; wait_listening "$port_aio"
sleep 1 # the Python worker imports after the relay listens

run() { # SYSTEM ROUND PORT PID
    local load; load=$(cut -d' ' -f1 /proc/loadavg)
    local json
    json=$("${RUN[@]}" "$bench" load --addr "127.0.0.1:$3" --conns "$CONNS" --size "$SIZE" --depth "$DEPTH" \
        --seconds "$SECS" --warmup "$WARMUP" --threads "$THREADS" --server-pid "$4" --json)
    echo "$json" | "$PY" -c "import json,sys; d=json.load(sys.stdin); d.update(system='$1', round=$2, loadavg=$load, fronts=$FRONTS, workers=$WORKERS, nice=$NICE); print(json.dumps(d))" >>"$OUT/runs.jsonl"
    echo "round $2 $1: $(echo "$json" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("%.0f req/s, p99 %d us, server cpu %.2f s, errors %d" % (d["req_per_sec"], d["p99_us"], d["server_cpu_seconds"], d["errors"]))') (load $load)"
}

for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        run pyshmrelay "$r" "$port_relay" "$pid_relay"; run asyncio "$r" "$port_aio" "$pid_aio"
    else
        run asyncio "$r" "$port_aio" "$pid_aio"; run pyshmrelay "$r" "$port_relay" "$pid_relay"
    fi
done

"$PY" - "$OUT/runs.jsonl" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in runs:
    by.setdefault(r["round"], {})[r["system"]] = r
print("| round | pyshmrelay req/s | asyncio req/s | ratio | req per server CPU-s, pyshmrelay / asyncio | p99 us, pyshmrelay / asyncio | load avg before each |")
print("|---|---|---|---|---|---|---|")
ratios, cpu_ratios = [], []
for k in sorted(by):
    a, b = by[k]["pyshmrelay"], by[k]["asyncio"]
    ratio = a["req_per_sec"] / b["req_per_sec"]
    ratios.append(ratio)
    cpu_ratios.append(a["req_per_server_cpu_sec"] / b["req_per_server_cpu_sec"])
    print(f"| {k} | {a['req_per_sec']:,.0f} | {b['req_per_sec']:,.0f} | {ratio:.2f}x | "
          f"{a['req_per_server_cpu_sec']:,.0f} / {b['req_per_server_cpu_sec']:,.0f} | "
          f"{a['p99_us']:,} / {b['p99_us']:,} | {a['loadavg']} / {b['loadavg']} |")
print(f"throughput ratio: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x); "
      f"per server CPU second: median {statistics.median(cpu_ratios):.2f}x")
EOF
echo "runs: $OUT/runs.jsonl"
