//! Property tests (proptest) and concurrency tests for the breaker, the
//! backoff and the retry budget.

use proptest::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use switchboard_resilience::breaker::{
    Breaker, BreakerConfig, OpenDuration, Outcome, State, Window,
};
use switchboard_resilience::retry::{Backoff, Jitter, RetryBudget};

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Against a model of the last `size` outcomes: the breaker opens on the
    /// first call after which the window holds at least `min_calls` calls and
    /// the failure rate is at least the threshold, and not a call earlier.
    #[test]
    fn opens_exactly_at_the_threshold(
        size in 1u32..40,
        min_frac in 0.0f64..=1.0,
        percent in 1u32..=100,
        outcomes in proptest::collection::vec(any::<bool>(), 0..200),
    ) {
        let min_calls = ((f64::from(size) * min_frac).ceil() as u32).clamp(1, size);
        let breaker = Breaker::new(BreakerConfig {
            window: Window::Count(size),
            min_calls,
            failure_rate: f64::from(percent) / 100.0,
            ..BreakerConfig::default()
        })
        .unwrap();
        let mut window = VecDeque::new();
        for (i, failed) in outcomes.into_iter().enumerate() {
            let permit = breaker.try_acquire().expect("closed until the model says open");
            permit.record(if failed { Outcome::Failure } else { Outcome::Success });
            window.push_back(failed);
            if window.len() > size as usize {
                window.pop_front();
            }
            let calls = window.len() as u64;
            let failures = window.iter().filter(|f| **f).count() as u64;
            let model_open = calls >= u64::from(min_calls) && failures * 100 >= u64::from(percent) * calls;
            prop_assert_eq!(
                breaker.state() == State::Open, model_open,
                "after call {}: {} failures of {} calls, min {}, threshold {}%",
                i, failures, calls, min_calls, percent
            );
            if model_open {
                break;
            }
            let snap = breaker.snapshot();
            prop_assert_eq!((snap.calls, snap.failed_calls), (calls, failures));
        }
    }

    /// Every delay stays within the bounds its jitter promises, and under the cap.
    #[test]
    fn backoff_delays_stay_within_bounds(
        base_ms in 1u64..2_000,
        extra_ms in 0u64..60_000,
        factor in 1.0f64..5.0,
        jitter in prop_oneof![
            Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal), Just(Jitter::Decorrelated)
        ],
    ) {
        let base = Duration::from_millis(base_ms);
        let max = base + Duration::from_millis(extra_ms);
        let backoff = Backoff::exponential(base, max).unwrap().with_factor(factor).unwrap().with_jitter(jitter);
        for (n, delay) in backoff.delays().take(40).enumerate() {
            let cap = backoff.cap(n as u32);
            prop_assert!(cap <= max && cap >= base);
            prop_assert!(delay <= max, "delay {delay:?} over max {max:?}");
            match jitter {
                Jitter::None => prop_assert_eq!(delay, cap),
                Jitter::Full => prop_assert!(delay <= cap),
                Jitter::Equal => prop_assert!(delay >= cap / 2 && delay <= cap),
                Jitter::Decorrelated => prop_assert!(delay >= base),
            }
        }
    }

    /// Between two points where everything has expired, successful withdrawals
    /// never exceed `percent`% of the deposits plus `min_per_sec * ttl`.
    #[test]
    fn budget_never_allows_more_than_percent_plus_minimum(
        ttl_s in 1u64..=10,
        min_per_sec in 0u32..5,
        percent_tenths in 0u32..=2_000,
        rounds in proptest::collection::vec(
            proptest::collection::vec((0u32..20, 0u32..20), 1..20), 1..4),
    ) {
        let ttl = Duration::from_secs(ttl_s);
        let percent = f64::from(percent_tenths) / 10.0;
        let rt = paused_runtime();
        rt.block_on(async {
            let budget = RetryBudget::new(ttl, min_per_sec, percent).unwrap();
            for ops in rounds {
                let (mut deposits, mut withdrawn) = (0u64, 0u64);
                for (d, w) in ops {
                    for _ in 0..d {
                        budget.deposit();
                    }
                    deposits += u64::from(d);
                    withdrawn += (0..w).filter(|_| budget.withdraw()).count() as u64;
                    // A little time passes, never a whole ttl.
                    tokio::time::advance(ttl / 100).await;
                }
                let bound = deposits * u64::from(percent_tenths) / 1_000
                    + u64::from(min_per_sec) * ttl_s;
                prop_assert!(withdrawn <= bound, "{withdrawn} retries > bound {bound}");
                // Let everything expire before the next round.
                tokio::time::advance(ttl * 2).await;
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Threads racing for half-open probes never hold more than permitted at
    /// once, whatever verdicts they give.
    #[test]
    fn never_more_half_open_probes_than_permitted(
        probes in 1u32..6,
        threads in 2usize..6,
        verdicts in proptest::collection::vec(0u8..4, 50..300),
    ) {
        let breaker = Breaker::new(BreakerConfig {
            window: Window::Count(4),
            min_calls: 1,
            half_open_probes: probes,
            half_open_max_wait: Duration::from_secs(3600),
            // Half-open right after opening, so threads keep meeting it.
            open_duration: OpenDuration::constant(Duration::from_nanos(1)),
            ..BreakerConfig::default()
        })
        .unwrap();
        breaker.try_acquire().unwrap().record(Outcome::Failure);
        let in_flight = AtomicUsize::new(0);
        let max_seen = AtomicUsize::new(0);
        let probes_seen = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (breaker, in_flight, max_seen, probes_seen, verdicts) =
                    (&breaker, &in_flight, &max_seen, &probes_seen, &verdicts);
                scope.spawn(move || {
                    for (i, verdict) in verdicts.iter().enumerate().skip(t) {
                        let Ok(permit) = breaker.try_acquire() else { continue };
                        if !permit.is_probe() {
                            // Closed again: push it back toward open.
                            permit.record(if i % 2 == 0 { Outcome::Failure } else { Outcome::Success });
                            continue;
                        }
                        probes_seen.fetch_add(1, Ordering::SeqCst);
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max_seen.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        match verdict {
                            0 => permit.record(Outcome::Success),
                            1 => permit.record(Outcome::Failure),
                            2 => permit.record(Outcome::Ignored),
                            _ => drop(permit),
                        }
                    }
                });
            }
        });
        prop_assert!(probes_seen.load(Ordering::SeqCst) > 0);
        prop_assert!(
            max_seen.load(Ordering::SeqCst) <= probes as usize,
            "{} probes at once, {} permitted", max_seen.load(Ordering::SeqCst), probes
        );
    }
}

/// Many threads hammer one breaker; the window's counts add up exactly.
#[test]
fn concurrent_records_add_up_exactly() {
    const THREADS: u64 = 8;
    const CALLS: u64 = 12_000;
    for window in [
        Window::Count((THREADS * CALLS) as u32),
        Window::Time(Duration::from_secs(3600)),
    ] {
        let breaker = Breaker::new(BreakerConfig {
            window,
            // Unreachable: only a window of nothing but failures would open it.
            failure_rate: 1.0,
            min_calls: 100,
            ..BreakerConfig::default()
        })
        .unwrap();
        let failures = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (breaker, failures) = (&breaker, &failures);
                scope.spawn(move || {
                    for i in 0..CALLS {
                        let permit = breaker.try_acquire().expect("stays closed");
                        match (i + t) % 3 {
                            0 => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                permit.record(Outcome::Failure);
                            }
                            1 => permit.record(Outcome::Success),
                            // Every seventh call is dropped: ignored, not counted.
                            _ if i % 7 == 0 => drop(permit),
                            _ => permit.record(Outcome::Success),
                        }
                    }
                });
            }
        });
        let ignored = (0..THREADS)
            .map(|t| {
                (0..CALLS)
                    .filter(|i| (i + t) % 3 == 2 && i % 7 == 0)
                    .count() as u64
            })
            .sum::<u64>();
        let snap = breaker.snapshot();
        assert_eq!(breaker.state(), State::Closed, "{window:?}");
        assert_eq!(snap.calls, THREADS * CALLS - ignored, "{window:?}");
        assert_eq!(
            snap.failed_calls,
            failures.load(Ordering::Relaxed),
            "{window:?}"
        );
        assert_eq!(snap.slow_calls, 0);
    }
}

/// A small window under many threads: counts never drift past the window.
#[test]
fn concurrent_records_on_a_small_window_stay_consistent() {
    let breaker = Breaker::new(BreakerConfig {
        window: Window::Count(16),
        min_calls: 16,
        ..BreakerConfig::default()
    })
    .unwrap();
    // Counts and rates, but never opens, whatever the interleaving.
    breaker.metrics_only();
    std::thread::scope(|scope| {
        for t in 0..6u64 {
            let breaker = &breaker;
            scope.spawn(move || {
                for i in 0..20_000u64 {
                    if let Ok(permit) = breaker.try_acquire() {
                        permit.record(if (i + t) % 4 == 0 {
                            Outcome::Success
                        } else {
                            Outcome::Failure
                        });
                    }
                }
            });
        }
    });
    let snap = breaker.snapshot();
    assert_eq!(snap.calls, 16, "a full window, never more");
    assert!(snap.failed_calls <= 16);
    // Once every thread is done, 16 successes make the window exact again.
    for _ in 0..16 {
        breaker
            .try_acquire()
            .expect("metrics-only admits")
            .record(Outcome::Success);
    }
    let snap = breaker.snapshot();
    assert_eq!((snap.calls, snap.failed_calls), (16, 0));
}
