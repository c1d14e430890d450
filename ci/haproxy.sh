#!/usr/bin/env bash
# A real load balancer in front of echod: Debian's HAProxy in TCP mode, round-robin over two
# echod instances, one reached with `send-proxy-v2`, the other with `send-proxy` (v1). Each echod
# answers with a banner "{hostname}-{listener} {client}". The check (ci/haproxy_check.py) sends
# connections through HAProxy from a source address of its own (127.0.0.77) and asserts that
# both backends answered, and that each banner shows the client's address, not HAProxy's.
#
# Loopback only, every process started here ended by PID, bounded in time (~5 s).
#
# Usage (from the repository root):  bash ci/haproxy.sh
# Environment: ECHOD_BIN (default target/debug/echod).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ECHOD_BIN=${ECHOD_BIN:-$PWD/target/debug/echod}
TMP=$(mktemp -d /tmp/echod-haproxy.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

if ! command -v haproxy >/dev/null; then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends haproxy >/dev/null
    else
        echo "haproxy is needed: apt-get install haproxy" >&2
        exit 1
    fi
fi
haproxy -v | sed -n 1p

# Starts an echod; prints its bound address (read from its log) once it is serving.
start_echod() {
    local name=$1; shift
    "$ECHOD_BIN" "$@" --metrics-listen off >"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    local deadline=$((SECONDS + 20))
    until grep -q "echod started" "$TMP/$name.log"; do
        if ((SECONDS > deadline)); then
            echo "echod $name did not start:" >&2
            cat "$TMP/$name.log" >&2
            exit 1
        fi
        sleep 0.05
    done
    grep -m1 "listening" "$TMP/$name.log" | grep -oE 'address=[0-9.]+:[0-9]+' | sed -n 1p | cut -d= -f2
}

banner='{hostname}-{listener} {client}'
v2=$(start_echod v2 --listen 'tcp://127.0.0.1:0?proxy=v2' --proxy-from 127.0.0.1 --banner "$banner")
v1=$(start_echod v1 --listen 'tcp://127.0.0.1:0?proxy=v1' --proxy-from 127.0.0.1 --banner "$banner")
front=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "echod backends: $v2 (PROXY v2), $v1 (PROXY v1); HAProxy frontend 127.0.0.1:$front"

cat >"$TMP/haproxy.cfg" <<EOF
global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend echo
    bind 127.0.0.1:$front
    default_backend echods
backend echods
    balance roundrobin
    # HAProxy connects from 127.0.0.1: the only peer the backends accept headers from.
    source 127.0.0.1
    server echod-v2 $v2 send-proxy-v2
    server echod-v1 $v1 send-proxy
EOF
haproxy -c -f "$TMP/haproxy.cfg" >/dev/null
haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
PIDS+=($!)

python3 ci/haproxy_check.py --frontend "127.0.0.1:$front" --source 127.0.0.77 \
    --backend "tcp://$v2?proxy=v2" --backend "tcp://$v1?proxy=v1" --connections 20
