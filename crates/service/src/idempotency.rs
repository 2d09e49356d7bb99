//! `Idempotency-Key` for a service's own unsafe handlers (POST, PATCH).
//!
//! [`IdempotencyLayer`] makes a request that carries `Idempotency-Key` run its
//! handler at most once per key: the first request runs it and its response is
//! stored; a repeat with the same key and the same request (method, path, body)
//! gets the stored response replayed, marked `idempotent-replayed: true`; a
//! repeat while the first still runs waits for it; the same key with a
//! different request is refused with 422. Server errors (5xx) are not stored,
//! so a retry after one runs the handler again. Requests without the header,
//! and safe methods, pass through untouched.
//!
//! The [`IdempotencyStore`] is shared by every instance that serves the same
//! data (clone the handle), so the key holds whichever instance the gateway
//! picks for the repeat.

use std::collections::hash_map::{DefaultHasher, Entry as MapEntry};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The request header naming the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set to `true` on a replayed response.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;
/// Largest request or response body the layer buffers; bigger requests get 413.
pub const MAX_BODY: usize = 1 << 20;

/// How long a repeat waits for the first request with its key before getting 409.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(10);

/// A response kept for replay.
#[derive(Debug, Clone)]
struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Debug)]
enum State {
    Running { fingerprint: u64, done: Arc<Notify> },
    Done { fingerprint: u64, response: Stored },
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, State>,
    /// Completion order; the TTL is the same for all, so this is expiry order too.
    expiry: VecDeque<(Instant, String)>,
}

/// Where keys and stored responses live: in memory, shared by clones of the handle.
///
/// Entries expire `ttl` after their request completed (24 h by default).
#[derive(Debug, Clone)]
pub struct IdempotencyStore {
    inner: Arc<Mutex<Inner>>,
    ttl: Duration,
}

impl Default for IdempotencyStore {
    fn default() -> Self {
        Self::new(Duration::from_secs(24 * 3600))
    }
}

enum Begin {
    /// Run the handler; call `finish` after.
    Run,
    Replay(Stored),
    Mismatch,
    Wait(Arc<Notify>),
}

impl IdempotencyStore {
    /// A store whose entries live `ttl` after completion.
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Arc::default(),
            ttl,
        }
    }

    /// Number of keys held (running or done).
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn begin(&self, key: &str, fingerprint: u64) -> Begin {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        while inner.expiry.front().is_some_and(|(at, _)| *at <= now) {
            let (_, old) = inner.expiry.pop_front().expect("front exists");
            // The key may have been re-run since; only drop a completed entry.
            if matches!(inner.entries.get(&old), Some(State::Done { .. })) {
                inner.entries.remove(&old);
            }
        }
        match inner.entries.entry(key.to_owned()) {
            MapEntry::Vacant(v) => {
                v.insert(State::Running {
                    fingerprint,
                    done: Arc::new(Notify::new()),
                });
                Begin::Run
            }
            MapEntry::Occupied(o) => match o.get() {
                State::Done { fingerprint: f, .. } | State::Running { fingerprint: f, .. }
                    if *f != fingerprint =>
                {
                    Begin::Mismatch
                }
                State::Done { response, .. } => Begin::Replay(response.clone()),
                State::Running { done, .. } => Begin::Wait(done.clone()),
            },
        }
    }

    /// Ends a run: stores the response, or forgets the key when `response` is None.
    fn finish(&self, key: &str, response: Option<Stored>) {
        let mut inner = self.inner.lock();
        let Some(State::Running { fingerprint, done }) = inner.entries.remove(key) else {
            return;
        };
        if let Some(response) = response {
            inner.entries.insert(
                key.to_owned(),
                State::Done {
                    fingerprint,
                    response,
                },
            );
            let at = Instant::now() + self.ttl;
            inner.expiry.push_back((at, key.to_owned()));
        }
        done.notify_waiters();
    }
}

/// Forgets a running key if the handler's future is dropped (client went away).
struct RunGuard {
    store: IdempotencyStore,
    key: Option<String>,
}

impl RunGuard {
    fn finish(mut self, response: Option<Stored>) {
        if let Some(key) = self.key.take() {
            self.store.finish(&key, response);
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.store.finish(&key, None);
        }
    }
}

/// The tower layer; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct IdempotencyLayer {
    store: IdempotencyStore,
}

impl IdempotencyLayer {
    /// A layer keeping its keys in `store`.
    pub fn new(store: IdempotencyStore) -> Self {
        Self { store }
    }
}

impl<S> tower::Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            store: self.store.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Debug, Clone)]
pub struct Idempotency<S> {
    inner: S,
    store: IdempotencyStore,
}

fn problem(status: StatusCode, detail: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut res = Response::new(Body::from(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

fn replay(stored: Stored) -> Response<Body> {
    let mut res = Response::new(Body::from(stored.body));
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers;
    res.headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    res
}

impl<S> tower::Service<Request<Body>> for Idempotency<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let unsafe_method = matches!(*req.method(), Method::POST | Method::PATCH);
        let key = match req.headers().get(IDEMPOTENCY_KEY) {
            Some(k) if unsafe_method => k.clone(),
            _ => return Box::pin(self.inner.call(req)),
        };
        // The service that was made ready is the one to call; keep a fresh clone for later.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let store = self.store.clone();
        Box::pin(async move {
            if key.is_empty() || key.len() > MAX_KEY_LEN || key.to_str().is_err() {
                return Ok(problem(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                ));
            }
            let (parts, body) = req.into_parts();
            let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return Ok(problem(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body too large for an idempotent request",
                    ));
                }
            };
            let mut h = DefaultHasher::new();
            parts.method.hash(&mut h);
            parts.uri.path().hash(&mut h);
            body.hash(&mut h);
            let fingerprint = h.finish();
            let key = format!(
                "{} {} {}",
                parts.method,
                parts.uri.path(),
                key.to_str().unwrap_or_default()
            );
            let deadline = Instant::now() + WAIT_FOR_FIRST;
            let mut state = store.begin(&key, fingerprint);
            loop {
                match state {
                    Begin::Run => break,
                    Begin::Replay(stored) => return Ok(replay(stored)),
                    Begin::Mismatch => {
                        return Ok(problem(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Idempotency-Key was already used for a different request",
                        ));
                    }
                    Begin::Wait(done) => {
                        let notified = done.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        // The first run may have finished between begin() and enable().
                        state = store.begin(&key, fingerprint);
                        if matches!(state, Begin::Wait(_)) {
                            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                                return Ok(problem(
                                    StatusCode::CONFLICT,
                                    "a request with this Idempotency-Key is still being processed",
                                ));
                            }
                            state = store.begin(&key, fingerprint);
                        }
                    }
                }
            }
            let guard = RunGuard {
                store,
                key: Some(key),
            };
            let req = Request::from_parts(parts, Body::from(body));
            let res = inner.call(req).await?;
            if res.status().is_server_error() {
                guard.finish(None);
                return Ok(res);
            }
            let (parts, body) = res.into_parts();
            match http_body_util::Limited::new(body, MAX_BODY).collect().await {
                Ok(collected) => {
                    let body = collected.to_bytes();
                    guard.finish(Some(Stored {
                        status: parts.status,
                        headers: parts.headers.clone(),
                        body: body.clone(),
                    }));
                    Ok(Response::from_parts(parts, Body::from(body)))
                }
                Err(_) => {
                    guard.finish(None);
                    Ok(problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "response could not be stored for idempotent replay",
                    ))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::post;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    fn app(store: IdempotencyStore, calls: Arc<AtomicUsize>, status: StatusCode) -> Router {
        Router::new()
            .route(
                "/orders",
                post(move |body: Bytes| async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    (status, format!("order {n} {}", body.len()))
                }),
            )
            .layer(IdempotencyLayer::new(store))
    }

    async fn post_with(
        app: Router,
        key: Option<&str>,
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::post("/orders");
        if let Some(key) = key {
            req = req.header(IDEMPOTENCY_KEY, key);
        }
        let res = app
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_repeat_replays_the_first_response() {
        let calls = Arc::new(AtomicUsize::new(0));
        let store = IdempotencyStore::default();
        let a = app(store.clone(), calls.clone(), StatusCode::CREATED);
        let first = post_with(a.clone(), Some("k1"), "{}").await;
        // A second instance sharing the store sees the key too.
        let b = app(store.clone(), calls.clone(), StatusCode::CREATED);
        let second = post_with(b, Some("k1"), "{}").await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(first.0, StatusCode::CREATED);
        assert_eq!(second.0, StatusCode::CREATED);
        assert_eq!(first.2, second.2);
        assert!(!first.1.contains_key(REPLAYED));
        assert_eq!(second.1[REPLAYED], "true");
        // Another key, or no key, runs the handler.
        post_with(a.clone(), Some("k2"), "{}").await;
        post_with(a.clone(), None, "{}").await;
        post_with(a, None, "{}").await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn concurrent_repeats_wait_for_the_first() {
        let calls = Arc::new(AtomicUsize::new(0));
        let a = app(
            IdempotencyStore::default(),
            calls.clone(),
            StatusCode::CREATED,
        );
        let results =
            futures::future::join_all((0..5).map(|_| post_with(a.clone(), Some("same"), "x")))
                .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(
            results
                .iter()
                .all(|r| r.0 == StatusCode::CREATED && r.2 == "order 1 1")
        );
        assert_eq!(
            results
                .iter()
                .filter(|r| r.1.contains_key(REPLAYED))
                .count(),
            4
        );
    }

    #[tokio::test]
    async fn a_different_request_with_the_same_key_is_refused() {
        let calls = Arc::new(AtomicUsize::new(0));
        let a = app(
            IdempotencyStore::default(),
            calls.clone(),
            StatusCode::CREATED,
        );
        post_with(a.clone(), Some("k"), "one").await;
        let (status, headers, _) = post_with(a, Some("k"), "two").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            headers[http::header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn server_errors_are_not_stored() {
        let calls = Arc::new(AtomicUsize::new(0));
        let store = IdempotencyStore::default();
        let a = app(
            store.clone(),
            calls.clone(),
            StatusCode::SERVICE_UNAVAILABLE,
        );
        post_with(a.clone(), Some("k"), "x").await;
        post_with(a, Some("k"), "x").await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn bad_keys_are_rejected() {
        let calls = Arc::new(AtomicUsize::new(0));
        let a = app(
            IdempotencyStore::default(),
            calls.clone(),
            StatusCode::CREATED,
        );
        let long = "k".repeat(MAX_KEY_LEN + 1);
        let (status, _, _) = post_with(a, Some(&long), "x").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let calls = Arc::new(AtomicUsize::new(0));
        let store = IdempotencyStore::new(Duration::from_secs(60));
        let a = app(store.clone(), calls.clone(), StatusCode::CREATED);
        post_with(a.clone(), Some("k"), "x").await;
        tokio::time::advance(Duration::from_secs(30)).await;
        post_with(a.clone(), Some("k"), "x").await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(31)).await;
        post_with(a, Some("k"), "x").await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
