use super::Timeout;
use std::time::Duration;
use tower::Layer;

/// Applies a [`Timeout`] to every request of the wrapped service.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    after: Duration,
}

impl TimeoutLayer {
    /// Requests fail with [`Elapsed`](super::Elapsed) after `after`.
    pub fn new(after: Duration) -> Self {
        Self { after }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::new(inner, self.after)
    }
}
