#!/usr/bin/env bash
# Connections at scale (issue 4): hold many idle connections with heartbeats against a real
# shmrelay and measure what the relay spends on them.
#
#   tools/bench/scale.sh            100,000 connections for 300 s over 6 fronts (about 7 minutes)
#   tools/bench/scale.sh --quick    10,000 connections for 30 s over 2 fronts (about 1 minute)
#   tools/bench/scale.sh --memory   resident memory with 0 and with 10,000 idle connections
#                                   (what tools/bench/memory.sh runs)
#   tools/bench/scale.sh --million  1,000,000 connections held 10 minutes, clients beating and
#                                   clients only answering pings, with samples over time, an SVG
#                                   chart and bytes per connection against the anchors (issue 15;
#                                   tools/bench/million.py, its options: --million --help)
#
# Options (after the mode): --conns N --seconds S --fronts F --workers W --procs P
#   --src-ips LIST --heartbeat S --sample S --settle S --out DIR
#   --no-build (use the release binaries already built in the target directory)
#   --relay-set KEY=VALUE (repeatable: passed to shmrelay as --set, e.g. ping_min_ms=45000)
#
# It builds in release (cargo build --release -p shmrelay -p shmrelay-tools), starts shmrelay
# on a free loopback port with its own instance name, measures the relay at idle, runs
# `relaybench hold`, samples the relay every --sample seconds (connections open from
# `relayctl stat --json`, resident memory and CPU time of the supervisor, fronts and workers
# from /proc), and prints a summary. Everything it started is stopped on exit and the
# instance's /dev/shm/shmrelay.<instance>.* files are removed. Raw data (samples, the hold
# report, logs) stays in --out (default: a new directory under ${TMPDIR:-/tmp}).
#
# Loopback only. The load generator shares the machine with the relay; the load average is
# printed next to every figure because other work on the machine skews CPU figures.
set -euo pipefail

MODE=scale
CONNS=100000 SECONDS_HOLD=300 FRONTS=6 WORKERS=2 PROCS=8 SRC_IPS=127.0.0.2-127.0.0.9
HEARTBEAT=30 SAMPLE=10 SETTLE=30 OUT="" BUILD=1
RELAY_SETS=()
case "${1:-}" in
--million)
    shift
    exec python3 "$(dirname "$0")/million.py" "$@" ;;
--quick)
    MODE=quick; CONNS=10000 SECONDS_HOLD=30 FRONTS=2 PROCS=2 SRC_IPS=127.0.0.2-127.0.0.3
    SAMPLE=5 SETTLE=5
    shift ;;
--memory)
    MODE=memory; CONNS=10000 SECONDS_HOLD=20 FRONTS=2 PROCS=1 SRC_IPS=127.0.0.2-127.0.0.3
    SAMPLE=5 SETTLE=5
    shift ;;
esac
while [ $# -gt 0 ]; do
    case "$1" in
    --conns) CONNS=$2; shift 2 ;;
    --seconds) SECONDS_HOLD=$2; shift 2 ;;
    --fronts) FRONTS=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --procs) PROCS=$2; shift 2 ;;
    --src-ips) SRC_IPS=$2; shift 2 ;;
    --heartbeat) HEARTBEAT=$2; shift 2 ;;
    --sample) SAMPLE=$2; shift 2 ;;
    --settle) SETTLE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --relay-set) RELAY_SETS+=(--set "$2"); shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "scale.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
INSTANCE="scale-$$"
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/shmrelay-$MODE.XXXXXX")}
mkdir -p "$OUT"
RELAY_PID="" HOLD_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$HOLD_PID" ] && kill -0 "$HOLD_PID" 2>/dev/null; then
        kill "$HOLD_PID" 2>/dev/null || true # its children die with it (PR_SET_PDEATHSIG)
        wait "$HOLD_PID" 2>/dev/null || true
    fi
    if [ -n "$RELAY_PID" ] && kill -0 "$RELAY_PID" 2>/dev/null; then
        kill -TERM "$RELAY_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$RELAY_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$RELAY_PID" 2>/dev/null; then
            # Its fronts and workers die with the supervisor.
            kill -KILL "$RELAY_PID" 2>/dev/null || true
        fi
        wait "$RELAY_PID" 2>/dev/null || true
    fi
    rm -f /dev/shm/shmrelay."$INSTANCE".* 2>/dev/null || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '%s\n' "$*" >&2; }

# --- build --------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
    log "building (release)..."
    cargo build --release -q -p shmrelay -p shmrelay-tools
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')}
BIN="$TARGET_DIR/release"
for b in shmrelay relaybench relayctl; do
    [ -x "$BIN/$b" ] || { log "scale.sh: $BIN/$b not found"; exit 1; }
done

# --- helpers ------------------------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
load1() { cut -d' ' -f1 /proc/loadavg; }

# The supervisor and all its descendants.
relay_pids() {
    ps -e -o pid=,ppid= | awk -v root="$RELAY_PID" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            keep[root] = 1; changed = 1
            while (changed) {
                changed = 0
                for (i in pids) { p = pids[i]; if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } }
            }
            for (p in keep) print p
        }'
}

# "rss_kb anon_kb shmem_kb cpu_ticks nprocs" summed over the relay's processes.
relay_usage() {
    local p rss=0 anon=0 shm=0 ticks=0 n=0 r a s t
    for p in $(relay_pids); do
        [ -r "/proc/$p/status" ] || continue
        read -r r a s < <(awk '/^VmRSS:/ {r=$2} /^RssAnon:/ {a=$2} /^RssShmem:/ {s=$2}
            END {print r+0, a+0, s+0}' "/proc/$p/status" 2>/dev/null || echo "0 0 0")
        t=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        rss=$((rss + r)) anon=$((anon + a)) shm=$((shm + s)) ticks=$((ticks + ${t:-0})) n=$((n + 1))
    done
    echo "$rss $anon $shm $ticks $n"
}

# "pid ticks ctxsw role" of every relay process (ctxsw: voluntary context switches, i.e. the
# times it went to sleep; role: the command line after the binary).
per_proc_ticks() {
    local p t cs role
    for p in $(relay_pids); do
        t=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || continue
        cs=$(awk '/^voluntary_ctxt_switches:/ {print $2}' "/proc/$p/status" 2>/dev/null) || cs=0
        role=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | awk '{$1 = ""; sub(/^ /, ""); print ($0 == "" ? "supervisor" : $0)}' | cut -c1-40)
        [ "$p" = "$RELAY_PID" ] && role="supervisor"
        echo "$p ${t:-0} ${cs:-0} $role"
    done | sort -n
}

# `relayctl stat --json` of the instance (its exit status 1 only means "problems listed").
relay_report() {
    "$BIN/relayctl" --json stat --interval 0 "$INSTANCE" 2>/dev/null || true
}

# Connections open in the relay (all fronts), from a report on stdin.
report_conns() {
    local n
    n=$(grep -m1 -o '"connections": *[0-9]*' | grep -o '[0-9]*$') || true
    echo "${n:-?}"
}

# "heartbeat_timeout_closes heartbeats_in pings_out" summed over fronts, from a report.
report_beats() {
    if command -v jq >/dev/null; then
        jq -r '[([.fronts[].closes.heartbeat_timeout] | add), ([.fronts[].heartbeats] | add),
            ([.fronts[].pings_sent] | add)] | map(. // 0) | map(tostring) | join(" ")' 2>/dev/null || echo "? ? ?"
    else
        echo "? ? ?"
    fi
}

# Closes by reason (sum over fronts) as "reason=n ..." for the non-zero ones, from a report.
report_closes() {
    if command -v jq >/dev/null; then
        jq -r '[.fronts[].closes | to_entries[]] | group_by(.key)
            | map({k: .[0].key, v: (map(.value) | add)}) | map(select(.v > 0))
            | map("\(.k)=\(.v)") | join(" ") | if . == "" then "none" else . end' 2>/dev/null || echo "?"
    else
        echo "(install jq for closes by reason)"
    fi
}

# Problems the report lists (leaks, growth, stalls), one line.
report_problems() {
    if command -v jq >/dev/null; then
        jq -r '.problems | if length == 0 then "none" else join("; ") end' 2>/dev/null || echo "?"
    else
        echo "(install jq)"
    fi
}

# Kernel slab memory, KiB (machine-wide).
kernel_slab() { awk '/^Slab:/ {print $2}' /proc/meminfo; }

# --- start the relay ----------------------------------------------------------------------
log "uptime before start: $(uptime)"
# A little over the connections asked for; more than the fronts' fds hold is refused at start.
MAX_CONNS=$((CONNS + CONNS / 50 + 100))
"$BIN/shmrelay" --fronts "$FRONTS" --workers "$WORKERS" --max-conns "$MAX_CONNS" \
    --instance "$INSTANCE" --listen 127.0.0.1:0 ${RELAY_SETS[@]+"${RELAY_SETS[@]}"} >"$OUT/relay.log" 2>&1 &
RELAY_PID=$!
ADDR=""
for _ in $(seq 1 300); do
    ADDR=$(sed -n 's/^shmrelay: listening on \([^ ]*\).*/\1/p' "$OUT/relay.log" | head -1)
    [ -n "$ADDR" ] && break
    kill -0 "$RELAY_PID" 2>/dev/null || { log "shmrelay exited:"; cat "$OUT/relay.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$ADDR" ] || { log "shmrelay did not start listening within 30 s"; exit 1; }
log "shmrelay pid $RELAY_PID listening on $ADDR (instance $INSTANCE, $FRONTS fronts, $WORKERS workers)"

# --- idle ---------------------------------------------------------------------------------
sleep 3
IDLE_SECS=10
read -r IDLE_RSS IDLE_ANON IDLE_SHM IDLE_T0 NPROCS <<<"$(relay_usage)"
K_SLAB0=$(kernel_slab)
IDLE_LOAD=$(load1)
sleep "$IDLE_SECS"
read -r _ _ _ IDLE_T1 _ <<<"$(relay_usage)"
IDLE_CPU=$(awk -v d=$((IDLE_T1 - IDLE_T0)) -v s="$IDLE_SECS" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", 100 * d / hz / s}')
log "idle: $NPROCS relay processes, RSS $((IDLE_RSS / 1024)) MiB (anon $((IDLE_ANON / 1024)) MiB, shmem $((IDLE_SHM / 1024)) MiB), CPU ${IDLE_CPU}% of one core over ${IDLE_SECS} s (load $IDLE_LOAD)"

# --- hold ---------------------------------------------------------------------------------
HOLD_ARGS=(hold --addr "$ADDR" --conns "$CONNS" --procs "$PROCS" --src-ips "$SRC_IPS"
    --seconds "$SECONDS_HOLD" --heartbeat "$HEARTBEAT" --server-pid "$RELAY_PID" --json)
log "relaybench ${HOLD_ARGS[*]}"
"$BIN/relaybench" "${HOLD_ARGS[@]}" >"$OUT/hold.json" 2>"$OUT/hold.log" &
HOLD_PID=$!
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

printf 't_s\tphase\tconns\thb_timeouts\trss_mib\tanon_mib\tcpu_pct\tload1\n' >"$OUT/samples.tsv"
printf '%7s  %-7s %8s %8s %9s %9s %8s %6s\n' t_s phase conns hb_tmo rss_MiB anon_MiB cpu_%1c load1 >&2
HOLD_AT="" STEADY_T0="" STEADY_TICKS0="" PREV_T="" PREV_TICKS="" LAST_T="" LAST_TICKS=""
MEM_RSS="" MEM_ANON="" MEM_CONNS="" MEM_LOAD=""
next_sample=0
while kill -0 "$HOLD_PID" 2>/dev/null; do
    now=$(elapsed)
    if [ -z "$HOLD_AT" ] && grep -q 'holding for' "$OUT/hold.log" 2>/dev/null; then
        HOLD_AT=$now
        log "$(grep -m1 'holding for' "$OUT/hold.log")"
        next_sample=0 # sample right away
    fi
    if awk -v n="$now" -v s="$next_sample" 'BEGIN {exit !(n >= s)}'; then
        read -r rss anon _ ticks _ <<<"$(relay_usage)"
        relay_report >"$OUT/report.json"
        conns=$(report_conns <"$OUT/report.json")
        read -r tmo beats pings <<<"$(report_beats <"$OUT/report.json")"
        l=$(load1)
        phase=ramp
        [ -n "$HOLD_AT" ] && phase=hold
        if [ -n "$HOLD_AT" ] && awk -v n="$now" -v h="$HOLD_AT" -v s="$SETTLE" 'BEGIN {exit !(n >= h + s)}'; then
            phase=steady
            if [ -z "$STEADY_T0" ]; then
                STEADY_T0=$now STEADY_TICKS0=$ticks STEADY_BEATS0=$beats STEADY_PINGS0=$pings
                per_proc_ticks >"$OUT/ticks0.txt"
                K_SLAB1=$(kernel_slab)
            fi
            # Only samples taken well inside the hold window count (not the last one, which
            # may see connections closing).
            if awk -v n="$now" -v h="$HOLD_AT" -v s="$SECONDS_HOLD" -v p="$SAMPLE" 'BEGIN {exit !(n <= h + s - p / 2)}'; then
                LAST_T=$now LAST_TICKS=$ticks LAST_BEATS=$beats LAST_PINGS=$pings
                per_proc_ticks >"$OUT/ticks1.txt"
                MEM_RSS=$rss MEM_ANON=$anon MEM_CONNS=$conns MEM_LOAD=$l
                cp "$OUT/report.json" "$OUT/report-steady.json"
            fi
        fi
        cpu="-"
        if [ -n "$PREV_T" ]; then
            cpu=$(awk -v d=$((ticks - PREV_TICKS)) -v a="$PREV_T" -v b="$now" -v hz="$CLK_TCK" \
                'BEGIN {printf "%.2f", (b > a) ? 100 * d / hz / (b - a) : 0}')
        fi
        PREV_T=$now PREV_TICKS=$ticks
        printf '%s\t%s\t%s\t%s\t%.1f\t%.1f\t%s\t%s\n' "$now" "$phase" "$conns" "$tmo" \
            "$(echo "$rss / 1024" | bc -l)" "$(echo "$anon / 1024" | bc -l)" "$cpu" "$l" >>"$OUT/samples.tsv"
        printf '%7s  %-7s %8s %8s %9.1f %9.1f %8s %6s\n' "$now" "$phase" "$conns" "$tmo" \
            "$(echo "$rss / 1024" | bc -l)" "$(echo "$anon / 1024" | bc -l)" "$cpu" "$l" >&2
        next_sample=$(awk -v n="$now" -v p="$SAMPLE" 'BEGIN {print n + p}')
    fi
    sleep 0.5
done
HOLD_RC=0
wait "$HOLD_PID" || HOLD_RC=$?
HOLD_PID=""
sleep 1
relay_report >"$OUT/report-end.json"
CLOSES=$(report_closes <"$OUT/report-end.json")
PROBLEMS="none"
[ -s "$OUT/report-steady.json" ] && PROBLEMS=$(report_problems <"$OUT/report-steady.json")
[ -s "$OUT/hold.json" ] || { log "relaybench hold failed ($HOLD_RC):"; cat "$OUT/hold.log" >&2; exit 1; }
HOLD_JSON=$(cat "$OUT/hold.json")
field() { grep -o "\"$1\":[^,}]*" <<<"$HOLD_JSON" | head -1 | cut -d: -f2; }

# --- summary ------------------------------------------------------------------------------
OPENED=$(field opened) OPEN_END=$(field open_at_end) SERVER_CLOSES=$(field server_closes)
CONNECT_ERR=$(field connect_errors) RAMP=$(field ramp_secs)
if [ -n "$STEADY_T0" ] && [ -n "$LAST_T" ] && awk -v a="$STEADY_T0" -v b="$LAST_T" 'BEGIN {exit !(b > a)}'; then
    STEADY_CPU=$(awk -v d=$((LAST_TICKS - STEADY_TICKS0)) -v a="$STEADY_T0" -v b="$LAST_T" -v hz="$CLK_TCK" \
        'BEGIN {printf "%.2f", 100 * d / hz / (b - a)}')
    STEADY_SPAN=$(awk -v a="$STEADY_T0" -v b="$LAST_T" 'BEGIN {printf "%.0f", b - a}')
    STEADY_LOAD=$(awk -F'\t' '$2 == "steady" {s += $8; n++} END {if (n) printf "%.2f", s / n}' "$OUT/samples.tsv")
    BEAT_RATE=$(awk -v a="$STEADY_BEATS0" -v b="$LAST_BEATS" -v c="$STEADY_PINGS0" -v d="$LAST_PINGS" -v t0="$STEADY_T0" -v t1="$LAST_T" \
        'BEGIN {if (a ~ /^[0-9]+$/) printf "%.0f length-0 frames in/s, %.0f pings out/s", (b - a) / (t1 - t0), (d - c) / (t1 - t0); else print "?"}')
else
    STEADY_CPU="n/a" STEADY_SPAN=0 STEADY_LOAD="n/a" BEAT_RATE="n/a"
fi
per_conn() { # delta_kb conns -> bytes per connection
    awk -v d="$1" -v c="$2" 'BEGIN {if (c > 0) printf "%.0f", d * 1024 / c; else print "n/a"}'
}
if [ -n "$MEM_RSS" ]; then
    PER_CONN=$(per_conn $((MEM_RSS - IDLE_RSS)) "$MEM_CONNS")
    PER_CONN_ANON=$(per_conn $((MEM_ANON - IDLE_ANON)) "$MEM_CONNS")
    KSLAB=$(per_conn $((K_SLAB1 - K_SLAB0)) "$MEM_CONNS")
else
    PER_CONN="n/a" PER_CONN_ANON="n/a" KSLAB="n/a" MEM_RSS=0 MEM_ANON=0 MEM_CONNS="?"
fi

{
    echo
    echo "## shmrelay $MODE: $CONNS connections, $FRONTS fronts, $WORKERS workers, hold ${SECONDS_HOLD} s, heartbeat ${HEARTBEAT} s"
    echo
    echo "machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), kernel $(uname -r), $(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "shmrelay --fronts $FRONTS --workers $WORKERS --max-conns $MAX_CONNS --instance $INSTANCE --listen 127.0.0.1:0 ${RELAY_SETS[*]:-}"
    echo "relaybench ${HOLD_ARGS[*]}"
    echo
    echo "| figure | value | load avg (1 min) |"
    echo "|---|---|---|"
    echo "| connections opened / held at the end | $OPENED / $OPEN_END (connect errors $CONNECT_ERR, ramp $(printf '%.1f' "$RAMP") s) | |"
    echo "| closed by the server (client's count) | $SERVER_CLOSES | |"
    echo "| relay closes by reason (all fronts, the client's own closes at the end included) | $CLOSES | |"
    echo "| problems relayctl listed in steady state | $PROBLEMS | |"
    echo "| relay CPU at idle, all $NPROCS processes | ${IDLE_CPU}% of one core | $IDLE_LOAD |"
    echo "| relay CPU in steady state (${STEADY_SPAN} s from ${SETTLE} s after the ramp) | ${STEADY_CPU}% of one core | $STEADY_LOAD |"
    echo "| relay heartbeat traffic in steady state (all fronts) | $BEAT_RATE | |"
    echo "| relay CPU over the whole hold window (relaybench) | $(field server_cpu_percent | xargs printf '%.2f')% of one core | |"
    echo "| relay RSS at 0 connections | $((IDLE_RSS / 1024)) MiB (anon $((IDLE_ANON / 1024)) MiB, shmem $((IDLE_SHM / 1024)) MiB) | $IDLE_LOAD |"
    echo "| relay RSS at $MEM_CONNS connections | $((MEM_RSS / 1024)) MiB (anon $((MEM_ANON / 1024)) MiB) | $MEM_LOAD |"
    echo "| user-space bytes per connection (VmRSS delta / conns) | $PER_CONN B | |"
    echo "| of which private heap (RssAnon delta / conns) | $PER_CONN_ANON B | |"
    echo "| kernel slab growth per connection, both ends of loopback (machine-wide, noisy) | $KSLAB B | |"
    echo "| client: CPU over the hold window / RSS at the end | $(field client_cpu_seconds | xargs printf '%.2f') s / $(($(field client_rss_kb) / 1024)) MiB | |"
    echo "| client heartbeats sent / answered / skipped, pings answered | $(field heartbeats_sent) / $(field heartbeats_answered) / $(field heartbeats_skipped), $(field pings_answered) | |"
    if [ -s "$OUT/ticks0.txt" ] && [ -s "$OUT/ticks1.txt" ] && [ "$STEADY_SPAN" != 0 ]; then
        echo
        echo "steady state by process (over ${STEADY_SPAN} s; sleeps: voluntary context switches, i.e. wakeups):"
        echo
        echo "| pid | process | CPU % of one core | sleeps/s | CPU us per wakeup |"
        echo "|---|---|---|---|---|"
        awk -v span="$STEADY_SPAN" -v hz="$CLK_TCK" '
            NR == FNR {t0[$1] = $2; c0[$1] = $3; next}
            ($1 in t0) {role = $4; for (i = 5; i <= NF; i++) role = role " " $i
                        cpu = ($2 - t0[$1]) / hz; cs = $3 - c0[$1]
                        printf "| %s | %s | %.2f | %.0f | %s |\n", $1, role, 100 * cpu / span, cs / span,
                            (cs > 0 ? sprintf("%.0f", 1e6 * cpu / cs) : "-")}' \
            "$OUT/ticks0.txt" "$OUT/ticks1.txt"
    fi
    echo
    echo "raw data: $OUT (samples.tsv, hold.json, hold.log, relay.log)"
} | tee "$OUT/summary.md"

if [ "$OPENED" != "$CONNS" ] || [ "$OPEN_END" != "$OPENED" ]; then
    log "scale.sh: not every connection was opened and held"
    exit 1
fi
