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
