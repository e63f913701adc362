#!/bin/sh
# Installs what the cluster tests (tests/tests/cluster.rs) need on a fresh Debian machine, as
# root: nats-server (the bus), haproxy (the example balancer) and iproute2 (network namespaces
# and veth links). Idempotent: installs only what is missing, and runs apt-get update at most
# once per call.
set -eu

need=""
command -v nats-server >/dev/null 2>&1 || need="$need nats-server"
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need="$need haproxy"
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need="$need iproute2"

if [ -n "$need" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    # shellcheck disable=SC2086 # word splitting of the package list is wanted
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $need
fi

# The Debian packages enable services; the tests start their own servers on free ports, so a
# packaged haproxy or nats-server left running is harmless, but stop them where possible to
# keep the machine quiet (no systemd on the test machines: nothing to stop there).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl stop haproxy nats-server >/dev/null 2>&1 || true
fi

nats-server --version
haproxy -v | head -n 1
ip -V
