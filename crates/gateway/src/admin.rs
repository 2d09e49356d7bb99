//! The admin listener: health, readiness, Prometheus metrics, the route and
//! breaker tables, the OpenAPI document, and whatever extra router the
//! embedding application merges in (the registry API). The dashboard's routes
//! (`/dashboard`, `/v1/stream`, `/v1/search`) live in [`crate::dashboard`].

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::proxy::Gateway;
use crate::reload::{ReloadError, Reloader};
use crate::upstream::InstanceStatus;

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct AdminState {
    /// The engine.
    pub gw: &'static Gateway,
    /// Swaps configurations (`POST /v1/reload`).
    pub reloader: Arc<Reloader>,
    /// False once shutdown started.
    pub ready: Arc<AtomicBool>,
    /// Extra OpenAPI paths merged into `/openapi.json`.
    pub openapi_extra: Arc<Value>,
    /// More series appended to `/metrics`.
    pub extra_metrics: Option<ExtraMetrics>,
}

/// Renders extra Prometheus series (complete families, with HELP and TYPE).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// The admin router (without the merged extras).
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/routes", get(routes))
        .route("/v1/breakers", get(breakers))
        .route("/v1/reload", post(reload))
        .route("/openapi.json", get(openapi))
        .with_state(state)
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let mut res = (
        status,
        axum::Json(json!({
            "type": "about:blank",
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        })),
    )
        .into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

/// `POST /v1/reload`: re-reads the config file; 422 with the `switchboard
/// check` errors when it is invalid (the old config keeps serving). Like
/// every admin write it needs the admin token ([`crate::admin_auth`]).
async fn reload(State(s): State<AdminState>) -> Response {
    match s.reloader.reload_file(None).await {
        Ok(routes) => axum::Json(json!({"status": "reloaded", "routes": routes})).into_response(),
        Err(ReloadError::NoFile) => problem(
            StatusCode::CONFLICT,
            "Conflict",
            "the gateway was not started from a config file",
        ),
        Err(e) => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid configuration",
            &e.to_string(),
        ),
    }
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn ready(State(s): State<AdminState>) -> Response {
    if s.ready.load(Relaxed) {
        axum::Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response()
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every gateway series in Prometheus text format.
pub fn render_metrics(gw: &Gateway) -> String {
    let mut out = String::with_capacity(16 * 1024);
    gw.metrics.render(&mut out);
    crate::policy::render_metrics(gw, &mut out);
    const STATES: [&str; 6] = [
        "closed",
        "open",
        "half_open",
        "forced_open",
        "disabled",
        "metrics_only",
    ];
    let routing = gw.routing();
    out.push_str("# HELP switchboard_gateway_breaker_state Circuit breaker state per route and instance (1 for the current state).\n");
    out.push_str("# TYPE switchboard_gateway_breaker_state gauge\n");
    for r in routing.table.routes() {
        let snap = routing.states[r.index].upstreams.current.load();
        for u in &snap.passing {
            let state = u.breaker.snapshot().state.as_str();
            for s in STATES {
                let _ = writeln!(
                    out,
                    "switchboard_gateway_breaker_state{{route=\"{}\",service=\"{}\",instance=\"{}\",state=\"{s}\"}} {}",
                    escape(&r.config.prefix),
                    escape(&r.config.service),
                    escape(&u.addr.to_string()),
                    u8::from(s == state)
                );
            }
        }
    }
    out.push_str("# HELP switchboard_gateway_instances Instances known to discovery, by service and status.\n");
    out.push_str("# TYPE switchboard_gateway_instances gauge\n");
    let mut seen: Vec<&str> = Vec::new();
    for r in routing.table.routes() {
        let service = r.config.service.as_str();
        if seen.contains(&service) {
            continue;
        }
        seen.push(service);
        let snap = routing.states[r.index].upstreams.current.load();
        for st in [
            InstanceStatus::Passing,
            InstanceStatus::Warning,
            InstanceStatus::Critical,
        ] {
            let n = snap.all.iter().filter(|i| i.status == st).count();
            let _ = writeln!(
                out,
                "switchboard_gateway_instances{{service=\"{}\",status=\"{}\"}} {n}",
                escape(service),
                st.as_str()
            );
        }
    }
    out
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut body = render_metrics(s.gw);
    if let Some(extra) = &s.extra_metrics {
        body.push_str(&extra());
    }
    let mut res = body.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

async fn routes(State(s): State<AdminState>) -> impl IntoResponse {
    let routing = s.gw.routing();
    let list: Vec<Value> = routing
        .table
        .routes()
        .iter()
        .map(|r| {
            let c = &r.config;
            let snap = routing.states[r.index].upstreams.current.load();
            json!({
                "prefix": c.prefix,
                "service": c.service,
                "methods": c.methods.as_ref().map(|m| m.iter().map(|x| x.as_str().to_owned()).collect::<Vec<_>>()),
                "host": c.host,
                "rewrite": c.rewrite,
                "timeout_ms": c.timeout.as_millis() as u64,
                "attempt_timeout_ms": c.attempt_timeout.as_millis() as u64,
                "connect_timeout_ms": c.connect_timeout.as_millis() as u64,
                "retry_attempts": c.retry.attempts,
                "balance": c.balance,
                "max_body_bytes": c.max_body_bytes,
                "instances": snap.all.len(),
                "passing": snap.passing.len(),
            })
        })
        .collect();
    axum::Json(list)
}

async fn breakers(State(s): State<AdminState>) -> impl IntoResponse {
    let mut list = Vec::new();
    let routing = s.gw.routing();
    for r in routing.table.routes() {
        let snap = routing.states[r.index].upstreams.current.load();
        for u in &snap.passing {
            let b = u.breaker.snapshot();
            list.push(json!({
                "route": r.config.prefix,
                "service": r.config.service,
                "instance": u.id,
                "address": u.addr.to_string(),
                "state": b.state.as_str(),
                "calls": b.calls,
                "failed_calls": b.failed_calls,
                "failure_rate": b.failure_rate,
                "retry_after_ms": b.retry_after.map(|d| d.as_millis() as u64),
                "outstanding": u.outstanding.total(),
            }));
        }
    }
    axum::Json(list)
}

/// The gateway's own OpenAPI paths.
pub fn openapi_paths() -> Value {
    let text = |d: &str| json!({"description": d, "content": {"text/plain": {"schema": {"type": "string"}}}});
    let obj = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"type": "object"}}}});
    let arr = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}});
    let problem = |d: &str| json!({"description": d, "content": {"application/problem+json": {"schema": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"}}}}}});
    // Each Server-Sent Event, as OpenAPI 3.1 tools read `schema` on an event stream.
    let sse_event = json!({
        "type": "object", "required": ["event", "data"],
        "properties": {
            "event": {"enum": ["history", "sample"]},
            "data": {"type": "string", "contentMediaType": "application/json", "description": "one JSON object: the last five minutes of series (history) or one sample"},
            "retry": {"type": "integer", "minimum": 0},
            "id": {"type": "string"}
        }
    });
    json!({
        "/health": {"get": {"summary": "Liveness", "responses": {"200": obj("alive")}}},
        "/ready": {"get": {"summary": "Readiness (503 while draining)", "responses": {"200": obj("ready"), "503": obj("draining")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": text("Prometheus text format 0.0.4")}}},
        "/v1/routes": {"get": {"summary": "The route table with instance counts", "responses": {"200": arr("routes")}}},
        "/v1/breakers": {"get": {"summary": "Circuit breaker per route and instance", "responses": {"200": arr("breakers")}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": obj("OpenAPI 3.1 document")}}},
        "/v1/reload": {"post": {"summary": "Re-read the config file and swap routes, services and policies (bearer token when an admin token is set)", "responses": {"200": obj("reloaded: {status, routes}"), "401": problem("missing or wrong token"), "409": problem("not started from a file"), "422": problem("invalid config; the old one keeps serving")}}},
        "/dashboard": {"get": {"summary": "The live dashboard page (self-contained HTML)", "responses": {"200": {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/v1/stream": {"get": {"summary": "Dashboard frames as Server-Sent Events, one per second (bearer token when configured)", "responses": {"200": {"description": "an `event: history` then `event: sample` frames", "content": {"text/event-stream": {"schema": sse_event}}}, "401": problem("token missing or wrong")}}},
        "/v1/search": {"get": {"summary": "Find a request id or correlation id in the recent access log and events", "parameters": [{"name": "q", "in": "query", "required": true, "description": "1-128 visible ASCII characters; surrounding ASCII whitespace is ignored", "schema": {"type": "string", "pattern": crate::dashboard::QUERY_PATTERN}}], "responses": {"200": obj("matching requests and events"), "400": problem("bad query"), "401": problem("token missing or wrong")}}},
    })
}

async fn openapi(State(s): State<AdminState>) -> impl IntoResponse {
    let mut paths = openapi_paths();
    if let (Some(p), Some(extra)) = (
        paths.as_object_mut(),
        s.openapi_extra.get("paths").and_then(Value::as_object),
    ) {
        for (k, v) in extra {
            p.insert(k.clone(), v.clone());
        }
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "Switchboard gateway admin API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
    });
    if let Some(c) = s.openapi_extra.get("components") {
        doc["components"] = c.clone();
    }
    axum::Json(doc)
}
