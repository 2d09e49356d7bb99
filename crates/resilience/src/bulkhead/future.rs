//! Future types

use super::BulkheadPermit;
use super::error::BulkheadFull;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower::{BoxError, Service};

/// The wait for a slot, boxed: it only exists when the bulkhead is full, so
/// an uncontended call allocates nothing.
pub(crate) type Acquire =
    Pin<Box<dyn Future<Output = Result<BulkheadPermit, BulkheadFull>> + Send>>;

pin_project! {
    /// [`BulkheadService`](super::BulkheadService) response future: waits for
    /// a slot if needed, then runs the call holding it.
    pub struct ResponseFuture<S, Request>
    where
        S: Service<Request>,
    {
        #[pin]
        state: State<S, Request>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Request>
    where
        S: Service<Request>,
    {
        Waiting {
            acquire: Acquire,
            service: Option<S>,
            request: Option<Request>,
        },
        Calling {
            #[pin]
            response: S::Future,
            permit: Option<BulkheadPermit>,
        },
    }
}

impl<S: Service<Request>, Request> ResponseFuture<S, Request> {
    pub(crate) fn calling(response: S::Future, permit: BulkheadPermit) -> Self {
        Self {
            state: State::Calling {
                response,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn waiting(acquire: Acquire, service: S, request: Request) -> Self {
        Self {
            state: State::Waiting {
                acquire,
                service: Some(service),
                request: Some(request),
            },
        }
    }
}

impl<S, Request> std::fmt::Debug for ResponseFuture<S, Request>
where
    S: Service<Request>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, Request> Future for ResponseFuture<S, Request>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Waiting {
                    acquire,
                    service,
                    request,
                } => {
                    let permit = match ready!(acquire.as_mut().poll(cx)) {
                        Ok(permit) => permit,
                        Err(full) => return Poll::Ready(Err(full.into())),
                    };
                    let mut service = service.take().expect("polled after completion");
                    let request = request.take().expect("polled after completion");
                    // `service` was made ready by poll_ready before it was moved here.
                    let response = service.call(request);
                    this.state.set(State::Calling {
                        response,
                        permit: Some(permit),
                    });
                }
                StateProj::Calling { response, permit } => {
                    let result = ready!(response.poll(cx));
                    drop(permit.take());
                    return Poll::Ready(result.map_err(Into::into));
                }
            }
        }
    }
}
