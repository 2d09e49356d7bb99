#!/usr/bin/env bash
# Gateway benchmark: Switchboard vs nginx and HAProxy in front of one nginx
# backend returning a small JSON body, measured with wrk in alternating rounds.
#
#   bench/gateway.sh                 # 5 rounds of 10 s per proxy
#   ROUNDS=3 DURATION=5 bench/gateway.sh
#   ONLY=switchboard bench/gateway.sh
#   EDGE=1 ONLY=switchboard bench/gateway.sh  # adds switchboard-edge: the same
#     gateway with a rate limit (never triggered) and idempotency on its route
#   PARITY=1 bench/gateway.sh        # adds nginx-parity: nginx adding the same
#     request and response fields as Switchboard (bench/peers/nginx-parity.conf),
#     to tell the cost of those fields (paid by the backend and wrk as well,
#     on this shared machine) from the proxies' own
#   KEEP_LOGS=1 bench/gateway.sh     # keep the access logs in the run dir
#
# Every proxy runs 2 workers/threads; wrk uses 2 threads and 50 connections.
# Prints median requests/s, median p99, each one's ratio to nginx, the CPU
# time each proxy's processes consumed per request (utime+stime from
# /proc/PID/stat across each wrk run divided by the requests it completed: a
# figure that, unlike req/s, barely moves with the machine's load) and the
# context switches per request of the proxy's and the backend's threads
# (from /proc/PID/task/*/status; on this shared machine they are most of
# the scheduling cost the proxy causes), then
# Switchboard's peak RSS holding 1,000 idle keep-alive connections.
# Installs nginx, haproxy and wrk with apt-get when missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
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
  [ -f "$RUN/parity.pid" ] && kill "$(cat "$RUN/parity.pid")" 2>/dev/null || true
  [ -f "$RUN/haproxy.pid" ] && kill $(cat "$RUN/haproxy.pid") 2>/dev/null || true
  wait 2>/dev/null || true
  # The access logs grow by ~100 MB per run; KEEP_LOGS=1 keeps them.
  [ -n "${KEEP_LOGS:-}" ] || rm -f "$RUN"/switchboard*-access.log "$RUN/proxy-access.log" "$RUN/parity-access.log"
}
trap cleanup EXIT

mkdir -p "$RUN/logs"
cp "$PEERS"/nginx-backend.conf "$PEERS"/nginx-proxy.conf "$PEERS"/nginx-parity.conf "$PEERS"/haproxy.cfg "$PEERS"/switchboard.toml "$RUN/"
log "run dir $RUN"

nginx -p "$RUN" -c "$RUN/nginx-backend.conf" -e "$RUN/backend-error.log"
wait_port 18080

declare -A PORT=([nginx]=18081 [haproxy]=18082 [switchboard]=18083 [switchboard-edge]=18084 [nginx-parity]=18085)
targets=(nginx haproxy switchboard)
[ -n "$ONLY" ] && targets=($ONLY)
[ -n "${PARITY:-}" ] && targets+=(nginx-parity)
if [ -n "${EDGE:-}" ]; then
  targets+=(switchboard-edge)
  sed -e 's/18083/18084/; s/19983/19984/' "$RUN/switchboard.toml" >"$RUN/switchboard-edge.toml"
  printf '%s\n' 'rate_limit = { rate = 100000000, per = "1s", key = "ip" }' \
    'idempotency = { ttl = "1m" }' >>"$RUN/switchboard-edge.toml"
fi

for t in "${targets[@]}"; do
  case $t in
    nginx) nginx -p "$RUN" -c "$RUN/nginx-proxy.conf" -e "$RUN/proxy-error.log" ;;
    nginx-parity) nginx -p "$RUN" -c "$RUN/nginx-parity.conf" -e "$RUN/parity-error.log" ;;
    # HAProxy and Switchboard get a session of their own, as nginx does by
    # daemonizing (see the note in bench/lib.sh).
    haproxy) (cd "$RUN" && exec setsid haproxy -f "$RUN/haproxy.cfg" -q >"$RUN/haproxy.out" 2>&1) &
             pids+=($!)
             echo $! >"$RUN/haproxy-fg.pid" ;;
    switchboard*) SWITCHBOARD_LOG=warn setsid $SWITCHBOARD_CMD "$RUN/$t.toml" \
                   >"$RUN/$t-access.log" 2>"$RUN/$t.err" &
                 pids+=($!)
                 echo $! >"$RUN/$t.pid" ;;
  esac
  wait_port "${PORT[$t]}"
done

# The processes doing a proxy's work: nginx's workers (children of the
# master), HAProxy's process, Switchboard's process (all threads included).
proxy_pids() {
  case $1 in
    nginx) pgrep -P "$(cat "$RUN/proxy.pid")" ;;
    nginx-parity) pgrep -P "$(cat "$RUN/parity.pid")" ;;
    haproxy) cat "$RUN/haproxy-fg.pid" ;;
    switchboard*) cat "$RUN/$1.pid" ;;
  esac
}

# Each proxy's scheduling group, to check that none shares one with wrk.
if [ -r /proc/self/autogroup ]; then
  log "wrk: $(cat /proc/$$/autogroup)"
  for t in "${targets[@]}"; do
    p=$(proxy_pids "$t" | head -1)
    log "$t: $(cat "/proc/$p/autogroup")"
  done
fi

HZ=$(getconf CLK_TCK)

# One wrk run: prints "req_per_s p99_ms cpu_us_per_req csw_per_req", the
# last being the context switches of the proxy's and the backend's threads.
measure() {
  local out pp t0 t1 s0 s1 bp
  pp=$(proxy_pids "$2")
  bp=$(pgrep -P "$(cat "$RUN/backend.pid")")
  t0=$(cpu_ticks $pp); s0=$(ctx_switches $pp $bp)
  out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$1/users/42")
  t1=$(cpu_ticks $pp); s1=$(ctx_switches $pp $bp)
  echo "$out" >>"$RUN/wrk.log"
  local rps p99 n cpu
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu=$(awk -v a="$t0" -v b="$t1" -v n="$n" -v hz="$HZ" 'BEGIN {printf "%.2f", (b - a) / hz * 1e6 / n}')
  csw=$(awk -v a="$s0" -v b="$s1" -v n="$n" 'BEGIN {printf "%.3f", (b - a) / n}')
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; print v}' <<<"$out")
  local errs
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
  [ -n "$errs" ] && log "$2: $errs"
  echo "$rps $p99 $cpu $csw"
}

log "warm-up"
for t in "${targets[@]}"; do wrk -t2 -c"$CONNS" -d2s "http://127.0.0.1:${PORT[$t]}/users/42" >/dev/null; done

for r in $(seq 1 "$ROUNDS"); do
  # Alternate the order each round so no proxy always runs first.
  order=("${targets[@]}")
  if (( r % 2 == 0 )); then order=($(printf '%s\n' "${targets[@]}" | tac)); fi
  for t in "${order[@]}"; do
    read -r rps p99 cpu csw < <(measure "${PORT[$t]}" "$t")
    echo "$t $rps $p99 $cpu $csw" >>"$RUN/results"
    log "round $r $t: $rps req/s, p99 ${p99} ms, ${cpu} us CPU, $csw context switches per request"
  done
done


declare -A RPS P99 CPU CSW
for t in "${targets[@]}"; do
  RPS[$t]=$(awk -v t="$t" '$1==t {print $2}' "$RUN/results" | median)
  P99[$t]=$(awk -v t="$t" '$1==t {print $3}' "$RUN/results" | median)
  CPU[$t]=$(awk -v t="$t" '$1==t {print $4}' "$RUN/results" | median)
  CSW[$t]=$(awk -v t="$t" '$1==t {print $5}' "$RUN/results" | median)
done

echo
echo "Gateway benchmark: wrk -t2 -c$CONNS -d${DURATION}s, $ROUNDS alternating rounds, medians; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-17s %12s %10s %10s %16s %12s\n' proxy "req/s" "p99 ms" "vs nginx" "cpu_us_per_req" "csw_per_req"
for t in "${targets[@]}"; do
  ratio=n/a
  [ -n "${RPS[nginx]:-}" ] && ratio=$(awk -v a="${RPS[$t]}" -v b="${RPS[nginx]}" 'BEGIN {printf "%.2fx", a/b}')
  printf '%-17s %12.0f %10.2f %10s %16.2f %12.3f\n' "$t" "${RPS[$t]}" "${P99[$t]}" "$ratio" "${CPU[$t]}" "${CSW[$t]}"
done
if [ -n "${RPS[switchboard-edge]:-}" ] && [ -n "${RPS[switchboard]:-}" ]; then
  awk -v a="${RPS[switchboard-edge]}" -v b="${RPS[switchboard]}" \
    'BEGIN {printf "switchboard-edge / switchboard: %.3f req/s\n", a/b}'
fi

# Peak RSS of a fresh Switchboard holding 1,000 idle keep-alive connections.
if [[ " ${targets[*]} " == *" switchboard "* ]]; then
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  SWITCHBOARD_LOG=warn setsid $SWITCHBOARD_CMD "$RUN/switchboard.toml" >/dev/null 2>&1 &
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
