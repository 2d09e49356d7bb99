//! Retries: how many, how spaced out, which results, and how many across all
//! requests (the budget).
//!
//! - [`Backoff`] (constant, or exponential with [`Jitter`] none, full, equal
//!   or decorrelated, capped) validates its parameters at construction.
//! - [`RetryBudget`] is Finagle's budget: retries stay under a percent of
//!   recent requests plus a minimum per second, shared across requests.
//! - [`RetryPolicy`] combines attempts, backoff, budget and a [`Retryable`]
//!   predicate; it is a tower `Policy` (use [`RetryLayer`]) and has a plain
//!   async [`run`](RetryPolicy::run).
//! - [`is_idempotent`] says which HTTP methods may be retried blindly.

mod backoff;
mod budget;
pub mod error;
pub mod future;
mod layer;
mod policy;

pub use self::backoff::{Backoff, Delays, Jitter};
pub use self::budget::{MAX_MIN_PER_SEC, RetryBudget};
pub use self::error::{InvalidBackoff, InvalidBudget, InvalidRetry};
pub use self::layer::RetryLayer;
pub use self::policy::{RetryErrors, RetryPolicy, Retryable};
pub use tower::retry::Retry;

/// The HTTP methods RFC 9110 defines as idempotent, which a proxy may retry
/// without knowing anything about the request.
pub const IDEMPOTENT_METHODS: [&str; 6] = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"];

/// True for GET, HEAD, OPTIONS, PUT, DELETE and TRACE. Method names are
/// case-sensitive (RFC 9110 section 9.1), so `get` is not idempotent.
///
/// ```
/// use switchboard_resilience::retry::is_idempotent;
/// assert!(is_idempotent("PUT"));
/// assert!(!is_idempotent("POST"));
/// ```
pub fn is_idempotent(method: &str) -> bool {
    IDEMPOTENT_METHODS.contains(&method)
}
