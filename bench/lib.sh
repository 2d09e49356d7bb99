# Helpers shared by the gateway benchmarks (gateway.sh, gateway_cpu.sh,
# dashboard.sh); sourced, not run.

log() { printf '== %s\n' "$*" >&2; }

# Waits up to 10 s for 127.0.0.1:PORT to accept a connection.
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "port $1 did not open"; exit 1
}

# utime+stime in clock ticks, summed over the given pids.
cpu_ticks() {
  local sum=0 p line f
  for p in "$@"; do
    line=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    # Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
    read -r -a f <<<"${line##*) }"
    sum=$((sum + f[11] + f[12]))
  done
  echo "$sum"
}

# Proxies under test run in a session of their own: `setsid CMD` (it execs
# in place, so `$!` stays the proxy's pid). With autogroup scheduling
# (/proc/sys/kernel/sched_autogroup_enabled = 1, as on this machine) the
# kernel shares CPU between sessions first and between the threads of a
# session second. nginx daemonizes into a session of its own; a proxy left
# in this script's session would share one group with wrk and compete with
# it for that group's share while the backend kept a whole group to itself.
# That handicap cost Switchboard 17% of its requests/s and multiplied its p99
# by eleven (bench/RESULTS.md, "Session of 2026-11-27, third"). A session per proxy
# is also how they run in production, where each service gets a cgroup.

# Context switches (voluntary and not) in the /proc status text on stdin.
sum_switches() {
  awk '/^(non)?voluntary_ctxt_switches:/ {s += $2} END {print s + 0}'
}

# Context switches so far, summed over every thread of the given pids.
ctx_switches() {
  local p
  for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null; done | sum_switches
}

# Median of the numbers on stdin, one per line.
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
