#!/usr/bin/env bash
# Where each proxy's CPU goes, kernel included: `perf record -e cpu-clock`
# (a software clock, so it works on VMs without hardware counters) on the
# proxy's processes while wrk drives it, for nginx and Switchboard in front
# of the benchmark's nginx backend (bench/peers/*.conf, same as gateway.sh).
#
#   bench/gateway-perf.sh [BINARY]      # default: the release build
#   ONLY=switchboard DURATION=10 bench/gateway-perf.sh
#
# Prints, per proxy, the CPU microseconds per request by symbol (top entries,
# kernel symbols marked [k]) and the totals for kernel and user space, and
# leaves the perf.data files in the run dir for `perf report -i`. Sampling
# itself costs CPU (totals run higher than in bench/gateway.sh): compare the
# proxies within one run, not with other benchmarks.
# Needs linux-perf (`perf`) and root (or perf_event_paranoid <= 0).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROOT=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${1:-$CARGO_TARGET_DIR/release/switchboard}
DURATION=${DURATION:-8}
FREQ=${FREQ:-4000}
TOP=${TOP:-40}
ONLY=${ONLY:-}
export PATH="$PATH:/usr/sbin"
export MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-0}
RUN=$(mktemp -d /tmp/switchboard-perf.XXXXXX)
cp bench/peers/nginx-backend.conf bench/peers/nginx-proxy.conf bench/peers/switchboard.toml "$RUN/"
sb_pid=""
cleanup() {
  [ -n "$sb_pid" ] && kill "$sb_pid" 2>/dev/null || true
  for f in backend.pid proxy.pid; do
    [ -f "$RUN/$f" ] && kill "$(cat "$RUN/$f")" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -f "$RUN"/*access.log
}
trap cleanup EXIT
nginx -p "$RUN" -c "$RUN/nginx-backend.conf" -e "$RUN/backend-error.log"
wait_port 18080
nginx -p "$RUN" -c "$RUN/nginx-proxy.conf" -e "$RUN/proxy-error.log"
# A session of its own, as nginx has (see bench/lib.sh).
SWITCHBOARD_LOG=warn setsid "$BIN" gateway --config "$RUN/switchboard.toml" >"$RUN/switchboard-access.log" 2>"$RUN/switchboard.err" &
sb_pid=$!
wait_port 18081
wait_port 18083

declare -A PORT=([nginx]=18081 [switchboard]=18083)
targets=(nginx switchboard)
[ -n "$ONLY" ] && targets=($ONLY)
pids_of() {
  case $1 in
    nginx) pgrep -P "$(cat "$RUN/proxy.pid")" | paste -sd, ;;
    switchboard) echo "$sb_pid" ;;
  esac
}
for t in "${targets[@]}"; do
  wrk -t2 -c50 -d2s "http://127.0.0.1:${PORT[$t]}/users/42" >/dev/null
  perf record -q -F "$FREQ" -e cpu-clock -p "$(pids_of "$t")" -o "$RUN/$t.data" -- sleep "$((DURATION + 1))" 2>/dev/null &
  perf_pid=$!
  sleep 0.5
  wrk -t2 -c50 -d"${DURATION}s" "http://127.0.0.1:${PORT[$t]}/users/42" >"$RUN/$t.wrk"
  wait "$perf_pid" || true
  n=$(awk '/requests in/ {print $1}' "$RUN/$t.wrk")
  # Samples only count while wrk ran (perf runs 1.5 s longer, idle then).
  perf report -i "$RUN/$t.data" --no-children -g none --sort sym --stdio -F sample,sym 2>/dev/null \
    | awk -v n="$n" -v f="$FREQ" '
      /^#/ || NF < 3 { next }
      { s = $1; sym = ""; for (i = 2; i <= NF; i++) sym = sym " " $i; printf "%8.3f us %s\n", s / f * 1e6 / n, sym }' \
    | sort -rn >"$RUN/$t.syms"
  awk -v t="$t" -v n="$n" '{ if ($0 ~ /\[k\]/) k += $1; else u += $1 }
    END { printf "%s: %d requests; CPU us per request: kernel %.2f, user %.2f, total %.2f\n", t, n, k, u, k + u }' \
    "$RUN/$t.syms" >"$RUN/$t.top"
  head -n "$TOP" "$RUN/$t.syms" >>"$RUN/$t.top"
done
for t in "${targets[@]}"; do
  echo "== $t"; cat "$RUN/$t.top"
done
echo "perf data: $RUN"
