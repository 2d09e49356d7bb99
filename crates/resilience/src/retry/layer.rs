use super::policy::RetryPolicy;
use tower::Layer;
use tower::retry::Retry;

/// Retries requests of the wrapped service per a [`RetryPolicy`].
///
/// The service is tower's own `Retry` (it already does the cloning and the
/// waiting right); what this crate adds is the policy. Requests must be `Clone`.
#[derive(Debug, Clone)]
pub struct RetryLayer<P> {
    policy: RetryPolicy<P>,
}

impl<P> RetryLayer<P> {
    /// A layer applying `policy`.
    pub fn new(policy: RetryPolicy<P>) -> Self {
        Self { policy }
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = Retry<RetryPolicy<P>, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(self.policy.clone(), inner)
    }
}
