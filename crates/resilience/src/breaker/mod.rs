//! A circuit breaker: stop calling an upstream that keeps failing, then probe
//! it carefully before trusting it again.
//!
//! The state machine is resilience4j's: **closed** counts outcomes in a
//! sliding window (the last N calls, or the last T of time) and opens when the
//! failure rate or the slow-call rate reaches its threshold with at least
//! `min_calls` in the window; **open** rejects calls with [`BreakerOpen`] for
//! the open duration (constant, or growing per consecutive opening, capped
//! and jittered); then **half-open** admits `half_open_probes` probe calls and
//! closes if their rates stay under the thresholds, or opens again. Half-open
//! gives up and reopens after `half_open_max_wait` if its probes never all
//! report. Operators can also force it open, disable it, or run it
//! metrics-only.
//!
//! Two shapes of use:
//! - [`Breaker::try_acquire`] hands out a [`Permit`]; the caller reports the
//!   verdict later with [`Permit::record`]. This is what a proxy needs: the
//!   verdict depends on the response. A permit dropped without a verdict counts
//!   as [`Outcome::Ignored`] and frees its probe slot.
//! - [`Breaker::call`] wraps a future, and [`CircuitBreakerLayer`] wraps a tower service.
//!
//! [`KeyedBreakers`] keeps one breaker per key (per upstream instance) in
//! bounded memory. [`Breaker::snapshot`] and [`Breaker::subscribe`] (or a
//! listener passed to [`Breaker::with_listener`]) feed metrics, dashboards and
//! passive health checks.
//!
//! # Concurrency and cost
//! Nothing on the call path locks. `try_acquire` on a closed breaker is one
//! atomic load; `record` on a count window is, for a healthy upstream, two
//! more loads and no write, and otherwise one compare-and-swap to claim a ring
//! slot, one swap, and one compare-and-swap on the packed counters. Half-open
//! probes are handed out by compare-and-swap on a packed word, so no more than
//! `half_open_probes` are ever out at once. State changes go through one
//! mutex, taken only by the thread that saw the reason for the change. Every
//! change starts a new epoch; a verdict from a permit of an earlier epoch is
//! dropped, so outcomes never leak into a window they do not belong to.
//!
//! The clock is read only where time matters: with a time-based window or
//! slow-call tracking (on each call), and when an open breaker rejects. A
//! process doing that per request can start a
//! [`CoarseClock`](crate::clock::CoarseClock) to make those reads one atomic load.
//!
//! ```
//! use std::time::Duration;
//! use switchboard_resilience::breaker::{Breaker, BreakerConfig, Outcome, State, Window};
//!
//! let breaker = Breaker::new(BreakerConfig {
//!     window: Window::Count(10),
//!     min_calls: 4,
//!     ..BreakerConfig::default()
//! })
//! .unwrap();
//! for _ in 0..4 {
//!     breaker.try_acquire().unwrap().record(Outcome::Failure);
//! }
//! assert_eq!(breaker.state(), State::Open);
//! let open = breaker.try_acquire().unwrap_err();
//! assert!(open.retry_after <= Duration::from_secs(5));
//! ```

mod config;
mod core;
pub mod error;
pub mod future;
mod keyed;
mod layer;
mod window;

pub use self::config::{
    BreakerConfig, MAX_COUNT_WINDOW, MAX_HALF_OPEN_PROBES, MIN_TIME_WINDOW, OpenDuration, Window,
};
pub use self::core::{Breaker, Outcome, OwnedPermit, Permit, Snapshot, State, Transition};
pub use self::error::{BreakerOpen, CallError, InvalidBreakerConfig};
pub use self::keyed::KeyedBreakers;
pub use self::layer::{CircuitBreakerLayer, Classify, ErrorIsFailure};

use self::future::ResponseFuture;
use std::task::{Context, Poll};
use tower::{BoxError, Service};

/// A tower service guarded by a [`Breaker`]: rejected calls fail fast with a
/// boxed [`BreakerOpen`], admitted ones are judged by the classifier `C`.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S, C = ErrorIsFailure> {
    inner: S,
    breaker: Breaker,
    classify: C,
}

impl<S> CircuitBreaker<S> {
    /// Guards `inner` with `breaker`, counting `Err` as failure.
    pub fn new(inner: S, breaker: Breaker) -> Self {
        Self::with_classifier(inner, breaker, ErrorIsFailure)
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// Guards `inner` with `breaker`, judging results with `classify`.
    pub fn with_classifier(inner: S, breaker: Breaker, classify: C) -> Self {
        Self {
            inner,
            breaker,
            classify,
        }
    }

    /// The breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes the wrapper, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, Request> Service<Request> for CircuitBreaker<S, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the inner service's; the breaker decides per call, so an
        // open breaker fails fast instead of parking callers in poll_ready.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.breaker.try_acquire_owned() {
            Ok(permit) => {
                ResponseFuture::running(self.inner.call(request), permit, self.classify.clone())
            }
            Err(open) => ResponseFuture::rejected(open, self.classify.clone()),
        }
    }
}
