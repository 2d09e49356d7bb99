//! Exponential backoff for redeliveries and reconnects.

use std::time::Duration;

/// Exponential backoff with optional "equal jitter": the delay before attempt
/// `n + 1` is `min(max, initial * multiplier^(n-1))`, of which the upper half
/// is randomized when `jitter` is on, so that a burst of failures does not
/// come back as a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBackoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: bool,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        RetryBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: true,
        }
    }
}

/// An impossible backoff configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid backoff: {0}")]
pub struct InvalidBackoff(&'static str);

impl RetryBackoff {
    /// A backoff from `initial` growing by `multiplier` up to `max`, jittered.
    pub fn new(initial: Duration, max: Duration, multiplier: f64) -> Result<Self, InvalidBackoff> {
        if initial > max {
            return Err(InvalidBackoff("initial delay exceeds the maximum"));
        }
        if !(multiplier.is_finite() && multiplier >= 1.0) {
            return Err(InvalidBackoff("multiplier must be a finite number >= 1"));
        }
        Ok(RetryBackoff {
            initial,
            max,
            multiplier,
            jitter: true,
        })
    }

    /// A constant delay without jitter (handy in tests).
    pub fn constant(delay: Duration) -> Self {
        RetryBackoff {
            initial: delay,
            max: delay,
            multiplier: 1.0,
            jitter: false,
        }
    }

    /// Turns jitter on or off.
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay after the `attempt`-th failure (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64);
        let factor = self.multiplier.powi(i32::try_from(exp).unwrap_or(64));
        let base = self.initial.as_secs_f64() * factor;
        let capped = Duration::from_secs_f64(base.min(self.max.as_secs_f64()));
        if self.jitter && !capped.is_zero() {
            let half = capped / 2;
            half + half.mul_f64(random_unit())
        } else {
            capped
        }
    }
}

/// A cheap random number in [0, 1): jitter needs spread, not cryptography.
fn random_unit() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            u64::from(std::process::id()) ^ (uuid::Uuid::new_v4().as_u128() as u64) | 1,
        );
    }
    STATE.with(|s| {
        // xorshift64*
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_and_caps() {
        let b = RetryBackoff::new(Duration::from_millis(10), Duration::from_millis(100), 2.0)
            .unwrap()
            .with_jitter(false);
        let got: Vec<_> = (1..=6).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(got, [10, 20, 40, 80, 100, 100]);
    }

    #[test]
    fn rejects_impossible_values() {
        assert!(RetryBackoff::new(Duration::from_secs(2), Duration::from_secs(1), 2.0).is_err());
        assert!(RetryBackoff::new(Duration::ZERO, Duration::from_secs(1), 0.5).is_err());
        assert!(RetryBackoff::new(Duration::ZERO, Duration::from_secs(1), f64::NAN).is_err());
    }

    proptest! {
        #[test]
        fn jittered_delay_stays_within_half_and_full(
            initial_ms in 0u64..1000, extra_ms in 0u64..10_000, mult in 1.0f64..4.0, attempt in 1u32..200,
        ) {
            let b = RetryBackoff::new(
                Duration::from_millis(initial_ms),
                Duration::from_millis(initial_ms + extra_ms),
                mult,
            ).unwrap();
            let full = b.with_jitter(false).delay(attempt);
            let d = b.delay(attempt);
            prop_assert!(d <= full && d >= full / 2, "{d:?} vs {full:?}");
            prop_assert!(full <= Duration::from_millis(initial_ms + extra_ms));
        }
    }
}
