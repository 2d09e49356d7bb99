//! Error types

/// A backoff that cannot work, with the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidBackoff {
    /// An exponential or decorrelated backoff needs a base above zero to grow from.
    #[error("base delay must be greater than zero for {0} backoff")]
    ZeroBase(&'static str),
    /// The cap is below the first delay.
    #[error("max delay ({max:?}) must not be below the base delay ({base:?})")]
    MaxBelowBase {
        /// The base delay.
        base: std::time::Duration,
        /// The rejected cap.
        max: std::time::Duration,
    },
    /// A growth factor below 1 or not a finite number.
    #[error("factor must be a finite number of at least 1, got {0}")]
    Factor(f64),
}

/// A retry budget that cannot work, with the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidBudget {
    /// Finagle's bounds: deposits are remembered for 1 to 60 seconds.
    #[error("ttl must be between 1s and 60s, got {0:?}")]
    Ttl(std::time::Duration),
    /// The percent is negative, above 1000 or not a number.
    #[error("percent must be between 0 and 1000, got {0}")]
    Percent(f64),
    /// The minimum rate is absurdly large.
    #[error("min_per_sec must be at most {max}, got {value}")]
    MinPerSec {
        /// The rejected value.
        value: u32,
        /// The largest accepted value.
        max: u32,
    },
}

/// A retry policy that cannot work, with the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidRetry {
    /// `max_attempts` counts the first try too, so it is at least 1.
    #[error("max_attempts must be at least 1 (it counts the first try)")]
    ZeroAttempts,
}
