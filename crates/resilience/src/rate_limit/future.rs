//! Future types

use super::error::RateLimited;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::BoxError;

pin_project! {
    /// [`RateLimit`](super::RateLimit) response future: the rejection, or the inner call.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        response: Option<F>,
        limited: Option<RateLimited>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn allowed(response: F) -> Self {
        Self {
            response: Some(response),
            limited: None,
        }
    }

    pub(crate) fn limited(limited: RateLimited) -> Self {
        Self {
            response: None,
            limited: Some(limited),
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(limited) = this.limited.take() {
            return Poll::Ready(Err(limited.into()));
        }
        match this.response.as_pin_mut() {
            Some(response) => response.poll(cx).map_err(Into::into),
            None => panic!("ResponseFuture polled after completion"),
        }
    }
}
