#!/usr/bin/env bash
# Installs what the WebSocket proofs need (issue 16) and prints the environment the tests want:
# - Debian packages: chromium (tests/tests/browser.rs), nginx with the stream module (the
#   nginx -> ws-echo benchmark in tools/bench/websocket.sh), python3-venv;
# - a virtualenv with `kosoku` (the Autobahn TestSuite driver, tools/ws/autobahn.sh) and
#   `websockets` (a well-kept Python client for protocol cases).
# Idempotent: what is already there is kept. Needs root for apt-get on a fresh Debian machine.
#
#   bash tools/ws/ci-setup.sh            # venv in target/ws-venv (or $SHMRELAY_WS_VENV)
#
# The last lines printed are KEY=VALUE pairs to export:
#   SHMRELAY_WS_VENV=<venv>  SHMRELAY_CHROMIUM=<chromium path>
#   SHMRELAY_REQUIRE_CHROMIUM=1  SHMRELAY_REQUIRE_KOSOKU=1
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${SHMRELAY_WS_VENV:-$root/target/ws-venv}
py=${PYTHON:-python3}

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
# The stream module is packaged apart; the benchmark proxies through the http module, but the
# module package is what the brief's CI image lists, so a config that loads it works too.
[ -e /usr/share/nginx/modules-available/mod-stream.conf ] || need+=(libnginx-mod-stream)
if ! command -v "$py" >/dev/null 2>&1 || ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need+=(python3 python3-venv)
    py=python3
fi
if [ ${#need[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "ws-ci-setup: apt-get install ${need[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q "${need[@]}" >&2
    else
        echo "ws-ci-setup: missing ${need[*]} and apt-get is not usable here (root needed)" >&2
        exit 1
    fi
fi
# The Debian nginx package starts a daemon on port 80 when it is installed; the benchmark runs
# its own instances with their own configs, so a running default one is only in the way.
if command -v service >/dev/null 2>&1 && [ -e /run/nginx.pid ]; then
    service nginx stop >/dev/null 2>&1 || true
fi

if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv" >&2
fi
if ! "$venv/bin/python" -c 'import kosoku, websockets' >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q 'kosoku>=0.1,<0.2' 'websockets>=12' >&2
fi
"$venv/bin/kosoku" -h >/dev/null
echo "ws-ci-setup: kosoku and websockets in $venv; chromium $(chromium --version 2>/dev/null || echo '?'); $(nginx -v 2>&1)" >&2
echo "SHMRELAY_WS_VENV=$venv"
echo "SHMRELAY_CHROMIUM=$(command -v chromium)"
echo "SHMRELAY_REQUIRE_CHROMIUM=1"
echo "SHMRELAY_REQUIRE_KOSOKU=1"
