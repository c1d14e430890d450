#!/usr/bin/env bash
# Load past one machine, proven on one: N echod-bench workers given one --start-at against one
# echod, their results merged with `echod-bench merge`, and checked against the same load from
# a single process:
#   - every worker opened its measured window at the start time (within 50 ms);
#   - merged operations, bytes and errors equal the workers' sums, and equal the single run's
#     (both use --count; warm-up work is left out of it exactly);
#   - the merged histogram holds exactly as many values as operations, and its p50/p99 lie
#     within the workers' own p50/p99 (a quantile of a sum of histograms lies between the
#     parts' quantiles), to the histogram's precision (3 significant digits);
#   - merged p50/p99 agree with the single process's within a factor (two runs on a shared
#     machine never agree to the histogram's precision; a unit or merge error is off by far more).
# Prints both summaries side by side. About 20 s.
#
# Usage: bash ci/fleet.sh     (ECHOD_BIN: an echod build; echod-bench is taken from beside it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ECHOD=${ECHOD_BIN:-target/debug/echod}
BENCH=$(dirname "$ECHOD")/echod-bench
[[ -x $ECHOD && -x $BENCH ]] || { echo "fleet: need $ECHOD and $BENCH (cargo build --bins)" >&2; exit 1; }
WORKERS=${FLEET_WORKERS:-4}
# Per worker: 4 connections, open loop at 1,000 messages/s, 1 s of warm-up, then 3,000 messages.
CONNS=4 RATE=1000 COUNT=3000 WARMUP=1s

TMP=$(mktemp -d /tmp/echod-fleet.XXXXXX)
ECHOD_PID=""
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ -n $ECHOD_PID ]]; then kill "$ECHOD_PID" 2>/dev/null || true; wait "$ECHOD_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

"$ECHOD" --listen 127.0.0.1:0 --metrics-listen off 2>"$TMP/echod.log" &
ECHOD_PID=$!
port=""
for _ in $(seq 100); do
    port=$(grep -o '127\.0\.0\.1:[1-9][0-9]*' "$TMP/echod.log" | sed -n 1p | cut -d: -f2 || true)
    [[ -n $port ]] && break
    kill -0 "$ECHOD_PID" 2>/dev/null || { cat "$TMP/echod.log" >&2; exit 1; }
    sleep 0.1
done
[[ -n $port ]] || { echo "fleet: echod logged no address within 10 s" >&2; cat "$TMP/echod.log" >&2; exit 1; }
TARGET=127.0.0.1:$port
echo "echod on $TARGET; $WORKERS workers x $CONNS connections at $RATE msg/s, $COUNT messages each after ${WARMUP} of warm-up"

# The workers: one start time, 3 s ahead (enough for the processes to start).
start_at=$(date -u -d '+3 sec' +%Y-%m-%dT%H:%M:%SZ)
for i in $(seq "$WORKERS"); do
    timeout -k 5 60 "$BENCH" --target "$TARGET" --worker "w$i" --start-at "$start_at" --warmup "$WARMUP" \
        --json --histogram - --quiet --timeout 5s --threads 1 \
        pingpong -c "$CONNS" --rate "$RATE" -n "$COUNT" >"$TMP/w$i.log" 2>"$TMP/w$i.err" &
    PIDS+=($!)
done
failed=0
for i in "${!PIDS[@]}"; do
    wait "${PIDS[$i]}" || { failed=1; echo "fleet: worker w$((i + 1)) failed:" >&2; cat "$TMP/w$((i + 1)).err" >&2; }
done
PIDS=()
((failed == 0)) || exit 1

"$BENCH" merge "$TMP"/w*.log
"$BENCH" merge --json "$TMP"/w*.log >"$TMP/merged.json"

# The same load from one process.
timeout -k 5 60 "$BENCH" --target "$TARGET" --worker single --warmup "$WARMUP" --json --histogram - --quiet --timeout 5s \
    pingpong -c $((CONNS * WORKERS)) --rate $((RATE * WORKERS)) -n $((COUNT * WORKERS)) >"$TMP/single.log" 2>"$TMP/single.err" \
    || { cat "$TMP/single.err" >&2; exit 1; }
"$BENCH" merge "$TMP/single.log"

python3 - "$TMP" "$start_at" "$WORKERS" <<'EOF'
import calendar, json, sys, time
from pathlib import Path

tmp, start_at, workers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def result(path):
    return next(json.loads(l) for l in path.read_text().splitlines() if l.startswith("{"))
parts = [result(tmp / f"w{i}.log") for i in range(1, workers + 1)]
merged = json.loads((tmp / "merged.json").read_text())
single = result(tmp / "single.log")
errors = []
def check(ok, what):
    if not ok:
        errors.append(what)

start = calendar.timegm(time.strptime(start_at, "%Y-%m-%dT%H:%M:%SZ"))
for p in parts:
    check(abs(p["window_start"] - p["warmup_s"] - start) < 0.05,
          f"{p['worker']}: traffic began {p['window_start'] - p['warmup_s'] - start:+.3f} s from --start-at")
for key in ("messages", "bytes", "errors", "connections_opened"):
    check(merged[key] == sum(p[key] for p in parts), f"merged {key} {merged[key]} != the workers' sum")
for key in ("messages", "bytes", "errors"):
    check(merged[key] == single[key], f"merged {key} {merged[key]} != single process {single[key]}")
check(merged["errors"] == 0 and merged["ok"], "errors in the merged run")
check(merged["latency_us"]["count"] == merged["messages"], "merged histogram count != operations")
precision = 1e-3
for q in ("p50", "p99"):
    lo = min(p["latency_us"][q] for p in parts) * (1 - precision)
    hi = max(p["latency_us"][q] for p in parts) * (1 + precision)
    check(lo <= merged["latency_us"][q] <= hi, f"merged {q} {merged['latency_us'][q]} outside the workers' [{lo}, {hi}]")
for q, factor in (("p50", 4.0), ("p99", 6.0)):
    m, s = merged["latency_us"][q], single["latency_us"][q]
    check(s / factor <= m <= s * factor, f"merged {q} {m} µs vs single {s} µs: off by more than {factor}x")

print()
print(f"{'':24} {'merged':>12} {'single':>12}")
for label, get in (
    ("operations", lambda r: r["messages"]),
    ("bytes", lambda r: r["bytes"]),
    ("errors", lambda r: r["errors"]),
    ("ops/s", lambda r: round(r["msgs_per_s"], 1)),
    ("p50 µs", lambda r: r["latency_us"]["p50"]),
    ("p99 µs", lambda r: r["latency_us"]["p99"]),
    ("p99.9 µs", lambda r: r["latency_us"]["p999"]),
):
    print(f"{label:24} {get(merged):>12} {get(single):>12}")
if errors:
    print("\nFAIL:\n  " + "\n  ".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"\nfleet: {workers} workers merged = one process's load: counts equal, percentiles consistent")
EOF
