#!/usr/bin/env bash
# Gateway benchmark: Switchboard vs nginx and HAProxy in front of one nginx
# backend returning a small JSON body, measured with wrk in alternating rounds.
#
#   bench/gateway.sh                 # 5 rounds of 10 s per proxy
#   ROUNDS=3 DURATION=5 bench/gateway.sh
#   ONLY=switchboard bench/gateway.sh
#   EDGE=1 ONLY=switchboard bench/gateway.sh  # adds switchboard-edge: the same
#     gateway with a rate limit (never triggered) and idempotency on its route
#
# Every proxy runs 2 workers/threads; wrk uses 2 threads and 50 connections.
# Prints median requests/s, median p99 and each one's ratio to nginx, then
# Switchboard's peak RSS holding 1,000 idle keep-alive connections.
# Installs nginx, haproxy and wrk with apt-get when missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
ONLY=${ONLY:-}
PEERS=$ROOT/bench/peers
RUN=$(mktemp -d /tmp/switchboard-bench.XXXXXX)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# mimalloc (the binary's allocator) commits its arenas lazily with this: peak
# RSS with 1,000 idle connections drops from ~75 MiB to ~44 MiB, throughput unchanged.
export MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-0}
SB=$CARGO_TARGET_DIR/release/switchboard

log() { printf '== %s\n' "$*" >&2; }

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"

# SWITCHBOARD_CMD overrides how the gateway is started (the config path is
# appended), e.g. the crate's example: SWITCHBOARD_CMD=".../examples/serve".
if [ -z "${SWITCHBOARD_CMD:-}" ]; then
  log "building switchboard (release)"
  cargo build --release -q -p switchboard
  SWITCHBOARD_CMD="$SB gateway --config"
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$RUN/backend.pid" ] && kill "$(cat "$RUN/backend.pid")" 2>/dev/null || true
  [ -f "$RUN/proxy.pid" ] && kill "$(cat "$RUN/proxy.pid")" 2>/dev/null || true
  [ -f "$RUN/haproxy.pid" ] && kill $(cat "$RUN/haproxy.pid") 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "port $1 did not open"; exit 1
}

mkdir -p "$RUN/logs"
cp "$PEERS"/nginx-backend.conf "$PEERS"/nginx-proxy.conf "$PEERS"/haproxy.cfg "$PEERS"/switchboard.toml "$RUN/"
log "run dir $RUN"

nginx -p "$RUN" -c "$RUN/nginx-backend.conf" -e "$RUN/backend-error.log"
wait_port 18080

declare -A PID
declare -A PORT=([nginx]=18081 [haproxy]=18082 [switchboard]=18083 [switchboard-edge]=18084)
targets=(nginx haproxy switchboard)
[ -n "$ONLY" ] && targets=($ONLY)
if [ -n "${EDGE:-}" ]; then
  targets+=(switchboard-edge)
  sed -e 's/18083/18084/; s/19983/19984/' "$RUN/switchboard.toml" >"$RUN/switchboard-edge.toml"
  printf '%s\n' 'rate_limit = { rate = 100000000, per = "1s", key = "ip" }' \
    'idempotency = { ttl = "1m" }' >>"$RUN/switchboard-edge.toml"
fi

for t in "${targets[@]}"; do
  case $t in
    nginx) nginx -p "$RUN" -c "$RUN/nginx-proxy.conf" -e "$RUN/proxy-error.log" ;;
    haproxy) (cd "$RUN" && exec haproxy -f "$RUN/haproxy.cfg" -q >"$RUN/haproxy.out" 2>&1) &
             pids+=($!) ;;
    switchboard*) SWITCHBOARD_LOG=warn $SWITCHBOARD_CMD "$RUN/$t.toml" \
                   >"$RUN/$t-access.log" 2>"$RUN/$t.err" &
                 pids+=($!); PID[$t]=$! ;;
  esac
  wait_port "${PORT[$t]}"
done

# CPU time (utime + stime, all threads) a process has used, in clock ticks.
ticks() { [ -n "$1" ] && awk '{print $14 + $15}' "/proc/$1/stat"; }

# One wrk run: prints "req_per_s p99_ms [cpu_us_per_request]" (the last for
# Switchboard: CPU per request does not depend on what else loads the machine).
measure() {
  local out t0 t1 cpu=""
  t0=$(ticks "${PID[$2]:-}")
  out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$1/users/42")
  t1=$(ticks "${PID[$2]:-}")
  [ -n "$t0" ] && cpu=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" \
    '/requests in/ {printf "%.2f", d / hz * 1e6 / $1}' <<<"$out")
  echo "$out" >>"$RUN/wrk.log"
  local rps p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; print v}' <<<"$out")
  local errs
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
  [ -n "$errs" ] && log "$2: $errs"
  echo "$rps $p99 $cpu"
}

log "warm-up"
for t in "${targets[@]}"; do wrk -t2 -c"$CONNS" -d2s "http://127.0.0.1:${PORT[$t]}/users/42" >/dev/null; done

for r in $(seq 1 "$ROUNDS"); do
  # Alternate the order each round so no proxy always runs first.
  order=("${targets[@]}")
  if (( r % 2 == 0 )); then order=($(printf '%s\n' "${targets[@]}" | tac)); fi
  for t in "${order[@]}"; do
    read -r rps p99 cpu < <(measure "${PORT[$t]}" "$t")
    echo "$t $rps $p99 $cpu" >>"$RUN/results"
    log "round $r $t: $rps req/s, p99 ${p99} ms${cpu:+, ${cpu} µs CPU/request}"
  done
done

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

declare -A RPS P99
for t in "${targets[@]}"; do
  RPS[$t]=$(awk -v t="$t" '$1==t {print $2}' "$RUN/results" | median)
  P99[$t]=$(awk -v t="$t" '$1==t {print $3}' "$RUN/results" | median)
done

echo
echo "Gateway benchmark: wrk -t2 -c$CONNS -d${DURATION}s, $ROUNDS alternating rounds, medians"
printf '%-12s %12s %10s %10s\n' proxy "req/s" "p99 ms" "vs nginx"
for t in "${targets[@]}"; do
  ratio=n/a
  [ -n "${RPS[nginx]:-}" ] && ratio=$(awk -v a="${RPS[$t]}" -v b="${RPS[nginx]}" 'BEGIN {printf "%.2fx", a/b}')
  printf '%-12s %12.0f %10.2f %10s\n' "$t" "${RPS[$t]}" "${P99[$t]}" "$ratio"
done
for t in "${targets[@]}"; do
  [ -n "${PID[$t]:-}" ] || continue
  cpu=$(awk -v t="$t" '$1==t && $4 != "" {print $4}' "$RUN/results" | median)
  echo "$t: median ${cpu} µs CPU per request"
done
if [ -n "${RPS[switchboard-edge]:-}" ] && [ -n "${RPS[switchboard]:-}" ]; then
  awk -v a="${RPS[switchboard-edge]}" -v b="${RPS[switchboard]}" \
    'BEGIN {printf "switchboard-edge / switchboard: %.3f req/s\n", a/b}'
fi

# Peak RSS of a fresh Switchboard holding 1,000 idle keep-alive connections.
if [[ " ${targets[*]} " == *" switchboard "* ]]; then
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  SWITCHBOARD_LOG=warn $SWITCHBOARD_CMD "$RUN/switchboard.toml" >/dev/null 2>&1 &
  sbpid=$!
  pids+=("$sbpid")
  wait_port 18083
  python3 - "$sbpid" <<'PY'
import socket, sys, time
pid = sys.argv[1]
conns = []
for i in range(1000):
    s = socket.create_connection(("127.0.0.1", 18083))
    s.sendall(b"GET /users/42 HTTP/1.1\r\nHost: bench\r\n\r\n")
    conns.append(s)
for s in conns:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
time.sleep(1.0)
status = open(f"/proc/{pid}/status").read()
hwm = [l for l in status.splitlines() if l.startswith(("VmHWM", "VmRSS"))]
print("switchboard with 1000 idle keep-alive connections: " + ", ".join(" ".join(l.split()) for l in hwm))
PY
fi
