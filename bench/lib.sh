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

# Median of the numbers on stdin, one per line.
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
