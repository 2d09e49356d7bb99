//! Error types

use std::time::Duration;

/// The breaker refused the call: it is open, forced open, or half-open with
/// every probe slot taken.
///
/// `retry_after` is when the breaker expects to admit calls again; a gateway
/// writes it as the `Retry-After` header (rounded up to whole seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker is open, retry after {retry_after:?}")]
pub struct BreakerOpen {
    /// How long until the breaker will probably admit a call again.
    pub retry_after: Duration,
}

/// The error of [`Breaker::call`](super::Breaker::call) and of the
/// [`CircuitBreaker`](super::CircuitBreaker) service when the inner error is kept typed.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The breaker rejected the call without running it.
    #[error(transparent)]
    Open(#[from] BreakerOpen),
    /// The call ran and failed.
    #[error("call failed: {0}")]
    Inner(E),
}

impl<E> CallError<E> {
    /// The inner error, if the call ran.
    pub fn into_inner(self) -> Option<E> {
        match self {
            CallError::Open(_) => None,
            CallError::Inner(e) => Some(e),
        }
    }
}

/// A breaker configuration that cannot work, with the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidBreakerConfig {
    /// A rate threshold outside (0, 1].
    #[error("{name} must be in (0, 1], got {value}")]
    Rate {
        /// Which threshold.
        name: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// A count-based window of zero or more than the maximum size.
    #[error("count window size must be in 1..={max}, got {size}")]
    WindowSize {
        /// The rejected size.
        size: u32,
        /// The largest supported size.
        max: u32,
    },
    /// A time-based window shorter than the minimum.
    #[error("time window must be at least {min:?}, got {window:?}")]
    WindowDuration {
        /// The rejected duration.
        window: Duration,
        /// The shortest supported window.
        min: Duration,
    },
    /// `min_calls` of zero, or larger than a count-based window can ever hold.
    #[error("min_calls must be in 1..={max}, got {min_calls}")]
    MinCalls {
        /// The rejected value.
        min_calls: u32,
        /// The largest value that can be reached with this window.
        max: u32,
    },
    /// A half-open probe count of zero or more than the maximum.
    #[error("half_open_probes must be in 1..={max}, got {probes}")]
    Probes {
        /// The rejected value.
        probes: u32,
        /// The largest supported value.
        max: u32,
    },
    /// An open duration that is zero, or whose maximum is below its base.
    #[error("open duration: {0}")]
    OpenDuration(&'static str),
    /// A zero duration where a positive one is required.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
}
