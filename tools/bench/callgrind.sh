#!/usr/bin/env bash
# User-space instructions per request of the relay's echo worker and of its front (issue 14),
# counted by valgrind's callgrind: a figure that a loaded machine does not skew (timings do).
#
# The relay runs natively with 1 front and 1 echo worker, except the process measured:
#   worker pass  the worker runs under callgrind (--worker-cmd "valgrind ... shmrelay worker echo")
#   front pass   the supervisor runs under callgrind with --trace-children=yes, skipping the
#                worker (--trace-children-skip-by-arg=worker), so the front is traced
# (the supervisor starts fronts itself; that is its only hook). Hang detection is relaxed
# (kill_hung=false, hang_timeout_ms=600000): under callgrind a process is ~50x slower.
# For each pass: a short warm-up load, then the counters are zeroed (callgrind_control -z), one
# closed-loop load runs (relaybench load, default 100 connections x depth 16 x 64 B for
# --seconds), the counters are dumped (callgrind_control -d) and divided by the replies the load
# got (every reply of the run, drain included). Printed: total Ir per request and the top
# functions (self cost, Ir per request). Under callgrind the traced process is slow, so requests
# queue up and batches are larger than in a native run: compare builds with this script, not
# with perf figures.
#
# Usage: tools/bench/callgrind.sh [--pass worker|front|both] [--size B] [--conns N] [--depth N]
#                                 [--seconds S] [--top N] [--label NAME] [--out DIR]
#                                 [--bin DIR] [--no-build]
# --bin DIR: take shmrelay from DIR (e.g. an older commit's target/release) instead of building
# this tree; relaybench always comes from this tree (only the client).
# Results: OUT/callgrind-LABEL-PASS.txt and the callgrind files (default OUT: target/callgrind).
# Needs valgrind (apt-get install valgrind).
set -euo pipefail
PASS=both; SIZE=64; CONNS=100; DEPTH=16; SECS=20; TOP=10; LABEL=""; OUT=""; BIN_DIR=""; BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --pass) PASS="$2"; shift 2 ;;
        --size) SIZE="$2"; shift 2 ;;
        --conns) CONNS="$2"; shift 2 ;;
        --depth) DEPTH="$2"; shift 2 ;;
        --seconds) SECS="$2"; shift 2 ;;
        --top) TOP="$2"; shift 2 ;;
        --label) LABEL="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --bin) BIN_DIR="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "callgrind.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$PASS" in worker) PASSES=worker ;; front) PASSES=front ;; both) PASSES="worker front" ;;
    *) echo "callgrind.sh: --pass is worker, front or both" >&2; exit 2 ;; esac
die() { echo "callgrind.sh: $*" >&2; exit 1; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
for t in valgrind callgrind_control callgrind_annotate; do
    command -v "$t" >/dev/null || die "$t is missing (apt-get install valgrind)"
done
[ -n "$OUT" ] || OUT="$ROOT/target/callgrind"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
# The release profile keeps line tables (debug = 1), which is what the function names need.
[ "$BUILD" = 1 ] && cargo build --release -q -p shmrelay -p shmrelay-tools
TARGET="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
SHMRELAY="${BIN_DIR:-$TARGET}/shmrelay"
BENCH="$TARGET/relaybench"
[ -x "$SHMRELAY" ] || die "$SHMRELAY is missing"
[ -x "$BENCH" ] || die "$BENCH is missing (cargo build --release -p shmrelay-tools)"
[ -n "$LABEL" ] || LABEL="$(git rev-parse --short HEAD 2>/dev/null || echo build)"

TMP="$(mktemp -d /tmp/shmrelay-callgrind.XXXXXX)"
SP=""
INSTANCE=""
stop_relay() {
    [ -n "$SP" ] || return 0
    stop_pid "$SP"
    wait "$SP" 2>/dev/null || true
    rm -f /dev/shm/shmrelay."$INSTANCE".* 2>/dev/null || true
    SP=""
}
cleanup() {
    local rc=$?
    trap - EXIT
    stop_relay
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
# shellcheck source=tools/bench/lib.sh
. "$ROOT/tools/bench/lib.sh"

# The pid of SP's child whose command line contains WORD (waits for it).
child_with() {
    local word=$1 p
    for _ in $(seq 600); do
        for p in $(pgrep -P "$SP" || true); do
            if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "$word"; then
                echo "$p"; return 0
            fi
        done
        sleep 0.1
    done
    die "no child of the supervisor runs '$word'"
}

load() { # SECONDS JSON-FILE
    "$BENCH" load --addr "127.0.0.1:$PORT" --conns "$CONNS" --size "$SIZE" --depth "$DEPTH" \
        --seconds "$1" --warmup 0.5 --drain 10 --threads 1 --json >"$2"
}

for pass in $PASSES; do
    PORT=$(free_ports 1)
    INSTANCE="cg-$$-$pass"
    rm -f /dev/shm/shmrelay."$INSTANCE".* 2>/dev/null || true
    rm -f "$OUT/callgrind.$LABEL.$pass".*
    common=(--listen "127.0.0.1:$PORT" --instance "$INSTANCE" --workers 1 --fronts 1 --drain-ms 300
        --set kill_hung=false --set hang_timeout_ms=600000)
    vg=(valgrind --tool=callgrind "--callgrind-out-file=$OUT/callgrind.$LABEL.$pass.%p")
    if [ "$pass" = worker ]; then
        "$SHMRELAY" "${common[@]}" --worker-cmd "${vg[*]} $SHMRELAY worker echo" >"$TMP/relay.log" 2>&1 &
        SP=$!
        wait_port "$PORT" "$SP" shmrelay "$TMP/relay.log"
        TARGET_PID=$(child_with callgrind)
    else
        "${vg[@]}" --trace-children=yes --trace-children-skip-by-arg=worker \
            "$SHMRELAY" "${common[@]}" >"$TMP/relay.log" 2>&1 &
        SP=$!
        wait_port "$PORT" "$SP" shmrelay "$TMP/relay.log"
        TARGET_PID=$(child_with front)
    fi
    echo "[callgrind] $LABEL $pass pass: pid $TARGET_PID; warm-up" >&2
    load 2 "$TMP/warm.json"
    callgrind_control -z "$TARGET_PID" >/dev/null || die "callgrind_control -z $TARGET_PID failed"
    echo "[callgrind] $LABEL $pass pass: $CONNS conns x depth $DEPTH x $SIZE B for ${SECS}s" >&2
    load "$SECS" "$TMP/load.json"
    callgrind_control -d "$TARGET_PID" >/dev/null || die "callgrind_control -d $TARGET_PID failed"
    DUMP=$(ls -t "$OUT/callgrind.$LABEL.$pass.$TARGET_PID".* 2>/dev/null | head -1)
    [ -n "$DUMP" ] || die "no callgrind dump of pid $TARGET_PID in $OUT"
    stop_relay
    python3 - "$TMP/load.json" "$DUMP" "$LABEL" "$pass" "$TOP" "$CONNS" "$DEPTH" "$SIZE" <<'PY' \
        | tee "$OUT/callgrind-$LABEL-$pass.txt"
# Self cost per function from the callgrind file itself (callgrind_annotate mis-assigns the
# costs of the frames that were on the stack when the counters were zeroed). Format: `fn=`
# names the function the following cost lines belong to; the cost line right after `calls=`
# is the inclusive cost of a call, not self cost. Names are compressed as "(id) name" once,
# "(id)" after; `fn=` and `cfn=` share one table.
import collections, json, re, sys
load_file, dump, label, who, top, conns, depth, size = sys.argv[1:9]
reqs = json.load(open(load_file))
errors, unanswered, reqs = reqs["errors"], reqs["unanswered"], reqs["replies"]
names, cost, total = {}, collections.Counter(), None
fn, after_call = None, False
for line in open(dump):
    if line.startswith(("fn=", "cfn=")):
        m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
        name = m.group(2) if m else line.split("=", 1)[1].strip()
        if m and m.group(2) is not None:
            names[m.group(1)] = name
        elif m:
            name = names[m.group(1)]
        if line.startswith("fn="):
            fn = name
    elif line.startswith("calls="):
        after_call = True
    elif line[:1] in "0123456789+-*":
        if after_call:
            after_call = False
        else:
            cost[fn] += int(line.split()[-1])
    elif line.startswith(("totals:", "summary:")):
        total = int(line.split()[1])
total = total or sum(cost.values())
if reqs == 0:
    sys.exit("callgrind.sh: the load got no replies")
print(f"# {label} {who}: {total / reqs:.1f} user-space instructions per request "
      f"({total:,} Ir / {reqs:,} replies; {conns} conns x depth {depth} x {size} B; "
      f"errors {errors}, unanswered {unanswered})")
print(f"# dump: {dump}")
print("# Ir/request  share  function (self cost)")
for name, n in cost.most_common(int(top)):
    print(f"{n / reqs:9.1f} {100 * n / total:5.1f}%  {name[:150]}")
PY
done
