use super::{KeyedRateLimiter, RateLimit, RateLimiter};
use std::hash::Hash;
use std::sync::Arc;
use tower::Layer;

/// Puts every request of the wrapped service under one shared [`RateLimiter`].
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<RateLimiter>,
}

impl RateLimitLayer {
    /// A layer whose services all share `limiter`.
    pub fn new(limiter: Arc<RateLimiter>) -> Self {
        Self { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S, Limit>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Limit::Direct(Arc::clone(&self.limiter)))
    }
}

/// Limits each request of the wrapped service by the key `key_of` extracts
/// from it (e.g. the client address).
pub struct KeyedRateLimitLayer<K: Hash + Eq + Clone, F> {
    limiter: Arc<KeyedRateLimiter<K>>,
    key_of: F,
}

impl<K: Hash + Eq + Clone, F: Clone> Clone for KeyedRateLimitLayer<K, F> {
    fn clone(&self) -> Self {
        Self {
            limiter: Arc::clone(&self.limiter),
            key_of: self.key_of.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone, F> std::fmt::Debug for KeyedRateLimitLayer<K, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedRateLimitLayer")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, F> KeyedRateLimitLayer<K, F> {
    /// A layer sharing `limiter`, keying each request with `key_of`.
    pub fn new(limiter: Arc<KeyedRateLimiter<K>>, key_of: F) -> Self {
        Self { limiter, key_of }
    }
}

impl<S, K: Hash + Eq + Clone, F: Clone> Layer<S> for KeyedRateLimitLayer<K, F> {
    type Service = RateLimit<S, Keyed<K, F>>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(
            inner,
            Keyed {
                limiter: Arc::clone(&self.limiter),
                key_of: self.key_of.clone(),
            },
        )
    }
}

/// The un-keyed limit of a [`RateLimit`] service.
#[derive(Debug, Clone)]
pub enum Limit {
    /// One limiter for every request.
    Direct(Arc<RateLimiter>),
}

/// The keyed limit of a [`RateLimit`] service.
pub struct Keyed<K: Hash + Eq + Clone, F> {
    pub(crate) limiter: Arc<KeyedRateLimiter<K>>,
    pub(crate) key_of: F,
}

impl<K: Hash + Eq + Clone, F: Clone> Clone for Keyed<K, F> {
    fn clone(&self) -> Self {
        Self {
            limiter: Arc::clone(&self.limiter),
            key_of: self.key_of.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone, F> std::fmt::Debug for Keyed<K, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyed").finish_non_exhaustive()
    }
}
