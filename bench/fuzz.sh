#!/usr/bin/env bash
# Fuzzing (issue 8): runs every cargo-fuzz target in fuzz/ for a fixed time.
#
#   bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   # default 60 s, every target
#
# Prints per target the executions run and whether it crashed, then one summary
# line; exits 1 if any target crashed (the input is in fuzz/artifacts/<target>/,
# replay it with `cargo fuzz run <target> <file>`).
#
# - cargo-fuzz needs nightly-only rustc flags (-Zsanitizer, sancov passes); the
#   stable toolchain accepts them with RUSTC_BOOTSTRAP=1, which this script sets.
#   Install the tool with `cargo install cargo-fuzz`.
# - The committed seeds in fuzz/seeds/<target>/ are copied into the (ignored)
#   working corpus fuzz/corpus/<target>/ before each run; what the fuzzer finds
#   stays there for the next run.
# - FUZZ_SANITIZER (default `none`): the code under test forbids unsafe, so a
#   panic is the failure that matters and ASan would only halve the executions;
#   set it to `address` to run under ASan anyway.
# - Runs under `nice -n 19`; FUZZ_NICE=0 turns that off.
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
shift || true
ALL_TARGETS=(gateway_config cloudevent_decode plain_envelope_decode registry_body resilience_config gateway_request)
TARGETS=("${@:-${ALL_TARGETS[@]}}")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL_TARGETS[@]}")
SANITIZER=${FUZZ_SANITIZER:-none}
NICE=(nice -n "${FUZZ_NICE:-19}")
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
fi

LOGS=$(mktemp -d)
echo "building ${#TARGETS[@]} targets (sanitizer: $SANITIZER, logs in $LOGS)"
if ! "${NICE[@]}" cargo fuzz build --sanitizer "$SANITIZER" >"$LOGS/build.log" 2>&1; then
    tail -30 "$LOGS/build.log" >&2
    exit 2
fi

total_execs=0
crashed=()
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
    log="$LOGS/$t.log"
    start=$(date +%s)
    "${NICE[@]}" cargo fuzz run --sanitizer "$SANITIZER" "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    elapsed=$(($(date +%s) - start))
    execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -1)
    execs=${execs:-0}
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    total_execs=$((total_execs + execs))
    if [ "$rc" -eq 0 ]; then
        status="no crash"
    else
        artifact=$(sed -nE 's/.*Test unit written to (\S+).*/\1/p' "$log" | tail -1)
        status="CRASHED (exit $rc): ${artifact:-see $log}"
        crashed+=("$t")
    fi
    printf '%-22s %10s execs  %4ss  corpus %5s  %s\n' "$t" "$execs" "$elapsed" "$corpus" "$status"
done

if [ ${#crashed[@]} -eq 0 ]; then
    echo "fuzz: ${#TARGETS[@]} targets x ${SECONDS_PER_TARGET}s, $total_execs executions, 0 crashes"
else
    echo "fuzz: ${#TARGETS[@]} targets x ${SECONDS_PER_TARGET}s, $total_execs executions, ${#crashed[@]} crashed: ${crashed[*]}"
    exit 1
fi
