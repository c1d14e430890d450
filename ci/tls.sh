#!/usr/bin/env bash
# Real TLS clients against echod's tls:// listeners: Debian's `openssl s_client` (TLS 1.3 and
# 1.2, verifying the server's certificate) and `socat OPENSSL:` echo ~100 KB exactly and end
# cleanly; with --tls-client-ca, s_client with a client certificate signed by that CA is echoed,
# one without a certificate or with a self-signed one is refused and gets no echo.
#
# s_client does not end the session when its input ends (-quiet implies -ign_eof): it prints
# what comes back and exits when echod closes, here after --idle-timeout 1s, with close_notify
# and FIN (s_client exits 0 only on a clean end). socat sends close_notify when its input ends,
# and echod answers with everything pending, then close_notify and FIN.
#
# Certificates are made here with `openssl req` and live only in a temporary directory.
# Loopback only, every process started here ended by PID, every wait bounded (~6 s in all).
#
# Usage (from the repository root):  bash ci/tls.sh
# Environment: ECHOD_BIN (default target/debug/echod).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ECHOD_BIN=${ECHOD_BIN:-$PWD/target/debug/echod}
START=$SECONDS
TMP=$(mktemp -d /tmp/echod-tls.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ $rc -ne 0 ]]; then
        for log in "$TMP"/*.log; do
            [[ -s $log ]] && { echo "--- $log" >&2; tail -n 20 "$log" >&2; }
        done
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v socat >/dev/null || missing+=(socat)
if [[ ${#missing[@]} -gt 0 ]]; then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
            { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
    else
        fail "needed: apt-get install ${missing[*]}"
    fi
fi
openssl version
socat -V | sed -n 2p

# ------------------------------------------------------------------ certificates
cd "$TMP"
# The server's: self-signed ECDSA P-256 for localhost and 127.0.0.1 (the clients trust it as
# their CA file).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
    -keyout key.pem -out cert.pem 2>/dev/null
# A client CA, a client certificate it signs, and a self-signed client certificate.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj "/CN=echod test client CA" -keyout client-ca.key -out client-ca.pem 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj /CN=ci-client -keyout client.key -out client.csr 2>/dev/null
printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' >client.ext
openssl x509 -req -in client.csr -CA client-ca.pem -CAkey client-ca.key -CAcreateserial -days 1 \
    -extfile client.ext -out client.pem 2>/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=rogue -keyout rogue.key -out rogue.pem 2>/dev/null
cd - >/dev/null

# Starts an echod and sets PORT to its bound port (read from its log) once it is serving. Not
# in a command substitution: the PID must reach this shell's PIDS.
start_echod() {
    local name=$1; shift
    "$ECHOD_BIN" "$@" --metrics-listen off >"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    local deadline=$((SECONDS + 20))
    until grep -q "echod started" "$TMP/$name.log"; do
        ((SECONDS <= deadline)) || fail "echod $name did not start"
        sleep 0.05
    done
    PORT=$(grep -m1 "listening" "$TMP/$name.log" | grep -oE 'address=[0-9.]+:[0-9]+' | sed -n 1p | cut -d: -f2)
}
tls=(--tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem" --idle-timeout 1s)
start_echod plain-tls --listen tls://127.0.0.1:0 "${tls[@]}"
port=$PORT
start_echod mtls --listen tls://127.0.0.1:0 "${tls[@]}" --tls-client-ca "$TMP/client-ca.pem"
mtls_port=$PORT
echo "echod tls://127.0.0.1:$port, and with --tls-client-ca tls://127.0.0.1:$mtls_port"

seq 1 20000 >"$TMP/input"   # 108,894 bytes of lines
s_client() {  # s_client PORT OUT [ARGS...]: echoes $TMP/input; status of s_client
    local port=$1 out=$2; shift 2
    timeout 20 openssl s_client -connect "localhost:$port" -CAfile "$TMP/cert.pem" \
        -verify_return_error -quiet "$@" <"$TMP/input" >"$out" 2>"$out.err"
}

for version in -tls1_3 -tls1_2; do
    rc=0
    s_client "$port" "$TMP/out$version" "$version" || rc=$?
    [[ $rc -eq 0 ]] || { cat "$TMP/out$version.err" >&2; fail "s_client $version exited $rc"; }
    cmp -s "$TMP/input" "$TMP/out$version" ||
        fail "s_client $version: echo differs ($(wc -c <"$TMP/out$version") bytes back)"
    echo "OK: openssl s_client $version: $(wc -c <"$TMP/out$version") bytes echoed, clean close"
done

rc=0
timeout 20 socat -t 5 - "OPENSSL:localhost:$port,cafile=$TMP/cert.pem" <"$TMP/input" >"$TMP/out-socat" \
    2>"$TMP/socat.err" || rc=$?
[[ $rc -eq 0 ]] || { cat "$TMP/socat.err" >&2; fail "socat exited $rc"; }
cmp -s "$TMP/input" "$TMP/out-socat" || fail "socat: echo differs ($(wc -c <"$TMP/out-socat") bytes back)"
echo "OK: socat OPENSSL: $(wc -c <"$TMP/out-socat") bytes echoed, clean close"

rc=0
s_client "$mtls_port" "$TMP/out-mtls" -cert "$TMP/client.pem" -key "$TMP/client.key" || rc=$?
[[ $rc -eq 0 ]] || { cat "$TMP/out-mtls.err" >&2; fail "s_client with a client certificate exited $rc"; }
cmp -s "$TMP/input" "$TMP/out-mtls" || fail "mTLS: echo differs"
echo "OK: mTLS: a client certificate signed by --tls-client-ca is echoed"
for who in none rogue; do
    args=()
    [[ $who == rogue ]] && args=(-cert "$TMP/rogue.pem" -key "$TMP/rogue.key")
    s_client "$mtls_port" "$TMP/out-$who" "${args[@]}" || true
    [[ ! -s $TMP/out-$who ]] || fail "mTLS: a client with certificate '$who' got $(wc -c <"$TMP/out-$who") bytes back"
    echo "OK: mTLS: client certificate '$who' refused, nothing echoed"
done
echo "tls checks passed in $((SECONDS - START))s"
