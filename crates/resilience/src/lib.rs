//! Resilience primitives for calls between services: a circuit breaker,
//! retries with a shared budget, timeouts, bulkheads and rate limits, each as
//! a plain async API and as a tower `Layer`.
//!
//! ```
//! use std::time::Duration;
//! use switchboard_resilience::breaker::{Breaker, BreakerConfig, Outcome};
//! use switchboard_resilience::retry::{Backoff, Jitter, RetryBudget};
//!
//! // One breaker per upstream instance; the verdict comes after the response.
//! let breaker = Breaker::new(BreakerConfig::default()).unwrap();
//! match breaker.try_acquire() {
//!     Ok(permit) => permit.record(Outcome::Success),
//!     Err(open) => eprintln!("503, Retry-After: {}s", open.retry_after.as_secs().max(1)),
//! }
//!
//! // Retries: capped exponential backoff with jitter, under a shared budget.
//! let backoff = Backoff::exponential(Duration::from_millis(25), Duration::from_secs(1))
//!     .unwrap()
//!     .with_jitter(Jitter::Full);
//! let budget = RetryBudget::new(Duration::from_secs(10), 10, 20.0).unwrap();
//! budget.deposit();
//! if budget.withdraw() {
//!     let _wait = backoff.delays().next();
//! }
//! ```
//!
//! # Layout
//! - [`breaker`]: the circuit breaker (`Breaker`, `Permit`, `KeyedBreakers`,
//!   `CircuitBreakerLayer`), count- and time-based windows, snapshots and
//!   state-change notifications.
//! - [`retry`]: `Backoff`, `RetryBudget` (Finagle), `RetryPolicy` (a tower
//!   `Policy`), `RetryLayer`, `is_idempotent`.
//!
//! All time is read from `tokio::time::Instant`, so tests run on virtual time
//! (`tokio::time::pause`). No primitive does I/O.

mod clock;

pub mod breaker;
pub mod bulkhead;
pub mod rate_limit;
pub mod retry;
pub mod timeout;
