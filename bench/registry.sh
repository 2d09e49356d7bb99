#!/usr/bin/env bash
# Registry benchmarks (issue 3). Prints one JSON line per run and the medians.
#
#   bench/registry.sh [RUNS]        # default 3 runs of each measurement
#
# - checks:      10,000 instances with HTTP checks every second against a local
#                backend (a separate process); CPU seconds per wall second of the
#                registry process (target <= 0.5).
# - propagation: a status change reaching an in-process watcher, p99
#                (target <= 50 ms memory, <= 250 ms through Redis).
# - lookup:      ns per lookup of a service's passing instances (target <= 100 ns);
#                the criterion version is `cargo bench -p switchboard-registry --bench lookup`.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p switchboard-registry --example registry_bench
BIN="$CARGO_TARGET_DIR/release/examples/registry_bench"
export CLK_TCK=$(getconf CLK_TCK)
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
field() { sed -E "s/.*\"$1\": ([0-9.]+).*/\1/"; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

BPORT=$(free_port)
"$BIN" backend "$BPORT" >/dev/null &
PIDS+=($!)
sleep 0.5

echo "== checks: 10000 instances, HTTP check every 1s, backend 127.0.0.1:$BPORT"
: >/tmp/sb-registry-checks
for _ in $(seq "$RUNS"); do
  out=$("$BIN" checks "127.0.0.1:$BPORT" 10000 10 2>/dev/null | tail -1)
  echo "$out"
  echo "$out" | field cpu_s_per_wall_s >>/tmp/sb-registry-checks
done
echo "median cpu_s_per_wall_s: $(median </tmp/sb-registry-checks)"

echo "== propagation (200 status changes per run)"
RURL=""
if command -v redis-server >/dev/null; then
  RPORT=$(free_port)
  redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null &
  PIDS+=($!)
  sleep 0.5
  RURL="redis://127.0.0.1:$RPORT"
fi
for store in memory:// $RURL; do
  : >/tmp/sb-registry-prop
  for _ in $(seq "$RUNS"); do
    out=$("$BIN" propagation "$store" 200 2>/dev/null | tail -1)
    echo "$out"
    echo "$out" | field p99_ms >>/tmp/sb-registry-prop
  done
  echo "median p99_ms ($store): $(median </tmp/sb-registry-prop)"
done
[ -n "$RURL" ] || echo "redis-server not found: Redis propagation skipped"

echo "== lookup"
: >/tmp/sb-registry-lookup
for _ in $(seq "$RUNS"); do
  out=$("$BIN" lookup 2>/dev/null | tail -1)
  echo "$out"
  echo "$out" | field view_ns_median >>/tmp/sb-registry-lookup
done
echo "median view_ns_median: $(median </tmp/sb-registry-lookup)"
