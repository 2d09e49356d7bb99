//! The registry's HTTP API, exactly as in `DESIGN.md`.
//!
//! - `PUT /v1/services/{service}/instances/{id}` (JSON [`Registration`]) -> 200 + the instance
//! - `PUT /v1/services/{service}/instances/{id}/heartbeat` -> 200
//! - `DELETE /v1/services/{service}/instances/{id}` -> 204
//! - `GET /v1/services` -> `[{"service", "instances", "passing"}]`
//! - `GET /v1/services/{service}?passing=true&index=N&wait=30s` -> `{"index", "instances"}`;
//!   with `index`, blocks until the service's index passes `N` or `wait` ends
//!   (default 5m, at most 10m). The index is also in the `x-registry-index` header.
//!
//! Writes need `Authorization: Bearer TOKEN` when a token is configured. Every
//! error is RFC 9457 `application/problem+json` with `type`, `title`, `status`,
//! `detail` (and `field` for validation errors); bad input is 400, never 500,
//! and a well-formed address that the network policy refuses is 403.
//! [`openapi`] states every validation rule (patterns, lengths, counts,
//! bounds) so that schema-driven clients and fuzzers send only what passes.
//!
//! [`router`] is what the gateway mounts on its admin listener (it has no
//! fallback and no `/openapi.json`, so it merges cleanly); [`openapi`] is the
//! registry part of the OpenAPI document. [`serve`] runs the standalone server
//! with `/health`, `/ready`, `/metrics` and `/openapi.json` added.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use bytes::Bytes;
use serde_json::json;

use crate::model::Registration;
use crate::registry::{Registry, RegistryError};
use crate::validate::{self, ValidationError};

/// Default body limit of write requests.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;
/// Longest `wait` of a blocking query.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// `wait` of a blocking query that gives none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// Options of the HTTP API.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpOptions {
    /// Bearer token required on writes (`PUT`, `DELETE`); `None` leaves writes open,
    /// which [`bind`] allows on loopback addresses only.
    pub token: Option<String>,
    /// Largest accepted request body in bytes (413 above). Default 64 KiB.
    pub body_limit: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            token: None,
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }
}

impl HttpOptions {
    /// Requires `Authorization: Bearer token` on writes.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the body limit.
    #[must_use]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }
}

/// An RFC 9457 problem document; every error of the API is one.
#[derive(Debug, Clone)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Short, fixed summary of the problem type.
    pub title: &'static str,
    /// What happened this time.
    pub detail: String,
    /// The offending field, for validation errors.
    pub field: Option<String>,
}

impl Problem {
    fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            title,
            detail: detail.into(),
            field: None,
        }
    }

    fn invalid(err: &ValidationError) -> Self {
        Problem {
            field: Some(err.field.clone()),
            ..Problem::new(StatusCode::BAD_REQUEST, "Invalid request", err.to_string())
        }
    }

    fn slug(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "invalid-request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "address-not-allowed",
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
            StatusCode::SERVICE_UNAVAILABLE => "store-unavailable",
            _ => "error",
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": format!("https://switchboard.invalid/problems/{}", self.slug()),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(field) = &self.field {
            body["field"] = json!(field);
        }
        let mut resp = (self.status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<RegistryError> for Problem {
    fn from(err: RegistryError) -> Self {
        match &err {
            RegistryError::Invalid(v) => Problem::invalid(v),
            RegistryError::Forbidden(v) => Problem {
                field: Some(v.field.clone()),
                ..Problem::new(StatusCode::FORBIDDEN, "Address not allowed", v.to_string())
            },
            RegistryError::NotFound { .. } => {
                Problem::new(StatusCode::NOT_FOUND, "Instance not found", err.to_string())
            }
            RegistryError::Store(_) | RegistryError::UnsupportedStore(_) => {
                tracing::warn!(error = %err, "registry store error");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Store unavailable",
                    "the registry store is unavailable; retry later",
                )
            }
        }
    }
}

#[derive(Clone)]
struct AppState {
    registry: Registry,
    token: Option<std::sync::Arc<str>>,
}

/// Constant-time comparison so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Problem> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    match given {
        Some(g) if same(g.trim().as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the bearer token is wrong",
        )),
        None => Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "writes need an Authorization: Bearer token header",
        )),
    }
}

fn path_pair(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, String), Problem> {
    let Path((service, id)) = path.map_err(|e| Problem {
        field: Some("path".into()),
        ..Problem::new(StatusCode::BAD_REQUEST, "Invalid request", e.body_text())
    })?;
    validate::service_name(&service).map_err(|e| Problem::invalid(&e))?;
    validate::instance_id(&id).map_err(|e| Problem::invalid(&e))?;
    Ok((service, id))
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Problem> {
    body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                status,
                "Body too large",
                "the request body exceeds the limit",
            )
        } else {
            Problem {
                field: Some("body".into()),
                ..Problem::new(StatusCode::BAD_REQUEST, "Invalid request", e.body_text())
            }
        }
    })
}

async fn put_instance(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    authorize(&state, &headers)?;
    let (service, id) = path_pair(path)?;
    let body = body_bytes(body)?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| Problem {
        field: Some("body".into()),
        ..Problem::new(
            StatusCode::BAD_REQUEST,
            "Invalid request",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let reg = Registration::from_json(&value).map_err(|e| Problem::invalid(&e))?;
    let instance = state.registry.register(&service, &id, reg).await?;
    Ok(axum::Json(instance).into_response())
}

async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Problem> {
    authorize(&state, &headers)?;
    let (service, id) = path_pair(path)?;
    state.registry.heartbeat(&service, &id).await?;
    Ok(axum::Json(json!({"service": service, "id": id, "renewed": true})).into_response())
}

async fn delete_instance(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Problem> {
    authorize(&state, &headers)?;
    let (service, id) = path_pair(path)?;
    state.registry.deregister(&service, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_services(State(state): State<AppState>) -> Response {
    axum::Json(state.registry.services()).into_response()
}

/// The parsed query of `GET /v1/services/{service}`.
#[derive(Debug, Default, PartialEq, Eq)]
struct ServiceQuery {
    passing: bool,
    index: Option<u64>,
    wait: Option<Duration>,
}

fn decode(s: &str) -> String {
    // Only what our parameters can contain needs decoding; anything else fails validation.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(raw: Option<&str>) -> Result<ServiceQuery, ValidationError> {
    let mut q = ServiceQuery::default();
    let Some(raw) = raw else { return Ok(q) };
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k), decode(v));
        match k.as_str() {
            "passing" => {
                q.passing = match v.as_str() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(ValidationError::new("passing", "must be true or false")),
                };
            }
            "index" => {
                q.index = Some(v.parse::<u64>().map_err(|_| {
                    ValidationError::new("index", "must be a non-negative integer")
                })?);
            }
            "wait" => {
                q.wait = Some(validate::duration_in(&v, "wait", Duration::ZERO, MAX_WAIT)?);
            }
            other => {
                return Err(ValidationError::new(
                    other.chars().take(64).collect::<String>(),
                    "unknown query parameter (expected passing, index, wait)",
                ));
            }
        }
    }
    Ok(q)
}

async fn get_service(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let Path(service) = path.map_err(|e| Problem {
        field: Some("path".into()),
        ..Problem::new(StatusCode::BAD_REQUEST, "Invalid request", e.body_text())
    })?;
    validate::service_name(&service).map_err(|e| Problem::invalid(&e))?;
    let query = parse_query(raw.as_deref()).map_err(|e| Problem::invalid(&e))?;
    if let Some(index) = query.index {
        let mut watch = state.registry.watch(&service);
        watch
            .wait_past(index, query.wait.unwrap_or(DEFAULT_WAIT))
            .await;
    }
    let mut view = state.registry.snapshot(&service);
    if query.passing {
        view.instances
            .retain(|i| i.status == crate::model::Status::Passing);
    }
    let body = json!({"index": view.index, "instances": view.instances});
    let mut resp = axum::Json(body).into_response();
    resp.headers_mut()
        .insert("x-registry-index", HeaderValue::from(view.index));
    Ok(resp)
}

/// The registry API routes (see the module docs), to merge into an admin router.
pub fn router(registry: Registry, opts: HttpOptions) -> Router {
    let state = AppState {
        registry,
        token: opts.token.map(std::sync::Arc::from),
    };
    Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{service}", get(get_service))
        .route(
            "/v1/services/{service}/instances/{id}",
            put(put_instance).delete(delete_instance),
        )
        .route(
            "/v1/services/{service}/instances/{id}/heartbeat",
            put(heartbeat),
        )
        .layer(DefaultBodyLimit::max(opts.body_limit))
        .with_state(state)
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition of the registry's state.
pub fn metrics_text(registry: &Registry) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    out.push_str(
        "# HELP switchboard_registry_instances Registered instances by service and status.\n",
    );
    out.push_str("# TYPE switchboard_registry_instances gauge\n");
    let mut checks = 0usize;
    for summary in registry.services() {
        let view = registry.view(&summary.service).unwrap_or_default();
        for status in ["passing", "warning", "critical"] {
            let n = view
                .instances
                .iter()
                .filter(|i| i.status.as_str() == status)
                .count();
            let _ = writeln!(
                out,
                "switchboard_registry_instances{{service=\"{}\",status=\"{status}\"}} {n}",
                esc(&summary.service)
            );
        }
    }
    checks += registry.checks_owned();
    out.push_str("# HELP switchboard_registry_checks_owned Health checks this process runs.\n");
    out.push_str("# TYPE switchboard_registry_checks_owned gauge\n");
    let _ = writeln!(out, "switchboard_registry_checks_owned {checks}");
    out
}

/// The full standalone app: [`router`] plus `/health`, `/ready`, `/metrics`,
/// `/openapi.json`, and problem+json for unknown routes and methods.
pub fn app(registry: Registry, opts: HttpOptions) -> Router {
    let metrics_registry = registry.clone();
    router(registry, opts)
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route(
            "/ready",
            get(|| async { axum::Json(json!({"status": "ready"})) }),
        )
        .route(
            "/metrics",
            get(move || {
                let r = metrics_registry.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics_text(&r),
                    )
                }
            }),
        )
        .route("/openapi.json", get(|| async { axum::Json(openapi()) }))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "Not found", "no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                "this route does not accept that method",
            )
        })
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Listening off loopback without a token would leave writes open to the network.
    #[error("refusing to listen on non-loopback address {0} without a token (set --token)")]
    InsecureListen(SocketAddr),
    /// Binding or serving failed.
    #[error("cannot serve on {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Binds a listener, refusing a non-loopback address when no token is configured.
pub async fn bind(
    addr: SocketAddr,
    opts: &HttpOptions,
) -> Result<tokio::net::TcpListener, ServeError> {
    if !addr.ip().is_loopback() && opts.token.as_deref().is_none_or(str::is_empty) {
        return Err(ServeError::InsecureListen(addr));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Io { addr, source })
}

/// Serves [`app`] on a bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    opts: HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    axum::serve(listener, app(registry, opts))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServeError::Io { addr, source })
}

/// The OpenAPI 3.1 description of the registry API (the paths of [`router`]).
///
/// The request schemas state exactly what the validator accepts: every
/// pattern comes from [`validate::patterns`], every bound from the
/// validator's constants (`tests/schema_in_step.rs` keeps them in step).
pub fn openapi() -> serde_json::Value {
    use validate::patterns as p;
    use validate::{MAX_LONG, MAX_METADATA, MAX_PERIOD, MAX_SHORT, MAX_TAGS};
    let problem = |d: &str| json!({"description": d, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    let service_param = json!({"name": "service", "in": "path", "required": true, "schema": {"type": "string", "pattern": p::SERVICE}});
    let id_param = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": p::INSTANCE_ID}});
    let bearer = json!([{"bearer": []}]);
    let duration = |min, max, d: &str| json!({"type": ["string", "null"], "pattern": p::duration(min, max), "description": d});
    let ipv6 = p::ipv6();
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Switchboard registry", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/v1/services": {
                "get": {
                    "summary": "List services",
                    "responses": {"200": {"description": "Services", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/ServiceSummary"}}}}}}
                }
            },
            "/v1/services/{service}": {
                "get": {
                    "summary": "Instances of a service; with index, a blocking query",
                    "parameters": [
                        service_param,
                        {"name": "passing", "in": "query", "schema": {"enum": ["true", "false", "1", "0", ""]}, "description": "only passing instances (empty: true)"},
                        {"name": "index", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX}, "description": "block until the service's index is greater"},
                        {"name": "wait", "in": "query", "schema": {"type": "string", "pattern": p::duration(Duration::ZERO, MAX_WAIT)}, "description": "longest block: a number and one unit of ms, s, m (default 5m, at most 10m)"}
                    ],
                    "responses": {
                        "200": {"description": "Service view", "headers": {"x-registry-index": {"schema": {"type": "integer"}}},
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ServiceView"}}}},
                        "400": problem("Invalid service name or query")
                    }
                }
            },
            "/v1/services/{service}/instances/{id}": {
                "put": {
                    "summary": "Register an instance",
                    "security": bearer,
                    "parameters": [service_param, id_param],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Registration"}}}},
                    "responses": {"200": {"description": "Registered", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Instance"}}}},
                                  "400": problem("Invalid body or path"), "401": problem("Token missing or wrong"),
                                  "403": problem("The network policy refuses the address (unspecified, link-local, outside the allowed networks, or a hostname where only IPs are allowed)"),
                                  "413": problem("Body too large"), "503": problem("Store unavailable")}
                },
                "delete": {
                    "summary": "Deregister an instance",
                    "security": bearer,
                    "parameters": [service_param, id_param],
                    "responses": {"204": {"description": "Deregistered (or was not registered)"}, "400": problem("Invalid path"), "401": problem("Token missing or wrong"), "503": problem("Store unavailable")}
                }
            },
            "/v1/services/{service}/instances/{id}/heartbeat": {
                "put": {
                    "summary": "Renew a TTL check",
                    "security": bearer,
                    "parameters": [service_param, id_param],
                    "responses": {"200": {"description": "Renewed", "content": {"application/json": {"schema": {"type": "object", "properties": {"service": {"type": "string"}, "id": {"type": "string"}, "renewed": {"const": true}}}}}},
                                  "400": problem("Invalid path"), "401": problem("Token missing or wrong"), "404": problem("Not registered"), "503": problem("Store unavailable")}
                }
            }
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                    "detail": {"type": "string"}, "field": {"type": "string"}}},
                "ServiceSummary": {"type": "object", "properties": {"service": {"type": "string"}, "instances": {"type": "integer"}, "passing": {"type": "integer"}}},
                "Check": {
                    "type": "object", "additionalProperties": false,
                    "description": "exactly one of http, tcp, ttl (null counts as absent); a timeout above the interval is cut to it",
                    "oneOf": [
                        {"required": ["http"], "properties": {"http": {"type": "string"}}},
                        {"required": ["tcp"], "properties": {"tcp": {"const": true}}},
                        {"required": ["ttl"], "properties": {"ttl": {"type": "string"}}}
                    ],
                    "properties": {
                        "http": {"type": ["string", "null"], "pattern": p::HTTP_PATH, "maxLength": MAX_LONG, "description": "path, e.g. /health"},
                        "tcp": {"enum": [true, null]},
                        "ttl": duration(validate::MIN_TTL, MAX_PERIOD, "renew within this, e.g. 10s"),
                        "interval": duration(validate::MIN_INTERVAL, MAX_PERIOD, "default 10s"),
                        "timeout": duration(validate::MIN_TIMEOUT, MAX_PERIOD, "default 2s, at most the interval"),
                        "healthy_threshold": {"type": ["integer", "null"], "minimum": 1, "maximum": 100, "default": 2},
                        "unhealthy_threshold": {"type": ["integer", "null"], "minimum": 1, "maximum": 100, "default": 3},
                        "deregister_critical_after": duration(validate::MIN_TTL, MAX_PERIOD, "deregister after this long critical")}},
                "Registration": {"type": "object", "required": ["address", "port"], "additionalProperties": false, "properties": {
                    "address": {"type": "string", "description": "IP address or hostname", "anyOf": [
                        {"pattern": p::IPV4},
                        {"pattern": ipv6},
                        {"allOf": [{"pattern": p::HOSTNAME}, {"pattern": p::HOSTNAME_LAST_LABEL}], "maxLength": 253}
                    ]},
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "version": {"type": ["string", "null"], "pattern": p::version(), "description": "semver"},
                    "tags": {"type": ["array", "null"], "items": {"type": "string", "minLength": 1, "maxLength": MAX_SHORT, "pattern": p::tag()}, "maxItems": MAX_TAGS},
                    "metadata": {"type": ["object", "null"], "maxProperties": MAX_METADATA,
                                 "propertyNames": {"pattern": p::METADATA_KEY},
                                 "additionalProperties": {"type": "string", "maxLength": MAX_LONG, "pattern": p::metadata_value()}},
                    "check": {"anyOf": [{"$ref": "#/components/schemas/Check"}, {"type": "null"}], "description": "absent or null: no active check"}}},
                "Instance": {"type": "object", "properties": {
                    "id": {"type": "string"}, "service": {"type": "string"}, "address": {"type": "string"}, "port": {"type": "integer"},
                    "version": {"type": ["string", "null"]}, "status": {"enum": ["passing", "warning", "critical"]},
                    "tags": {"type": "array", "items": {"type": "string"}}, "metadata": {"type": "object"},
                    "last_check": {"type": ["string", "null"], "format": "date-time", "description": "when the last active (HTTP or TCP) check completed"},
                    "last_heartbeat": {"type": ["string", "null"], "format": "date-time", "description": "when the registry last accepted a heartbeat renewing the TTL check (with a shared Redis store: through any registry process on it, seen within about 250 ms, at worst one resync interval); absent from older registries"}}},
                "ServiceView": {"type": "object", "properties": {"index": {"type": "integer"}, "instances": {"type": "array", "items": {"$ref": "#/components/schemas/Instance"}}}}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        assert_eq!(parse_query(None).unwrap(), ServiceQuery::default());
        let q = parse_query(Some("passing=true&index=7&wait=30s")).unwrap();
        assert_eq!(
            q,
            ServiceQuery {
                passing: true,
                index: Some(7),
                wait: Some(Duration::from_secs(30))
            }
        );
        assert!(parse_query(Some("passing")).unwrap().passing);
        assert_eq!(parse_query(Some("index=-1")).unwrap_err().field, "index");
        assert_eq!(parse_query(Some("wait=11m")).unwrap_err().field, "wait");
        assert_eq!(parse_query(Some("wait=10m")).unwrap().wait, Some(MAX_WAIT));
        assert_eq!(
            parse_query(Some("wait=1m%2030s")).unwrap_err().field,
            "wait"
        );
        assert_eq!(parse_query(Some("wait=%zz")).unwrap_err().field, "wait");
        assert_eq!(parse_query(Some("dc=x")).unwrap_err().field, "dc");
        assert_eq!(decode("a%20b%"), "a b%");
    }

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
