//! Rate limits with GCRA (the generic cell rate algorithm): a steady rate
//! with a burst allowance, plain or per key; a call over the limit fails with
//! [`RateLimited`], which says when to come back.
//!
//! Built on the `governor` crate (lock-free GCRA state, well kept), read on
//! tokio's clock so tests run on virtual time, with a key store of bounded
//! size (see [`KeyedRateLimiter`]).
//!
//! ```
//! use std::num::NonZeroU32;
//! use switchboard_resilience::rate_limit::{Quota, RateLimiter};
//!
//! let limiter = RateLimiter::new(Quota::per_second(NonZeroU32::new(2).unwrap()));
//! assert!(limiter.check().is_ok());
//! assert!(limiter.check().is_ok());
//! let limited = limiter.check().unwrap_err();
//! assert!(limited.retry_after.as_millis() <= 500);
//! ```

mod clock;
pub mod error;
pub mod future;
mod keyed;
mod layer;

pub use self::clock::TokioClock;
pub use self::error::{InvalidRateLimit, RateLimited};
pub use self::keyed::KeyedRateLimiter;
pub use self::layer::{Keyed, KeyedRateLimitLayer, Limit, RateLimitLayer};
pub use governor::Quota;

use self::future::ResponseFuture;
use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use std::hash::Hash;
use std::num::NonZeroU32;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{BoxError, Service};

/// `rate` calls per `period`, with bursts of up to `burst` calls.
///
/// ```
/// use std::time::Duration;
/// use switchboard_resilience::rate_limit::quota;
/// assert!(quota(100, Duration::from_secs(1), 20).is_ok());
/// assert!(quota(0, Duration::from_secs(1), 20).is_err());
/// ```
pub fn quota(rate: u32, period: Duration, burst: u32) -> Result<Quota, InvalidRateLimit> {
    let rate = NonZeroU32::new(rate).ok_or(InvalidRateLimit::ZeroRate)?;
    let burst = NonZeroU32::new(burst).ok_or(InvalidRateLimit::ZeroBurst)?;
    if period.is_zero() {
        return Err(InvalidRateLimit::ZeroPeriod);
    }
    let every = period / rate.get();
    Quota::with_period(every.max(Duration::from_nanos(1)))
        .map(|q| q.allow_burst(burst))
        .ok_or(InvalidRateLimit::ZeroPeriod)
}

type Direct = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// One GCRA rate limit for every call.
#[derive(Debug)]
pub struct RateLimiter {
    inner: Direct,
    clock: TokioClock,
}

impl RateLimiter {
    /// A limiter for `quota`.
    pub fn new(quota: Quota) -> Self {
        let clock = TokioClock::new();
        Self {
            inner: governor::RateLimiter::direct_with_clock(quota, clock),
            clock,
        }
    }

    /// Lets one call through, or says when the next would be allowed.
    pub fn check(&self) -> Result<(), RateLimited> {
        self.inner.check().map_err(|not_until| RateLimited {
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Waits until a call is allowed.
    pub async fn acquire(&self) {
        while let Err(limited) = self.check() {
            tokio::time::sleep(limited.retry_after).await;
        }
    }
}

/// How a [`RateLimit`] service decides on one request.
pub trait Check<Request> {
    /// `Ok` to let the request through.
    fn check(&self, request: &Request) -> Result<(), RateLimited>;
}

impl<Request> Check<Request> for Limit {
    fn check(&self, _: &Request) -> Result<(), RateLimited> {
        match self {
            Limit::Direct(limiter) => limiter.check(),
        }
    }
}

impl<Request, K, F> Check<Request> for Keyed<K, F>
where
    K: Hash + Eq + Clone,
    F: Fn(&Request) -> K,
{
    fn check(&self, request: &Request) -> Result<(), RateLimited> {
        self.limiter.check(&(self.key_of)(request))
    }
}

/// A tower service whose requests over the limit fail at once with a boxed
/// [`RateLimited`] (rather than waiting, which a gateway cannot afford).
#[derive(Debug, Clone)]
pub struct RateLimit<S, L> {
    inner: S,
    limit: L,
}

impl<S, L> RateLimit<S, L> {
    /// Limits `inner` by `limit`.
    pub fn new(inner: S, limit: L) -> Self {
        Self { inner, limit }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, L, Request> Service<Request> for RateLimit<S, L>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    L: Check<Request>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.limit.check(&request) {
            Ok(()) => ResponseFuture::allowed(self.inner.call(request)),
            Err(limited) => ResponseFuture::limited(limited),
        }
    }
}
