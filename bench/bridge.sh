#!/usr/bin/env bash
# HTTP event bridge (issue 10): `switchboard bench bridge` on Redis, with the
# CPU each event costs. Compares one or more binaries in alternating rounds.
#
#   bench/bridge.sh BIN [BIN...]                  # 5 rounds, 100,000 events, batch 100
#   ROUNDS=3 EVENTS=50000 BATCH=1 bench/bridge.sh BIN_A BIN_B
#   LOCK=1 bench/bridge.sh BIN                    # wall-clock figures: hold the bench lock
#
# Per run it prints events/s end to end, the switchboard process's CPU per
# event (its own utime+stime over the measured span, from the bench's JSON),
# redis-server's CPU per event (utime+stime from /proc/PID/stat around the
# run) and their sum. The CPU figures hardly move with the machine's other
# load, unlike events/s; compare builds by them while others are busy and
# by events/s only on a quiet machine. Prints the medians per binary.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${ROUNDS:-5}
EVENTS=${EVENTS:-100000}
BATCH=${BATCH:-100}
EXTRA=${EXTRA:-}
[ $# -ge 1 ] || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "redis-server not installed" >&2; exit 2; }
if [ "${LOCK:-0}" = 1 ] && [ -z "${SWITCHBOARD_BENCH_LOCKED:-}" ]; then
  export SWITCHBOARD_BENCH_LOCKED=1
  exec flock /tmp/switchboard-bench.lock "$0" "$@"
fi

RUN=$(mktemp -d /tmp/switchboard-bridge.XXXXXX)
RPID=
cleanup() { [ -n "$RPID" ] && kill "$RPID" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null &
RPID=$!
wait_port "$RPORT"
HZ=$(getconf CLK_TCK)
field() { sed -E "s/.*\"$1\":([0-9.e+-]+).*/\1/"; }

log "load average: $(cut -d' ' -f1-3 /proc/loadavg); $EVENTS events, batch $BATCH, redis on $RPORT"
for r in $(seq 1 "$ROUNDS"); do
  order=("$@")
  if (( r % 2 == 0 )); then order=($(printf '%s\n' "$@" | tac)); fi
  for bin in "${order[@]}"; do
    before=$(cpu_ticks "$RPID")
    # shellcheck disable=SC2086
    json=$("$bin" bench bridge --bus "redis://127.0.0.1:$RPORT" --events "$EVENTS" --batch "$BATCH" $EXTRA --json | tail -1)
    after=$(cpu_ticks "$RPID")
    eps=$(field events_per_s <<<"$json")
    sb=$(field cpu_us_per_event <<<"$json")
    conns=$(field subscriber_connections <<<"$json")
    rd=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$EVENTS" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
    sum=$(awk -v a="$sb" -v b="$rd" 'BEGIN {printf "%.2f", a + b}')
    echo "$bin $eps $sb $rd $sum $conns" >>"$RUN/results"
    log "round $r $bin: $eps events/s; CPU us/event: switchboard $sb, redis $rd, sum $sum; $conns subscriber connections (load $(cut -d' ' -f1-3 /proc/loadavg))"
  done
done

echo
echo "bench bridge on Redis: $EVENTS events, batch $BATCH ${EXTRA:+($EXTRA) }$ROUNDS alternating rounds, medians"
printf '%-45s %10s %14s %10s %10s\n' binary events/s "switchboard us" "redis us" "sum us"
for bin in "$@"; do
  col() { awk -v b="$bin" -v c="$1" '$1==b {print $c}' "$RUN/results" | median; }
  printf '%-45s %10s %14s %10s %10s\n' "$bin" "$(col 2)" "$(col 3)" "$(col 4)" "$(col 5)"
done
