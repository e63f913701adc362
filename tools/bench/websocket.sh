#!/usr/bin/env bash
# WebSocket benchmark (issue 16), in one run:
# 1. throughput: shmrelay's websocket listener with the built-in echo worker, nginx proxying
#    WebSocket to ws-echo (tokio-tungstenite, examples/), and ws-echo alone, 64 B messages,
#    1,000 connections, `relaybench load --codec websocket` (masked binary messages), the
#    systems taking turns (compare.sh --systems "shmrelay-ws nginx-ws ws-echo"); report with
#    ratios, load averages and the chart OUT/compare.svg (compare_report.py);
# 2. memory: the relay's private memory (Private_Clean + Private_Dirty of
#    /proc/PID/smaps_rollup, supervisor + front + worker) with no connection and with
#    --idle-conns idle WebSocket connections (upgraded, no message), per connection.
#
# Usage: tools/bench/websocket.sh [--out DIR] [--idle-conns N] [--no-memory] [--memory-only]
#                                 [--no-build] [any compare.sh option, e.g. --repeat 5]
# Default OUT: target/websocket. Targets (issue 16): >= 2x nginx and >= 0.8x ws-echo at 64 B and
# 1,000 connections; <= 512 B of relay private memory per idle WebSocket connection.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
die() { printf 'websocket.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '[websocket] %s\n' "$*" >&2; }
# shellcheck source=tools/bench/lib.sh
. "$ROOT/tools/bench/lib.sh"

OUT="$ROOT/target/websocket"
IDLE=10000
MEMORY=1
THROUGHPUT=1
BUILD=1
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --idle-conns) IDLE="$2"; shift 2 ;;
        --no-memory) MEMORY=0; shift ;;
        --memory-only) THROUGHPUT=0; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
if [ "$BUILD" = 1 ]; then
    say "building release binaries"
    cargo build --release -q -p shmrelay -p shmrelay-tools -p shmrelay-examples
fi
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"

# ---- 1. throughput (compare.sh starts, measures and stops the three systems)
if [ "$THROUGHPUT" = 1 ]; then
    "$ROOT/tools/bench/compare.sh" --no-build --systems "shmrelay-ws nginx-ws ws-echo" \
        --sizes 64 --conns 1000 --out "$OUT" "${PASS[@]}"
fi
[ "$MEMORY" = 1 ] || exit 0

# ---- 2. private memory per idle WebSocket connection
TMP="$(mktemp -d /tmp/shmrelay-wsmem.XXXXXX)"
INSTANCE="wsmem-$$"
RELAY_PID=""
cleanup() {
    stop_pid "$RELAY_PID"
    rm -rf "$TMP"
}
trap cleanup EXIT
PORT=$(free_ports 1)
start_ws_relay "$BIN/shmrelay" "$TMP" "$PORT" "$INSTANCE"
sleep 1

# Private bytes (clean + dirty) of the supervisor and its children, in KiB.
private_kib() {
    local total=0 p v
    for p in "$RELAY_PID" $(pgrep -P "$RELAY_PID" || true); do
        v=$(awk '/^Private_(Clean|Dirty):/ {s += $2} END {print s + 0}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
        total=$((total + v))
    done
    echo "$total"
}
conns_open() {
    "$BIN/relayctl" stat --json "$INSTANCE" --interval 0 2>/dev/null | python3 -c '
import json, sys
print(sum(f["connections"]["open"] for f in json.load(sys.stdin)["fronts"]))' 2>/dev/null || echo 0
}
BEFORE=$(private_kib)
say "relay private memory with no connection: $BEFORE KiB; opening $IDLE idle WebSocket connections"
# A rate this low sends nothing in the window: the connections are upgraded and stay idle.
"$BIN/relaybench" load --addr "127.0.0.1:$PORT" --codec websocket --conns "$IDLE" \
    --rate 0.000001 --seconds 20 --warmup 0 --drain 0 --json >"$TMP/idle.json" 2>"$TMP/idle.log" &
LOAD_PID=$!
WITH=0
for _ in $(seq 120); do
    sleep 1
    kill -0 "$LOAD_PID" 2>/dev/null || break
    if [ "$(conns_open)" -ge "$IDLE" ]; then
        sleep 3 # let the front settle after the ramp
        WITH=$(private_kib)
        OPEN=$(conns_open)
        break
    fi
done
wait "$LOAD_PID" || { cat "$TMP/idle.log" >&2; die "relaybench load (idle connections) failed"; }
[ "$WITH" != 0 ] || die "the relay never had $IDLE connections open"
PER=$(( (WITH - BEFORE) * 1024 / OPEN ))
{
    echo "## relay private memory per idle WebSocket connection"
    echo
    echo "| connections open | relay private memory | per connection | target |"
    echo "|---:|---:|---:|---|"
    echo "| 0 | $BEFORE KiB | | |"
    echo "| $OPEN | $WITH KiB | $PER B | <= 512 B: $([ "$PER" -le 512 ] && echo met || echo MISSED) |"
    echo
    echo "Private_Clean + Private_Dirty of /proc/PID/smaps_rollup over the supervisor, the front"
    echo "and the worker; load average $(cut -d' ' -f1-3 /proc/loadavg); command: tools/bench/websocket.sh --idle-conns $IDLE"
} | tee "$OUT/memory.md"
