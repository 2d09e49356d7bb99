#!/usr/bin/env bash
# Demo shop benchmark: orders per second through the whole flow
# (client -> gateway -> orders -> users over HTTP -> bus -> inventory -> bus ->
# payments -> bus -> orders) and p99 time from POST /orders to order.confirmed,
# on the memory bus and on Redis Streams.
#
#   bench/shop.sh                      # 3 rounds of 10 s per bus, 64 orders in flight
#   ROUNDS=1 SECONDS_PER_ROUND=5 bench/shop.sh
#   BUSES=memory bench/shop.sh         # or BUSES=redis
#
# Everything runs in one process (examples/shop_bench.rs): the gateway with its
# worker threads, two instances of each service, the load generator. On Redis,
# a private redis-server without persistence is started on a free port.
# Prints one line per round and the median per bus.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-10}
CONCURRENCY=${CONCURRENCY:-64}
BUSES=${BUSES:-"memory redis"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

cargo build --release -q -p switchboard-shop --example shop_bench
BIN=$CARGO_TARGET_DIR/release/examples/shop_bench

for bus in $BUSES; do
  url=$bus
  [ "$bus" = memory ] && url=memory://
  results=()
  for round in $(seq "$ROUNDS"); do
    line=$(SWITCHBOARD_LOG=warn "$BIN" --bus "$url" --seconds "$SECONDS_PER_ROUND" --concurrency "$CONCURRENCY" | tee /dev/stderr | tail -1)
    results+=("$line")
  done
  printf '%s\n' "${results[@]}" | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
med = lambda k: statistics.median(r[k] for r in rows)
print(f"== {rows[0][\"bus\"]}: median of {len(rows)} rounds: {med(\"orders_per_s\"):.0f} orders/s, "
      f"p50 {med(\"p50_ms\"):.2f} ms, p99 {med(\"p99_ms\"):.2f} ms, errors {sum(r[\"errors\"] for r in rows)}")
'
done
