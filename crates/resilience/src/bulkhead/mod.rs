//! Bulkheads: at most N calls in flight; a call beyond that waits a bounded
//! time for a slot and then fails with [`BulkheadFull`], so one slow upstream
//! cannot tie up every task and connection.
//!
//! Built on tokio's fair semaphore (waiters get slots in arrival order).
//!
//! ```
//! use std::time::Duration;
//! use switchboard_resilience::bulkhead::Bulkhead;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let bulkhead = Bulkhead::new(1, Duration::from_millis(100)).unwrap();
//! let held = bulkhead.acquire().await.unwrap();
//! let full = bulkhead.acquire().await.unwrap_err();
//! assert_eq!(full.waited, Duration::from_millis(100));
//! drop(held);
//! assert!(bulkhead.try_acquire().is_ok());
//! # }
//! ```

pub mod error;
pub mod future;
mod layer;

pub use self::error::{BulkheadFull, InvalidBulkhead};
pub use self::layer::BulkheadLayer;

use self::future::ResponseFuture;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{BoxError, Service};

/// A bounded number of concurrent calls, with a bounded wait for a slot.
/// Clones share the slots.
#[derive(Debug, Clone)]
pub struct Bulkhead {
    semaphore: Arc<Semaphore>,
    max_concurrent: u32,
    max_wait: Duration,
}

/// A slot in a [`Bulkhead`], given back when dropped.
#[derive(Debug)]
pub struct BulkheadPermit {
    _permit: OwnedSemaphorePermit,
}

impl Bulkhead {
    /// At most `max_concurrent` calls in flight; others wait up to `max_wait`
    /// (zero: reject at once).
    pub fn new(max_concurrent: u32, max_wait: Duration) -> Result<Self, InvalidBulkhead> {
        let max = u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
        if max_concurrent == 0 {
            return Err(InvalidBulkhead::ZeroConcurrency);
        }
        if max_concurrent > max {
            return Err(InvalidBulkhead::TooLarge {
                value: max_concurrent,
                max,
            });
        }
        Ok(Self {
            semaphore: Arc::new(Semaphore::new(max_concurrent as usize)),
            max_concurrent,
            max_wait,
        })
    }

    /// The number of slots.
    pub fn max_concurrent(&self) -> u32 {
        self.max_concurrent
    }

    /// How long a call may wait for a slot.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Free slots right now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// A slot if one is free now, without waiting.
    pub fn try_acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        Arc::clone(&self.semaphore)
            .try_acquire_owned()
            .map(|permit| BulkheadPermit { _permit: permit })
            .map_err(|_| self.full(Duration::ZERO))
    }

    /// A slot, waiting up to `max_wait` for one.
    pub async fn acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        if let Ok(permit) = self.try_acquire() {
            return Ok(permit);
        }
        if self.max_wait.is_zero() {
            return Err(self.full(Duration::ZERO));
        }
        let semaphore = Arc::clone(&self.semaphore);
        match tokio::time::timeout(self.max_wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(BulkheadPermit { _permit: permit }),
            // The semaphore is never closed; treat it like a full bulkhead anyway.
            Ok(Err(_)) | Err(_) => Err(self.full(self.max_wait)),
        }
    }

    /// Runs `call` holding a slot.
    pub async fn call<F: Future>(&self, call: F) -> Result<F::Output, BulkheadFull> {
        let _permit = self.acquire().await?;
        Ok(call.await)
    }

    fn full(&self, waited: Duration) -> BulkheadFull {
        BulkheadFull {
            max_concurrent: self.max_concurrent,
            waited,
        }
    }
}

/// A tower service whose calls go through a [`Bulkhead`]; a call that finds
/// no slot in time fails with a boxed [`BulkheadFull`]. The inner service must
/// be `Clone`, because a waiting call keeps its own ready copy.
#[derive(Debug, Clone)]
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
}

impl<S> BulkheadService<S> {
    /// Guards `inner` with `bulkhead`.
    pub fn new(inner: S, bulkhead: Bulkhead) -> Self {
        Self { inner, bulkhead }
    }

    /// The bulkhead.
    pub fn bulkhead(&self) -> &Bulkhead {
        &self.bulkhead
    }
}

impl<S, Request> Service<Request> for BulkheadService<S>
where
    S: Service<Request> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.bulkhead.try_acquire() {
            Ok(permit) => ResponseFuture::calling(self.inner.call(request), permit),
            Err(_) => {
                // Keep the service that poll_ready readied for this call.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                let bulkhead = self.bulkhead.clone();
                ResponseFuture::waiting(
                    Box::pin(async move { bulkhead.acquire().await }),
                    ready,
                    request,
                )
            }
        }
    }
}
