#!/usr/bin/env bash
# Wake-ups per second of an idle gateway, per thread: the bench config
# (bench/peers/switchboard.toml) in front of the nginx backend, one second of
# traffic, one second of rest, then voluntary and involuntary context
# switches of every thread over IDLE seconds (from /proc/PID/task/*/status).
#
#   bench/idle-wakeups.sh [BIN...]   # default: target/release/switchboard
#   IDLE=30 bench/idle-wakeups.sh OLD_BIN NEW_BIN
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
export PATH="$PATH:/usr/sbin"
IDLE=${IDLE:-10}
[ $# -gt 0 ] || set -- "${CARGO_TARGET_DIR:-$PWD/target}/release/switchboard"
RUN=$(mktemp -d /tmp/switchboard-idle.XXXXXX)
cp bench/peers/nginx-backend.conf bench/peers/switchboard.toml "$RUN/"
nginx -p "$RUN" -c "$RUN/nginx-backend.conf" -e "$RUN/backend-error.log"
trap 'kill "$(cat "$RUN/backend.pid")" 2>/dev/null || true' EXIT
wait_port 18080
snap() { # pid: "thread-name switches" per thread
  local t
  for t in /proc/"$1"/task/*; do
    printf '%s %s\n' "$(tr ' ' _ <"$t/comm")" \
      "$(sum_switches <"$t/status")"
  done
}
for bin in "$@"; do
  SWITCHBOARD_LOG=warn "$bin" gateway --config "$RUN/switchboard.toml" >/dev/null 2>&1 &
  pid=$!
  wait_port 18083
  wrk -t1 -c4 -d1s http://127.0.0.1:18083/users/42 >/dev/null
  sleep 1
  snap "$pid" >"$RUN/before"
  sleep "$IDLE"
  snap "$pid" >"$RUN/after"
  echo "$bin: wake-ups per second while idle"
  paste "$RUN/before" "$RUN/after" |
    awk -v s="$IDLE" '{printf "  %-26s %7.1f\n", $1, ($4 - $2) / s; t += ($4 - $2) / s} END {printf "  %-26s %7.1f\n", "total", t}'
  kill "$pid"
  wait "$pid" 2>/dev/null || true
done
