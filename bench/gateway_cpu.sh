#!/usr/bin/env bash
# CPU time per proxied request of one or more `switchboard` binaries (the
# gateway's utime+stime from /proc/PID/stat over a wrk run, divided by the
# requests wrk completed). Less sensitive to other load on the machine than
# requests/s; use it to compare two builds of the request path.
#
#   bench/gateway_cpu.sh BIN_A BIN_B            # 5 alternating rounds of 10 s
#   ROUNDS=3 DURATION=5 bench/gateway_cpu.sh BIN_A BIN_B
#
# Each binary serves bench/peers/switchboard.toml in front of the nginx backend
# of bench/gateway.sh (wrk -t2 -c50, GET /users/42). Prints, per binary, the
# median CPU microseconds per request and the median requests/s.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROOT=$PWD
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
PEERS=$ROOT/bench/peers
RUN=$(mktemp -d /tmp/switchboard-cpu.XXXXXX)
export MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-0}
export PATH="$PATH:/usr/sbin"
[ $# -ge 1 ] || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
command -v wrk >/dev/null && command -v nginx >/dev/null || {
  echo "needs wrk and nginx (bench/gateway.sh installs them)" >&2; exit 2; }

pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  [ -f "$RUN/backend.pid" ] && kill "$(cat "$RUN/backend.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

cp "$PEERS"/nginx-backend.conf "$PEERS"/switchboard.toml "$RUN/"
nginx -p "$RUN" -c "$RUN/nginx-backend.conf" -e "$RUN/backend-error.log"
wait_port 18080

HZ=$(getconf CLK_TCK)

for r in $(seq 1 "$ROUNDS"); do
  order=("$@")
  if (( r % 2 == 0 )); then order=($(printf '%s\n' "$@" | tac)); fi
  for bin in "${order[@]}"; do
    SWITCHBOARD_LOG=warn setsid "$bin" gateway --config "$RUN/switchboard.toml" \
      >/dev/null 2>"$RUN/gateway.err" &
    pid=$!
    wait_port 18083
    wrk -t2 -c"$CONNS" -d2s "http://127.0.0.1:18083/users/42" >/dev/null
    before=$(cpu_ticks "$pid")
    out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:18083/users/42")
    after=$(cpu_ticks "$pid")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    us=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
    echo "$bin $us $rps" >>"$RUN/results"
    log "round $r $bin: ${us} us CPU/request, $rps req/s (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  done
done

echo
echo "CPU per request: wrk -t2 -c$CONNS -d${DURATION}s, $ROUNDS alternating rounds, medians"
for bin in "$@"; do
  us=$(awk -v b="$bin" '$1==b {print $2}' "$RUN/results" | median)
  rps=$(awk -v b="$bin" '$1==b {print $3}' "$RUN/results" | median)
  printf '%-50s %8s us/req %10s req/s\n' "$bin" "$us" "$rps"
done
