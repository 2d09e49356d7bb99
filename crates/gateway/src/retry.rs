//! Retry decisions: which methods are safe, jittered backoff, and the retry
//! budget that keeps retries from multiplying an outage.
//!
//! The budget follows Finagle's idea (tower's `TpsBudget`): over a sliding
//! 10-second window, retries may add at most `percent` of the requests plus
//! `min_per_second` per second. Depositing is the hot path (one relaxed add on
//! a per-thread shard); withdrawing happens only when something failed, so it
//! may take a short lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use http::Method;
use parking_lot::Mutex;

use crate::correlation::random_u64;

const WINDOW: Duration = Duration::from_secs(10);
use crate::metrics::SHARDS;

/// True for methods RFC 9110 defines as idempotent (the resilience crate's rule).
pub fn is_idempotent(m: &Method) -> bool {
    switchboard_resilience::retry::is_idempotent(m.as_str())
}

/// Backoff before retry number `retry` (1-based): `base * 2^(retry-1)`,
/// capped at `max`, with "equal jitter" (uniform in the upper half).
pub fn backoff(retry: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
    let d = exp.min(max);
    let half = d / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    let jitter = if nanos == 0 {
        0
    } else {
        random_u64() % (nanos + 1)
    };
    half + Duration::from_nanos(jitter)
}

#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicU64);

#[derive(Debug)]
struct Ledger {
    /// (time, requests so far, retries so far), at least a second apart.
    samples: VecDeque<(Instant, u64, u64)>,
    retries: u64,
}

/// A retry budget.
#[derive(Debug)]
pub struct Budget {
    percent: u64,
    min_per_second: u64,
    requests: [Padded; SHARDS],
    ledger: Mutex<Ledger>,
}

impl Budget {
    /// Retries may add `percent`% of requests plus `min_per_second` per second.
    pub fn new(percent: u32, min_per_second: u32) -> Self {
        Self {
            percent: u64::from(percent),
            min_per_second: u64::from(min_per_second),
            requests: Default::default(),
            ledger: Mutex::new(Ledger {
                samples: VecDeque::from([(Instant::now(), 0, 0)]),
                retries: 0,
            }),
        }
    }

    /// Counts one request.
    pub fn deposit(&self) {
        self.requests[crate::metrics::shard()]
            .0
            .fetch_add(1, Relaxed);
    }

    fn requests(&self) -> u64 {
        self.requests.iter().map(|p| p.0.load(Relaxed)).sum()
    }

    /// Takes leave for one retry; false when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        let total = self.requests();
        let mut l = self.ledger.lock();
        while l.samples.len() > 1 && now.duration_since(l.samples[1].0) >= WINDOW {
            l.samples.pop_front();
        }
        if l.samples
            .back()
            .is_some_and(|s| now.duration_since(s.0) >= Duration::from_secs(1))
        {
            let r = l.retries;
            l.samples.push_back((now, total, r));
        }
        let (t0, req0, ret0) = l.samples[0];
        let span = now.duration_since(t0).min(WINDOW).as_secs_f64().max(1.0);
        let requests = total.saturating_sub(req0);
        let retries = l.retries - ret0;
        let allowed = (requests * self.percent) as f64 / 100.0 + self.min_per_second as f64 * span;
        if (retries + 1) as f64 <= allowed {
            l.retries += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_percent_plus_floor() {
        let b = Budget::new(20, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 20);
        let b = Budget::new(0, 10);
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        for retry in 1..20 {
            let d = backoff(retry, Duration::from_millis(10), Duration::from_millis(200));
            let nominal = Duration::from_millis(10 * (1 << (retry - 1).min(16)))
                .min(Duration::from_millis(200));
            assert!(d >= nominal / 2 && d <= nominal, "{retry}: {d:?}");
        }
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
    }
}
