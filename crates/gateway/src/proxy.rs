//! The request path, as named phases read top to bottom (after pingora's
//! `ProxyHttp`):
//!
//! 1. `Gateway::request_filter`: `Host` and request-target
//!    checks (`check_target`), request id, body limit.
//! 2. route lookup (longest prefix, method, host) — 404 when none.
//! 3. `read_body`: buffer a small body so a retry can replay it.
//! 4. `upstream_request_filter`: hop-by-hop removal, `x-forwarded-*`,
//!    `x-request-id`, `traceparent`, prefix rewrite.
//! 5. the attempt loop: `upstream_peer` (balancer + breaker), connect or reuse
//!    a pooled connection, send with per-attempt and total deadlines, classify
//!    the outcome, feed the breaker, and retry where safe within the budget.
//!    A 2xx-4xx with a body is only judged when its body ends: the breaker
//!    permit travels with the body (`Finish::verdict`) and an upstream body
//!    error counts as a failure; a client leaving mid-body counts for nothing.
//! 6. `response_filter`: hop-by-hop removal, echo `x-request-id`.
//! 7. logging: when the response body ends (or the client leaves), `Finish`
//!    returns the connection to the pool and records metrics and the access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::time::{sleep_until, timeout_at};

use crate::access_log::{AccessLog, AccessRecord};
use crate::body::{ClientBody, ReqBody, ResBody, Streamed, UpBody};
use crate::breaker::OwnedPermit;
use crate::config::{Protocol, RouteConfig};
use crate::correlation;
use crate::h1::{self, Failed, H1Body, Outgoing, SendError};
use crate::h1_server::ClientUpgrade;
use crate::headers::{Forwarding, IDEMPOTENCY_KEY, X_REQUEST_ID, strip_hop_by_hop};
use crate::metrics::{AttemptOutcome, Metrics, RouteSeries};
use crate::pool::{self, PoolConfig};
use crate::problem::{self, Problem};
use crate::retry::{Budget, backoff, is_idempotent};
use crate::route::{RouteMatch, RouteTable, rewrite};
use crate::upstream::{Pick, RouteUpstreams, Upstream};

/// Per-route runtime state. A reload that keeps a route (same prefix,
/// service, balancing, breaker, budget and policies) keeps its state:
/// breakers, load, budget, rate-limit and idempotency state.
#[derive(Debug)]
pub struct RouteState {
    /// The route's live instances.
    pub upstreams: Arc<RouteUpstreams>,
    /// The route's retry budget.
    pub budget: Budget,
    /// Edge policies needing work per request; `None` costs one branch.
    pub policy: Option<Box<crate::policy::RoutePolicy>>,
    /// The route's metric series.
    pub series: &'static RouteSeries,
}

/// One generation of the routing configuration: the route table and each
/// route's state (`states[i]` belongs to `table.routes()[i]`).
#[derive(Debug)]
pub struct Routing {
    /// The route table.
    pub table: RouteTable,
    /// Per-route state, in the table's file order.
    pub states: Vec<Arc<RouteState>>,
}

/// The engine: everything the request path reads. Built once and leaked to
/// `'static` so requests reference it without touching a reference count.
pub struct Gateway {
    /// The current routing generation. Generations are leaked (a reload
    /// costs the size of the route table, a few KB) so a request borrows its
    /// generation as `&'static` for its whole life, across awaits, without a
    /// reference count on the hot path; the swap itself is one atomic store.
    pub(crate) routing: ArcSwap<&'static Routing>,
    pub(crate) metrics: Metrics,
    pub(crate) access: AccessLog,
    pub(crate) pool: PoolConfig,
    pub(crate) passive: Option<PassiveHealth>,
    /// Terminates TLS on the proxy listener when `[gateway.tls]` is set.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Upgraded (WebSocket) connections being spliced; shutdown waits for
    /// them up to the drain deadline.
    pub(crate) upgrades: tokio_util::task::TaskTracker,
    /// Breaker transitions, for the dashboard (rare: a lock is fine).
    pub(crate) transitions: crate::dashboard::Transitions,
    /// The HTTP event bridge when it publishes on the proxy listener
    /// (`bridge.publish = "proxy"` or `"both"`): its path is answered before
    /// routing.
    pub(crate) publish: Option<crate::bridge::Bridge>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routing", self.routing())
            .finish_non_exhaustive()
    }
}

/// Receives passive health outcomes: `(service, instance id, ok)`.
pub type PassiveHealth = Arc<dyn Fn(&str, &str, bool) + Send + Sync>;

/// Request bookkeeping completed when the response body ends or is dropped.
#[derive(Debug)]
pub(crate) struct Finish {
    gw: &'static Gateway,
    start: Instant,
    route: Option<&'static RouteSeries>,
    request_id: HeaderValue,
    method: Method,
    status: u16,
    attempts: u32,
    upstream: Option<Arc<Upstream>>,
    /// The upstream's verdict while its body streams: its breaker permit and
    /// service (for passive health). Settled as a success at the body's clean
    /// end, as a failure on an upstream body error, and not at all when the
    /// client goes away first.
    verdict: Option<(OwnedPermit, &'static str)>,
    /// The client connected over TLS (`x-forwarded-proto: https`).
    tls: bool,
}

impl Finish {
    /// The upstream's body failed mid-stream (reset, truncated): a failure
    /// of that instance for its breaker and passive health.
    pub(crate) fn upstream_body_failed(&mut self) {
        if let (Some((permit, service)), Some(u)) = (self.verdict.take(), &self.upstream) {
            permit.record(false);
            self.gw.passive(service, u, false);
            if let Some(r) = self.route {
                self.gw.metrics.attempt(r, AttemptOutcome::BodyError);
            }
        }
    }

    pub(crate) fn done(mut self, complete: bool) {
        let duration = self.start.elapsed();
        if let Some(u) = &self.upstream {
            if let Some((permit, service)) = self.verdict.take() {
                // Incomplete without an upstream error: the client left, which
                // says nothing about the upstream (the permit counts as ignored).
                if complete {
                    permit.record(true);
                    self.gw.passive(service, u, true);
                }
                // The attempt itself went well as far as the upstream's part.
                if let Some(r) = self.route {
                    self.gw.metrics.attempt(r, AttemptOutcome::Ok);
                }
            }
            u.outstanding.dec();
        }
        self.gw.metrics.request(self.route, self.status, duration);
        self.gw.access.log(AccessRecord {
            request_id: self.request_id,
            method: self.method,
            route: self.route.map(|s| &s.labels),
            instance: self.upstream.as_ref().map(|u| u.addr),
            status: self.status,
            duration,
            attempts: self.attempts,
            complete,
        });
    }
}

/// Per-connection facts the request path needs.
#[derive(Debug, Default)]
pub struct ConnInfo {
    /// The client connected over TLS (`x-forwarded-proto: https`).
    pub tls: bool,
}

/// Up to 8 instances already tried by one request, without allocating.
struct Tried {
    addrs: [SocketAddr; 8],
    len: usize,
}

impl Tried {
    fn new() -> Self {
        Self {
            addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); 8],
            len: 0,
        }
    }
    fn push(&mut self, a: SocketAddr) {
        if self.len < self.addrs.len() {
            self.addrs[self.len] = a;
            self.len += 1;
        }
    }
    fn as_slice(&self) -> &[SocketAddr] {
        &self.addrs[..self.len]
    }
}

enum BodyError {
    TooLarge,
    Client,
    Timeout,
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Reads a body up to `buffer` bytes so it can be replayed; beyond that it is
/// streamed (prefix first) and never retried.
async fn read_body(
    mut body: ClientBody,
    cfg: &RouteConfig,
    deadline: tokio::time::Instant,
) -> Result<ReqBody, BodyError> {
    if body.is_end_stream() {
        return Ok(ReqBody::Empty);
    }
    let hint = body.size_hint();
    let stream = |prefix: Option<Bytes>, rest: ClientBody, seen: u64| {
        ReqBody::Stream(Box::new(Streamed {
            prefix,
            rest,
            seen,
            limit: cfg.max_body_bytes,
            too_large: Arc::new(AtomicBool::new(false)),
        }))
    };
    if hint.lower() > cfg.retry_buffer_bytes {
        return Ok(stream(None, body, 0));
    }
    let mut buf = BytesMut::new();
    loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok(ReqBody::Full(Some(buf.freeze()))),
            Ok(Some(Err(_))) => return Err(BodyError::Client),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if buf.is_empty() && body.is_end_stream() {
                if data.len() as u64 > cfg.max_body_bytes {
                    return Err(BodyError::TooLarge);
                }
                return Ok(ReqBody::Full(Some(data)));
            }
            buf.extend_from_slice(&data);
            if buf.len() as u64 > cfg.max_body_bytes {
                return Err(BodyError::TooLarge);
            }
            if buf.len() as u64 > cfg.retry_buffer_bytes {
                let seen = buf.len() as u64;
                return Ok(stream(Some(buf.freeze()), body, seen));
            }
        }
    }
}

/// Phase 1, the request line and `Host` (RFC 9112 §3.2): exactly one `Host`
/// in HTTP/1.1; no `CONNECT` (the gateway is no tunnel); an absolute-form
/// target only as `http(s)://` naming the same authority as `Host`, so routing
/// by `Host` and the upstream's view of the target cannot disagree; and an
/// ASCII target (raw bytes past 0x7f are not URI characters, and upstreams
/// decode them differently). Returns why the request is refused.
fn check_target(parts: &http::request::Parts) -> Option<&'static str> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("more than one Host header");
    }
    if host.is_none() && parts.version == http::Version::HTTP_11 {
        return Some("an HTTP/1.1 request needs a Host header");
    }
    if parts.method == Method::CONNECT {
        return Some("CONNECT is not supported: the gateway is not a tunnel");
    }
    let uri = &parts.uri;
    // HTTP/2 always carries the authority and scheme (`:authority`, `:scheme`).
    if let Some(authority) = uri
        .authority()
        .filter(|_| parts.version < http::Version::HTTP_2)
    {
        let web =
            |s: &http::uri::Scheme| *s == http::uri::Scheme::HTTP || *s == http::uri::Scheme::HTTPS;
        if !uri.scheme().is_some_and(web) {
            return Some("an absolute-form target must use the http or https scheme");
        }
        if host.is_none_or(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        }) {
            return Some("the absolute-form target names another host than the Host header");
        }
    }
    if !uri.path_and_query().is_none_or(|pq| pq.as_str().is_ascii()) {
        return Some("the request target has bytes outside ASCII (percent-encode them)");
    }
    None
}

/// Phase 4: the request as the upstream will see it: hop-by-hop fields
/// removed and the target rewritten here; the fields the gateway adds
/// (`x-forwarded-*`, `x-request-id`, `traceparent`) are returned, to be
/// applied to the map or written with the head.
fn upstream_request_filter(
    headers: &mut HeaderMap,
    uri: &mut Uri,
    cfg: &RouteConfig,
    request_id: &HeaderValue,
    client: SocketAddr,
    https: bool,
) -> Forwarding {
    strip_hop_by_hop(headers);
    let fwd = Forwarding::new(headers, request_id, client.ip(), https);
    if let Some(rw) = &cfg.rewrite {
        *uri = rewrite(uri, &cfg.prefix, rw);
    } else if uri.scheme().is_some() || uri.authority().is_some() {
        // Absolute-form from the client: the upstream gets origin-form.
        *uri = uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    }
    fwd
}

/// The request of one attempt: the body and headers are moved on the last
/// attempt and copied when a retry may still need them.
fn attempt_request(
    parts: &mut http::request::Parts,
    body: &mut Option<ReqBody>,
    keep_for_retry: bool,
) -> Request<ReqBody> {
    let b = if keep_for_retry {
        body.as_ref().and_then(ReqBody::try_clone)
    } else {
        body.take()
    };
    let mut req = Request::new(b.unwrap_or(ReqBody::Empty));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.headers_mut() = if keep_for_retry {
        parts.headers.clone()
    } else {
        std::mem::take(&mut parts.headers)
    };
    req
}

/// An HTTP/2 request names its host in the `:authority` pseudo-header, not
/// in `Host`; routing and `x-forwarded-host` read `Host`.
fn h2_host(parts: &mut http::request::Parts) {
    if parts.headers.contains_key(header::HOST) {
        return;
    }
    if let Some(v) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, v);
    }
}

/// The client sent `te: trailers` (gRPC does; the upstream may insist on it).
fn wants_trailers(h: &HeaderMap) -> bool {
    h.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    })
}

/// Phase 6: the response as the client will see it.
fn response_filter(headers: &mut HeaderMap, request_id: &HeaderValue) {
    strip_hop_by_hop(headers);
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

enum Failure {
    /// Nothing was sent.
    Connect,
    /// Sent (or maybe sent), then the connection broke.
    Reset,
    /// No response head in time.
    Timeout,
}

impl Gateway {
    /// The current routing generation.
    pub fn routing(&self) -> &'static Routing {
        **self.routing.load()
    }

    /// Swaps in a new routing generation; requests already running finish
    /// on the one they started with.
    pub(crate) fn swap_routing(&self, routing: Routing) {
        let r: &'static Routing = Box::leak(Box::new(routing));
        self.routing.store(Arc::new(r));
    }

    fn finish(
        &'static self,
        start: Instant,
        route: Option<&'static RouteSeries>,
        request_id: HeaderValue,
        method: Method,
        tls: bool,
    ) -> Finish {
        Finish {
            gw: self,
            start,
            route,
            request_id,
            method,
            status: 0,
            attempts: 0,
            upstream: None,
            verdict: None,
            tls,
        }
    }

    pub(crate) fn problem(
        &'static self,
        mut fin: Finish,
        p: Problem,
        detail: &str,
        retry_after: Option<Duration>,
    ) -> Response<ResBody> {
        let secs = retry_after.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        let mut res = problem::response(p, detail, &fin.request_id, secs);
        fin.status = res.status().as_u16();
        res.body_mut().set_finish(fin);
        res
    }

    /// Answers with a response the gateway made (preflight, replay).
    pub(crate) fn reply(
        &'static self,
        mut fin: Finish,
        mut res: Response<ResBody>,
    ) -> Response<ResBody> {
        res.headers_mut()
            .insert(X_REQUEST_ID.clone(), fin.request_id.clone());
        fin.status = res.status().as_u16();
        res.body_mut().set_finish(fin);
        res
    }

    /// Phase 1 (the framing was checked by the connection): returns the
    /// request id, or an early 400 with its reason.
    fn request_filter(
        &'static self,
        parts: &http::request::Parts,
    ) -> (HeaderValue, Option<&'static str>) {
        let request_id = correlation::request_id(parts.headers.get(&X_REQUEST_ID));
        (request_id, check_target(parts))
    }

    /// Serves one request. Never fails: every error is a problem+json response.
    pub async fn handle(
        &'static self,
        req: Request<ClientBody>,
        client: SocketAddr,
        conn: &ConnInfo,
    ) -> Response<ResBody> {
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        if parts.version == Version::HTTP_2 {
            h2_host(&mut parts);
        }
        let (request_id, early) = self.request_filter(&parts);
        let method = parts.method.clone();
        if let Some(detail) = early {
            let fin = self.finish(start, None, request_id, method, conn.tls);
            return self.problem(fin, Problem::BadRequest, detail, None);
        }

        // The event bridge's publish path, when it is served on this listener.
        if let Some(bridge) = &self.publish
            && parts.uri.path() == bridge.publish_on().1
        {
            return Box::pin(bridge.handle_publish(Request::from_parts(parts, body))).await;
        }

        // Phase 2: route. The Host header only narrows among configured routes.
        let host = parts.headers.get(header::HOST).map(HeaderValue::as_bytes);
        let routing = self.routing();
        let Some(route) = routing.table.find(&parts.method, host, parts.uri.path()) else {
            // A CORS preflight is an OPTIONS for a route that may only list
            // the method it announces.
            if let Some(route) = crate::policy::preflight_route(&routing.table, &parts) {
                let series = routing.states[route.index].series;
                let fin = self.finish(start, Some(series), request_id, method, conn.tls);
                return crate::policy::preflight(self, route, &parts, fin);
            }
            let fin = self.finish(start, None, request_id, method, conn.tls);
            return self.problem(fin, Problem::NoRoute, "no route matches this request", None);
        };
        let cfg = &route.config;
        let state: &'static RouteState = &routing.states[route.index];
        let fin = self.finish(start, Some(state.series), request_id, method, conn.tls);
        if content_length(&parts.headers).is_some_and(|n| n > cfg.max_body_bytes) {
            let detail = format!("request body exceeds {} bytes", cfg.max_body_bytes);
            return self.problem(fin, Problem::PayloadTooLarge, &detail, None);
        }
        // Edge policies (rate limit, CORS, versioning, idempotency): one
        // branch when the route has none.
        if let Some(policy) = state.policy.as_deref() {
            return Box::pin(crate::policy::handle(
                self, policy, route, state, parts, body, fin, client, start,
            ))
            .await;
        }
        self.forward(route, state, parts, body, fin, client, start, None)
            .await
    }

    /// Phases 3 to 7 for a routed request.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn forward(
        &'static self,
        route: &'static RouteMatch,
        state: &'static RouteState,
        mut parts: http::request::Parts,
        body: ClientBody,
        fin: Finish,
        client: SocketAddr,
        start: Instant,
        major: Option<u64>,
    ) -> Response<ResBody> {
        let cfg = &route.config;
        let deadline = tokio::time::Instant::from_std(start + cfg.timeout);
        // The HTTP/1.1 server marks requests that ask for an upgrade
        // (WebSocket); the check reads an empty extension map for every
        // other request.
        if let Some(on_upgrade) = parts.extensions.remove::<ClientUpgrade>() {
            return Box::pin(self.upgrade(fin, parts, on_upgrade, cfg, state, client, deadline))
                .await;
        }
        // Phase 3: body (an empty one without entering the reader's state).
        let body = if body.is_end_stream() {
            Ok(ReqBody::Empty)
        } else {
            Box::pin(self.read_body(body, cfg, deadline)).await
        };
        let body = match body {
            Ok(b) => b,
            Err(p) => return self.problem(fin, p.0, &p.1, None),
        };
        self.forward_body(route, state, parts, body, fin, client, start, major)
            .await
    }

    /// Phase 3: the body, buffered when small enough to replay; an error is
    /// the problem to answer with.
    pub(crate) async fn read_body(
        &'static self,
        body: ClientBody,
        cfg: &RouteConfig,
        deadline: tokio::time::Instant,
    ) -> Result<ReqBody, (Problem, String)> {
        match read_body(body, cfg, deadline).await {
            Ok(b) => Ok(b),
            Err(BodyError::TooLarge) => Err((
                Problem::PayloadTooLarge,
                format!("request body exceeds {} bytes", cfg.max_body_bytes),
            )),
            Err(BodyError::Client) => Err((
                Problem::BadRequest,
                "the request body could not be read".into(),
            )),
            // The client was slow, not the upstream: 408, not 504.
            Err(BodyError::Timeout) => Err((
                Problem::RequestTimeout,
                "the request body did not arrive in time".into(),
            )),
        }
    }

    /// Phases 4 to 7 with the body read. `major` narrows the instances to
    /// one major version (header versioning).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn forward_body(
        &'static self,
        route: &'static RouteMatch,
        state: &'static RouteState,
        mut parts: http::request::Parts,
        body: ReqBody,
        mut fin: Finish,
        client: SocketAddr,
        start: Instant,
        major: Option<u64>,
    ) -> Response<ResBody> {
        let cfg = &route.config;
        let deadline = tokio::time::Instant::from_std(start + cfg.timeout);
        let too_large = match &body {
            ReqBody::Stream(s) => Some(Arc::clone(&s.too_large)),
            _ => None,
        };

        // Phase 4.
        let te_trailers = cfg.protocol == Protocol::H2c && wants_trailers(&parts.headers);
        let fwd = upstream_request_filter(
            &mut parts.headers,
            &mut parts.uri,
            cfg,
            &fin.request_id,
            client,
            fin.tls,
        );
        // The gateway's HTTP/1.1 client writes the added fields with the
        // head; hyper's client (h2c, streamed bodies) takes them in the map.
        let on_wire = cfg.protocol != Protocol::H2c && !matches!(body, ReqBody::Stream(_));
        if !on_wire {
            fwd.apply(&mut parts.headers);
        }
        if te_trailers {
            // gRPC: `te: trailers` is hop-by-hop but the upstream needs it.
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }

        // The upstream's response fields can stay unparsed when nothing
        // reads them before the HTTP/1.1 server writes them: no edge policy
        // (CORS, idempotency and versioning look at or add to them), and not
        // for hyper's HTTP/2 server, which takes a map.
        let raw_fields = state.policy.is_none() && parts.version != Version::HTTP_2;

        // Phase 5: attempts.
        let retry_after_send =
            is_idempotent(&parts.method) || parts.headers.contains_key(&IDEMPOTENCY_KEY);
        let max_attempts = cfg.retry.attempts.max(1);
        state.budget.deposit();
        let mut tried = Tried::new();
        let mut body = Some(body);
        let mut last: Option<(Problem, String)> = None;
        let mut pending_response: Option<Response<UpBody>> = None;
        let mut lost_races = 0;
        loop {
            fin.attempts += 1;
            let attempt = fin.attempts;
            let upstream = match state.upstreams.pick_major(tried.as_slice(), major) {
                Pick::Instance(u) => u,
                Pick::NoneHealthy => {
                    if let Some(res) = pending_response.take() {
                        fin.attempts -= 1;
                        return self.respond(fin, res);
                    }
                    fin.attempts -= 1;
                    let (p, d) = last.unwrap_or_else(|| {
                        (
                            Problem::NoHealthyInstance,
                            format!("no healthy instance of service `{}`", cfg.service),
                        )
                    });
                    return self.problem(fin, p, &d, None);
                }
                Pick::AllOpen(after) => {
                    if let Some(res) = pending_response.take() {
                        fin.attempts -= 1;
                        return self.respond(fin, res);
                    }
                    fin.attempts -= 1;
                    if let Some((p, d)) = last {
                        return self.problem(fin, p, &d, None);
                    }
                    let d = format!(
                        "every instance of service `{}` is ejected by its circuit breaker",
                        cfg.service
                    );
                    return self.problem(fin, Problem::BreakerOpen, &d, Some(after));
                }
            };
            let u = upstream;
            tried.push(u.addr);
            // The permit borrows the instance (no reference count touched);
            // losing it to a concurrent request (a half-open probe slot) means
            // picking again.
            let permit = match u.breaker.try_acquire() {
                Ok(p) => p,
                Err(after) => {
                    fin.attempts -= 1;
                    lost_races += 1;
                    if lost_races > 8 {
                        let d = format!(
                            "every instance of service `{}` is ejected by its circuit breaker",
                            cfg.service
                        );
                        return self.problem(fin, Problem::BreakerOpen, &d, Some(after));
                    }
                    continue;
                }
            };
            pending_response = None;
            let more_after = attempt < max_attempts;
            let replayable = body.as_ref().is_some_and(|b| b.try_clone().is_some());
            // The first attempt starts with the request: no clock read.
            let attempt_start = if attempt == 1 {
                tokio::time::Instant::from_std(start)
            } else {
                tokio::time::Instant::now()
            };
            let attempt_deadline = deadline.min(attempt_start + cfg.attempt_timeout);
            u.outstanding.inc();

            let keep_for_retry = more_after && retry_after_send && replayable;
            let result = if cfg.protocol == Protocol::H2c {
                let req = attempt_request(&mut parts, &mut body, keep_for_retry);
                Box::pin(self.send_h2(req, &u, cfg, attempt_deadline))
                    .await
                    .map(|r| r.map(UpBody::Hyper))
            } else if let Some(ReqBody::Stream(_)) = &body {
                // Never replayed: the body is moved into the one attempt.
                let req = attempt_request(&mut parts, &mut body, false);
                Box::pin(self.send_streamed(req, &u, cfg, attempt_deadline)).await
            } else {
                self.send_h1(
                    &parts,
                    &fwd,
                    body.as_ref(),
                    &u,
                    cfg,
                    start,
                    attempt_deadline,
                    raw_fields,
                )
                .await
            };
            match result {
                Ok(res) => {
                    let status = res.status();
                    let server_error = status.is_server_error();
                    // A success is only known at the end of the body (an
                    // upstream can reset mid-body): the body settles it.
                    // So is the attempt's outcome: `Finish` records it then.
                    let mut settled_now = true;
                    if server_error || res.body().is_end_stream() {
                        permit.record(!server_error);
                        self.passive(&cfg.service, &u, !server_error);
                    } else {
                        match permit.into_owned(&u.breaker) {
                            Ok(p) => {
                                fin.verdict = Some((p, cfg.service.as_str()));
                                settled_now = false;
                            }
                            Err(p) => {
                                p.record(true);
                                self.passive(&cfg.service, &u, true);
                            }
                        }
                    }
                    if settled_now {
                        self.metrics.attempt(
                            state.series,
                            if server_error {
                                AttemptOutcome::ServerError
                            } else {
                                AttemptOutcome::Ok
                            },
                        );
                    }
                    let retryable = matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    );
                    if retryable
                        && retry_after_send
                        && more_after
                        && body.is_some()
                        && Box::pin(self.may_retry(state, attempt, cfg, deadline, false)).await
                    {
                        u.outstanding.dec();
                        // Kept in case no other instance can be tried.
                        pending_response = Some(res);
                        continue;
                    }
                    fin.upstream = Some(u);
                    return self.respond(fin, res);
                }
                Err(failure) => {
                    u.outstanding.dec();
                    permit.record(false);
                    self.passive(&cfg.service, &u, false);
                    let (outcome, p, detail) = match failure {
                        Failure::Connect => (
                            AttemptOutcome::ConnectError,
                            Problem::BadGateway,
                            format!(
                                "could not connect to an instance of service `{}`",
                                cfg.service
                            ),
                        ),
                        Failure::Reset => (
                            AttemptOutcome::Reset,
                            Problem::BadGateway,
                            format!("an instance of service `{}` failed to answer", cfg.service),
                        ),
                        Failure::Timeout => (
                            AttemptOutcome::Timeout,
                            Problem::GatewayTimeout,
                            format!("service `{}` did not answer in time", cfg.service),
                        ),
                    };
                    self.metrics.attempt(state.series, outcome);
                    if too_large.as_ref().is_some_and(|f| f.load(Relaxed)) {
                        let detail = format!("request body exceeds {} bytes", cfg.max_body_bytes);
                        return self.problem(fin, Problem::PayloadTooLarge, &detail, None);
                    }
                    let safe = matches!(failure, Failure::Connect) || retry_after_send;
                    let past_deadline = tokio::time::Instant::now() >= deadline;
                    if past_deadline {
                        let d = format!("service `{}` did not answer in time", cfg.service);
                        return self.problem(fin, Problem::GatewayTimeout, &d, None);
                    }
                    let nothing_sent = matches!(failure, Failure::Connect);
                    if safe
                        && more_after
                        && body.is_some()
                        && Box::pin(self.may_retry(state, attempt, cfg, deadline, nothing_sent))
                            .await
                    {
                        last = Some((p, detail));
                        continue;
                    }
                    return self.problem(fin, p, &detail, None);
                }
            }
        }
    }

    /// Reports to passive health: every failure, and the first success after
    /// one (so the hot path only reads a flag).
    fn passive(&self, service: &str, u: &Upstream, ok: bool) {
        let Some(report) = &self.passive else {
            return;
        };
        if ok {
            if u.suspect.load(Relaxed) && u.suspect.swap(false, Relaxed) {
                report(service, &u.id, true);
            }
        } else {
            u.suspect.store(true, Relaxed);
            report(service, &u.id, false);
        }
    }

    /// Asks the budget for a retry and sleeps the jittered backoff.
    ///
    /// A retry after a failed connect skips the budget: nothing reached the
    /// failed instance, so it cannot multiply an outage, and the retry goes
    /// to another instance; the budget guards retries of requests that were sent.
    async fn may_retry(
        &'static self,
        state: &RouteState,
        attempt: u32,
        cfg: &RouteConfig,
        deadline: tokio::time::Instant,
        nothing_sent: bool,
    ) -> bool {
        if !nothing_sent && !state.budget.try_withdraw() {
            self.metrics.budget_exhausted(state.series);
            return false;
        }
        self.metrics.retry(state.series);
        let wait = backoff(attempt, cfg.retry.backoff, cfg.retry.max_backoff);
        let until = tokio::time::Instant::now() + wait;
        if until >= deadline {
            return false;
        }
        if !wait.is_zero() {
            sleep_until(until).await;
        }
        true
    }

    /// One attempt over a pooled (or new) HTTP/1.1 connection to `u`, with
    /// the gateway's own client: the request is written from borrowed parts,
    /// so a retry needs no copy of them.
    #[allow(clippy::too_many_arguments)]
    async fn send_h1(
        &'static self,
        parts: &http::request::Parts,
        fwd: &Forwarding,
        body: Option<&ReqBody>,
        u: &Upstream,
        cfg: &RouteConfig,
        start: Instant,
        deadline: tokio::time::Instant,
        raw_fields: bool,
    ) -> Result<Response<UpBody>, Failure> {
        let out = Outgoing {
            method: &parts.method,
            target: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
            host: &u.host,
            headers: &parts.headers,
            forwarding: Some(fwd),
            body: match body {
                Some(ReqBody::Full(b)) => b.as_ref(),
                _ => None,
            },
            declares_body: parts.headers.contains_key(header::CONTENT_LENGTH),
            raw_fields,
        };
        let idle = pool::take_idle(u.addr, &self.pool, start);
        let (conn, mut head) =
            match h1::exchange(idle, u.addr, cfg.connect_timeout, &out, deadline).await {
                Ok(x) => x,
                Err(Failed::Connect(_) | Failed::Send(SendError::NotSent)) => {
                    return Err(Failure::Connect);
                }
                Err(Failed::Timeout) => return Err(Failure::Timeout),
                Err(Failed::Send(_)) => return Err(Failure::Reset),
            };
        let raw = head.raw.take();
        let body = H1Body::new(conn, &head, self.pool, start).with_raw_fields(raw);
        Ok(Response::from_parts(head.parts, UpBody::H1(body)))
    }

    /// One attempt whose body is streamed (too large to buffer): hyper's
    /// client writes it while the upstream may already answer, over a
    /// connection of its own.
    async fn send_streamed(
        &'static self,
        mut req: Request<ReqBody>,
        u: &Upstream,
        cfg: &RouteConfig,
        deadline: tokio::time::Instant,
    ) -> Result<Response<UpBody>, Failure> {
        req.headers_mut().insert(header::HOST, u.host.clone());
        let Ok(Ok(mut conn)) = timeout_at(
            deadline,
            pool::connect_hyper(u.addr, cfg.connect_timeout, false),
        )
        .await
        else {
            return Err(Failure::Connect);
        };
        match timeout_at(deadline, conn.send_request(req)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Ok(res)) => Ok(res.map(UpBody::Hyper)),
            Ok(Err(_)) => Err(Failure::Reset),
        }
    }

    /// One attempt over the worker's shared h2c connection to `u`.
    async fn send_h2(
        &'static self,
        mut req: Request<ReqBody>,
        u: &Upstream,
        cfg: &RouteConfig,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Incoming>, Failure> {
        // HTTP/2 carries the host in `:authority`, taken from an absolute URI.
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let authority = http::uri::Authority::try_from(u.host.as_bytes()).ok();
        if let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(authority.ok_or(Failure::Connect)?)
            .path_and_query(pq)
            .build()
        {
            *req.uri_mut() = uri;
        }
        req.headers_mut().remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
        let Ok(Ok(mut sender)) =
            timeout_at(deadline, crate::h2c::sender(u.addr, cfg.connect_timeout)).await
        else {
            return Err(Failure::Connect);
        };
        // Waiting for a stream slot (the upstream's concurrency limit) sends nothing.
        match timeout_at(deadline, sender.ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                crate::h2c::forget(u.addr).await;
                return Err(Failure::Connect);
            }
            Err(_) => return Err(Failure::Timeout),
        }
        match timeout_at(deadline, sender.send_request(req)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Ok(res)) => Ok(res),
            Ok(Err(_)) => {
                crate::h2c::forget(u.addr).await;
                Err(Failure::Reset)
            }
        }
    }

    /// An HTTP/1.1 upgrade (WebSocket): the request goes to one instance on a
    /// fresh connection; on `101 Switching Protocols` both connections are
    /// handed over and their bytes copied both ways until either side closes
    /// (or the drain deadline after shutdown passes).
    #[allow(clippy::too_many_arguments)]
    async fn upgrade(
        &'static self,
        mut fin: Finish,
        mut parts: http::request::Parts,
        client_upgrade: ClientUpgrade,
        cfg: &RouteConfig,
        state: &'static RouteState,
        client: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Response<ResBody> {
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        upstream_request_filter(
            &mut parts.headers,
            &mut parts.uri,
            cfg,
            &fin.request_id,
            client,
            fin.tls,
        )
        .apply(&mut parts.headers);
        let Some(protocol) = protocol else {
            return self.problem(
                fin,
                Problem::BadRequest,
                "an upgrade needs an Upgrade header",
                None,
            );
        };
        let u = match state.upstreams.pick(&[]) {
            Pick::Instance(u) => u,
            Pick::NoneHealthy => {
                let d = format!("no healthy instance of service `{}`", cfg.service);
                return self.problem(fin, Problem::NoHealthyInstance, &d, None);
            }
            Pick::AllOpen(after) => {
                let d = format!(
                    "every instance of service `{}` is ejected by its circuit breaker",
                    cfg.service
                );
                return self.problem(fin, Problem::BreakerOpen, &d, Some(after));
            }
        };
        let Ok(permit) = u.breaker.try_acquire() else {
            let d = format!(
                "every instance of service `{}` is ejected by its circuit breaker",
                cfg.service
            );
            return self.problem(fin, Problem::BreakerOpen, &d, None);
        };
        fin.attempts = 1;
        parts.headers.insert(header::HOST, u.host.clone());
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let mut req = Request::new(ReqBody::Empty);
        *req.method_mut() = parts.method;
        *req.uri_mut() = parts.uri;
        *req.headers_mut() = parts.headers;
        let sent = timeout_at(deadline, async {
            let mut conn = pool::connect_hyper(u.addr, cfg.connect_timeout, true)
                .await
                .map_err(|_| Failure::Connect)?;
            conn.send_request(req).await.map_err(|_| Failure::Reset)
        })
        .await
        .unwrap_or(Err(Failure::Timeout));
        let mut res = match sent {
            Ok(res) => res,
            Err(f) => {
                permit.record(false);
                self.passive(&cfg.service, &u, false);
                let (outcome, p) = match f {
                    Failure::Connect => (AttemptOutcome::ConnectError, Problem::BadGateway),
                    Failure::Reset => (AttemptOutcome::Reset, Problem::BadGateway),
                    Failure::Timeout => (AttemptOutcome::Timeout, Problem::GatewayTimeout),
                };
                self.metrics.attempt(state.series, outcome);
                let d = format!("the upgrade to service `{}` failed", cfg.service);
                return self.problem(fin, p, &d, None);
            }
        };
        let ok = !res.status().is_server_error();
        permit.record(ok);
        self.passive(&cfg.service, &u, ok);
        self.metrics.attempt(
            state.series,
            if ok {
                AttemptOutcome::Ok
            } else {
                AttemptOutcome::ServerError
            },
        );
        fin.upstream = Some(u);
        if res.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Refused: an ordinary response (the connection is not pooled).
            return self.respond(fin, res.map(UpBody::Hyper));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut res);
        let accepted = res.headers().get(header::UPGRADE).cloned();
        let mut out = self.respond(fin, res.map(UpBody::Hyper));
        if let Some(p) = accepted {
            out.headers_mut().insert(header::UPGRADE, p);
        }
        out.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let metrics = &self.metrics;
        metrics.upgrade_opened();
        self.upgrades.spawn(async move {
            if let (Some(c), Ok(up)) = tokio::join!(client_upgrade.connection(), upstream_upgrade) {
                let mut c = c;
                let mut up = hyper_util::rt::TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            }
            metrics.upgrade_closed();
        });
        out
    }

    fn respond(&'static self, mut fin: Finish, res: Response<UpBody>) -> Response<ResBody> {
        let (mut parts, body) = res.into_parts();
        response_filter(&mut parts.headers, &fin.request_id);
        fin.status = parts.status.as_u16();
        let mut body = ResBody::upstream(body);
        body.set_finish(fin);
        Response::from_parts(parts, body)
    }
}
