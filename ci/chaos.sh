#!/usr/bin/env bash
# Chaos suite: echod's promises on hostile networks.
#
# Each case makes its own network namespace (echod-chaos-PID-N) with only a loopback, sets that
# loopback's MTU, runs echod ($ECHOD_BIN) and its clients (ci/chaos/client.py) inside it, injects
# faults there with nftables or tc, checks what echod promises, and stops echod with SIGTERM,
# which must end in exit status 0. The namespace is removed when the case ends, also on failure.
#
#   bash ci/chaos.sh [--required] [CASE...]
#
# Cases: loss-1 loss-5 loss-20 dup mtu-576 tbf reset blackhole many (default: all, in that
# order). Runs as root; without root, `ip netns` or nftables it says why and exits 0 (with
# --required, as CI runs it, exit 1). Missing nftables or iproute2 are installed with apt-get.
# The blackhole case needs echod's --tcp-keepalive-interval, --tcp-keepalive-count and
# --tcp-user-timeout flags; against an echod without them it is reported as skipped.
#
# Environment: ECHOD_BIN (default target/debug/echod), CHAOS_KEEP_LOGS=1 (keep echod's logs).
#
# The loopback's GSO is limited to one segment per packet (gso_max_segs 1), so a rule or a
# qdisc sees, drops or duplicates real MTU-sized TCP segments, as on a wire, and not the 64 KiB
# packets loopback TCP uses by default.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
ECHOD_BIN=${ECHOD_BIN:-$ROOT/target/debug/echod}
CLIENT="$ROOT/ci/chaos/client.py"
ALL_CASES=(loss-1 loss-5 loss-20 dup mtu-576 tbf reset blackhole many)

required=0
cases=()
for arg in "$@"; do
    case $arg in
        --required) required=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "chaos: unknown option $arg" >&2; exit 2 ;;
        *)
            if [[ " ${ALL_CASES[*]} " != *" $arg "* ]]; then
                echo "chaos: unknown case $arg (cases: ${ALL_CASES[*]})" >&2
                exit 2
            fi
            cases+=("$arg")
            ;;
    esac
done
[[ ${#cases[@]} -gt 0 ]] || cases=("${ALL_CASES[@]}")

cannot_run() {
    if [[ $required == 1 ]]; then
        echo "chaos: cannot run: $*" >&2
        exit 1
    fi
    echo "chaos: skipped: $*"
    exit 0
}

# --------------------------------------------------------------------------- prerequisites

[[ $(id -u) == 0 ]] || cannot_run "needs root (network namespaces and nftables)"
if ! command -v nft >/dev/null || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    if command -v apt-get >/dev/null; then
        echo "chaos: installing nftables and iproute2"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -q --no-install-recommends nftables iproute2 ||
            { apt-get update -q && apt-get install -y -q --no-install-recommends nftables iproute2; }; } \
            >/dev/null || cannot_run "apt-get could not install nftables and iproute2"
    fi
fi
for tool in ip nft tc python3; do
    command -v "$tool" >/dev/null || cannot_run "$tool is not installed"
done
[[ -x $ECHOD_BIN ]] || { echo "chaos: no echod at $ECHOD_BIN (cargo build --bins, or set ECHOD_BIN)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/echod-chaos.XXXXXX)
# What a case starts is noted in files, so that this shell removes it whatever way the case's
# subshell ended: namespaces by name, processes as "PID START-TIME" (so a PID reused by another
# process after ours exited is never signalled).
: >"$WORK/namespaces"
: >"$WORK/processes"
note_namespace() { echo "$1" >>"$WORK/namespaces"; }
note_process() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    echo "$1 $(awk '{ print $22 }' <<<"${stat##*)}")" >>"$WORK/processes"
}
start_time() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    awk '{ print $22 }' <<<"${stat##*)}"
}
remove_all() {
    local pid started ns
    while read -r pid started; do
        if [[ -n $pid && $(start_time "$pid") == "$started" ]]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done <"$WORK/processes"
    while read -r ns; do
        [[ -z $ns ]] || ip netns del "$ns" 2>/dev/null || true
    done <"$WORK/namespaces"
    : >"$WORK/processes"
    : >"$WORK/namespaces"
}
cleanup() {
    remove_all
    if [[ ${CHAOS_KEEP_LOGS:-0} == 1 ]]; then
        echo "chaos: logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

probe=echod-chaos-$$-probe
if ! ip netns add "$probe" 2>"$WORK/probe.err"; then
    cannot_run "ip netns add failed: $(cat "$WORK/probe.err")"
fi
note_namespace "$probe"
if ! ip netns exec "$probe" nft add table inet probe 2>"$WORK/probe.err"; then
    cannot_run "nftables does not work in a namespace: $(cat "$WORK/probe.err")"
fi
ip netns del "$probe"

# The blackhole case needs the flags that bound the time to free a vanished peer.
user_timeout_flags=0
if "$ECHOD_BIN" --help | grep -- '--tcp-user-timeout' >/dev/null; then
    user_timeout_flags=1
fi

# --------------------------------------------------------------------------- helpers

N=0
SKIPPED=3 # a case's exit status when it cannot run against this echod
NS=""
ECHOD_PID=""
ECHO_ADDR=""
METRICS_ADDR=""

inns() { ip netns exec "$NS" "$@"; }

# A fresh namespace whose loopback is up with MTU $1, one segment per packet, and the suite's
# nftables table (chain `out` on the output hook: every packet on loopback passes it once).
ns_up() {
    NS=echod-chaos-$$-$N
    ip netns add "$NS"
    note_namespace "$NS"
    ip -n "$NS" link set lo mtu "$1" gso_max_segs 1 up
    inns nft -f - <<'EOF'
table inet chaos {
    chain out {
        type filter hook output priority 0; policy accept;
        meta l4proto tcp counter
    }
}
EOF
}

# Starts echod in the namespace on ephemeral ports and waits for its start-up line, reading its
# log through a pipe (no polling); the log goes on to a file.
start_echod() {
    local log=$WORK/$N-echod.log fifo=$WORK/$N-echod.fifo line fd
    mkfifo "$fifo"
    : >"$log"
    RUST_LOG=info NO_COLOR=1 ip netns exec "$NS" "$ECHOD_BIN" \
        --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 "$@" \
        </dev/null >/dev/null 2>"$fifo" &
    ECHOD_PID=$!
    note_process "$ECHOD_PID"
    exec {fd}<"$fifo"
    ECHO_ADDR=""
    METRICS_ADDR=""
    while IFS= read -r -t 10 -u "$fd" line; do
        printf '%s\n' "$line" >>"$log"
        case $line in
            *"listening address="*) ECHO_ADDR=${line##*address=} ECHO_ADDR=${ECHO_ADDR%% *} ;;
            *"serving /metrics"*"address="*) METRICS_ADDR=${line##*address=} METRICS_ADDR=${METRICS_ADDR%% *} ;;
            *"echod started"*) break ;;
        esac
    done
    if [[ $line != *"echod started"* ]]; then
        exec {fd}<&-
        echo "  FAILED: echod did not start; its log:" >&2
        cat "$log" >&2
        return 1
    fi
    cat <&"$fd" >>"$log" &
    note_process "$!"
    exec {fd}<&-
    echo "  echod: pid $ECHOD_PID, echo $ECHO_ADDR, metrics $METRICS_ADDR, flags: $*"
}

# Waits at most $2 seconds for echod to exit (a timer raced against it, no polling) and checks
# that it exited with status $1.
expect_exit() {
    local want=$1 within=$2 timer which="" rc=0
    sleep "$within" &
    timer=$!
    wait -n -p which "$ECHOD_PID" "$timer" || rc=$?
    if [[ $which == "$timer" ]]; then
        echo "  FAILED: echod did not exit within ${within}s of SIGTERM" >&2
        return 1
    fi
    kill "$timer" 2>/dev/null || true
    wait "$timer" 2>/dev/null || true
    if [[ $rc != "$want" ]]; then
        echo "  FAILED: echod exited with $rc, expected $want; its log ends:" >&2
        tail -n 20 "$WORK/$N-echod.log" >&2
        return 1
    fi
}

# SIGTERM to an echod whose clients are done: the drain must end at once with status 0.
drain() {
    local t0=$EPOCHREALTIME
    kill -TERM "$ECHOD_PID"
    expect_exit 0 10
    awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "  drain: SIGTERM -> exit 0 in %.2f s\n", b - a }'
}

# The case's client; its own deadlines bound it, and a watchdog ends it should they not.
client() {
    inns timeout -k 5 240 python3 "$CLIENT" --addr "$ECHO_ADDR" --metrics "$METRICS_ADDR" \
        --pid "$ECHOD_PID" "$@"
}

# Packets dropped or duplicated by the rule whose comment is $1, and TCP packets seen in all.
rule_figures() {
    local ruleset seen hit
    ruleset=$(inns nft list ruleset)
    seen=$(sed -n 's/.*meta l4proto tcp counter packets \([0-9]*\).*/\1/p' <<<"$ruleset" | sed -n 1p)
    hit=$(grep -F "comment \"$1\"" <<<"$ruleset" | sed -n 's/.*counter packets \([0-9]*\).*/\1/p' | sed -n 1p)
    awk -v s="${seen:-0}" -v h="${hit:-0}" -v what="$1" \
        'BEGIN { printf "  %s: %d of %d TCP segments (%.1f%%)\n", what, h, s, s ? 100 * h / s : 0 }'
}

# --------------------------------------------------------------------------- cases

# Random loss of $1 % of TCP segments, both directions. Streams of MiBs come back exactly and end
# with a clean EOF after the client's half-close; SIGTERM in the middle of them: the drain lets
# them finish, then echod exits 0.
#
# At 20 % the doubling retransmission timeout now and then stalls a stream for tens of seconds (a
# segment lost seven times in a row waits 25 s), also after echod has closed its side and exited,
# when only the kernel still delivers the tail: the client's single waits are allowed 120 s.
case_loss() {
    local percent=$1 conns=$2 bytes=$3 wait=$4
    ns_up 1500
    inns nft add rule inet chaos out meta l4proto tcp numgen random mod 100 "<" "$percent" \
        counter drop comment "\"dropped\""
    start_echod --shutdown-timeout 60s
    client --timeout "$wait" --deadline $((wait + 60)) stream --conns "$conns" --bytes "$bytes" --sigterm
    expect_exit 0 30
    echo "  drain: exit 0 once the streams were done"
    rule_figures dropped
}

# Duplication: 10 % of TCP segments sent twice, both directions, on a 1280-byte MTU.
case_dup() {
    ns_up 1280
    inns nft -f - <<'EOF'
table ip chaosdup {
    chain out {
        type filter hook output priority 0; policy accept;
        meta l4proto tcp numgen random mod 100 < 10 counter dup to 127.0.0.1 comment "duplicated"
    }
}
EOF
    start_echod
    client stream --conns 4 --bytes $((4 << 20))
    client sizes --sizes 1,1227,1228,1229,4096,65536,1048576
    drain
    rule_figures duplicated
    # The receivers saw the copies: each duplicate of data already received is answered with a
    # D-SACK.
    # shellcheck disable=SC2016 # an awk program
    inns awk '/^TcpExt:/ { if (!n++) { split($0, k) } else { for (i = 2; i <= NF; i++)
        if (k[i] == "TCPDSACKOldSent" || k[i] == "TCPDSACKOfoSent") printf "  %s: %s\n", k[i], $i } }' \
        /proc/net/netstat
}

# A small MTU: 576 bytes (MSS 536); messages of sizes around it, and streams.
case_mtu() {
    ns_up 576
    start_echod
    client stream --conns 4 --bytes $((4 << 20))
    client sizes --sizes 1,535,536,537,1072,1073,65536,1048576
    drain
}

# A bandwidth cap with queueing: tbf at 40 Mbit/s, burst 32 KiB (above the 1500-byte MTU: tbf
# drops packets larger than its burst), up to 100 ms of queue. A client that sends without
# reading is stopped by backpressure; streams alongside finish exactly; memory stays bounded.
case_tbf() {
    ns_up 1500
    inns tc qdisc add dev lo root tbf rate 40mbit burst 32kb latency 100ms
    start_echod
    client backpressure --conns 8 --bytes $((2 << 20))
    drain
    inns tc -s qdisc show dev lo | sed -n 's/^ *\(Sent .*\)/  tbf: \1/p; s/^ *\(backlog .*\)/  tbf: \1/p'
}

# A reset injected mid-stream into one connection (after 256 KiB from echod): only that
# connection ends, counted as reason="reset"; four streams alongside finish exactly.
case_reset() {
    ns_up 1500
    start_echod
    client reset --others 4 --bytes $((2 << 20)) --reset-after $((256 << 10))
    drain
}

# A blackholed peer (every packet to and from its port dropped), idle and with data in flight:
# freed within the bound, the slot serves the next client, echod_connections_active back to 0.
# Keepalive 2 s (too short to spread), then 3 probes 1 s apart: both bounds are
# 2 + 1 + 3 x 1 = 6 s.
case_blackhole() {
    if [[ $user_timeout_flags == 0 ]]; then
        echo "  this echod has no --tcp-user-timeout: without it a peer that vanishes with data in"
        echo "  flight holds its slot for the kernel's ~15 minutes of retransmissions"
        exit "$SKIPPED"
    fi
    ns_up 1500
    start_echod --max-connections 1 --tcp-keepalive 2s --tcp-keepalive-interval 1s \
        --tcp-keepalive-count 3 --tcp-user-timeout auto
    client blackhole --idle-bound 6 --flight-bound 6
    drain
}

# 2,000 clients with 5 % loss: all served (all open at once), each ends with a clean EOF, none
# stuck at the end.
case_many() {
    ns_up 1500
    inns nft add rule inet chaos out meta l4proto tcp numgen random mod 100 "<" 5 \
        counter drop comment "\"dropped\""
    start_echod
    client --deadline 120 many --conns 2000 --msgs 3 --size 1000
    drain
    rule_figures dropped
}

run_case() {
    case $1 in
        loss-1) case_loss 1 4 $((16 << 20)) 30 ;;
        loss-5) case_loss 5 4 $((8 << 20)) 30 ;;
        loss-20) case_loss 20 4 $((512 << 10)) 120 ;;
        dup) case_dup ;;
        mtu-576) case_mtu ;;
        tbf) case_tbf ;;
        reset) case_reset ;;
        blackhole) case_blackhole ;;
        many) case_many ;;
    esac
}

# --------------------------------------------------------------------------- run

echo "chaos: $("$ECHOD_BIN" --version 2>&1 | sed -n 1p) ($ECHOD_BIN), kernel $(uname -r)"
suite_t0=$SECONDS
failed=()
skipped=()
for c in "${cases[@]}"; do
    N=$((N + 1))
    echo
    echo "--- $c"
    t0=$SECONDS
    # A case runs in a subshell, so that its first failure (set -e) ends only that case; this
    # shell then ends what it started and removes its namespace.
    set +e
    (
        set -e
        run_case "$c"
    )
    rc=$?
    set -e
    remove_all
    if [[ $rc == 0 ]]; then
        echo "--- $c: ok in $((SECONDS - t0)) s"
    elif [[ $rc == "$SKIPPED" ]]; then
        echo "--- $c: SKIPPED"
        skipped+=("$c")
    else
        if [[ -f $WORK/$N-echod.log ]]; then
            echo "  echod's log ends:"
            tail -n 15 "$WORK/$N-echod.log" | sed 's/^/    /'
        fi
        echo "--- $c: FAILED after $((SECONDS - t0)) s"
        failed+=("$c")
    fi
done
echo
echo "chaos: ${#cases[@]} cases in $((SECONDS - suite_t0)) s; failed: ${failed[*]:-none}; skipped: ${skipped[*]:-none}"
[[ ${#failed[@]} == 0 ]]
