# Helpers shared by the bench scripts. Source it after defining `die MESSAGE` (print, exit 1).

# free_ports N: N free loopback ports, asked from the kernel, on one line.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# wait_port PORT PID NAME LOG: waits (up to 20 s) until 127.0.0.1:PORT accepts a connection.
# Dies, printing LOG, if PID exits first or the port never opens.
wait_port() {
    local port=$1 pid=$2 name=$3 log=$4
    for _ in $(seq 400); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2 || true; die "$name (pid $pid) exited at start"; }
        sleep 0.05
    done
    cat "$log" >&2 || true
    die "$name does not listen on 127.0.0.1:$port"
}

# stop_pid PID: SIGTERM, up to 5 s for it to exit, then SIGKILL (no-op for an empty PID).
stop_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

# start_ws_relay BIN DIR PORT INSTANCE [SETTING...]: starts BIN (shmrelay) with one websocket
# listener on 127.0.0.1:PORT served by the built-in echo worker (1 front, 1 worker) and the
# given top-level TOML settings (e.g. 'max_frame = 16777216'); config and log in DIR. Waits
# until it listens; sets RELAY_PID. Prefix it with RUN="nice -n N" to change its niceness.
start_ws_relay() {
    local bin=$1 dir=$2 port=$3 instance=$4
    shift 4
    {
        echo "instance = \"$instance\""
        echo "fronts = 1"
        local setting
        for setting in "$@"; do echo "$setting"; done
        printf '\n[[listener]]\nlisten = "127.0.0.1:%s"\ncodec = "websocket"\nworkers = 1\n' "$port"
    } >"$dir/relay.toml"
    rm -f /dev/shm/shmrelay."$instance".* 2>/dev/null || true
    ${RUN:-} "$bin" --config "$dir/relay.toml" >"$dir/relay.log" 2>&1 &
    RELAY_PID=$!
    wait_port "$port" "$RELAY_PID" "shmrelay ($instance)" "$dir/relay.log"
}
