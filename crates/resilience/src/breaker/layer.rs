use super::CircuitBreaker;
use super::core::{Breaker, Outcome};
use tower::Layer;

/// Judges an inner service's result for the breaker.
///
/// Implemented for every `Fn(&Result<T, E>) -> Outcome`, so a closure works.
pub trait Classify<T, E> {
    /// The verdict on one result.
    fn classify(&self, result: &Result<T, E>) -> Outcome;
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(&Result<T, E>) -> Outcome,
{
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        self(result)
    }
}

/// The default verdict: `Ok` is a success, `Err` a failure.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorIsFailure;

impl<T, E> Classify<T, E> for ErrorIsFailure {
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// Applies a [`Breaker`] to every request of the wrapped service.
///
/// All services made by one layer share its breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = ErrorIsFailure> {
    breaker: Breaker,
    classify: C,
}

impl CircuitBreakerLayer {
    /// A layer that counts `Err` as failure and `Ok` as success.
    pub fn new(breaker: Breaker) -> Self {
        Self {
            breaker,
            classify: ErrorIsFailure,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A layer that lets `classify` judge each result (e.g. count HTTP 5xx
    /// responses as failures and 4xx as ignored).
    pub fn with_classifier<C2>(self, classify: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classify,
        }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::with_classifier(inner, self.breaker.clone(), self.classify.clone())
    }
}
