#!/usr/bin/env bash
# Fault injection under load (issue 8): runs `switchboard bench chaos` scenarios
# and exits non-zero when any of them lost something.
#
#   bench/chaos.sh                    # gateway (3 phases x 10 s), bus (30 s), registry (60 s), shop (60 s)
#   SECONDS_PER_PHASE=5 BUS_SECONDS=20 bench/chaos.sh
#   SCENARIOS=gateway bench/chaos.sh  # or SCENARIOS=bus, SCENARIOS=registry, SCENARIOS=shop
#   REG_INSTANCES=2000 REG_SECONDS=30 SCENARIOS=registry bench/chaos.sh
#   SHOP_SECONDS=300 SCENARIOS=shop bench/chaos.sh
#
# - gateway: closed-loop GETs (CONCURRENCY clients) through a gateway whose
#   upstreams are killed (listener and connections closed at once, as on
#   kill -9) and restarted in turn, next to one that accepts and never answers,
#   one that answers after 2 s and one that resets after reading the request;
#   a last phase adds one that resets mid-body. Zero failed GETs are expected
#   in the baseline and fault phases.
# - bus: a private redis-server with AOF `appendfsync always` gets SIGKILL and
#   a restart every ~6 s under publish (RATE/s) and consume load; a consumer is
#   killed and replaced every 2 s; event 100 is poison. Every acknowledged
#   publish must be handled, side effects exactly once (idempotent consumer on
#   the same Redis), the poison event dead-lettered. Needs redis-server.
# - registry: two `switchboard registry` processes share a private redis-server
#   (AOF always); REG_INSTANCES (10,000) instances register over HTTP and flap
#   (TTL heartbeats stop and resume, deregistrations, new ports; 200 with HTTP
#   checks against a stub whose answer flaps) for REG_SECONDS while every 10 s
#   redis-server, registry A or registry B in turn gets SIGKILL and a restart.
#   Meanwhile no dead instance may be listed passing later than TTL + 8 s.
#   Then the final states are fixed and both views must equal the ground
#   truth within 60 s: no instance stuck in a wrong state. Needs redis-server.
#   (10,000 instances: 0 stuck, converged 10.4 s after settling, release build: docs/RELIABILITY.md.)
# - shop: the demo shop (2 instances of each service, gateway, Redis Streams
#   bus on a private redis-server with AOF always) under SHOP_CLIENTS clients
#   of mixed traffic for SHOP_SECONDS; one instance killed like a crash and
#   restarted every ~3 s, redis-server SIGKILLed every 20 s, payments decline
#   in bursts. Every accepted order must end confirmed or cancelled, none
#   stuck or placed twice, stock and payments must add up. Needs redis-server.
#
# The shortest versions of these cases run in CI as tests:
# crates/gateway/tests/proxy.rs (failover_with_zero_failed_gets),
# crates/gateway/tests/abuse.rs, crates/bus/tests/* (broker_restart_loses_nothing),
# demo/shop/tests/redis_restart.rs, demo/shop/tests/soak.rs,
# crates/cli/tests/chaos_registry.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_PHASE=${SECONDS_PER_PHASE:-10}
BUS_SECONDS=${BUS_SECONDS:-30}
CONCURRENCY=${CONCURRENCY:-32}
RATE=${RATE:-500}
REG_INSTANCES=${REG_INSTANCES:-10000}
REG_SECONDS=${REG_SECONDS:-60}
SHOP_SECONDS=${SHOP_SECONDS:-60}
SHOP_CLIENTS=${SHOP_CLIENTS:-8}
SCENARIOS=${SCENARIOS:-"gateway bus registry shop"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

cargo build --release -q -p switchboard
BIN=$CARGO_TARGET_DIR/release/switchboard
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
failed=()
for s in $SCENARIOS; do
  case $s in
    gateway)
      SWITCHBOARD_LOG=error "$BIN" bench chaos gateway --seconds "$SECONDS_PER_PHASE" \
        --concurrency "$CONCURRENCY" --json || failed+=(gateway) ;;
    bus)
      SWITCHBOARD_LOG=error "$BIN" bench chaos bus --seconds "$BUS_SECONDS" --rate "$RATE" --json \
        || failed+=(bus) ;;
    registry)
      SWITCHBOARD_LOG=error "$BIN" bench chaos registry --instances "$REG_INSTANCES" \
        --seconds "$REG_SECONDS" --json || failed+=(registry) ;;
    shop)
      SWITCHBOARD_LOG=error "$BIN" bench chaos shop --seconds "$SHOP_SECONDS" \
        --clients "$SHOP_CLIENTS" --json || failed+=(shop) ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "chaos: lost something in: ${failed[*]}"
  exit 1
fi
echo "chaos: nothing lost ($SCENARIOS)"
