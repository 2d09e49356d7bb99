//! Correlation: the request id and W3C trace context that follow one piece of work
//! across HTTP calls, events and log lines.
//!
//! [`CorrelationLayer`] reads `x-request-id` and `traceparent` from an incoming
//! request (keeping a sane request id, generating one otherwise; continuing the
//! trace with a new span id, or starting one), runs the handler inside a
//! `tracing` span carrying both, and inside a task-local [`Correlation`] that
//! outgoing calls ([`crate::client`]) and published events
//! ([`Context::publish`](crate::service::Context::publish))
//! read. The request id is echoed on the response.
//!
//! Work that starts elsewhere (an event handler, a background job) enters the
//! same context with [`Correlation::scope`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use switchboard_bus::trace;
use tracing::Instrument;

/// The request id header, kept from the client when sane, generated otherwise.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Longest request id accepted from a client, in bytes (all visible ASCII).
pub const MAX_REQUEST_ID_LEN: usize = trace::MAX_REQUEST_ID;

tokio::task_local! {
    static CURRENT: Correlation;
}

/// A W3C `traceparent` (version 00): trace id, parent span id and flags.
///
/// Parsing, child spans and ids come from [`switchboard_bus::trace`], which
/// the gateway and the bus use as well.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent(trace::TraceParent);

impl TraceParent {
    /// Starts a new trace (random trace and span ids, sampled).
    pub fn new_root() -> Self {
        Self(trace::TraceParent::new_root())
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (surrounding whitespace
    /// ignored); all-zero ids, version `ff` and malformed forms are
    /// rejected, and a later version is read by its first four fields, as
    /// the W3C spec requires.
    pub fn parse(s: &str) -> Option<Self> {
        trace::TraceParent::parse(s.trim().as_bytes())
            .ok()
            .map(Self)
    }

    /// The same trace with a new span id: what a hop sends downstream.
    #[must_use]
    pub fn child(&self) -> Self {
        Self(self.0.child())
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        self.0.trace_id_str().to_owned()
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        self.0.parent_id_str().to_owned()
    }

    /// The header value.
    pub fn to_header(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.0.to_bytes()).expect("traceparent is ASCII hex")
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0.to_bytes();
        f.write_str(std::str::from_utf8(&bytes).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// True when a client-supplied request id may be kept: 1 to 128 visible ASCII characters.
pub use switchboard_bus::trace::is_sane_request_id;

/// Generates a request id (a UUID v7: unique and roughly time-ordered, so
/// ids sort by when the work began; the gateway, on its hot path, uses
/// [`trace::new_id`] instead).
pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The correlation context of one piece of work: its request id and trace context.
///
/// Cheap to clone. Inside [`Correlation::scope`] (and inside every request that
/// passed through [`CorrelationLayer`]) it is available as [`Correlation::current`].
#[derive(Clone, PartialEq, Eq)]
pub struct Correlation {
    request_id: Arc<str>,
    traceparent: TraceParent,
}

impl fmt::Debug for Correlation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Correlation")
            .field("request_id", &&*self.request_id)
            .field("traceparent", &self.traceparent)
            .finish()
    }
}

impl Correlation {
    /// A context with the given request id and trace context.
    pub fn new(request_id: impl Into<Arc<str>>, traceparent: TraceParent) -> Self {
        Self {
            request_id: request_id.into(),
            traceparent,
        }
    }

    /// A fresh context: new request id, new trace.
    pub fn generate() -> Self {
        Self::new(new_request_id(), TraceParent::new_root())
    }

    /// The context of an incoming request: its sane `x-request-id` or a new one,
    /// its `traceparent` continued with a new span id, or a new trace.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let request_id = headers
            .get(REQUEST_ID)
            .map(HeaderValue::as_bytes)
            .filter(|v| is_sane_request_id(v))
            .and_then(|v| std::str::from_utf8(v).ok())
            .map_or_else(|| Arc::from(new_request_id()), Arc::from);
        let traceparent = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse)
            .map_or_else(TraceParent::new_root, |t| t.child());
        Self {
            request_id,
            traceparent,
        }
    }

    /// The context carried by an event: its correlation id (used as the request
    /// id when sane) and its traceparent (continued), each generated when absent.
    pub fn from_parts(request_id: Option<&str>, traceparent: Option<&str>) -> Self {
        let request_id = request_id
            .filter(|v| is_sane_request_id(v.as_bytes()))
            .map_or_else(|| Arc::from(new_request_id()), Arc::from);
        let traceparent = traceparent
            .and_then(TraceParent::parse)
            .map_or_else(TraceParent::new_root, |t| t.child());
        Self {
            request_id,
            traceparent,
        }
    }

    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The trace context of the current hop.
    pub fn traceparent(&self) -> TraceParent {
        self.traceparent
    }

    /// The context of the task running now, if it runs inside one.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// The current context, or a fresh one when there is none.
    pub fn current_or_generate() -> Self {
        Self::current().unwrap_or_else(Self::generate)
    }

    /// A `tracing` span named `request` with `request_id` and `trace_id` fields,
    /// and `service` when given: every log line inside names all three.
    pub fn span(&self, service: Option<&str>) -> tracing::Span {
        let trace_id = self.traceparent.0.trace_id_str();
        match service {
            Some(service) => tracing::info_span!(
                "request",
                service = %service,
                request_id = %self.request_id,
                trace_id = %trace_id,
            ),
            None => tracing::info_span!(
                "request",
                request_id = %self.request_id,
                trace_id = %trace_id,
            ),
        }
    }

    /// The same context in the bus's terms, so that events published inside
    /// [`scope`](Self::scope) carry it (`correlationid` = request id).
    pub fn to_bus(&self) -> switchboard_bus::middleware::correlation::Correlation {
        switchboard_bus::middleware::correlation::Correlation {
            traceparent: Some(self.traceparent.to_string()),
            correlation_id: Some(self.request_id.to_string()),
        }
    }

    /// The context an event carries (its `correlationid` and `traceparent`).
    pub fn of_event(event: &switchboard_bus::Event) -> Self {
        Self::from_parts(event.correlation_id(), event.traceparent())
    }

    /// Runs `fut` with this context as [`Correlation::current`] (and as the
    /// bus's current context), inside its [`span`](Self::span).
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> + use<F> {
        self.scope_in(None, fut)
    }

    /// [`scope`](Self::scope) with the span naming `service`.
    pub fn scope_in<F: Future>(
        self,
        service: Option<&str>,
        fut: F,
    ) -> impl Future<Output = F::Output> + use<F> {
        let span = self.span(service);
        let bus = self.to_bus();
        CURRENT
            .scope(
                self,
                switchboard_bus::middleware::correlation::scope(bus, fut),
            )
            .instrument(span)
    }

    /// Writes the headers for an outgoing call: the request id and a child traceparent.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            headers.insert(REQUEST_ID, v);
        }
        headers.insert(TRACEPARENT, self.traceparent.child().to_header());
    }
}

/// A tower layer that puts every request in its [`Correlation`] context; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct CorrelationLayer {
    service: Option<Arc<str>>,
}

impl CorrelationLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The layer, with request spans naming `service`.
    pub fn for_service(service: &str) -> Self {
        Self {
            service: Some(service.into()),
        }
    }
}

impl<S> tower::Layer<S> for CorrelationLayer {
    type Service = CorrelationService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CorrelationService {
            inner,
            service: self.service.clone(),
        }
    }
}

/// The service made by [`CorrelationLayer`].
#[derive(Debug, Clone)]
pub struct CorrelationService<S> {
    inner: S,
    service: Option<Arc<str>>,
}

impl<S, B, RB> tower::Service<Request<B>> for CorrelationService<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let correlation = Correlation::from_headers(req.headers());
        // Handlers that read the headers see the values the context holds.
        if let Ok(v) = HeaderValue::from_str(correlation.request_id()) {
            req.headers_mut().insert(REQUEST_ID, v);
        }
        req.headers_mut()
            .insert(TRACEPARENT, correlation.traceparent.to_header());
        req.extensions_mut().insert(correlation.clone());
        let echo = HeaderValue::from_str(correlation.request_id()).ok();
        let span = correlation.span(self.service.as_deref());
        let bus = correlation.to_bus();
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            CURRENT
                .scope(
                    correlation,
                    switchboard_bus::middleware::correlation::scope(bus, async move {
                        let mut res = fut.await?;
                        if let Some(v) = echo {
                            res.headers_mut().insert(REQUEST_ID, v);
                        }
                        Ok(res)
                    }),
                )
                .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    fn app() -> Router {
        Router::new()
            .route(
                "/",
                get(|| async {
                    let c = Correlation::current().expect("inside the context");
                    format!("{} {}", c.request_id(), c.traceparent())
                }),
            )
            .layer(CorrelationLayer::new())
    }

    async fn call(headers: &[(&str, &str)]) -> (HeaderMap, String) {
        let mut req = Request::get("/");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = app()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let headers = res.headers().clone();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        (headers, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn keeps_a_sane_request_id_and_continues_the_trace() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (headers, body) = call(&[("x-request-id", "abc-123"), ("traceparent", tp)]).await;
        assert_eq!(headers[REQUEST_ID], "abc-123");
        let (id, seen) = body.split_once(' ').unwrap();
        assert_eq!(id, "abc-123");
        let seen = TraceParent::parse(seen).unwrap();
        assert_eq!(seen.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(
            seen.span_id(),
            "00f067aa0ba902b7",
            "a new span id for this hop"
        );
    }

    #[tokio::test]
    async fn replaces_an_insane_request_id_and_starts_a_trace() {
        let long = "x".repeat(129);
        for bad in ["has space", long.as_str(), "bad\tid"] {
            let (headers, body) = call(&[("x-request-id", bad), ("traceparent", "garbage")]).await;
            let echoed = headers[REQUEST_ID].to_str().unwrap();
            assert_ne!(echoed, bad);
            assert!(uuid::Uuid::parse_str(echoed).is_ok(), "{echoed}");
            let (id, tp) = body.split_once(' ').unwrap();
            assert_eq!(id, echoed);
            assert!(TraceParent::parse(tp).is_some());
        }
        let (headers, _) = call(&[]).await;
        assert!(headers.contains_key(REQUEST_ID));
    }

    #[test]
    fn traceparent_parsing_follows_the_spec() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(TraceParent::parse(ok).unwrap().to_string(), ok);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
        // A future version may append fields.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(TraceParent::parse(v1).is_some());
    }

    #[tokio::test]
    async fn inject_propagates_the_id_and_a_child_span() {
        let c = Correlation::generate();
        let mut h = HeaderMap::new();
        c.inject(&mut h);
        assert_eq!(h[REQUEST_ID], c.request_id());
        let sent = TraceParent::parse(h[TRACEPARENT].to_str().unwrap()).unwrap();
        assert_eq!(sent.trace_id(), c.traceparent().trace_id());
        assert_ne!(sent.span_id(), c.traceparent().span_id());
        assert!(Correlation::current().is_none());
        let inner = c
            .clone()
            .scope(async { Correlation::current().unwrap() })
            .await;
        assert_eq!(inner, c);
    }
}
