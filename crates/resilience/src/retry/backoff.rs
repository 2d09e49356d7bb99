//! How long to wait before each retry.

use super::error::InvalidBackoff;
use std::time::Duration;

/// How a backoff randomizes its delays (see the AWS Architecture Blog,
/// "Exponential Backoff And Jitter"). `cap(n)` is `min(max, base * factor^n)`
/// for the n-th retry, counted from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Jitter {
    /// Exactly `cap(n)`.
    None,
    /// Uniform in `[0, cap(n)]`: the least load on the upstream.
    Full,
    /// Uniform in `[cap(n) / 2, cap(n)]`: never retries right away.
    Equal,
    /// `min(max, uniform in [base, previous * 3])`, starting from `base`:
    /// spreads out like full jitter without depending on the attempt number.
    Decorrelated,
}

/// A validated backoff schedule; [`delays`](Backoff::delays) walks it.
///
/// ```
/// use std::time::Duration;
/// use switchboard_resilience::retry::{Backoff, Jitter};
///
/// let backoff = Backoff::exponential(Duration::from_millis(50), Duration::from_secs(2))
///     .unwrap()
///     .with_jitter(Jitter::Equal);
/// for (n, delay) in backoff.delays().take(10).enumerate() {
///     assert!(delay <= backoff.cap(n as u32));
/// }
/// assert!(Backoff::exponential(Duration::ZERO, Duration::from_secs(1)).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    factor: f64,
    jitter: Jitter,
}

impl Backoff {
    /// The same delay before every retry (zero retries immediately).
    pub fn constant(delay: Duration) -> Self {
        Self {
            base: delay,
            max: delay,
            factor: 1.0,
            jitter: Jitter::None,
        }
    }

    /// `base`, doubling per retry up to `max`, with full jitter.
    pub fn exponential(base: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if base.is_zero() {
            return Err(InvalidBackoff::ZeroBase("exponential"));
        }
        if max < base {
            return Err(InvalidBackoff::MaxBelowBase { base, max });
        }
        Ok(Self {
            base,
            max,
            factor: 2.0,
            jitter: Jitter::Full,
        })
    }

    /// The same schedule growing by `factor` per retry instead.
    pub fn with_factor(self, factor: f64) -> Result<Self, InvalidBackoff> {
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(InvalidBackoff::Factor(factor));
        }
        Ok(Self { factor, ..self })
    }

    /// The same schedule randomized by `jitter`.
    #[must_use]
    pub fn with_jitter(self, jitter: Jitter) -> Self {
        Self { jitter, ..self }
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Growth per retry.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// How delays are randomized.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// `min(max, base * factor^n)`: the largest delay before retry `n` (from 0).
    pub fn cap(&self, n: u32) -> Duration {
        let exp = i32::try_from(n).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delays before retry 0, 1, 2, ... (an endless iterator).
    pub fn delays(&self) -> Delays {
        Delays {
            backoff: *self,
            n: 0,
            previous: self.base,
        }
    }
}

/// The delays of one sequence of retries; see [`Backoff::delays`].
#[derive(Debug, Clone)]
pub struct Delays {
    backoff: Backoff,
    n: u32,
    previous: Duration,
}

fn uniform(low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    // In u128 nanoseconds: delays past u64::MAX ns (584 years) are possible
    // (`Duration::MAX` caps), and truncating them drew delays below `low`.
    let ns = rand::random_range(low.as_nanos()..=high.as_nanos());
    let secs = u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX);
    Duration::new(secs, (ns % 1_000_000_000) as u32)
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let b = &self.backoff;
        let cap = b.cap(self.n);
        self.n = self.n.saturating_add(1);
        let delay = match b.jitter {
            Jitter::None => cap,
            Jitter::Full => uniform(Duration::ZERO, cap),
            Jitter::Equal => uniform(cap / 2, cap),
            Jitter::Decorrelated => {
                let high = self.previous.saturating_mul(3).min(b.max);
                let delay = uniform(b.base.min(high), high);
                self.previous = delay.max(b.base);
                delay
            }
        };
        Some(delay)
    }
}
