//! Future types

use super::core::{Outcome, OwnedPermit};
use super::error::BreakerOpen;
use super::layer::Classify;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::BoxError;

pin_project! {
    /// [`CircuitBreaker`](super::CircuitBreaker) response future: either the
    /// rejection, or the inner call holding its permit until it finishes.
    #[derive(Debug)]
    pub struct ResponseFuture<F, C> {
        #[pin]
        response: Option<F>,
        permit: Option<OwnedPermit>,
        rejected: Option<BreakerOpen>,
        classify: C,
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn running(response: F, permit: OwnedPermit, classify: C) -> Self {
        Self {
            response: Some(response),
            permit: Some(permit),
            rejected: None,
            classify,
        }
    }

    pub(crate) fn rejected(open: BreakerOpen, classify: C) -> Self {
        Self {
            response: None,
            permit: None,
            rejected: Some(open),
            classify,
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(open) = this.rejected.take() {
            return Poll::Ready(Err(open.into()));
        }
        let Some(response) = this.response.as_pin_mut() else {
            panic!("ResponseFuture polled after completion");
        };
        let result = std::task::ready!(response.poll(cx));
        if let Some(permit) = this.permit.take() {
            let outcome: Outcome = this.classify.classify(&result);
            permit.record(outcome);
        }
        Poll::Ready(result.map_err(Into::into))
    }
}
