//! Breaker configuration: the raw knobs, their defaults, and validation.

use super::error::InvalidBreakerConfig;
use std::time::Duration;

/// The largest count-based window: 2^17 - 1 calls (the counters pack into one word).
pub const MAX_COUNT_WINDOW: u32 = (1 << 17) - 1;
/// The most half-open probes a breaker can be configured to admit.
pub const MAX_HALF_OPEN_PROBES: u32 = 1023;
/// The shortest time-based window (it is split into ten buckets).
pub const MIN_TIME_WINDOW: Duration = Duration::from_millis(10);

/// Which recent calls the failure and slow-call rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `n` calls that got a verdict (ignored calls do not count).
    Count(u32),
    /// The calls that finished in the last duration, kept in ten buckets, so the
    /// window slides in steps of a tenth of its length.
    Time(Duration),
}

/// How long the breaker stays open before it lets probes through.
///
/// The n-th consecutive opening (counted since the breaker last closed) lasts
/// `base * factor^(n-1)`, at most `max`; with `jitter > 0` each duration is then
/// shortened by a random fraction of up to `jitter`, so that many gateways that
/// opened together do not probe together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpenDuration {
    /// The first opening's duration.
    pub base: Duration,
    /// Growth per consecutive opening; `1.0` keeps it constant.
    pub factor: f64,
    /// The cap on the grown duration.
    pub max: Duration,
    /// Random shortening, a fraction in `[0, 1)`.
    pub jitter: f64,
}

impl OpenDuration {
    /// Always `duration`, no growth, no jitter.
    pub fn constant(duration: Duration) -> Self {
        Self {
            base: duration,
            factor: 1.0,
            max: duration,
            jitter: 0.0,
        }
    }

    /// `base`, then `base * factor`, ... up to `max`, per consecutive opening.
    pub fn exponential(base: Duration, factor: f64, max: Duration) -> Self {
        Self {
            base,
            factor,
            max,
            jitter: 0.0,
        }
    }

    /// The same schedule with each duration shortened by up to `jitter` (a fraction).
    #[must_use]
    pub fn with_jitter(self, jitter: f64) -> Self {
        Self { jitter, ..self }
    }

    /// Checks that the schedule makes sense.
    pub fn validate(&self) -> Result<(), InvalidBreakerConfig> {
        if self.base.is_zero() {
            return Err(InvalidBreakerConfig::OpenDuration(
                "base must be greater than zero",
            ));
        }
        if self.max < self.base {
            return Err(InvalidBreakerConfig::OpenDuration(
                "max must not be below base",
            ));
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(InvalidBreakerConfig::OpenDuration(
                "factor must be finite and at least 1",
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(InvalidBreakerConfig::OpenDuration(
                "jitter must be in [0, 1)",
            ));
        }
        Ok(())
    }

    /// The duration of the `n`-th consecutive opening (1-based), before jitter.
    pub fn nominal(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The duration of the `n`-th consecutive opening, jitter applied.
    pub(crate) fn for_opening(&self, n: u32) -> Duration {
        let nominal = self.nominal(n);
        if self.jitter == 0.0 {
            return nominal;
        }
        let cut = self.jitter * rand::random::<f64>();
        nominal.mul_f64(1.0 - cut)
    }
}

/// A circuit breaker's configuration. Every field has a production-safe
/// default; see the table in the crate docs.
///
/// ```
/// use std::time::Duration;
/// use switchboard_resilience::breaker::{BreakerConfig, Window};
///
/// let config = BreakerConfig {
///     window: Window::Time(Duration::from_secs(10)),
///     min_calls: 20,
///     ..BreakerConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Open when at least this fraction of the window's calls failed, in (0, 1].
    pub failure_rate: f64,
    /// Open when at least this fraction of the window's calls were slow, in (0, 1].
    pub slow_call_rate: f64,
    /// A call that takes at least this long is slow. `None` turns slow-call
    /// tracking off, and with it the clock reads on the closed path.
    pub slow_call_duration: Option<Duration>,
    /// The rates only count once the window holds at least this many calls.
    pub min_calls: u32,
    /// Which calls the rates are computed over.
    pub window: Window,
    /// How long to stay open, and how that grows with consecutive openings.
    pub open_duration: OpenDuration,
    /// How many probe calls half-open admits; all must report before it decides.
    pub half_open_probes: u32,
    /// A half-open breaker whose probes have not all reported after this long
    /// opens again, so a lost verdict can never keep it half-open forever.
    pub half_open_max_wait: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call_duration: None,
            min_calls: 20,
            window: Window::Count(100),
            open_duration: OpenDuration::constant(Duration::from_secs(5)),
            half_open_probes: 5,
            half_open_max_wait: Duration::from_secs(30),
        }
    }
}

impl BreakerConfig {
    /// Checks every field, naming the first one that cannot work.
    pub fn validate(&self) -> Result<(), InvalidBreakerConfig> {
        for (name, value) in [
            ("failure_rate", self.failure_rate),
            ("slow_call_rate", self.slow_call_rate),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(InvalidBreakerConfig::Rate { name, value });
            }
        }
        let max_min_calls = match self.window {
            Window::Count(size) => {
                if size == 0 || size > MAX_COUNT_WINDOW {
                    return Err(InvalidBreakerConfig::WindowSize {
                        size,
                        max: MAX_COUNT_WINDOW,
                    });
                }
                size
            }
            Window::Time(window) => {
                if window < MIN_TIME_WINDOW {
                    return Err(InvalidBreakerConfig::WindowDuration {
                        window,
                        min: MIN_TIME_WINDOW,
                    });
                }
                u32::MAX
            }
        };
        if self.min_calls == 0 || self.min_calls > max_min_calls {
            return Err(InvalidBreakerConfig::MinCalls {
                min_calls: self.min_calls,
                max: max_min_calls,
            });
        }
        if self.half_open_probes == 0 || self.half_open_probes > MAX_HALF_OPEN_PROBES {
            return Err(InvalidBreakerConfig::Probes {
                probes: self.half_open_probes,
                max: MAX_HALF_OPEN_PROBES,
            });
        }
        if self.slow_call_duration.is_some_and(|d| d.is_zero()) {
            return Err(InvalidBreakerConfig::ZeroDuration("slow_call_duration"));
        }
        if self.half_open_max_wait.is_zero() {
            return Err(InvalidBreakerConfig::ZeroDuration("half_open_max_wait"));
        }
        self.open_duration.validate()
    }
}
