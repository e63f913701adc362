#!/usr/bin/env bash
# Soak: steady load against a relay for a while, sampling the private memory (RssAnon) and open
# fds of every relay process; passes if, after warm-up, both stay flat (within 5%) and no request
# was lost. Private memory, not RSS: ring pages are touched lazily as records reach them
# (issue 15), so RSS grows towards the rings' size without anything leaking. Usage: tools/bench/soak.sh [--minutes 30] [--profile release|debug] [--conns 100] [--rate 4000]
set -euo pipefail
cd "$(dirname "$0")/../.."

minutes=30 profile=release conns=100 rate=4000
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    *) echo "usage: $0 [--minutes N] [--profile release|debug] [--conns N] [--rate R]" >&2; exit 2 ;;
  esac
done

target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
if [ "$profile" = release ]; then
  cargo build --release -p shmrelay -p shmrelay-tools >&2
  bin=$target/release
else
  [ -x "$target/debug/shmrelay" ] && [ -x "$target/debug/relaybench" ] || cargo build -p shmrelay -p shmrelay-tools >&2
  bin=$target/debug
fi

work=$(mktemp -d)
instance=soak-$$
relay_pid=""
cleanup() {
  [ -n "$relay_pid" ] && kill -INT "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null || true
  rm -f /dev/shm/shmrelay."$instance".*
  rm -rf "$work"
}
trap cleanup EXIT

RUST_LOG=warn "$bin/shmrelay" --listen 127.0.0.1:0 --instance "$instance" --fronts 2 --workers 2 >"$work/relay.out" 2>"$work/relay.err" &
relay_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/relay.out" 2>/dev/null && break; sleep 0.1; done
addr=$(grep -o 'listening on [0-9.:]*' "$work/relay.out" | awk '{print $3}')
[ -n "$addr" ] || { echo "relay did not start:" >&2; cat "$work/relay.err" >&2; exit 1; }
pids="$relay_pid $(cat /proc/"$relay_pid"/task/*/children)"
echo "soak: relay $addr (pids $pids), $conns connections at $rate req/s for $minutes min, $profile build"

seconds=$((minutes * 60))
"$bin/relaybench" load --addr "$addr" --conns "$conns" --rate "$rate" --seconds "$seconds" --warmup 1 --json >"$work/load.json" &
load_pid=$!

sample() {
  for p in $pids; do
    rss=$(awk '/^RssAnon:/ {print $2}' /proc/"$p"/status 2>/dev/null || echo 0)
    fds=$(ls /proc/"$p"/fd 2>/dev/null | wc -l)
    echo "$1 $p $rss $fds"
  done
}
interval=$(( seconds >= 600 ? 30 : 10 ))
t=0
while kill -0 "$load_pid" 2>/dev/null; do
  sample "$t" >>"$work/samples"
  sleep "$interval"; t=$((t + interval))
done
wait "$load_pid" || true
sample "$t" >>"$work/samples"

python3 - "$work/samples" "$work/load.json" "$seconds" <<'PY'
import json, sys
samples, load, seconds = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
rows = [l.split() for l in open(samples)]
warm = max(20, seconds // 5)  # the first fifth (at least 20 s) is warm-up
ok = True
print(f"{'pid':>8} {'private after warm-up':>22} {'private end':>12} {'growth':>8} {'fds after warm-up':>18} {'fds end':>8}")
for pid in sorted({r[1] for r in rows}, key=int):
    series = [(int(r[0]), int(r[2]), int(r[3])) for r in rows if r[1] == pid]
    after = [s for s in series if s[0] >= warm] or series[-1:]
    base, end = after[0], after[-1]
    peak = max(s[1] for s in after)
    growth = (peak - base[1]) / max(base[1], 1) * 100
    flat = growth <= 5 and end[2] <= base[2]
    ok &= flat
    print(f"{pid:>8} {base[1]:>18} KiB {end[1]:>8} KiB {growth:>7.1f}% {base[2]:>18} {end[2]:>8} {'' if flat else '  <- grew'}")
lost = load["errors"] + load["mismatches"] + load["unanswered"]
print(f"requests {load['requests']} at {load['req_per_sec']:.0f}/s, p99 {load['p99_us']} us; "
      f"errors {load['errors']}, mismatches {load['mismatches']}, unanswered {load['unanswered']}")
if lost:
    ok = False
print("soak: PASS (memory and fds flat within 5% after warm-up, no request lost)" if ok else "soak: FAIL")
sys.exit(0 if ok else 1)
PY
