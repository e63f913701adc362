#!/usr/bin/env bash
# redis-benchmark against redis-server and against shmrelay (one front, one kv worker by
# default, on a `resp` listener), in the same run, on loopback: SET and GET, pipelined 16 deep,
# at 50 and 1,000 connections. The two servers take turns case by case, so a change in the
# machine's load hits both alike.
#
#   tools/bench/redis.sh [-n REQUESTS] [--repeat K] [--kv-workers W] [--random-keys R] [--no-build]
#
#   -n REQUESTS         requests per redis-benchmark run (default 4000000: 5-10 s per run on a
#                       2-core VM)
#   --repeat K          run every case K times, alternating who goes first, and print the
#                       medians (default 1)
#   --kv-workers W      kv workers behind the listener (default 1; more: commands routed by key)
#   --random-keys R     redis-benchmark -r R for both servers (default: one key, as plain -t)
#   --no-build          use the release binary as it is
#
# Installs redis-server and redis-tools with apt-get when they are missing (Debian). Nothing is
# persisted: redis-server runs with --save "" --appendonly no in a temporary directory.
# Prints the commands, the load average before and after, and a markdown table: req/s of each,
# their ratio, and the CPU time each server spent per request (user + system from /proc, all
# of shmrelay's processes: supervisor, front, kv worker).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=4000000
REPEAT=1
BUILD=1
KV_WORKERS=1
RANDOM_KEYS=
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) N=$2; shift 2 ;;
    --repeat) REPEAT=$2; shift 2 ;;
    --kv-workers) KV_WORKERS=$2; shift 2 ;;
    --random-keys) RANDOM_KEYS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "usage: $0 [-n REQUESTS] [--repeat K] [--kv-workers W] [--random-keys R] [--no-build]" >&2; exit 2 ;;
  esac
done
REDIS_PORT=${REDIS_PORT:-16379}
RELAY_PORT=${RELAY_PORT:-16380}

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "redis.sh: installing redis-server and redis-tools" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server redis-tools >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server redis-tools >/dev/null; }
fi
# 1,000 client connections plus the server side of each, in one process each.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [[ $BUILD == 1 ]]; then
  cargo build --release -p shmrelay -q
fi
BIN=${CARGO_TARGET_DIR:-target}/release/shmrelay
[[ -x $BIN ]] || { echo "redis.sh: $BIN not built" >&2; exit 2; }

TMP=$(mktemp -d)
RS=
RL=
cleanup() {
  # Only the two servers this script started, by pid.
  [[ -n $RS ]] && kill "$RS" 2>/dev/null
  [[ -n $RL ]] && kill "$RL" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

# Same socket limits for both: redis-server's maxclients defaults to 10000.
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
  --dir "$TMP" --daemonize no --maxclients 10000 >"$TMP/redis.log" 2>&1 &
RS=$!

cat >"$TMP/relay.toml" <<CONF
instance = "bench-redis-$$"
fronts = 1

[[listener]]
listen = "127.0.0.1:$RELAY_PORT"
codec = "resp"
workers = $KV_WORKERS
worker_cmd = "$(realpath "$BIN") worker kv"
CONF
RUST_LOG=warn "$BIN" --config "$TMP/relay.toml" >"$TMP/relay.out" 2>"$TMP/relay.log" &
RL=$!
for _ in $(seq 100); do
  if grep -q "listening on" "$TMP/relay.out" 2>/dev/null \
    && redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    break
  fi
  sleep 0.1
done
redis-cli -p "$REDIS_PORT" ping >/dev/null || { cat "$TMP/redis.log" >&2; exit 1; }
redis-cli -p "$RELAY_PORT" ping >/dev/null || { cat "$TMP/relay.log" >&2; exit 1; }

# CPU time (user + system, clock ticks) of a process and its children that are alive: the
# server's cost of a run, less sensitive than req/s to what else the shared machine runs.
HZ=$(getconf CLK_TCK)
ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1"); do
    [[ -r /proc/$p/stat ]] || continue
    total=$((total + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$total"
}
run() { # port conns test server-pid -> "req/s CPU-us-per-request"
  local before after rps
  before=$(ticks "$4")
  rps=$(redis-benchmark -h 127.0.0.1 -p "$1" -c "$2" -n "$N" -P 16 -t "$3" ${RANDOM_KEYS:+-r "$RANDOM_KEYS"} -q 2>"$TMP/bench.err" \
    | tr '\r' '\n' | awk -F': ' '/requests per second/ {split($2, a, " "); v=a[1]} END {print v}')
  after=$(ticks "$4")
  awk -v r="$rps" -v t=$((after - before)) -v hz="$HZ" -v n="$N" \
    'BEGIN { printf "%s %.2f\n", r, t / hz * 1e6 / n }'
}

echo "# $(date -u '+%F %T') UTC, shmrelay $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(redis-server --version | awk '{print $3}'), $(nproc) cores"
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# redis-benchmark -h 127.0.0.1 -p PORT -c CONNS -n $N -P 16 -t TEST ${RANDOM_KEYS:+-r $RANDOM_KEYS }-q"
echo "# shmrelay: 1 front, $KV_WORKERS kv worker(s) on a resp listener"
echo
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR]=$1} END {printf "%.0f\n", (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
HEAD_ROW="| test | conns | redis-server req/s | shmrelay + kv req/s | shmrelay / redis-server | redis-server CPU us/req | shmrelay CPU us/req (all processes) |"
HEAD_SEP="|---|---|---|---|---|---|---|"
echo "$HEAD_ROW"
echo "$HEAD_SEP"
SUMMARY=()
for c in 50 1000; do
  for t in set get; do
    rs=""; ss=""; rcs=""; scs=""
    for k in $(seq "$REPEAT"); do
      # Alternate who goes first, so neither always runs on the warmer machine.
      if (( k % 2 == 1 )); then
        read -r r rc < <(run "$REDIS_PORT" "$c" "$t" "$RS")
        read -r s sc < <(run "$RELAY_PORT" "$c" "$t" "$RL")
      else
        read -r s sc < <(run "$RELAY_PORT" "$c" "$t" "$RL")
        read -r r rc < <(run "$REDIS_PORT" "$c" "$t" "$RS")
      fi
      rs+=" $r"; ss+=" $s"; rcs+=" $rc"; scs+=" $sc"
      echo "| ${t^^} | $c | $r | $s | $(ratio "$s" "$r") | $rc | $sc |"
    done
    mr=$(echo "$rs" | median); ms=$(echo "$ss" | median)
    mrc=$(echo "$rcs" | tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR]=$1} END {printf "%.2f", (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}')
    msc=$(echo "$scs" | tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR]=$1} END {printf "%.2f", (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}')
    SUMMARY+=("| ${t^^} | $c | $mr | $ms | $(ratio "$ms" "$mr") | $mrc | $msc |")
  done
done
if (( REPEAT > 1 )); then
  echo
  echo "Medians of $REPEAT:"
  echo
  echo "$HEAD_ROW"
  echo "$HEAD_SEP"
  printf '%s\n' "${SUMMARY[@]}"
fi
echo
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
# The relay's own account: nothing was refused or broken.
if grep -qiE "error|panic" "$TMP/relay.log"; then
  echo "# relay log:"; grep -iE "error|panic" "$TMP/relay.log" | head -5
fi
