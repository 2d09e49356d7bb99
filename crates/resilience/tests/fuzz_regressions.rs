//! Inputs found by the fuzz targets in `fuzz/` (see `bench/fuzz.sh`), kept so
//! the bugs they found stay fixed.

use std::time::Duration;

use switchboard_resilience::retry::{Backoff, Jitter};

/// `fuzz/fuzz_targets/resilience_config.rs`: with a cap past u64::MAX
/// nanoseconds (about 584 years), equal jitter drew delays far below `cap / 2`
/// (`18398081911s` for a cap of `2659609977590799882s`) because the lower bound
/// was truncated to 64 bits of nanoseconds.
#[test]
fn equal_jitter_stays_in_bounds_past_u64_nanoseconds() {
    let backoff = Backoff::exponential(
        Duration::from_secs(1_329_804_988_795_399_941),
        Duration::MAX,
    )
    .unwrap()
    .with_jitter(Jitter::Equal);
    for (n, delay) in backoff.delays().take(64).enumerate() {
        let cap = backoff.cap(u32::try_from(n).unwrap());
        assert!(
            cap / 2 <= delay && delay <= cap,
            "delay {n} = {delay:?} outside [{:?}, {cap:?}]",
            cap / 2
        );
    }
}

/// The same truncation for decorrelated jitter, whose delays start at `base`.
#[test]
fn decorrelated_jitter_never_below_base_past_u64_nanoseconds() {
    let base = Duration::from_secs(1 << 40);
    let backoff = Backoff::exponential(base, Duration::MAX)
        .unwrap()
        .with_jitter(Jitter::Decorrelated);
    for (n, delay) in backoff.delays().take(64).enumerate() {
        assert!(base <= delay, "delay {n} = {delay:?} below base {base:?}");
    }
}
