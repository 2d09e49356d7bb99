//! Resilience primitives for calls between services: a circuit breaker,
//! retries under a shared budget, timeouts, bulkheads and rate limits, each a
//! plain async API and a tower `Layer`.
//!
//! A proxy keeps one breaker per upstream instance and reports each verdict
//! once the response is in:
//!
//! ```
//! use std::time::Duration;
//! use switchboard_resilience::breaker::{BreakerConfig, KeyedBreakers, Outcome};
//! use switchboard_resilience::retry::{Backoff, RetryBudget, is_idempotent};
//!
//! let breakers = KeyedBreakers::new(BreakerConfig::default(), 10_000).unwrap();
//! let budget = RetryBudget::default(); // 20% of requests + 10/s, over 10s
//! let backoff = Backoff::exponential(Duration::from_millis(25), Duration::from_secs(1)).unwrap();
//!
//! budget.deposit(); // one per incoming request
//! match breakers.try_acquire(&"10.0.0.7:4001") {
//!     Ok(permit) => {
//!         let status = 502; // ... forward the request, read the status ...
//!         permit.record(if status >= 500 { Outcome::Failure } else { Outcome::Success });
//!         if status >= 500 && is_idempotent("GET") && budget.withdraw() {
//!             let _wait = backoff.delays().next(); // then try another instance
//!         }
//!     }
//!     // 503 with `Retry-After: retry_after` (rounded up to seconds)
//!     Err(open) => assert!(open.retry_after > Duration::ZERO),
//! }
//! ```
//!
//! A client composes the layers with tower's `ServiceBuilder`:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchboard_resilience::breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};
//! use switchboard_resilience::bulkhead::{Bulkhead, BulkheadLayer};
//! use switchboard_resilience::rate_limit::{RateLimitLayer, RateLimiter, quota};
//! use switchboard_resilience::retry::{Backoff, RetryLayer, RetryPolicy};
//! use switchboard_resilience::timeout::TimeoutLayer;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let upstream = service_fn(|n: u32| async move { Ok::<_, tower::BoxError>(n * 2) });
//! let client = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(Arc::new(RateLimiter::new(
//!         quota(100, Duration::from_secs(1), 10)?,
//!     ))))
//!     .layer(BulkheadLayer::new(Bulkhead::new(64, Duration::from_millis(50))?))
//!     .layer(CircuitBreakerLayer::new(Breaker::new(BreakerConfig::default())?))
//!     .layer(RetryLayer::new(RetryPolicy::new(3, Backoff::constant(Duration::from_millis(10)))?))
//!     .layer(TimeoutLayer::new(Duration::from_secs(2)))
//!     .service(upstream);
//! assert_eq!(client.oneshot(21).await?, 42);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! Each primitive is a folder in tower's shape: `mod.rs` (the plain API and
//! the tower `Service`), `layer.rs`, `future.rs`, `error.rs`.
//! - [`breaker`]: `Breaker` (`try_acquire` -> `Permit` -> `record`, `call`,
//!   `snapshot`, `subscribe`), `KeyedBreakers`, `CircuitBreakerLayer`;
//!   internal `core.rs` (state machine), `window.rs` (lock-free count and time
//!   windows), `config.rs`, `keyed.rs`.
//! - [`retry`]: `Backoff` + `Jitter`, `RetryBudget` (Finagle), `RetryPolicy`
//!   (a tower `Policy`, and `run` for plain async), `RetryLayer`, `is_idempotent`.
//! - [`timeout`]: `timeout()`, `TimeoutLayer`, `Elapsed`.
//! - [`bulkhead`]: `Bulkhead` (max concurrent, bounded wait), `BulkheadLayer`, `BulkheadFull`.
//! - [`rate_limit`]: GCRA on `governor`: `RateLimiter`, `KeyedRateLimiter`
//!   (bounded memory), `RateLimitLayer`, `KeyedRateLimitLayer`, `RateLimited`.
//!
//! - [`redact`]: `redact_url`, the one rule for showing connection URLs
//!   without their credentials (used by the registry, the bus and the gateway).
//!
//! - [`clock`]: where time comes from: `tokio::time::Instant` (so tests run
//!   on virtual time with `tokio::time::pause`), or an opt-in [`clock::CoarseClock`]
//!   for processes that read the time on every request.
//!
//! Nothing here does I/O or knows about HTTP.
//!
//! # Defaults
//!
//! | what | setting | default | why |
//! |---|---|---|---|
//! | breaker | `failure_rate` | `0.5` | open when half the window failed |
//! | breaker | `slow_call_rate` | `1.0` | only an all-slow window opens it |
//! | breaker | `slow_call_duration` | `None` (off) | no clock reads on the closed path unless asked |
//! | breaker | `min_calls` | `20` | a handful of errors on a quiet upstream is not a trend |
//! | breaker | `window` | `Window::Count(100)` | last 100 calls |
//! | breaker | `open_duration` | constant `5s` | growth (`OpenDuration::exponential`) and jitter are opt-in |
//! | breaker | `half_open_probes` | `5` | all five must report before deciding |
//! | breaker | `half_open_max_wait` | `30s` | lost probes cannot keep it half-open |
//! | retry budget | `RetryBudget::default()` | ttl `10s`, `10`/s, `20%` | Finagle's defaults |
//! | backoff | `Backoff::exponential(base, max)` | factor `2`, `Jitter::Full` | AWS's recommendation |
//! | retry | `max_attempts` | none: required | counts the first try |
//! | bulkhead | `max_concurrent`, `max_wait` | none: required | zero wait rejects at once |
//! | rate limit | `Quota` / [`rate_limit::quota`] | none: required | keyed: `max_keys` required |
//!
//! # Cost
//! The breaker is written by hand (tower has none; tower-resilience's boxes a
//! future and takes an async mutex per call). Its closed path is one atomic load to acquire and, for
//! a healthy upstream, two loads to record; see `bench/RESULTS.md` and
//! `switchboard bench breaker` for figures.

pub mod breaker;
pub mod bulkhead;
pub mod clock;
pub mod rate_limit;
pub mod redact;
pub mod retry;
pub mod timeout;
