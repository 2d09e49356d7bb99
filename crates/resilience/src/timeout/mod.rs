//! Time limits: a call that takes longer than its limit fails with [`Elapsed`].
//!
//! A thin wrapper over tokio's timer (which tower's own `Timeout` uses too);
//! what it adds is an error that says which limit passed, in this crate's
//! naming, and the plain [`timeout`] function next to the tower layer.
//!
//! ```
//! use std::time::Duration;
//! use switchboard_resilience::timeout::{Elapsed, timeout};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let slow = tokio::time::sleep(Duration::from_secs(10));
//! assert_eq!(
//!     timeout(Duration::from_secs(1), slow).await,
//!     Err(Elapsed { after: Duration::from_secs(1) })
//! );
//! # }
//! ```

pub mod error;
pub mod future;
mod layer;

pub use self::error::Elapsed;
pub use self::layer::TimeoutLayer;

use self::future::ResponseFuture;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{BoxError, Service};

/// Runs `future` for at most `after`.
pub async fn timeout<F: Future>(after: Duration, future: F) -> Result<F::Output, Elapsed> {
    tokio::time::timeout(after, future)
        .await
        .map_err(|_| Elapsed { after })
}

/// A tower service whose requests fail with a boxed [`Elapsed`] after a limit.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    after: Duration,
}

impl<S> Timeout<S> {
    /// Limits every request of `inner` to `after`.
    pub fn new(inner: S, after: Duration) -> Self {
        Self { inner, after }
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

impl<S, Request> Service<Request> for Timeout<S>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        ResponseFuture::new(self.inner.call(request), self.after)
    }
}
