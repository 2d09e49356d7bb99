//! Error types

use std::time::Duration;

/// The call is over the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited, retry after {retry_after:?}")]
pub struct RateLimited {
    /// When the next call would be allowed; a gateway writes it as `Retry-After`.
    pub retry_after: Duration,
}

/// A rate limit that cannot work, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRateLimit {
    /// A rate of zero would allow nothing.
    #[error("rate must be at least 1 per period")]
    ZeroRate,
    /// A burst of zero would allow nothing.
    #[error("burst must be at least 1")]
    ZeroBurst,
    /// A zero period has no rate.
    #[error("period must be greater than zero")]
    ZeroPeriod,
    /// The keyed limiter needs room for at least one key.
    #[error("max_keys must be at least 1")]
    ZeroKeys,
}
