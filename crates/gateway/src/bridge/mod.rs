//! The HTTP event bridge: services in any language publish CloudEvents with
//! one HTTP POST and receive them as HTTP requests, with retries and dead
//! letters handled for them (like Dapr's pub/sub), over the same
//! [`switchboard_bus::Bus`] the Rust services use.
//!
//! - **Publish**: `POST /v1/events` ([`publish`]) takes structured, binary or
//!   batch mode ([`http_binding`]) and answers 202 once the bus accepted. It
//!   is served on the admin listener, the proxy listener (answered there
//!   before routing) or both, as `bridge.publish` says.
//! - **Push**: a subscription ([`config::SubscriptionSpec`], from
//!   `[[subscriptions]]` or `PUT /v1/subscriptions/{name}`) consumes a topic
//!   as a bus consumer group and POSTs each event in binary mode to a passing
//!   instance of a service, through the proxy's balancer, per-instance
//!   breakers and connection pool ([`push`]).
//! - **Admin API** (on the admin listener): `GET /v1/subscriptions`,
//!   `GET|PUT|DELETE /v1/subscriptions/{name}`; writes (and publishing) need
//!   `Authorization: Bearer TOKEN` when the registry token is set.
//! - **Metrics** ([`metrics`]): `switchboard_bridge_*` in `/metrics`.
//!
//! Subscriptions registered over the API live in this gateway process: a
//! service registers its subscription when it starts (as the examples do),
//! the way it registers its instance. Several gateways may run the same
//! subscription: they are consumers of one group and share its events.
//!
//! ```no_run
//! # async fn demo(registry: switchboard_registry::Registry) -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_gateway::bridge::{Bridge, BridgeOptions, registry_resolver};
//!
//! let bus = switchboard_bus::Bus::open("redis://127.0.0.1:6379").await?;
//! let bridge = Bridge::start(BridgeOptions::new(bus, registry_resolver(registry))).await?;
//! let admin_routes = bridge.router(); // merge into the admin listener
//! # let _ = admin_routes;
//! bridge.shutdown().await;
//! # Ok(()) }
//! ```

pub mod config;
pub mod http_binding;
pub mod metrics;
pub mod publish;
pub mod push;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use switchboard_bus::{Bus, BusError, Event, SubscribeOptions};
use tokio::sync::watch;

use crate::breaker::OnChange;
use crate::config::Balance;
use crate::pool::PoolConfig;
use crate::upstream::{Instance, InstanceList, InstanceStatus, RouteUpstreams};
use config::{PublishOn, Subscription, SubscriptionSpec, Target};
use metrics::{PublishMetrics, SubStats};
use publish::Answer;
use push::Pusher;

/// Finds a service's instances: a watch channel of its instance list.
pub type Resolver = Arc<dyn Fn(&str) -> watch::Receiver<InstanceList> + Send + Sync>;

/// A resolver over the registry (a watch per target service).
pub fn registry_resolver(registry: switchboard_registry::Registry) -> Resolver {
    Arc::new(move |service: &str| {
        crate::discovery::registry_sources(&registry, [service.to_owned()])
            .remove(service)
            .unwrap_or_else(|| watch::channel(InstanceList::default()).1)
    })
}

/// A resolver over fixed channels (tests, static sources); unknown services have no instances.
pub fn sources_resolver(
    sources: std::collections::HashMap<String, watch::Receiver<InstanceList>>,
) -> Resolver {
    Arc::new(move |service: &str| {
        sources
            .get(service)
            .cloned()
            .unwrap_or_else(|| watch::channel(InstanceList::default()).1)
    })
}

/// What a [`Bridge`] needs.
pub struct BridgeOptions {
    /// The bus events are published on and consumed from.
    pub bus: Bus,
    /// Finds target services' instances.
    pub resolver: Resolver,
    /// Bearer token for publishing and subscription writes (`None`: open).
    pub token: Option<String>,
    /// Where publishing is served.
    pub publish: PublishOn,
    /// The publish path (`/v1/events`).
    pub path: String,
    /// Largest publish body.
    pub max_body_bytes: u64,
    /// Connect timeout for push deliveries.
    pub connect_timeout: Duration,
    /// Connection pool settings for push deliveries.
    pub pool: PoolConfig,
    /// Subscriptions to start with (the config's).
    pub subscriptions: Vec<Subscription>,
    /// Networks push targets may be in (the gateway's `upstream_allow` / `upstream_deny`).
    pub upstream_policy: crate::allowlist::UpstreamPolicy,
}

impl BridgeOptions {
    /// Defaults: publish on the admin listener at `/v1/events`, 1 MiB bodies, no token.
    pub fn new(bus: Bus, resolver: Resolver) -> Self {
        let raw = config::RawBridge::default();
        Self {
            bus,
            resolver,
            token: None,
            publish: raw.publish,
            path: raw.path,
            max_body_bytes: raw.max_body_bytes,
            connect_timeout: Duration::from_secs(1),
            pool: PoolConfig {
                idle_timeout: Duration::from_secs(60),
                max_idle: 64,
            },
            subscriptions: Vec::new(),
            upstream_policy: crate::allowlist::UpstreamPolicy::default(),
        }
    }
}

impl std::fmt::Debug for BridgeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeOptions")
            .field("bus", &self.bus)
            .field("publish", &self.publish)
            .field("subscriptions", &self.subscriptions.len())
            .finish_non_exhaustive()
    }
}

/// A subscription could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The bus refused or could not be reached.
    #[error("subscription `{name}`: {source}")]
    Bus {
        /// The subscription.
        name: String,
        /// The bus's error.
        source: BusError,
    },
    /// The target is not allowed (outside `gateway.upstream_allow`).
    #[error("subscription `{name}`: {reason}")]
    Refused {
        /// The subscription.
        name: String,
        /// Why.
        reason: String,
    },
}

/// The running bridge; cheap to clone.
#[derive(Clone)]
pub struct Bridge {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) bus: Bus,
    resolver: Resolver,
    token: Option<Arc<str>>,
    pub(crate) publish: PublishOn,
    pub(crate) path: String,
    pub(crate) max_body_bytes: u64,
    connect_timeout: Duration,
    pool: PoolConfig,
    upstream_policy: crate::allowlist::UpstreamPolicy,
    pub(crate) metrics: PublishMetrics,
    /// Lifecycle (PUT/DELETE are serialized; never on the delivery path).
    subs: tokio::sync::Mutex<BTreeMap<String, Running>>,
    /// Counters by subscription, for `/metrics` (read without awaiting).
    stats: parking_lot::Mutex<Vec<(String, Arc<SubStats>)>>,
}

struct Running {
    sub: Subscription,
    origin: &'static str,
    handle: switchboard_bus::Subscription,
    follow: Option<tokio::task::JoinHandle<()>>,
    upstreams: Arc<RouteUpstreams>,
    stats: Arc<SubStats>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("bus", &self.inner.bus)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// Starts the bridge and the given subscriptions.
    pub async fn start(opts: BridgeOptions) -> Result<Bridge, SubscribeError> {
        let bridge = Bridge {
            inner: Arc::new(Inner {
                bus: opts.bus,
                resolver: opts.resolver,
                token: opts.token.filter(|t| !t.is_empty()).map(Arc::from),
                publish: opts.publish,
                path: opts.path,
                max_body_bytes: opts.max_body_bytes,
                connect_timeout: opts.connect_timeout,
                pool: opts.pool,
                upstream_policy: opts.upstream_policy,
                metrics: PublishMetrics::default(),
                subs: tokio::sync::Mutex::new(BTreeMap::new()),
                stats: parking_lot::Mutex::new(Vec::new()),
            }),
        };
        for sub in opts.subscriptions {
            bridge.put(sub, "config").await?;
        }
        Ok(bridge)
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// Publish counters.
    pub fn publish_metrics(&self) -> &PublishMetrics {
        &self.inner.metrics
    }

    /// Where publishing is served, and on which path.
    pub fn publish_on(&self) -> (PublishOn, &str) {
        (self.inner.publish, &self.inner.path)
    }

    /// Starts (or replaces) a subscription; `true` when it is new. A replaced
    /// one is shut down gracefully after its successor started.
    pub async fn put(
        &self,
        sub: Subscription,
        origin: &'static str,
    ) -> Result<bool, SubscribeError> {
        let mut subs = self.inner.subs.lock().await;
        let running = self.spawn(sub, origin).await?;
        let name = running.sub.name.clone();
        let stats = Arc::clone(&running.stats);
        let old = subs.insert(name.clone(), running);
        {
            let mut s = self.inner.stats.lock();
            s.retain(|(n, _)| *n != name);
            s.push((name.clone(), stats));
            s.sort_by(|a, b| a.0.cmp(&b.0));
        }
        drop(subs);
        let created = old.is_none();
        if let Some(old) = old {
            stop(old).await;
        }
        tracing::info!(subscription = %name, created, "bridge subscription running");
        Ok(created)
    }

    /// Stops and removes a subscription (its group keeps its position on the
    /// bus); `false` if there is none of that name.
    pub async fn delete(&self, name: &str) -> bool {
        let old = self.inner.subs.lock().await.remove(name);
        self.inner.stats.lock().retain(|(n, _)| n != name);
        match old {
            Some(r) => {
                stop(r).await;
                true
            }
            None => false,
        }
    }

    /// The subscriptions with their settings, origin and counters.
    pub async fn subscriptions(&self) -> Vec<serde_json::Value> {
        self.inner.subs.lock().await.values().map(view).collect()
    }

    /// Stops every subscription gracefully (in-flight deliveries finish and are settled).
    pub async fn shutdown(&self) {
        let all = std::mem::take(&mut *self.inner.subs.lock().await);
        self.inner.stats.lock().clear();
        for r in all.into_values() {
            stop(r).await;
        }
    }

    /// The bridge's Prometheus families.
    pub fn metrics_text(&self) -> String {
        let stats = self.inner.stats.lock().clone();
        let mut text = metrics::render(&self.inner.metrics, &stats);
        // The bus's own counters (`switchboard_bus_*`): the admin listener is
        // where the gateway process's bus is observed.
        text.push_str(&self.inner.bus.metrics().render_prometheus());
        text
    }

    async fn spawn(
        &self,
        sub: Subscription,
        origin: &'static str,
    ) -> Result<Running, SubscribeError> {
        if let Target::Url { addr, .. } = &sub.target
            && let Some(why) = self.inner.upstream_policy.refusal(addr.ip())
        {
            return Err(SubscribeError::Refused {
                name: sub.name,
                reason: why,
            });
        }
        // Instances outside the allowed networks are dropped from the
        // snapshot, as for routes: the bridge never connects to them.
        let filter = crate::upstream::SnapshotFilter {
            networks: self.inner.upstream_policy.clone(),
            version: None,
        };
        let upstreams = Arc::new(RouteUpstreams::with_filter(
            Balance::P2c,
            sub.spec.breaker.clone(),
            filter,
        ));
        let name = sub.name.clone();
        let on_change: OnChange = Arc::new(move |ev| {
            tracing::info!(subscription = %name, instance = %ev.instance, address = %ev.addr, state = ev.state.as_str(), "bridge breaker state changed");
        });
        let (follow, target, path) = match &sub.target {
            Target::Service { service, path } => {
                let rx = (self.inner.resolver)(service);
                upstreams.update(&rx.borrow(), &on_change);
                let task = tokio::spawn(crate::upstream::follow(
                    Arc::clone(&upstreams),
                    rx,
                    on_change,
                ));
                (Some(task), format!("service `{service}`"), path)
            }
            Target::Url { addr, path } => {
                let only = Instance {
                    id: addr.to_string(),
                    addr: *addr,
                    status: InstanceStatus::Passing,
                    version: None,
                };
                upstreams.update(&[only], &on_change);
                (None, format!("http://{addr}"), path)
            }
        };
        let stats = Arc::new(SubStats::default());
        let spec = &sub.spec;
        let pusher = Arc::new(Pusher {
            target,
            upstreams: Arc::clone(&upstreams),
            path: path
                .parse()
                .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/")),
            ack_timeout: spec.ack_timeout,
            connect_timeout: self.inner.connect_timeout,
            // Every delivery in flight can go back to the pool.
            idle: Arc::new(crate::pool::OwnedPool::new(PoolConfig {
                max_idle: self.inner.pool.max_idle.max(spec.max_in_flight),
                ..self.inner.pool
            })),
            stats: Arc::clone(&stats),
        });
        let handler = move |event: Event| {
            let p = Arc::clone(&pusher);
            async move { p.deliver(event).await }
        };
        // The bus gives a delivery to another consumer after the ack wait: it
        // must outlast one delivery (its ack timeout) with room to settle.
        let opts = SubscribeOptions::default()
            .max_in_flight(spec.max_in_flight)
            .ack_wait(spec.ack_timeout * 2 + Duration::from_secs(1))
            .max_deliveries(spec.max_deliveries)
            .backoff(sub.backoff)
            .dead_letter_topic(spec.dead_letter_topic.clone());
        let handle = self
            .inner
            .bus
            .subscribe(&spec.topic, &sub.group, handler, opts)
            .await;
        let handle = match handle {
            Ok(h) => h,
            Err(source) => {
                if let Some(f) = follow {
                    f.abort();
                }
                return Err(SubscribeError::Bus {
                    name: sub.name,
                    source,
                });
            }
        };
        Ok(Running {
            sub,
            origin,
            handle,
            follow,
            upstreams,
            stats,
        })
    }

    /// Checks `Authorization: Bearer TOKEN` when a token is configured, with
    /// the admin listener's check ([`crate::admin_auth`], which also guards
    /// these writes there); this one covers publishing on the proxy listener.
    pub(crate) fn authorize(
        &self,
        headers: &HeaderMap,
        request_id: &HeaderValue,
    ) -> Result<(), Answer> {
        let Some(token) = &self.inner.token else {
            return Ok(());
        };
        let auth = headers.get(header::AUTHORIZATION);
        if crate::admin_auth::bearer_matches(auth, token) {
            return Ok(());
        }
        let detail = if auth.is_some() {
            "the bearer token is wrong"
        } else {
            "this endpoint needs an Authorization: Bearer token header"
        };
        Err(Answer::problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
            &[],
            request_id,
        ))
    }

    /// Serves a publish request from any listener (the proxy calls this for
    /// its configured path).
    pub async fn handle_publish<B, R>(&self, req: http::Request<B>) -> http::Response<R>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        R: From<Bytes>,
    {
        let (parts, body) = req.into_parts();
        let rid = crate::correlation::request_id(parts.headers.get(&crate::headers::X_REQUEST_ID));
        if parts.method != http::Method::POST {
            let mut res = Answer::problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                &format!("{} publishes with POST", self.inner.path),
                &[],
                &rid,
            )
            .into_response::<R>(rid);
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return res;
        }
        publish::publish(self, &parts.headers, body, &rid)
            .await
            .into_response(rid)
    }

    /// The admin routes: the subscriptions API, and `POST {path}` when
    /// publishing is served on the admin listener.
    pub fn router(&self) -> Router {
        let mut r = Router::new()
            .route("/v1/subscriptions", get(list_subs))
            .route(
                "/v1/subscriptions/{name}",
                get(get_sub).put(put_sub).delete(delete_sub),
            );
        if self.inner.publish.admin() {
            // Every method: `handle_publish` answers the others with a 405
            // problem+json, as on the proxy listener (axum's own is bare).
            r = r.route(&self.inner.path, any(publish_admin));
        }
        r.with_state(self.clone())
    }
}

async fn stop(r: Running) {
    r.handle.shutdown().await;
    if let Some(f) = r.follow {
        f.abort();
    }
}

fn view(r: &Running) -> serde_json::Value {
    let mut v = serde_json::to_value(&r.sub.spec).unwrap_or_default();
    v["name"] = serde_json::json!(r.sub.name);
    v["group"] = serde_json::json!(r.sub.group);
    v["origin"] = serde_json::json!(r.origin);
    let snap = r.upstreams.current.load();
    v["instances"] = serde_json::json!(snap.all.len());
    v["passing"] = serde_json::json!(snap.passing.len());
    v["stats"] = r.stats.json();
    v["running"] = serde_json::json!(!r.handle.is_finished());
    v
}

fn rid(headers: &HeaderMap) -> HeaderValue {
    crate::correlation::request_id(headers.get(&crate::headers::X_REQUEST_ID))
}

fn not_found(name: &str, rid: &HeaderValue) -> Response {
    Answer::problem(
        StatusCode::NOT_FOUND,
        "no-subscription",
        "No such subscription",
        &format!("there is no subscription `{name}`"),
        &[],
        rid,
    )
    .into_response::<axum::body::Body>(rid.clone())
}

async fn publish_admin(State(b): State<Bridge>, req: axum::extract::Request) -> Response {
    b.handle_publish::<_, axum::body::Body>(req).await
}

async fn list_subs(State(b): State<Bridge>) -> Response {
    axum::Json(b.subscriptions().await).into_response()
}

async fn get_sub(
    State(b): State<Bridge>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let subs = b.inner.subs.lock().await;
    match subs.get(&name) {
        Some(r) => axum::Json(view(r)).into_response(),
        None => not_found(&name, &rid(&headers)),
    }
}

async fn put_sub(
    State(b): State<Bridge>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rid = rid(&headers);
    if let Err(a) = b.authorize(&headers, &rid) {
        return a.into_response::<axum::body::Body>(rid);
    }
    let bad = |detail: String, errors: serde_json::Value| {
        Answer::problem(
            StatusCode::BAD_REQUEST,
            "invalid-subscription",
            "Invalid subscription",
            &detail,
            &[("errors", errors)],
            &rid,
        )
        .into_response::<axum::body::Body>(rid.clone())
    };
    let spec: SubscriptionSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return bad(
                format!("the body is not a subscription: {e}"),
                serde_json::json!([]),
            );
        }
    };
    let sub = match spec.resolve(Some(&name)) {
        Ok(s) => s,
        Err(errs) => {
            let detail = errs
                .iter()
                .map(|(k, m)| format!("`{k}`: {m}"))
                .collect::<Vec<_>>()
                .join("; ");
            let list: Vec<_> = errs
                .iter()
                .map(|(k, m)| serde_json::json!({"key": k, "message": m}))
                .collect();
            return bad(detail, serde_json::json!(list));
        }
    };
    match b.put(sub, "api").await {
        Ok(created) => {
            let subs = b.inner.subs.lock().await;
            let body = subs.get(&name).map(view).unwrap_or_default();
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(body)).into_response()
        }
        Err(e @ SubscribeError::Refused { .. }) => bad(
            e.to_string(),
            serde_json::json!([{"key": "url", "message": e.to_string()}]),
        ),
        Err(e) => Answer::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus-unavailable",
            "Bus unavailable",
            &e.to_string(),
            &[],
            &rid,
        )
        .into_response::<axum::body::Body>(rid),
    }
}

async fn delete_sub(
    State(b): State<Bridge>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let rid = rid(&headers);
    if let Err(a) = b.authorize(&headers, &rid) {
        return a.into_response::<axum::body::Body>(rid);
    }
    if b.delete(&name).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        not_found(&name, &rid)
    }
}

/// The bridge's OpenAPI paths.
pub fn openapi(path: &str) -> serde_json::Value {
    let problem = |d: &str| serde_json::json!({"description": d, "content": {"application/problem+json": {"schema": {"type": "object"}}}});
    let obj = |d: &str| serde_json::json!({"description": d, "content": {"application/json": {"schema": {"type": "object"}}}});
    let ce =
        serde_json::json!({"type": "object", "required": ["specversion", "id", "source", "type"]});
    serde_json::json!({"paths": {
        path: {"post": {
            "summary": "Publish CloudEvents (structured, binary with ce-* headers, or batch); 202 once the bus accepted them",
            "requestBody": {"content": {
                "application/cloudevents+json": {"schema": ce},
                "application/cloudevents-batch+json": {"schema": {"type": "array", "items": ce}},
                "*/*": {"schema": {"description": "binary mode: the data, with ce-specversion, ce-id, ce-source, ce-type headers"}}
            }},
            "responses": {"202": obj("accepted: {accepted, ids}"), "400": problem("missing or bad attribute (named in `attribute`)"),
                "401": problem("token required"), "413": problem("body over the limit"), "415": problem("not a CloudEvents content type"),
                "503": problem("the bus did not accept the events")}
        }},
        "/v1/subscriptions": {"get": {"summary": "Push subscriptions with settings and counters", "responses": {"200": obj("list")}}},
        "/v1/subscriptions/{name}": {
            "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
            "get": {"summary": "One push subscription", "responses": {"200": obj("subscription"), "404": problem("unknown")}},
            "put": {"summary": "Create or replace a push subscription: {topic, group?, service | url, path?, max_in_flight?, ack_timeout?, backoff?, max_deliveries?, dead_letter_topic?}",
                "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["topic"]}}}},
                "responses": {"200": obj("replaced"), "201": obj("created"), "400": problem("invalid, every bad key named in `errors`"), "401": problem("token required")}},
            "delete": {"summary": "Stop a push subscription (its group keeps its position)", "responses": {"204": {"description": "stopped"}, "404": problem("unknown"), "401": problem("token required")}}
        }
    }})
}
