//! The edge-policy phase: what a route with `rate_limit`, `cors`,
//! header `version`, `deprecated` or `idempotency` does around forwarding.
//!
//! A route without any of these has no [`RoutePolicy`] (its `RouteState`
//! holds `None`): the request path pays one branch, no lock and no
//! allocation. A pinned `version = { major = N }` alone needs no policy
//! either: it filters the route's snapshot when discovery publishes one.
//!
//! Order, for a route that has everything:
//! 1. CORS preflight: answered here, never forwarded.
//! 2. Rate limit: 429 before anything else is spent.
//! 3. Version: the major from the header (400 when malformed).
//! 4. Idempotency (POST/PATCH with `Idempotency-Key`): replay, 409, 422, or
//!    forward holding the key's lock and keep the response (or, when it is
//!    over `max_response_bytes`, a record that the request was done).
//! 5. Every answer, forwarded or not, gets the route's CORS and deprecation headers.
//!
//! A [`RoutePolicy`] is built from the route's [`RouteConfig`] alone (plus a
//! shared handle per Redis URL), so a config reload can rebuild it. A route
//! whose config is unchanged keeps its state across a reload; a changed route
//! gets a new one: its memory rate limits start full and its stored
//! idempotent responses are forgotten, while Redis state carries over.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use crate::body::{ReqBody, ResBody};
use crate::config::RouteConfig;
use crate::cors::{Cors, Preflight};
use crate::edge_redis::RedisHandle;
use crate::headers::{IDEMPOTENCY_KEY, X_REQUEST_ID};
use crate::idempotency::{self, Begin, IDEMPOTENT_REPLAYED, Idempotency, Stored};
use crate::problem::Problem;
use crate::proxy::{Finish, Gateway, RouteState};
use crate::ratelimit::RateLimit;
use crate::route::{RouteMatch, RouteTable};
use crate::versioning::{Deprecation, VersionSelect, parse_major};

/// One shared [`RedisHandle`] per URL, so routes on one Redis share a connection.
#[derive(Debug, Default)]
pub struct RedisHandles(HashMap<String, Arc<RedisHandle>>);

impl RedisHandles {
    /// The handle for `url`, created on first request.
    pub fn get(&mut self, url: &str) -> Result<Arc<RedisHandle>, String> {
        if let Some(h) = self.0.get(url) {
            return Ok(Arc::clone(h));
        }
        let h = Arc::new(RedisHandle::new(url)?);
        self.0.insert(url.to_owned(), Arc::clone(&h));
        Ok(h)
    }
}

/// A route's per-request policies, built from its config.
#[derive(Debug)]
pub struct RoutePolicy {
    /// Major from a header (`None` when pinned or unversioned).
    pub version: Option<VersionSelect>,
    /// Deprecation headers.
    pub deprecated: Option<Deprecation>,
    /// Rate limit.
    pub rate_limit: Option<RateLimit>,
    /// Idempotency keys.
    pub idempotency: Option<Arc<Idempotency>>,
    /// CORS.
    pub cors: Option<Cors>,
}

impl RoutePolicy {
    /// The route's policy, or `None` when nothing happens per request.
    pub fn build(cfg: &RouteConfig, redis: &mut RedisHandles) -> Result<Option<Box<Self>>, String> {
        let p = &cfg.policy;
        let version = match &p.version {
            Some(v @ VersionSelect::Header { .. }) => Some(v.clone()),
            _ => None,
        };
        if version.is_none()
            && p.deprecated.is_none()
            && p.rate_limit.is_none()
            && p.idempotency.is_none()
            && p.cors.is_none()
        {
            return Ok(None);
        }
        let mut get = |u: &str| redis.get(u);
        Ok(Some(Box::new(RoutePolicy {
            version,
            deprecated: p.deprecated.clone(),
            rate_limit: p
                .rate_limit
                .as_ref()
                .map(|c| RateLimit::new(c, &mut get))
                .transpose()?,
            idempotency: p
                .idempotency
                .as_ref()
                .map(|c| Idempotency::new(c, &mut get).map(Arc::new))
                .transpose()?,
            cors: p.cors.clone(),
        })))
    }

    /// Adds the headers every response of the route carries.
    fn decorate(&self, origin: Option<&HeaderValue>, res: &mut Response<ResBody>) {
        if let Some(c) = &self.cors {
            c.apply(origin, res.headers_mut());
        }
        if let Some(d) = &self.deprecated {
            d.apply(res.headers_mut());
        }
    }
}

/// For an unrouted `OPTIONS` preflight: the route of the method it announces,
/// if that route has CORS.
pub(crate) fn preflight_route(
    table: &'static RouteTable,
    parts: &Parts,
) -> Option<&'static RouteMatch> {
    if parts.method != Method::OPTIONS {
        return None;
    }
    let m = parts.headers.get(&crate::cors::ACRM)?;
    let m = Method::from_bytes(m.as_bytes()).ok()?;
    let host = parts.headers.get(header::HOST).map(HeaderValue::as_bytes);
    let route = table.find(&m, host, parts.uri.path())?;
    route.config.policy.cors.as_ref()?;
    Some(route)
}

/// Answers a preflight for `route` (which has CORS).
pub(crate) fn preflight(
    gw: &'static Gateway,
    route: &'static RouteMatch,
    parts: &Parts,
    fin: Finish,
) -> Response<ResBody> {
    let Some(cors) = &route.config.policy.cors else {
        return gw.problem(fin, Problem::NoRoute, "no route matches this request", None);
    };
    match cors.preflight(&parts.method, &parts.headers) {
        Preflight::Allow(h) => {
            let mut res = Response::new(ResBody::full(Bytes::new()));
            *res.status_mut() = StatusCode::NO_CONTENT;
            *res.headers_mut() = h;
            gw.reply(fin, res)
        }
        Preflight::Deny | Preflight::No => gw.problem(
            fin,
            Problem::CorsDenied,
            "this origin is not allowed to call this route",
            None,
        ),
    }
}

/// The policy phase around [`Gateway::forward`].
#[allow(clippy::too_many_arguments)]
pub(crate) async fn handle(
    gw: &'static Gateway,
    policy: &'static RoutePolicy,
    route: &'static RouteMatch,
    state: &'static RouteState,
    parts: Parts,
    body: crate::body::ClientBody,
    fin: Finish,
    client: SocketAddr,
    start: Instant,
) -> Response<ResBody> {
    let origin = if policy.cors.is_some() {
        parts.headers.get(header::ORIGIN).cloned()
    } else {
        None
    };
    let mut res = run(gw, policy, route, state, parts, body, fin, client, start).await;
    policy.decorate(origin.as_ref(), &mut res);
    res
}

#[allow(clippy::too_many_arguments)]
async fn run(
    gw: &'static Gateway,
    policy: &'static RoutePolicy,
    route: &'static RouteMatch,
    state: &'static RouteState,
    parts: Parts,
    body: crate::body::ClientBody,
    fin: Finish,
    client: SocketAddr,
    start: Instant,
) -> Response<ResBody> {
    // 1. Preflight.
    if let Some(c) = &policy.cors {
        match c.preflight(&parts.method, &parts.headers) {
            Preflight::No => {}
            _ => return preflight(gw, route, &parts, fin),
        }
    }
    // 2. Rate limit.
    if let Some(rl) = &policy.rate_limit
        && let Err(wait) = rl.check(client.ip(), &parts.headers).await
    {
        let mut res = gw.problem(
            fin,
            Problem::TooManyRequests,
            "the rate limit of this route is exceeded; retry later",
            Some(wait),
        );
        rl.limited_headers(res.headers_mut(), wait);
        return res;
    }
    // 3. Version.
    let major = match &policy.version {
        Some(VersionSelect::Header { name, default }) => match parts.headers.get(name) {
            None => Some(*default),
            Some(v) => match parse_major(v.as_bytes()) {
                Some(m) => Some(m),
                None => {
                    let d = format!(
                        "`{name}` must be a version like `2` or `v2` (got `{}`)",
                        String::from_utf8_lossy(v.as_bytes())
                    );
                    return gw.problem(fin, Problem::InvalidRequest, &d, None);
                }
            },
        },
        _ => None,
    };
    // 4. Idempotency.
    let idem = match &policy.idempotency {
        Some(i)
            if (parts.method == Method::POST || parts.method == Method::PATCH)
                && parts.headers.contains_key(&IDEMPOTENCY_KEY) =>
        {
            i
        }
        _ => {
            return gw
                .forward(route, state, parts, body, fin, client, start, major)
                .await;
        }
    };
    let Some(key) = parts
        .headers
        .get(&IDEMPOTENCY_KEY)
        .and_then(|v| idempotency::parse_key(v.as_bytes()))
    else {
        let d = format!(
            "`Idempotency-Key` must be a string of 1 to {} printable characters",
            idempotency::MAX_KEY_BYTES
        );
        return gw.problem(fin, Problem::InvalidRequest, &d, None);
    };
    let key = idem.scoped_key(key, &parts.headers);
    let cfg = &route.config;
    let deadline = tokio::time::Instant::from_std(start + cfg.timeout);
    let body = match gw.read_body(body, cfg, deadline).await {
        Ok(b) => b,
        Err((p, d)) => return gw.problem(fin, p, &d, None),
    };
    let bytes = match &body {
        ReqBody::Empty => Bytes::new(),
        ReqBody::Full(b) => b.clone().unwrap_or_default(),
        ReqBody::Stream(_) => {
            let d = format!(
                "a request with an Idempotency-Key must fit in {} bytes (the route's retry_buffer_bytes)",
                cfg.retry_buffer_bytes
            );
            return gw.problem(fin, Problem::PayloadTooLarge, &d, None);
        }
    };
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let fp = idempotency::fingerprint(&parts.method, pq, &bytes);
    let lock = match idem.begin(key, fp).await {
        Begin::Proceed(lock) => Some(lock),
        Begin::Unprotected => None,
        Begin::Replay(stored) => return replay(gw, fin, &stored),
        Begin::NotKept { limit } => {
            let d = format!(
                "a request with this Idempotency-Key was already processed; its response was larger than the {limit} bytes this route keeps (max_response_bytes), so it is neither run again nor replayed"
            );
            return gw.problem(fin, Problem::IdempotencyNotKept, &d, None);
        }
        Begin::InFlight => {
            return gw.problem(
                fin,
                Problem::IdempotencyInFlight,
                "a request with this Idempotency-Key is still being processed; retry later",
                None,
            );
        }
        Begin::Mismatch => {
            return gw.problem(
                fin,
                Problem::IdempotencyMismatch,
                "this Idempotency-Key was already used with a different request",
                None,
            );
        }
    };
    let mut res = gw
        .forward_body(route, state, parts, body, fin, client, start, major)
        .await;
    let Some(lock) = lock else {
        return res;
    };
    if !res.body().is_upstream() || !Idempotency::keeps(res.status()) {
        // Not worth keeping: a repeat runs again.
        lock.release().await;
        return res;
    }
    let limit = idem.config().max_response_bytes;
    let too_big = res
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > limit as u64);
    if too_big {
        lock.too_large().await;
        return res;
    }
    match res.body_mut().read_prefix(limit).await {
        Ok((bytes, true)) => {
            let headers = res
                .headers()
                .iter()
                .filter(|(n, _)| **n != X_REQUEST_ID && *n != header::CONTENT_LENGTH)
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            lock.complete(Stored {
                status: res.status(),
                headers,
                body: bytes,
            })
            .await;
        }
        Ok((_, false)) => lock.too_large().await,
        Err(_) => lock.release().await,
    }
    res
}

fn replay(gw: &'static Gateway, fin: Finish, stored: &Stored) -> Response<ResBody> {
    let mut res = Response::new(ResBody::full(stored.body.clone()));
    *res.status_mut() = stored.status;
    let h = res.headers_mut();
    for (n, v) in &stored.headers {
        h.append(n.clone(), v.clone());
    }
    h.insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    gw.reply(fin, res)
}

/// Appends the edge-policy counters in Prometheus text format.
pub fn render_metrics(gw: &Gateway, out: &mut String) {
    let mut rl = String::new();
    let mut rl_err = String::new();
    let mut idem_err = String::new();
    let mut idem_rep = String::new();
    let routing = gw.routing();
    for (r, st) in routing.table.routes().iter().zip(&routing.states) {
        let Some(p) = st.policy.as_deref() else {
            continue;
        };
        let route = r.config.prefix.replace('\\', "\\\\").replace('"', "\\\"");
        if let Some(l) = &p.rate_limit {
            let _ = writeln!(
                rl,
                "switchboard_gateway_rate_limited_total{{route=\"{route}\"}} {}",
                l.limited.load(Relaxed)
            );
            let _ = writeln!(
                rl_err,
                "switchboard_gateway_rate_limit_store_errors_total{{route=\"{route}\"}} {}",
                l.store_errors.load(Relaxed)
            );
        }
        if let Some(i) = &p.idempotency {
            let _ = writeln!(
                idem_rep,
                "switchboard_gateway_idempotent_replays_total{{route=\"{route}\"}} {}",
                i.replayed.load(Relaxed)
            );
            let _ = writeln!(
                idem_err,
                "switchboard_gateway_idempotency_store_errors_total{{route=\"{route}\"}} {}",
                i.store_errors.load(Relaxed)
            );
        }
    }
    let family = |out: &mut String, name: &str, help: &str, body: &str| {
        if !body.is_empty() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            out.push_str(body);
        }
    };
    family(
        out,
        "switchboard_gateway_rate_limited_total",
        "Requests refused with 429 by the route's rate limit.",
        &rl,
    );
    family(
        out,
        "switchboard_gateway_rate_limit_store_errors_total",
        "Rate-limit store failures; each let a request through (fail open).",
        &rl_err,
    );
    family(
        out,
        "switchboard_gateway_idempotent_replays_total",
        "Stored responses replayed for a repeated Idempotency-Key.",
        &idem_rep,
    );
    family(
        out,
        "switchboard_gateway_idempotency_store_errors_total",
        "Idempotency store failures; each forwarded a request unprotected.",
        &idem_err,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn routes(extra: &str) -> Vec<RouteConfig> {
        let text = format!(
            "[[services]]\nname = \"s\"\ninstances = []\n[[routes]]\nprefix = \"/\"\nservice = \"s\"\n{extra}\n"
        );
        crate::Config::parse(Path::new("t.toml"), &text)
            .unwrap()
            .routes
    }

    #[test]
    fn routes_without_request_time_policies_have_none() {
        let mut redis = RedisHandles::default();
        for extra in ["", "version = { major = 2 }"] {
            let r = &routes(extra)[0];
            assert!(
                RoutePolicy::build(r, &mut redis).unwrap().is_none(),
                "{extra}"
            );
        }
        for extra in [
            "version = { default = 2 }",
            "rate_limit = { rate = 1 }",
            "idempotency = {}",
            "cors = { origins = [\"*\"] }",
            "deprecated = { since = \"2024-01-01\" }",
        ] {
            let r = &routes(extra)[0];
            assert!(
                RoutePolicy::build(r, &mut redis).unwrap().is_some(),
                "{extra}"
            );
        }
    }

    #[test]
    fn one_redis_handle_per_url() {
        let mut redis = RedisHandles::default();
        let a = redis.get("redis://127.0.0.1:1").unwrap();
        let b = redis.get("redis://127.0.0.1:1").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(redis.get("nonsense").is_err());
    }
}
