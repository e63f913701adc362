#!/usr/bin/env bash
# The C echo worker (examples/echo.c over the C ABI) against the Rust echo worker
# (`echo-worker`, the SDK directly) behind shmrelay, in one run (issue 18).
#
# Two relays, each `--fronts 1 --workers 1 --worker-cmd WORKER`, are started once on free
# loopback ports; they take turns under `relaybench load` (closed loop, the same settings for
# both), the order alternating from round to round, so background load hits both alike. The
# supervisor of the relay measured is passed as --server-pid (its front and worker are its
# descendants), so server CPU per request is comparable. The 1-minute load average is printed
# before each run. Output: one line per run, then per system the median req/s over the rounds
# and the ratio C / Rust.
#
# Usage: workers/ffi/bench.sh [--rounds N] [--conns N] [--size B] [--depth N] [--seconds S]
#                             [--threads N] [--no-build]
set -euo pipefail

ROUNDS=3
CONNS=1000
SIZE=64
DEPTH=16
SECS=5
THREADS=2
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --conns) CONNS="$2"; shift 2 ;;
        --size) SIZE="$2"; shift 2 ;;
        --depth) DEPTH="$2"; shift 2 ;;
        --seconds) SECS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
die() { echo "bench.sh: $*" >&2; exit 1; }
# shellcheck source=../../tools/bench/lib.sh
. "$ROOT/tools/bench/lib.sh"
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -q -p shmrelay -p shmrelay-tools -p shmrelay-worker \
        -p shmrelay-worker-ffi)
fi
for b in shmrelay relaybench echo-worker libshmrelay_worker_c.a; do
    [ -e "$BIN/$b" ] || die "$BIN/$b is missing"
done

TMP="$(mktemp -d /tmp/shmrelay-ffi-bench.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f /dev/shm/shmrelay.ffibench-*-$$.* 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

"${CC:-cc}" -std=c11 -O2 -I "$ROOT/workers/ffi/include" "$ROOT/workers/ffi/examples/echo.c" \
    "$BIN/libshmrelay_worker_c.a" -lpthread -ldl -lm -o "$TMP/c-echo"

declare -A ADDR PID
start() { # NAME PORT WORKER
    "$BIN/shmrelay" --listen "127.0.0.1:$2" --instance "ffibench-$1-$$" --fronts 1 --workers 1 \
        --worker-cmd "$3" --drain-ms 500 >"$TMP/$1.log" 2>&1 &
    PID[$1]=$!
    PIDS+=("$!")
    wait_port "$2" "$!" "shmrelay ($1)" "$TMP/$1.log"
    ADDR[$1]="127.0.0.1:$2"
}
read -r P_RUST P_C < <(free_ports 2)
start rust "$P_RUST" "$BIN/echo-worker"
start c "$P_C" "$TMP/c-echo"
sleep 1

echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git -C "$ROOT" rev-parse --short HEAD) nproc=$(nproc)"
echo "# relaybench load --conns $CONNS --size $SIZE --depth $DEPTH --seconds $SECS --warmup 1 --threads $THREADS"
SYSTEMS=(rust c)
: >"$TMP/results"
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < 2; k++)); do
        sys=${SYSTEMS[$(((k + r) % 2))]}
        load=$(cut -d' ' -f1 /proc/loadavg)
        json=$("$BIN/relaybench" load --addr "${ADDR[$sys]}" --conns "$CONNS" --size "$SIZE" \
            --depth "$DEPTH" --seconds "$SECS" --warmup 1 --threads "$THREADS" \
            --server-pid "${PID[$sys]}" --json)
        line=$(python3 -c '
import json, sys
s = json.loads(sys.argv[1])
print("%s %.0f %d %.0f %d" % (sys.argv[2], s["req_per_sec"], s["p99_us"],
      s["req_per_server_cpu_sec"] or 0, s["errors"] + s["mismatches"]))' "$json" "$sys")
        echo "$line" >>"$TMP/results"
        read -r _ rps p99 eff errs <<<"$line"
        printf 'round %d  %-4s  %9s req/s  p99 %6s us  %8s req/server-cpu-s  errors %s  (load %s)\n' \
            $((r + 1)) "$sys" "$rps" "$p99" "$eff" "$errs" "$load"
    done
done
python3 - "$TMP/results" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    sys_, rps, p99, eff, errs = line.split()
    runs.setdefault(sys_, []).append((float(rps), int(p99), float(eff)))
med = {k: statistics.median(r for r, _, _ in v) for k, v in runs.items()}
for k, v in runs.items():
    print("%-4s median %9.0f req/s  (range %.0f-%.0f)  median p99 %d us  median %.0f req/server-cpu-s"
          % (k, med[k], min(r for r, _, _ in v), max(r for r, _, _ in v),
             statistics.median(p for _, p, _ in v), statistics.median(e for _, _, e in v)))
print("C / Rust: %.3f" % (med["c"] / med["rust"]))
EOF
