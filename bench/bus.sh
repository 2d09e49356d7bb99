#!/usr/bin/env bash
# Event bus benchmarks (issue 5). Prints one JSON line per run and the medians.
#
#   bench/bus.sh [RUNS]                  # default 3 runs per backend
#   BACKENDS="memory redis" EVENTS=200000 bench/bus.sh 5
#   BIN=/tmp/switchboard-before bench/bus.sh    # a binary built earlier
#
# Each Redis run starts with the ceiling the same redis-server gives for bare
# pipelined XADD of the same payload (`redis-benchmark -P 64`), measured in the
# same loop, so a bus figure can be read as a ratio of what Redis itself does
# on this machine at that moment. Runs take /tmp/switchboard-bench.lock so only
# one benchmark uses the machine at a time.
#
# - throughput: `switchboard bench bus --events N --payload 256`, publish ->
#   handled -> acked end to end (target: Redis >= 150,000/s, memory >= 2,000,000/s);
# - latency:    p50/p99 of single publishes offered open-loop at 50,000/s
#   (target p99 <= 2 ms), in the same invocation.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
BACKENDS=${BACKENDS:-memory redis}
PAYLOAD=${PAYLOAD:-256}
EVENTS=${EVENTS:-}
RATE=${RATE:-50000}
LATENCY_EVENTS=${LATENCY_EVENTS:-50000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
# BIN=path/to/switchboard measures a binary built earlier (e.g. the one before a change).
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p switchboard
  BIN="$CARGO_TARGET_DIR/release/switchboard"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# utime+stime of a process in seconds (for redis-server's CPU per event).
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15)/hz}' "/proc/$1/stat"; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
field() { sed -E "s/.*\"$1\":([0-9.e+-]+).*/\1/"; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

RPORT=""
if [[ " $BACKENDS " == *" redis "* ]]; then
  command -v redis-server >/dev/null || { echo "redis-server not installed" >&2; exit 1; }
  RPORT=$(free_port)
  redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null &
  PIDS+=($!)
  RPID=$!
  for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

PAYLOAD_STR=$(head -c "$PAYLOAD" </dev/zero | tr '\0' x)
uptime
for backend in $BACKENDS; do
  case $backend in
    memory) url="memory://bench"; n=${EVENTS:-1000000} ;;
    redis) url="redis://127.0.0.1:$RPORT"; n=${EVENTS:-200000} ;;
    nats) echo "nats: run by hand against a nats-server -js (see bench/RESULTS.md)"; continue ;;
    *) echo "unknown backend $backend" >&2; exit 1 ;;
  esac
  : >/tmp/sb-bus-eps; : >/tmp/sb-bus-p99; : >/tmp/sb-bus-ceiling; : >/tmp/sb-bus-cpu
  echo "== $backend: $BIN bench bus --bus $url --events $n --payload $PAYLOAD --rate $RATE --latency-events $LATENCY_EVENTS --json"
  for i in $(seq "$RUNS"); do
    if [ "$backend" = redis ]; then
      redis-cli -p "$RPORT" del s >/dev/null
      ceiling=$(flock /tmp/switchboard-bench.lock redis-benchmark -p "$RPORT" -P 64 -n 500000 -q XADD s '*' f "$PAYLOAD_STR" \
        | tr '\r' '\n' | grep -oE '[0-9.]+ requests per second' | tail -1 | cut -d' ' -f1)
      redis-cli -p "$RPORT" del s >/dev/null
      echo "run $i: redis-benchmark pipelined XADD ceiling: $ceiling/s"
      echo "$ceiling" >>/tmp/sb-bus-ceiling
    fi
    if [ "$backend" = redis ]; then
      redis-cli -p "$RPORT" config resetstat >/dev/null
      server_before=$(cpu_of "$RPID")
    fi
    out=$(flock /tmp/switchboard-bench.lock "$BIN" bench bus --bus "$url" --events "$n" --payload "$PAYLOAD" \
      --rate "$RATE" --latency-events "$LATENCY_EVENTS" --json | tail -1)
    echo "run $i: $out  (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    if [ "$backend" = redis ]; then
      total=$((n + LATENCY_EVENTS))
      echo "run $i: redis-server CPU $(awk -v a="$server_before" -v b="$(cpu_of "$RPID")" -v n="$total" 'BEGIN {printf "%.2f s, %.2f us per event", b-a, (b-a)*1e6/n}') (both phases); command time per event (INFO commandstats):" \
        "$(redis-cli -p "$RPORT" info commandstats | tr -d '\r' | awk -F'[:,=]' -v n="$total" '/^cmdstat_x(add|readgroup|ack)/ {printf "%s %.2f us  ", substr($1, 9), $5/n}')"
    fi
    echo "$out" | field events_per_s >>/tmp/sb-bus-eps
    echo "$out" | field publish_p99_ms >>/tmp/sb-bus-p99
    echo "$out" | field cpu_s >>/tmp/sb-bus-cpu
  done
  eps=$(median </tmp/sb-bus-eps)
  cpu=$(median </tmp/sb-bus-cpu)
  echo "median $backend: $eps events/s end to end, publish p99 $(median </tmp/sb-bus-p99) ms, cpu_s $cpu ($(awk -v c="$cpu" -v n="$n" 'BEGIN {printf "%.2f", c*1e6/n}') us/event)"
  if [ "$backend" = redis ]; then
    ceil=$(median </tmp/sb-bus-ceiling)
    echo "median redis-benchmark XADD ceiling: $ceil/s (bus/ceiling $(awk -v a="$eps" -v b="$ceil" 'BEGIN {printf "%.2f", a/b}'))"
  fi
done
uptime
