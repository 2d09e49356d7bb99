#!/usr/bin/env bash
# Instructions per proxied request of the gateway, under callgrind: a figure
# that does not move with the machine's load (unlike req/s or CPU time).
#
#   bench/gateway-callgrind.sh [BINARY]     # default: the release build
#   EDGE=1 bench/gateway-callgrind.sh       # route with rate limit + idempotency
#
# Starts the benchmark's nginx backend (bench/peers/nginx-backend.conf) and
# `BINARY gateway` (bench/peers/switchboard.toml: every feature on) on ports
# 28080/28083, runs the gateway under `valgrind --tool=callgrind`, warms up
# with wrk, zeroes the counters, drives 10 s of wrk -t1 -c10 and dumps. Prints
# instructions per request in total and per thread group (workers, access
# log), and leaves the profile in the run dir for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${1:-$CARGO_TARGET_DIR/release/switchboard}
RUN=$(mktemp -d /tmp/switchboard-callgrind.XXXXXX)
export PATH="$PATH:/usr/sbin"
mkdir -p "$RUN/logs"
sed 's/18080/28080/; s/^pid .*/pid backend.pid;/' bench/peers/nginx-backend.conf >"$RUN/backend.conf"
sed 's/18083/28083/; s/19983/29983/; s/18080/28080/' bench/peers/switchboard.toml >"$RUN/sb.toml"
# EDGE=1: the route also has a rate limit (never triggered) and idempotency (issue 6).
[ -n "${EDGE:-}" ] && printf '%s\n' 'rate_limit = { rate = 100000000, per = "1s", key = "ip" }' \
  'idempotency = { ttl = "1m" }' >>"$RUN/sb.toml"
nginx -p "$RUN" -c "$RUN/backend.conf" -e "$RUN/backend-error.log"
vg=""
cleanup() {
  [ -n "$vg" ] && kill "$vg" 2>/dev/null || true
  [ -f "$RUN/backend.pid" ] && kill "$(cat "$RUN/backend.pid")" 2>/dev/null || true
  rm -f "$RUN/access.log"
}
trap cleanup EXIT
MIMALLOC_ARENA_EAGER_COMMIT=0 SWITCHBOARD_LOG=warn valgrind --tool=callgrind \
  --callgrind-out-file="$RUN/callgrind.out" "$BIN" gateway --config "$RUN/sb.toml" \
  >"$RUN/access.log" 2>"$RUN/gateway.err" &
vg=$!
for _ in $(seq 1 200); do curl -s -o /dev/null http://127.0.0.1:28083/users/1 && break; sleep 0.5; done
wrk -t1 -c10 -d3s http://127.0.0.1:28083/users/42 >/dev/null
callgrind_control -z "$vg" >/dev/null
wrk -t1 -c10 -d10s http://127.0.0.1:28083/users/42 >"$RUN/wrk.txt"
callgrind_control -d "$vg" >/dev/null
sleep 1
kill -INT "$vg"; wait "$vg" || true; vg=""
n=$(awk '/requests in/ {print $1}' "$RUN/wrk.txt")
prof=$(ls "$RUN"/callgrind.out.* | head -1)
callgrind_annotate --inclusive=yes --threshold=100 "$prof" 2>/dev/null >"$RUN/annotate.txt"
per() { awk -v n="$n" -v pat="$1" 'index($0, pat) {gsub(",", "", $1); printf "%.0f", $1 / n; exit}' "$RUN/annotate.txt"; }
echo "requests: $n (profile: $prof)"
echo "instructions per request: total $(per 'PROGRAM TOTALS')," \
  "workers $(per 'server.rs:std::sys::backtrace::__rust_begin_short_backtrace')," \
  "access log $(per 'access_log.rs:std::sys::backtrace::__rust_begin_short_backtrace')"
