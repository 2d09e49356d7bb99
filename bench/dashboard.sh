#!/usr/bin/env bash
# What the dashboard costs the gateway: CPU time per proxied request (utime +
# stime of the gateway process from /proc/PID/stat over one wrk run) and
# requests/s, with and without an SSE client following /v1/stream, in
# alternating rounds against the same gateway process.
#
#   flock /tmp/switchboard-bench.lock bench/dashboard.sh
#   ROUNDS=6 DURATION=8 BASE=/path/to/older/switchboard bench/dashboard.sh
#
# With BASE set, a second gateway built from another commit (e.g. main before
# the dashboard) is measured in the same rounds as a peer.
# Setup as bench/gateway.sh: one nginx backend, bench/peers/switchboard.toml
# (2 workers, access log on), wrk -t2 -c50.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROOT=$PWD
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-8}
CONNS=${CONNS:-50}
BASE=${BASE:-}
RUN=$(mktemp -d /tmp/switchboard-dash.XXXXXX)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-0}
SB=$CARGO_TARGET_DIR/release/switchboard
export PATH="$PATH:/usr/sbin"

for tool in nginx wrk curl; do
  command -v "$tool" >/dev/null || { log "needs $tool (bench/gateway.sh installs nginx and wrk)"; exit 1; }
done
# NO_BUILD=1 measures the binary already in $CARGO_TARGET_DIR/release.
if [ -z "${NO_BUILD:-}" ]; then
  log "building switchboard (release)"
  cargo build --release -q -p switchboard
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$RUN/backend.pid" ] && kill "$(cat "$RUN/backend.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
cp bench/peers/nginx-backend.conf "$RUN/"
nginx -p "$RUN" -c "$RUN/nginx-backend.conf" -e "$RUN/backend-error.log"
wait_port 18080

start_gateway() { # name binary listen-port admin-port
  sed -e "s/18083/$3/; s/19983/$4/" bench/peers/switchboard.toml >"$RUN/$1.toml"
  SWITCHBOARD_LOG=warn setsid "$2" gateway --config "$RUN/$1.toml" >"$RUN/$1-access.log" 2>"$RUN/$1.err" &
  pids+=($!)
  echo $! >"$RUN/$1.pid"
  wait_port "$3"
}
start_gateway new "$SB" 18083 19983
targets=(new new+sse)
declare -A PORT=([new]=18083 [new+sse]=18083) PIDOF=([new]=new [new+sse]=new)
if [ -n "$BASE" ]; then
  start_gateway base "$BASE" 18084 19984
  targets+=(base); PORT[base]=18084; PIDOF[base]=base
fi

TICK=$(getconf CLK_TCK)

# One run: prints "req_per_s cpu_us_per_request".
measure() {
  local t=$1 pid sse=""
  pid=$(cat "$RUN/${PIDOF[$t]}.pid")
  if [ "$t" = new+sse ]; then
    curl -sN "http://127.0.0.1:19983/v1/stream" >"$RUN/sse.out" &
    sse=$!
    sleep 1.5 # connected and a frame or two received
  fi
  local before after out rps reqs
  before=$(cpu_ticks "$pid")
  out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:${PORT[$t]}/users/42")
  after=$(cpu_ticks "$pid")
  if [ -n "$sse" ]; then
    kill "$sse" 2>/dev/null || true; wait "$sse" 2>/dev/null || true
    grep -c '^event: sample' "$RUN/sse.out" >>"$RUN/sse-frames"
  fi
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  awk -v r="$rps" -v n="$reqs" -v b="$before" -v a="$after" -v hz="$TICK" \
    'BEGIN {printf "%s %.3f\n", r, (a - b) / hz * 1e6 / n}'
}

log "warm-up"
for t in "${targets[@]}"; do wrk -t2 -c"$CONNS" -d2s "http://127.0.0.1:${PORT[$t]}/users/42" >/dev/null; done
for r in $(seq 1 "$ROUNDS"); do
  order=("${targets[@]}")
  if (( r % 2 == 0 )); then order=($(printf '%s\n' "${targets[@]}" | tac)); fi
  for t in "${order[@]}"; do
    read -r rps us < <(measure "$t")
    echo "$t $rps $us" >>"$RUN/results"
    log "round $r $t: $rps req/s, $us us CPU per request"
  done
done

declare -A RPS US
for t in "${targets[@]}"; do
  RPS[$t]=$(awk -v t="$t" '$1==t {print $2}' "$RUN/results" | median)
  US[$t]=$(awk -v t="$t" '$1==t {print $3}' "$RUN/results" | median)
done
echo
echo "Dashboard cost: wrk -t2 -c$CONNS -d${DURATION}s, $ROUNDS alternating rounds, medians; load: $(uptime | sed 's/.*load/load/')"
printf '%-10s %12s %16s %12s %12s\n' gateway "req/s" "CPU us/request" "req/s ratio" "CPU ratio"
for t in "${targets[@]}"; do
  printf '%-10s %12.0f %16.2f %12s %12s\n' "$t" "${RPS[$t]}" "${US[$t]}" \
    "$(awk -v a="${RPS[$t]}" -v b="${RPS[new]}" 'BEGIN {printf "%.3f", a/b}')" \
    "$(awk -v a="${US[$t]}" -v b="${US[new]}" 'BEGIN {printf "%.3f", a/b}')"
done
[ -f "$RUN/sse-frames" ] && echo "SSE frames received per run: $(tr '\n' ' ' <"$RUN/sse-frames")"
