//! Backoff, retry and breaker constructors fed arbitrary numbers and durations.
//!
//! Invariants: constructors return errors (with a message), never panic; a
//! built backoff's delays stay within its bounds; a breaker built from a
//! config `validate` accepts survives a run of calls and outcomes.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use switchboard_resilience::breaker::{Breaker, BreakerConfig, OpenDuration, Outcome, Window};
use switchboard_resilience::retry::{Backoff, Jitter, RetryBudget, RetryPolicy};

/// Any `Duration`, including zero and `Duration::MAX`.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Dur {
    Nanos(u64),
    Millis(u32),
    Secs(u64),
    Exact(u64, u32),
    Max,
}

impl Dur {
    fn get(self) -> Duration {
        match self {
            Dur::Nanos(n) => Duration::from_nanos(n),
            Dur::Millis(n) => Duration::from_millis(n.into()),
            Dur::Secs(n) => Duration::from_secs(n),
            Dur::Exact(s, n) => Duration::new(s, n % 1_000_000_000),
            Dur::Max => Duration::MAX,
        }
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum JitterIn {
    None,
    Full,
    Equal,
    Decorrelated,
}

#[derive(Debug, Arbitrary)]
enum WindowIn {
    Count(u32),
    Time(Dur),
}

#[derive(Debug, Arbitrary)]
enum OutcomeIn {
    Success,
    Failure,
    Ignored,
}

#[derive(Debug, Arbitrary)]
struct Input {
    constant: Dur,
    base: Dur,
    max: Dur,
    factor: Option<f64>,
    jitter: JitterIn,
    delays: u8,
    attempts: u32,
    budget: (Dur, u32, f64),
    failure_rate: f64,
    slow_call_rate: f64,
    slow_call_duration: Option<Dur>,
    min_calls: u32,
    window: WindowIn,
    open: (Dur, f64, Dur, f64),
    half_open_probes: u32,
    half_open_max_wait: Dur,
    calls: Vec<OutcomeIn>,
}

fuzz_target!(|input: Input| {
    let constant = Backoff::constant(input.constant.get());
    for d in constant.delays().take(4) {
        assert_eq!(d, input.constant.get());
    }

    match Backoff::exponential(input.base.get(), input.max.get()) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(backoff) => {
            let backoff = match input.factor.map(|f| backoff.with_factor(f)) {
                None => Some(backoff),
                Some(Ok(b)) => Some(b),
                Some(Err(e)) => {
                    assert!(!e.to_string().is_empty());
                    None
                }
            };
            if let Some(b) = backoff {
                let jitter = match input.jitter {
                    JitterIn::None => Jitter::None,
                    JitterIn::Full => Jitter::Full,
                    JitterIn::Equal => Jitter::Equal,
                    JitterIn::Decorrelated => Jitter::Decorrelated,
                };
                check_delays(&b.with_jitter(jitter), input.delays);
                match RetryPolicy::new(input.attempts, b) {
                    Ok(p) => assert_eq!(p.max_attempts(), input.attempts),
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
        }
    }

    let (ttl, min_per_sec, percent) = input.budget;
    match RetryBudget::new(ttl.get(), min_per_sec, percent) {
        Ok(budget) => {
            budget.deposit();
            let _ = budget.withdraw();
            let _ = budget.available();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }

    let (base, factor, max, jitter) = input.open;
    let config = BreakerConfig {
        failure_rate: input.failure_rate,
        slow_call_rate: input.slow_call_rate,
        slow_call_duration: input.slow_call_duration.map(Dur::get),
        min_calls: input.min_calls,
        window: match input.window {
            WindowIn::Count(n) => Window::Count(n),
            WindowIn::Time(d) => Window::Time(d.get()),
        },
        open_duration: OpenDuration::exponential(base.get(), factor, max.get()).with_jitter(jitter),
        half_open_probes: input.half_open_probes,
        half_open_max_wait: input.half_open_max_wait.get(),
    };
    let valid = config.validate();
    match Breaker::new(config.clone()) {
        Err(e) => {
            // Compared as text: a rejected NaN is not equal to itself.
            let valid = valid.map_err(|v| v.to_string());
            assert_eq!(valid, Err(e.to_string()), "new and validate disagree");
            assert!(!e.to_string().is_empty());
        }
        Ok(breaker) => {
            assert_eq!(valid, Ok(()), "new accepted what validate rejects");
            let open = config.open_duration;
            for n in [0, 1, 2, 3, 10, 64, 1000, u32::MAX] {
                assert!(open.nominal(n) <= open.max, "nominal({n}) above max");
            }
            for call in input.calls.iter().take(512) {
                match breaker.try_acquire() {
                    Ok(permit) => permit.record(match call {
                        OutcomeIn::Success => Outcome::Success,
                        OutcomeIn::Failure => Outcome::Failure,
                        OutcomeIn::Ignored => Outcome::Ignored,
                    }),
                    Err(open) => assert!(open.retry_after <= config.open_duration.max),
                }
            }
            let _ = breaker.snapshot();
        }
    }
});

/// Every delay lies within what the schedule promises for its retry number.
fn check_delays(b: &Backoff, count: u8) {
    let mut previous_cap = Duration::ZERO;
    for (n, delay) in b.delays().take(usize::from(count)).enumerate() {
        let n = u32::try_from(n).expect("at most 255");
        let cap = b.cap(n);
        assert!(cap <= b.max(), "cap({n}) = {cap:?} above max {:?}", b.max());
        assert!(cap >= previous_cap, "cap({n}) = {cap:?} shrank");
        previous_cap = cap;
        assert!(
            delay <= b.max(),
            "delay {n} = {delay:?} above max {:?}",
            b.max()
        );
        match b.jitter() {
            Jitter::None => assert_eq!(delay, cap),
            Jitter::Full => assert!(delay <= cap, "delay {n} = {delay:?} above cap {cap:?}"),
            Jitter::Equal => assert!(
                cap / 2 <= delay && delay <= cap,
                "delay {n} = {delay:?} outside [{:?}, {cap:?}]",
                cap / 2
            ),
            Jitter::Decorrelated => assert!(
                b.base() <= delay,
                "delay {n} = {delay:?} below base {:?}",
                b.base()
            ),
        }
    }
}
