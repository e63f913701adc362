#!/usr/bin/env bash
# Side-by-side comparison (issue 6): shmrelay vs HAProxy vs nginx stream vs in-process tokio echo.
#
# One invocation, one load generator (`relaybench load`, closed loop), the same settings for
# every system:
#   shmrelay  shmrelay --workers 1 (one front + one built-in echo worker)
#   haproxy   HAProxy, TCP mode, nbthread 1, in front of tokio-echo --threads 1
#   nginx     nginx stream proxy, worker_processes 1, in front of tokio-echo --threads 1
#   tokio     tokio-echo --threads 1 alone (no second process: the upper bound)
#   cepoll    examples/c/epoll-echo.c (built here with cc -O2): a plain C epoll echo server in one
#             process and one thread, the hand-written upper bound (issue 14)
#   uring     uring-echo (examples/src/bin/uring-echo): the same echo on io_uring, one thread
#             (multishot receive into provided buffers, batched sends, one io_uring_enter per
#             loop turn): the prototype of an io_uring front's socket I/O (issue 14; not in the
#             default --systems)
# Cases: payload 64 B and 4 KiB x 100 and 1,000 connections, --depth 16 (change with options).
# Every server process (proxy, echo backend, shmrelay supervisor, front and worker) is passed as
# --server-pid, so the server CPU seconds are comparable. All four stacks are started once, on
# free loopback ports, and stay idle while another one is measured; for each case the systems run
# one after another (rotating the order), so a change in background load hits all of them alike.
# Before each measurement the script waits while a `relaybench hold` runs, and records the load
# average. Results: OUT/runs.jsonl (one line per run: the relaybench JSON plus context),
# OUT/results.json, OUT/table.md and OUT/compare.svg (throughput and p99 per case).
#
# Usage: tools/bench/compare.sh [--seconds N] [--warmup N] [--quick] [--out DIR]
#                               [--depth N] [--sizes "64 4096"] [--conns "100 1000"]
#                               [--systems "shmrelay haproxy nginx tokio cepoll"]
#                               [--client-threads N]
#                               [--max-load L [--max-load-wait S]] [--nice N] [--repeat N]
#                               [--no-build] [--no-install] [--baseline-bin PATH] [--no-hold-wait]
# --no-hold-wait: do not wait while a `relaybench hold` runs (on a machine shared with other
# benchmarks; the systems still alternate in every round, so a hold disturbs them alike).
# --baseline-bin PATH: also measure system `shmrelay-base`, another build of the shmrelay binary
# (e.g. an older commit: `git worktree add /tmp/base COMMIT && cargo build --release` there), run
# exactly like `shmrelay`, so a change is measured against its baseline in the same run.
# WebSocket systems (issue 16; tools/bench/websocket.sh runs them), loaded with
# `relaybench load --codec websocket` (masked binary messages; WS_KIND=text for text):
#   shmrelay-ws  shmrelay, one websocket listener, 1 front + the built-in echo worker
#   nginx-ws     nginx http proxy (Upgrade), worker_processes 1, in front of ws-echo --threads 1
#   ws-echo      ws-echo --threads 1 alone (tokio-tungstenite, in process: the upper bound)
# --nice N: run every server process and the load generator at niceness N (e.g. -10, needs
# root), the same for every system, so that other work on a shared machine disturbs the runs
# less. With autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled = 1) nice only
# ranks processes inside one session, so the script then re-runs itself in a new session
# (setsid) and sets that session's autogroup nice to N as well.
# --repeat N: measure every case N times (the systems take turns within each round); the report
# shows, per system and case, the run with the median req/s and the range over the N runs.
# --client-threads N: load generator threads (default 2, one per core here; one thread can
# saturate before the server does).
# --max-load: before each run, wait (at most --max-load-wait seconds, default 120) until the
# 1-minute load average is below L; the load average is recorded next to every figure anyway.
set -euo pipefail
ORIG_ARGS=("$@")

SECONDS_PER_RUN=5
WARMUP=1
QUICK=0
OUT=""
DEPTH=16
SIZES="64 4096"
CONNS="100 1000"
SYSTEMS="shmrelay haproxy nginx tokio cepoll"
CLIENT_THREADS=2
BUILD=1
INSTALL=1
MAX_LOAD=""
MAX_LOAD_WAIT=120
NICE=0
REPEAT=1
BASE_BIN=""
HOLD_WAIT=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --depth) DEPTH="$2"; shift 2 ;;
        --sizes) SIZES="$2"; shift 2 ;;
        --conns) CONNS="$2"; shift 2 ;;
        --systems) SYSTEMS="$2"; shift 2 ;;
        --client-threads) CLIENT_THREADS="$2"; shift 2 ;;
        --max-load) MAX_LOAD="$2"; shift 2 ;;
        --max-load-wait) MAX_LOAD_WAIT="$2"; shift 2 ;;
        --nice) NICE="$2"; shift 2 ;;
        --repeat) REPEAT="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-install) INSTALL=0; shift ;;
        --baseline-bin) BASE_BIN="$2"; SYSTEMS="$SYSTEMS shmrelay-base"; shift 2 ;;
        --no-hold-wait) HOLD_WAIT=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$NICE" != 0 ] && [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ] &&
    [ -z "${COMPARE_AUTOGROUP:-}" ]; then
    # A session of our own: its autogroup holds only this benchmark, and goes away with it.
    COMPARE_AUTOGROUP=1 exec setsid -w "$0" "${ORIG_ARGS[@]}"
fi

if [ "$QUICK" = 1 ]; then
    # Smoke test: one short run per system.
    SECONDS_PER_RUN=1; WARMUP=0.3; SIZES="64"; CONNS="100"; REPEAT=1
fi

say() { printf '[compare] %s\n' "$*" >&2; }
die() { printf 'compare.sh: %s\n' "$*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
[ -n "$OUT" ] || OUT="$ROOT/target/compare"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REPORT_PY="$ROOT/tools/bench/compare_report.py"

# ---------------------------------------------------------------- binaries and packages
if [ "$BUILD" = 1 ]; then
    say "building release binaries"
    cargo build --release -q -p shmrelay -p shmrelay-tools -p shmrelay-examples
fi
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
BIN="$TARGET_DIR/release"
for b in shmrelay relayctl relaybench tokio-echo ws-echo; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing (build with: cargo build --release -p shmrelay -p shmrelay-tools -p shmrelay-examples)"
done

if case " $SYSTEMS " in *" uring "*) true ;; *) false ;; esac; then
    [ -x "$BIN/uring-echo" ] || die "$BIN/uring-echo is missing (cargo build --release -p shmrelay-examples)"
fi

if case " $SYSTEMS " in *" cepoll "*) true ;; *) false ;; esac; then
    command -v "${CC:-cc}" >/dev/null 2>&1 || die "the cepoll system needs a C compiler (${CC:-cc})"
    "${CC:-cc}" -O2 -o "$BIN/epoll-echo" "$ROOT/examples/c/epoll-echo.c" || die "cc failed on examples/c/epoll-echo.c"
fi

NGINX_STREAM_SO=/usr/lib/nginx/modules/ngx_stream_module.so
need_pkgs=()
case " $SYSTEMS " in *" haproxy "*) command -v haproxy >/dev/null 2>&1 || need_pkgs+=(haproxy) ;; esac
case " $SYSTEMS " in *" nginx "*)
    command -v nginx >/dev/null 2>&1 || need_pkgs+=(nginx)
    # Debian builds the stream module as a dynamic module in its own package.
    if ! nginx -V 2>&1 | grep -q -- '--with-stream ' && [ ! -f "$NGINX_STREAM_SO" ]; then
        need_pkgs+=(libnginx-mod-stream)
    fi ;;
esac
case " $SYSTEMS " in *" nginx-ws "*) command -v nginx >/dev/null 2>&1 || need_pkgs+=(nginx) ;; esac
if [ ${#need_pkgs[@]} -gt 0 ]; then
    [ "$INSTALL" = 1 ] || die "missing packages: ${need_pkgs[*]} (run without --no-install)"
    say "installing ${need_pkgs[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# ---------------------------------------------------------------- start and stop
RUN=""
if [ "$NICE" != 0 ]; then
    nice -n "$NICE" true 2>/dev/null && [ "$(nice -n "$NICE" nice)" = "$NICE" ] \
        || die "cannot run at niceness $NICE (negative values need root)"
    # exec keeps the PID: the PID we hold is the server process itself.
    RUN="nice -n $NICE"
    if [ -n "${COMPARE_AUTOGROUP:-}" ]; then
        echo "$NICE" >/proc/self/autogroup || die "cannot set the autogroup nice to $NICE"
        say "session autogroup: $(cat /proc/self/autogroup)"
    fi
fi
INSTANCE="cmp-$$"
TMP="$(mktemp -d /tmp/shmrelay-compare.XXXXXX)"
PIDS=()          # every process this script started, killed by PID at exit
SHM_PID=""
BASE_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f /dev/shm/shmrelay."$INSTANCE".* /dev/shm/shmrelay."$INSTANCE-base".* 2>/dev/null || true
    rm -f /dev/shm/shmrelay."$INSTANCE-ws".* 2>/dev/null || true
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=tools/bench/lib.sh
. "$ROOT/tools/bench/lib.sh"
read -r P_SHM P_HAP P_NGX P_TOK P_ECHO_HAP P_ECHO_NGX P_BASE P_CEP < <(free_ports 8)

start_echo() { # NAME PORT -> sets LAST_PID
    $RUN "$BIN/tokio-echo" --listen "127.0.0.1:$2" --threads 1 >"$TMP/$1.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    wait_port "$2" "$LAST_PID" "$1" "$TMP/$1.log"
}

declare -A ADDR SERVER_PIDS

start_nginx() { # NAME PORT: nginx with $TMP/NAME/nginx.conf, as system NAME -> sets LAST_PID
    local d="$TMP/$1"
    nginx -t -q -p "$d" -e "$d/logs/error.log" -c "$d/nginx.conf" || die "nginx rejects the generated $1 config"
    $RUN nginx -p "$d" -e "$d/logs/error.log" -c "$d/nginx.conf" >"$TMP/$1.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    wait_port "$2" "$LAST_PID" "$1" "$TMP/$1.log"
    ADDR[$1]="127.0.0.1:$2"
}
has() { case " $SYSTEMS " in *" $1 "*) return 0 ;; esac; return 1; }

if has shmrelay; then
    rm -f /dev/shm/shmrelay."$INSTANCE".* 2>/dev/null || true
    $RUN "$BIN/shmrelay" --listen "127.0.0.1:$P_SHM" --instance "$INSTANCE" --workers 1 --fronts 1 \
        --drain-ms 500 >"$TMP/shmrelay.log" 2>&1 &
    SHM_PID=$!
    PIDS+=("$SHM_PID")
    wait_port "$P_SHM" "$SHM_PID" shmrelay "$TMP/shmrelay.log"
    ADDR[shmrelay]="127.0.0.1:$P_SHM"
fi

if has shmrelay-base; then
    [ -x "$BASE_BIN" ] || die "--baseline-bin $BASE_BIN is not an executable"
    rm -f /dev/shm/shmrelay."$INSTANCE-base".* 2>/dev/null || true
    $RUN "$BASE_BIN" --listen "127.0.0.1:$P_BASE" --instance "$INSTANCE-base" --workers 1 \
        --fronts 1 --drain-ms 500 >"$TMP/shmrelay-base.log" 2>&1 &
    BASE_PID=$!
    PIDS+=("$BASE_PID")
    wait_port "$P_BASE" "$BASE_PID" shmrelay-base "$TMP/shmrelay-base.log"
    ADDR[shmrelay-base]="127.0.0.1:$P_BASE"
fi

if has haproxy; then
    start_echo echo-haproxy "$P_ECHO_HAP"; ECHO_HAP_PID=$LAST_PID
    cat >"$TMP/haproxy.cfg" <<CFG
global
    nbthread 1
    maxconn 8000
    pidfile $TMP/haproxy.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend fe
    bind 127.0.0.1:$P_HAP
    default_backend be
backend be
    server echo 127.0.0.1:$P_ECHO_HAP
CFG
    haproxy -c -q -f "$TMP/haproxy.cfg" || die "haproxy rejects the generated config"
    # -db: stay in the foreground (the PID we hold is the proxy process itself).
    $RUN haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
    HAP_PID=$!
    PIDS+=("$HAP_PID")
    wait_port "$P_HAP" "$HAP_PID" haproxy "$TMP/haproxy.log"
    ADDR[haproxy]="127.0.0.1:$P_HAP"
fi

if has nginx; then
    start_echo echo-nginx "$P_ECHO_NGX"; ECHO_NGX_PID=$LAST_PID
    mkdir -p "$TMP/nginx/logs"
    LOAD_MODULE=""
    if ! nginx -V 2>&1 | grep -q -- '--with-stream '; then LOAD_MODULE="load_module $NGINX_STREAM_SO;"; fi
    cat >"$TMP/nginx/nginx.conf" <<CFG
$LOAD_MODULE
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
stream {
    upstream echo { server 127.0.0.1:$P_ECHO_NGX; }
    server {
        listen 127.0.0.1:$P_NGX;
        proxy_pass echo;
        proxy_timeout 120s;
    }
}
CFG
    start_nginx nginx "$P_NGX"; NGX_PID=$LAST_PID
fi

if has tokio; then
    start_echo tokio "$P_TOK"; TOK_PID=$LAST_PID
    ADDR[tokio]="127.0.0.1:$P_TOK"
fi

# ---- WebSocket systems
read -r P_SHMWS P_NGXWS P_WSE P_WSE_NGX < <(free_ports 4)
WS_KIND=${WS_KIND:-binary}
start_ws_echo() { # NAME PORT -> sets LAST_PID
    $RUN "$BIN/ws-echo" --listen "127.0.0.1:$2" --threads 1 >"$TMP/$1.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    wait_port "$2" "$LAST_PID" "$1" "$TMP/$1.log"
}
if has shmrelay-ws; then
    mkdir -p "$TMP/shmrelay-ws"
    start_ws_relay "$BIN/shmrelay" "$TMP/shmrelay-ws" "$P_SHMWS" "$INSTANCE-ws" 'drain_ms = 500'
    SHMWS_PID=$RELAY_PID
    PIDS+=("$SHMWS_PID")
    ADDR[shmrelay-ws]="127.0.0.1:$P_SHMWS"
fi
if has nginx-ws; then
    start_ws_echo ws-echo-nginx "$P_WSE_NGX"; WSE_NGX_PID=$LAST_PID
    mkdir -p "$TMP/nginx-ws/logs"
    cat >"$TMP/nginx-ws/nginx.conf" <<CFG
worker_processes 1;
daemon off;
pid $TMP/nginx-ws/nginx.pid;
error_log $TMP/nginx-ws/logs/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    upstream wsecho { server 127.0.0.1:$P_WSE_NGX; }
    server {
        listen 127.0.0.1:$P_NGXWS;
        location / {
            proxy_pass http://wsecho;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_read_timeout 120s;
            proxy_send_timeout 120s;
        }
    }
}
CFG
    start_nginx nginx-ws "$P_NGXWS"; NGXWS_PID=$LAST_PID
fi
if has ws-echo; then
    start_ws_echo ws-echo "$P_WSE"; WSE_PID=$LAST_PID
    ADDR[ws-echo]="127.0.0.1:$P_WSE"
fi
# relaybench's codec flags for a system.
codec_args() {
    case "$1" in
        shmrelay-ws|nginx-ws|ws-echo) echo "--codec websocket --ws-kind $WS_KIND" ;;
    esac
}
if has cepoll; then
    $RUN "$BIN/epoll-echo" --listen "127.0.0.1:$P_CEP" >"$TMP/cepoll.log" 2>&1 &
    CEP_PID=$!
    PIDS+=("$CEP_PID")
    wait_port "$P_CEP" "$CEP_PID" cepoll "$TMP/cepoll.log"
    ADDR[cepoll]="127.0.0.1:$P_CEP"
fi
if has uring; then
    read -r P_URI < <(free_ports 1)
    $RUN "$BIN/uring-echo" --listen "127.0.0.1:$P_URI" >"$TMP/uring.log" 2>&1 &
    URI_PID=$!
    PIDS+=("$URI_PID")
    wait_port "$P_URI" "$URI_PID" uring "$TMP/uring.log"
    ADDR[uring]="127.0.0.1:$P_URI"
fi

# The server processes of a system right now (children looked up by parent PID).
server_pids() {
    case "$1" in
        shmrelay) echo "$SHM_PID" $(pgrep -P "$SHM_PID" || true) ;;
        shmrelay-base) echo "$BASE_PID" $(pgrep -P "$BASE_PID" || true) ;;
        haproxy) echo "$HAP_PID $ECHO_HAP_PID" ;;
        nginx) echo "$NGX_PID" $(pgrep -P "$NGX_PID" || true) "$ECHO_NGX_PID" ;;
        tokio) echo "$TOK_PID" ;;
        shmrelay-ws) echo "$SHMWS_PID" $(pgrep -P "$SHMWS_PID" || true) ;;
        nginx-ws) echo "$NGXWS_PID" $(pgrep -P "$NGXWS_PID" || true) "$WSE_NGX_PID" ;;
        ws-echo) echo "$WSE_PID" ;;
        cepoll) echo "$CEP_PID" ;;
        uring) echo "$URI_PID" ;;
    esac
}

wait_no_hold() {
    local waited=0
    while [ "$HOLD_WAIT" = 1 ] && pgrep -f "relaybench hold" >/dev/null 2>&1; do
        [ "$waited" = 0 ] && say "a 'relaybench hold' is running: waiting for it to end"
        sleep 5; waited=$((waited + 5))
    done
    if [ -n "$MAX_LOAD" ]; then
        local t=0
        while python3 -c "import sys; sys.exit(0 if float(open('/proc/loadavg').read().split()[0]) >= $MAX_LOAD else 1)" \
            && [ "$t" -lt "$MAX_LOAD_WAIT" ]; do
            [ "$t" = 0 ] && say "load average $(cut -d' ' -f1 /proc/loadavg) >= $MAX_LOAD: waiting up to ${MAX_LOAD_WAIT}s"
            sleep 5; t=$((t + 5)); waited=$((waited + 5))
        done
    fi
    echo "$waited"
}

shm_counters() { # prints "bytes_in bytes_out bytes_copied" of front 0
    "$BIN/relayctl" stat --json "$INSTANCE" --interval 0 | python3 -c '
import json, sys
f = json.load(sys.stdin)["fronts"][0]
print(f["bytes_in"], f["bytes_out"], f["bytes_copied"], f["copied_ratio"])'
}

# ---------------------------------------------------------------- measure
RUNS="$OUT/runs.jsonl"
: >"$RUNS"
{
    echo "nproc=$(nproc)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel=$(uname -srm)"
    echo "haproxy=$(haproxy -v 2>/dev/null | head -1 || true)"
    echo "nginx=$(nginx -v 2>&1 || true)"
    echo "git=$(git rev-parse --short HEAD 2>/dev/null || true)$(git diff --quiet 2>/dev/null || echo '+dirty')"
    echo "command=tools/bench/compare.sh --seconds $SECONDS_PER_RUN --warmup $WARMUP --depth $DEPTH --sizes '$SIZES' --conns '$CONNS' --client-threads $CLIENT_THREADS${BASE_BIN:+ --baseline-bin $BASE_BIN}$([ "$REPEAT" != 1 ] && echo " --repeat $REPEAT")${MAX_LOAD:+ --max-load $MAX_LOAD}$([ "$NICE" != 0 ] && echo " --nice $NICE")$([ "$QUICK" = 1 ] && echo ' (--quick)')"
    echo "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$OUT/machine.txt"

read -r -a SYS_ARR <<<"$SYSTEMS"
nsys=${#SYS_ARR[@]}
case_no=0
for size in $SIZES; do
    for conns in $CONNS; do
      for ((rep = 1; rep <= REPEAT; rep++)); do
        for ((k = 0; k < nsys; k++)); do
            sys=${SYS_ARR[$(((k + case_no + rep - 1) % nsys))]}
            waited=$(wait_no_hold)
            load_before=$(cut -d' ' -f1-3 /proc/loadavg)
            pid_args=()
            for p in $(server_pids "$sys"); do pid_args+=(--server-pid "$p"); done
            [ "$sys" = shmrelay ] && read -r b_in0 b_out0 b_cp0 _ < <(shm_counters)
            say "$sys  size=$size conns=$conns depth=$DEPTH seconds=$SECONDS_PER_RUN rep $rep/$REPEAT  (load avg $load_before)"
            json=$($RUN "$BIN/relaybench" load --addr "${ADDR[$sys]}" --conns "$conns" --size "$size" \
                --depth "$DEPTH" --seconds "$SECONDS_PER_RUN" --warmup "$WARMUP" \
                --threads "$CLIENT_THREADS" --json "${pid_args[@]}" $(codec_args "$sys")) \
                || die "relaybench load against $sys failed"
            load_after=$(cut -d' ' -f1-3 /proc/loadavg)
            extra='null'
            if [ "$sys" = shmrelay ]; then
                read -r b_in1 b_out1 b_cp1 ratio_total < <(shm_counters)
                extra=$(printf '{"bytes_relayed":%s,"bytes_copied":%s,"copied_ratio_cumulative":%s}' \
                    "$(( (b_in1 - b_in0) + (b_out1 - b_out0) ))" "$((b_cp1 - b_cp0))" "$ratio_total")
            fi
            printf '{"system":"%s","rep":'"$rep"',"size":%s,"conns":%s,"depth":%s,"loadavg_before":"%s","loadavg_after":"%s","hold_wait_secs":%s,"server_pids":"%s","shmrelay":%s,"load":%s}\n' \
                "$sys" "$size" "$conns" "$DEPTH" "$load_before" "$load_after" "$waited" \
                "$(server_pids "$sys" | xargs)" "$extra" "$json" >>"$RUNS"
        done
      done
        case_no=$((case_no + 1))
    done
done

echo "finished=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$OUT/machine.txt"
python3 "$REPORT_PY" "$OUT"
