#!/usr/bin/env bash
# CI check of echod's Prometheus/Grafana assets:
#   1. promtool check config / check rules / test rules on deploy/prometheus/
#   2. static lint of dashboards/echod.json
#   3. live: run echod and a real Prometheus on loopback, lint /metrics with
#      `promtool check metrics`, compare it with the metrics contract, drive echo
#      traffic (TCP and UDP), then evaluate every dashboard query (must return data) and every
#      alert rule (must parse and evaluate) through Prometheus' HTTP API; finally
#      SIGTERM: /readyz must turn 503, echod_draining 1, and echod must exit 0.
#
# Usage (from the repository root):  bash ci/prometheus.sh
# The echod binary: $ECHOD_BIN, else target/release/echod, else target/debug/echod
# (under $CARGO_TARGET_DIR when set); built with `cargo build --release --locked` if none exists.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
START=$SECONDS

step() { printf '\n==> %s\n' "$*"; }

# ---------------------------------------------------------------- install
step "promtool / prometheus"
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "installing Debian's prometheus package (promtool + server)"
    # Keep the package's service from being started by the install (policy-rc.d, 101 =
    # action forbidden); only when no policy is in place already.
    POLICY=/usr/sbin/policy-rc.d
    ADDED_POLICY=""
    if [[ ! -e $POLICY ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY" && ADDED_POLICY=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends prometheus >/dev/null
    if [[ -n $ADDED_POLICY ]]; then rm -f "$POLICY"; fi
fi
PROMTOOL=$(command -v promtool)
PROMETHEUS=$(command -v prometheus)
promtool --version 2>&1 | sed -n 1p
INSTALL_DONE=$SECONDS

# ---------------------------------------------------------------- static checks
step "promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml

step "promtool check rules deploy/prometheus/rules/echod.rules.yml"
promtool check rules deploy/prometheus/rules/echod.rules.yml

step "promtool test rules deploy/prometheus/tests/echod.rules.test.yml"
promtool test rules deploy/prometheus/tests/echod.rules.test.yml

step "lint dashboards/echod.json"
python3 ci/prometheus_check.py lint-dashboard dashboards/echod.json

# ---------------------------------------------------------------- echod binary
step "echod binary"
TARGET_DIR=${CARGO_TARGET_DIR:-target}
if [[ -n ${ECHOD_BIN:-} ]]; then
    BIN=$ECHOD_BIN
elif [[ -x $TARGET_DIR/release/echod ]]; then
    BIN=$TARGET_DIR/release/echod
elif [[ -x $TARGET_DIR/debug/echod ]]; then
    BIN=$TARGET_DIR/debug/echod
else
    echo "no echod binary found; building it (cargo build --release --locked --bin echod)"
    cargo build --release --locked --bin echod
    BIN=$TARGET_DIR/release/echod
fi
[[ -x $BIN ]] || { echo "FAIL: $BIN is not an executable" >&2; exit 1; }
echo "using $BIN"

# ---------------------------------------------------------------- live check
TMP=$(mktemp -d "${TMPDIR:-/tmp}/echod-prom.XXXXXX")
ECHOD_PID=""
PROM_PID=""
stop() {  # stop one process we started: SIGTERM, then SIGKILL after 5 s
    local pid=$1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        for log in echod prometheus; do
            if [[ -s $TMP/$log.log ]]; then
                echo "--- last lines of $log's log"
                tail -n 30 "$TMP/$log.log"
            fi
        done
    fi
    stop "$PROM_PID"
    stop "$ECHOD_PID"
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT

mapfile -t PORTS < <(python3 ci/prometheus_check.py free-ports 3)
ECHO_ADDR=127.0.0.1:${PORTS[0]}
METRICS_ADDR=127.0.0.1:${PORTS[1]}
PROM_ADDR=127.0.0.1:${PORTS[2]}

step "start echod (echo $ECHO_ADDR, metrics $METRICS_ADDR)"
# UDP on the same port number (a free TCP port is nearly always a free UDP one), with a low
# rate limit so a short burst shows drops on the dashboard and to the alert. The shutdown delay
# keeps echod draining (readyz 503, echod_draining 1) long enough to be seen: idle clients are
# closed as soon as the listeners close, so without it the drain is over at once.
UDP_RATE_LIMIT=50
RUST_LOG=${RUST_LOG:-warn} "$BIN" --listen "$ECHO_ADDR" --listen "udp://$ECHO_ADDR" \
    --udp-rate-limit "$UDP_RATE_LIMIT" --metrics-listen "$METRICS_ADDR" \
    --shutdown-delay 2s --shutdown-timeout 2s >"$TMP/echod.log" 2>&1 &
ECHOD_PID=$!
echo "pid $ECHOD_PID"

step "start prometheus ($PROM_ADDR, scraping echod every 1s, rules loaded)"
cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/deploy/prometheus/rules/echod.rules.yml
scrape_configs:
  - job_name: echod
    static_configs:
      - targets: ["$METRICS_ADDR"]
EOF
"$PROMETHEUS" --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/data" \
    --web.listen-address="$PROM_ADDR" --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!
echo "pid $PROM_PID"

step "live checks"
python3 ci/prometheus_check.py live \
    --dashboard dashboards/echod.json \
    --prometheus "http://$PROM_ADDR" \
    --metrics-url "http://$METRICS_ADDR/metrics" \
    --echo "$ECHO_ADDR" \
    --udp-echo "$ECHO_ADDR" --udp-rate-limit "$UDP_RATE_LIMIT" \
    --promtool "$PROMTOOL" \
    --echod-pid "$ECHOD_PID"

kill -0 "$PROM_PID" 2>/dev/null || { echo "FAIL: prometheus exited during the check" >&2; exit 1; }

step "echod exits 0 once drained (SIGTERM was sent by the live check)"
for _ in $(seq 100); do
    kill -0 "$ECHOD_PID" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$ECHOD_PID" 2>/dev/null; then
    echo "FAIL: echod still running 10 s after SIGTERM (shutdown delay and timeout are 2 s each)" >&2
    exit 1
fi
rc=0
wait "$ECHOD_PID" || rc=$?
ECHOD_PID=""
[[ $rc -eq 0 ]] || { echo "FAIL: echod exited $rc after SIGTERM, expected 0" >&2; exit 1; }
echo "OK: exit status 0"

step "done: prometheus checks passed in $((SECONDS - START))s ($((SECONDS - INSTALL_DONE))s after install)"
