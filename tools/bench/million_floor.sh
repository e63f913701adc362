#!/usr/bin/env bash
# The heartbeat floor at a million connections (issue 15): what the least possible server
# spends answering the beats of --conns held connections, to set the relay's CPU per heartbeat
# at the same scale against (tools/bench/scale.sh --million measures the relay).
#
# The server is examples/c/epoll-echo.c (built here with cc -O2) in --procs processes sharing
# one port with SO_REUSEPORT: one process cannot hold a million sockets under the open-files
# limit, and a floor measured with fewer connections misses what a million sockets cost the
# kernel (cold socket memory on every beat). The load is the same `relaybench hold` command
# million.py runs. heartbeat_floor.sh is the small-scale variant (tokio echo, 10,000 connections).
#
# Usage: tools/bench/million_floor.sh [--conns N] [--seconds S] [--beat S] [--procs P]
#                                     [--client-procs P] [--src-ips LIST] [--no-build]
#                                     [--json PATH] [--touch-pages K]
# Defaults: 1,000,000 connections beating every 60 s, held 240 s, 64 server processes, 63
# client processes over 127.0.0.2-127.0.0.101.
# Prints the server's CPU over the hold window (% of one core, from relaybench hold
# --server-pid: user + system of the server and its children) and CPU microseconds per beat;
# --json PATH also writes them as one JSON object (million.py's --floor reads it).
# --touch-pages K: each server process visits a line in each of K pages of its own after every
# wake, one after another (epoll-echo's probe): what K more pages per wake cost at this scale.
set -euo pipefail
CONNS=1000000 SECS=240 BEAT=60 PROCS=64 CLIENT_PROCS=63 SRC_IPS=127.0.0.2-127.0.0.101 BUILD=1 JSON="" TOUCH=0
while [ $# -gt 0 ]; do
    case "$1" in
    --conns) CONNS=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --beat) BEAT=$2; shift 2 ;;
    --procs) PROCS=$2; shift 2 ;;
    --client-procs) CLIENT_PROCS=$2; shift 2 ;;
    --src-ips) SRC_IPS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --json) JSON=$2; shift 2 ;;
    --touch-pages) TOUCH=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "million_floor.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
die() { echo "million_floor.sh: $*" >&2; exit 1; }
# shellcheck source=tools/bench/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/../.."
[ "$BUILD" = 1 ] && cargo build --release -q -p shmrelay-tools
TARGET_DIR=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/shmrelay-mfloor.XXXXXX")
cc -O2 -o "$TMP/epoll-echo" examples/c/epoll-echo.c || die "cc failed (install a C compiler)"
SERVER_PID=""
trap 'stop_pid "$SERVER_PID"' EXIT
PORT=$(free_ports 1)
"$TMP/epoll-echo" --listen "127.0.0.1:$PORT" --procs "$PROCS" --backlog 65535 \
    --touch-pages "$TOUCH" >"$TMP/echo.log" 2>&1 &
SERVER_PID=$!
wait_port "$PORT" "$SERVER_PID" epoll-echo "$TMP/echo.log"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); epoll-echo x $PROCS on 127.0.0.1:$PORT; raw data in $TMP"
"$TARGET_DIR/release/relaybench" hold --addr "127.0.0.1:$PORT" --conns "$CONNS" \
    --procs "$CLIENT_PROCS" --src-ips "$SRC_IPS" --seconds "$SECS" --heartbeat "$BEAT" \
    --connect-concurrency 1024 --connect-timeout 30 --ramp-limit 900 \
    --server-pid "$SERVER_PID" --json >"$TMP/hold.json" 2>"$TMP/hold.log" ||
    { tail -5 "$TMP/hold.log" >&2; die "relaybench hold failed"; }
python3 - "$TMP/hold.json" "$SECS" "$PROCS" "$JSON" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); secs = float(sys.argv[2])
# Beats answered inside the hold window, the window of the server's CPU seconds (relaybench
# divides the one by the other: server_us_per_heartbeat).
beats = d["heartbeats_answered_in_window"]; cpu = d["server_cpu_seconds"] or 0.0
us = d["server_us_per_heartbeat"]
if us is None:
    sys.exit(f"million_floor.sh: no server CPU per heartbeat: {beats} heartbeats answered in the "
             f"hold window, server CPU {d['server_cpu_seconds']} s (see {sys.argv[1]})")
print(f'load after: {open("/proc/loadavg").read().split()[0]}')
print(f"opened {d['opened']}, open at end {d['open_at_end']}, connect errors {d['connect_errors']}, ramp {d['ramp_secs']:.0f} s, "
      f'closed by server {d["server_closes"]}')
print(f'floor: {d["server_cpu_percent"]:.1f}% of one core, {beats / secs:.0f} beats/s answered in the hold window, '
      f'{us:.1f} us CPU per beat')
if sys.argv[4]:
    with open(sys.argv[4], "w") as f:
        json.dump({"server": f"epoll-echo.c x {sys.argv[3]}", "conns": d["opened"], "seconds": secs,
                   "beats": beats, "beats_per_s": beats / secs, "server_cpu_seconds": cpu,
                   "cpu_percent": d["server_cpu_percent"], "us_per_beat": us,
                   "closes": d["server_closes"], "connect_errors": d["connect_errors"],
                   "load1": float(open("/proc/loadavg").read().split()[0])}, f)
        f.write("\n")
PY
