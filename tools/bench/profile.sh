#!/usr/bin/env bash
# Where the server's CPU goes per request (issue 6): shmrelay's front and worker, or tokio-echo,
# under the same closed-loop load as tools/bench/compare.sh.
#
# Software counters only (this VM has no hardware counters): perf stat attached to every server
# process for the whole load (task-clock, context switches and the I/O system calls, from
# tracepoints) plus user/system time from /proc, divided by the replies the load generator got.
# With --callgrind the servers run under valgrind's callgrind instead (user-space instruction
# counts per function; ~50x slower, so compare proportions, not rates): the files are left in OUT.
#
# Usage: tools/bench/profile.sh [--system shmrelay|tokio] [--size BYTES] [--conns N] [--depth N]
#                               [--seconds N] [--client-threads N] [--nice N] [--callgrind]
#                               [--out DIR] [--no-build]
# Results: OUT/profile-SYSTEM-SIZE-CONNS.txt (default OUT: target/compare/profile).
set -euo pipefail
ORIG_ARGS=("$@")
SYSTEM=shmrelay; SIZE=64; CONNS=1000; DEPTH=16; SECS=8; CLIENT_THREADS=2; NICE=0; CG=0; OUT=""; BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --system) SYSTEM="$2"; shift 2 ;;
        --size) SIZE="$2"; shift 2 ;;
        --conns) CONNS="$2"; shift 2 ;;
        --depth) DEPTH="$2"; shift 2 ;;
        --seconds) SECS="$2"; shift 2 ;;
        --client-threads) CLIENT_THREADS="$2"; shift 2 ;;
        --nice) NICE="$2"; shift 2 ;;
        --callgrind) CG=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "profile.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$SYSTEM" in shmrelay|tokio) ;; *) echo "profile.sh: --system is shmrelay or tokio" >&2; exit 2 ;; esac
# As in compare.sh: with autogroup scheduling, a session of our own whose nice is raised.
if [ "$NICE" != 0 ] && [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ] &&
    [ -z "${COMPARE_AUTOGROUP:-}" ]; then
    COMPARE_AUTOGROUP=1 exec setsid -w "$0" "${ORIG_ARGS[@]}"
fi
die() { echo "profile.sh: $*" >&2; exit 1; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
[ -n "$OUT" ] || OUT="$ROOT/target/compare/profile"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
[ "$BUILD" = 1 ] && cargo build --release -q -p shmrelay -p shmrelay-tools -p shmrelay-examples
BIN="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
command -v perf >/dev/null || [ "$CG" = 1 ] || die "perf is missing (apt-get install linux-perf)"
command -v valgrind >/dev/null || [ "$CG" = 0 ] || die "valgrind is missing"
if [ "$NICE" != 0 ]; then
    renice -n "$NICE" -p $$ >/dev/null || die "cannot set niceness $NICE"
    [ -n "${COMPARE_AUTOGROUP:-}" ] && echo "$NICE" >/proc/self/autogroup
fi

INSTANCE="prof-$$"
TMP="$(mktemp -d /tmp/shmrelay-profile.XXXXXX)"
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f /dev/shm/shmrelay."$INSTANCE".* 2>/dev/null || true
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
# shellcheck source=tools/bench/lib.sh
. "$ROOT/tools/bench/lib.sh"
PORT=$(free_ports 1)

TAG="$SYSTEM-$SIZE-$CONNS"
VG=()
[ "$CG" = 1 ] && VG=(valgrind --tool=callgrind --trace-children=yes "--callgrind-out-file=$OUT/callgrind.$TAG.%p")
if [ "$SYSTEM" = shmrelay ]; then
    # Hang detection off: under callgrind a busy front may look hung.
    "${VG[@]}" "$BIN/shmrelay" --listen "127.0.0.1:$PORT" --instance "$INSTANCE" --workers 1 --fronts 1 \
        --drain-ms 300 --set kill_hung=false --set hang_timeout_ms=600000 >"$TMP/server.log" 2>&1 &
else
    "${VG[@]}" "$BIN/tokio-echo" --listen "127.0.0.1:$PORT" --threads 1 >"$TMP/server.log" 2>&1 &
fi
SP=$!; PIDS+=("$SP")
wait_port "$PORT" "$SP" "$SYSTEM" "$TMP/server.log"
TARGETS="$SP"
if [ "$SYSTEM" = shmrelay ]; then
    # The front and the worker (the supervisor listens before it has started them).
    for _ in $(seq 600); do
        [ "$(pgrep -P "$SP" | wc -l)" -ge 2 ] && break
        sleep 0.05
    done
    TARGETS="$(pgrep -P "$SP" | xargs)" || die "the supervisor started no front or worker"
    [ "$CG" = 1 ] && sleep 3   # let the children finish starting under valgrind
fi
pidlist=$(echo "$TARGETS" | tr ' ' ',')
times() { for p in $TARGETS; do echo "$p $(cut -d' ' -f14,15 "/proc/$p/stat") $(tr '\0' ' ' <"/proc/$p/cmdline" | cut -c1-60)"; done; }
times >"$TMP/t0"
if [ "$CG" = 0 ]; then
    EV=task-clock,context-switches,cpu-migrations
    for s in readv writev read write recvfrom sendto epoll_wait futex; do EV="$EV,syscalls:sys_enter_$s"; done
    perf stat -x, --per-thread -e "$EV" -p "$pidlist" -o "$TMP/perf.csv" &
    PERF=$!; PIDS+=("$PERF")
    sleep 0.3
fi
"$BIN/relaybench" load --addr "127.0.0.1:$PORT" --conns "$CONNS" --size "$SIZE" --depth "$DEPTH" \
    --seconds "$SECS" --warmup 1 --threads "$CLIENT_THREADS" --server-pid "$SP" --json >"$TMP/load.json"
if [ "$CG" = 0 ]; then kill -INT "$PERF"; wait "$PERF" 2>/dev/null || true; fi
times >"$TMP/t1"
[ "$SYSTEM" = shmrelay ] && "$BIN/relayctl" stat --json "$INSTANCE" --interval 0 >"$TMP/stat.json"

python3 - "$TMP" "$SYSTEM $SIZE B, $CONNS conns, depth $DEPTH" "$CG" <<'PY' | tee "$OUT/profile-$TAG.txt"
import json, os, sys
tmp, title, cg = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
load = json.load(open(f"{tmp}/load.json"))
reqs = load["replies"]  # every reply of the run (warm-up and drain included), as perf saw them
print(f"# {title}: {load['req_per_sec']:,.0f} req/s in the window, p50 {load['p50_us']} us, "
      f"p99 {load['p99_us']} us, {reqs:,} replies in all")
hz = os.sysconf("SC_CLK_TCK")
t0 = {l.split()[0]: l.split() for l in open(f"{tmp}/t0")}
for line in open(f"{tmp}/t1"):
    f = line.split()
    a = t0[f[0]]
    u, s = (int(f[1]) - int(a[1])) / hz, (int(f[2]) - int(a[2])) / hz
    tot = u + s
    print(f"pid {f[0]} ({' '.join(f[3:])}): user {u:.2f} s, system {s:.2f} s "
          f"({100 * s / tot if tot else 0:.0f}% in the kernel), {1e9 * tot / reqs:.0f} ns per request")
if not cg and os.path.exists(f"{tmp}/perf.csv"):
    per = {}
    for line in open(f"{tmp}/perf.csv"):
        f = line.strip().split(",")
        if len(f) < 4 or line.startswith("#"):
            continue
        try:
            v = float(f[1])
        except ValueError:
            continue
        per.setdefault(f[0], {})[f[3].replace("syscalls:sys_enter_", "")] = v
    for who, ev in per.items():
        parts = []
        for k, v in ev.items():
            if k == "task-clock":
                parts.append(f"task-clock {v * 1e6 / reqs:.0f} ns/req")
            elif v:
                parts.append(f"{k} {v / reqs:.4f}/req ({reqs / v:.1f} req per call)")
        print(f"{who}: " + ", ".join(parts))
if os.path.exists(f"{tmp}/stat.json"):
    fr = json.load(open(f"{tmp}/stat.json"))["fronts"][0]
    print(f"front: frames_in {fr['frames_in']:,}, bytes_copied {fr['bytes_copied']:,} "
          f"(copied/relayed {100 * fr['copied_ratio']:.3f}%)")
PY
[ "$CG" = 1 ] && echo "callgrind files: $OUT/callgrind.$TAG.* (callgrind_annotate --inclusive=no FILE)"
exit 0
