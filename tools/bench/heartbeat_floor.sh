#!/usr/bin/env bash
# What answering one heartbeat costs the server (issue 4): shmrelay (one front) against the
# in-process tokio echo server (examples/tokio-echo, one thread: it answers a length-0 frame
# with a length-0 frame, the least any server can do), the same connections and beat rate, in
# the same run, alternating, so the ratio holds on a shared, noisy machine.
#
# Usage: tools/bench/heartbeat_floor.sh [--conns N] [--seconds S] [--heartbeat S] [--rounds R]
#                                       [--no-build] [--bin DIR] [--servers LIST] [--json FILE]
# Defaults: 10,000 connections beating every 3 s (3,333 beats/s, the rate of 100,000
# connections beating every 30 s) for 40 s, 2 rounds.
#
# Server CPU is `relaybench hold --server-pid` (user + system time of the server's processes
# over the hold window, descendants included), divided by the heartbeats answered.
#
# --servers tokio measures the floor alone (tools/bench/million.py does, before its variants);
# --bin DIR takes the binaries from DIR without building; --json FILE appends one JSON object
# per hold (round, server, conns, heartbeat, cpu_percent, beats_per_s, us_per_beat, closes,
# load1, and relaybench's own figures).
set -euo pipefail
CONNS=10000 SECS=40 HEARTBEAT=3 ROUNDS=2 BUILD=1 BIN="" SERVERS=tokio,shmrelay JSON=""
while [ $# -gt 0 ]; do
    case "$1" in
    --conns) CONNS=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --heartbeat) HEARTBEAT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --bin) BIN=$2; BUILD=0; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --json) JSON=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "heartbeat_floor.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
die() { echo "heartbeat_floor.sh: $*" >&2; exit 1; }
for s in ${SERVERS//,/ }; do
    case "$s" in tokio | shmrelay) ;; *) die "--servers takes tokio, shmrelay or both, not $s" ;; esac
done
# shellcheck source=tools/bench/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/../.."
if [ "$BUILD" = 1 ]; then
    cargo build --release -q -p shmrelay -p shmrelay-tools -p shmrelay-examples
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')}
BIN=${BIN:-$TARGET_DIR/release}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/shmrelay-hbfloor.XXXXXX")
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# Starts a server; sets SERVER_PID and PORT.
start() {
    PORT=$(free_ports 1)
    case "$1" in
    tokio) "$BIN/tokio-echo" --listen "127.0.0.1:$PORT" --threads 1 >"$TMP/$1.log" 2>&1 & ;;
    shmrelay) "$BIN/shmrelay" --fronts 1 --workers 1 --max-conns $((CONNS + CONNS / 50 + 100)) \
        --instance "hbfloor-$$" --listen "127.0.0.1:$PORT" >"$TMP/$1.log" 2>&1 & ;;
    esac
    SERVER_PID=$!
    wait_port "$PORT" "$SERVER_PID" "$1" "$TMP/$1.log"
}

# One hold against the running server (round $1, server $2); prints "cpu_percent beats_per_s
# us_per_beat closes" and appends the JSON row to --json FILE if given.
hold() {
    "$BIN/relaybench" hold --addr "127.0.0.1:$PORT" --conns "$CONNS" --procs 1 \
        --src-ips 127.0.0.2-127.0.0.3 --seconds "$SECS" --heartbeat "$HEARTBEAT" \
        --server-pid "$SERVER_PID" --json >"$TMP/hold.json" 2>"$TMP/hold.log" ||
        { cat "$TMP/hold.log" >&2; die "relaybench hold failed against $2"; }
    python3 - "$TMP/hold.json" "$SECS" "$1" "$2" "$JSON" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); secs = float(sys.argv[2])
beats = d["heartbeats_answered_in_window"]  # the window of the server CPU seconds
us = d["server_us_per_heartbeat"]  # server CPU over that window / those beats
if us is None:
    sys.exit(f"heartbeat_floor.sh: no server CPU per heartbeat against {sys.argv[4]}: {beats} "
             f"heartbeats answered in the hold window (see {sys.argv[1]})")
print(f'{d["server_cpu_percent"]:.2f} {beats / secs:.0f} {us:.1f} {d["server_closes"]}')
if sys.argv[5]:
    row = {"round": int(sys.argv[3]), "server": sys.argv[4], "conns": d["conns"],
           "heartbeat": d["heartbeat"], "cpu_percent": d["server_cpu_percent"],
           "beats_per_s": beats / secs, "us_per_beat": us,
           "closes": d["server_closes"], "load1": float(open("/proc/loadavg").read().split()[0]),
           "hold": d}
    with open(sys.argv[5], "a") as f:
        f.write(json.dumps(row) + "\n")
PY
}

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| round | server | CPU % of one core | beats answered/s | CPU µs per beat | closed by server | load |"
echo "|---|---|---|---|---|---|---|"
declare -A SUM
for r in $(seq 1 "$ROUNDS"); do
    for s in ${SERVERS//,/ }; do
        start "$s"
        sleep 1
        read -r cpu bps us closes < <(hold "$r" "$s")
        cleanup
        SERVER_PID=""
        echo "| $r | $s | $cpu | $bps | $us | $closes | $(cut -d' ' -f1 /proc/loadavg) |"
        SUM[$s]=$(python3 -c "print(${SUM[$s]:-0} + $us)")
    done
done
if [ -n "${SUM[shmrelay]:-}" ] && [ -n "${SUM[tokio]:-}" ]; then
    python3 -c "print(f'\nshmrelay / tokio-echo CPU per heartbeat (mean of rounds): {${SUM[shmrelay]} / ${SUM[tokio]}:.2f}x')"
fi
echo "raw data: $TMP"
