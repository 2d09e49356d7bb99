//! Switchboard's API gateway: a reverse proxy that finds its upstreams through
//! discovery, balances over passing instances, ejects failing ones with
//! per-instance circuit breakers, retries only where safe, and measures
//! everything — at a per-request cost close to a bare hyper proxy.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_gateway::{Config, GatewayBuilder, discovery};
//!
//! let config = Config::load("gateway.toml".as_ref())?;
//! let sources = discovery::static_sources(&config); // or the registry's
//! let running = GatewayBuilder::new(config).sources(sources.receivers()).start().await?;
//! println!("proxy on {}, admin on {}", running.listen(), running.admin());
//! running.shutdown().await; // stop accepting, drain, return
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`config`]: TOML config, validation with file/line/column/key errors, defaults.
//! - [`route`]: the route table (longest prefix, method, host) and rewrites.
//! - [`proxy`]: the request path as named phases (after pingora's `ProxyHttp`).
//! - [`upstream`]: discovery snapshots (arc-swap) and the P2C / round-robin balancer.
//! - [`breaker`]: per-instance breakers from `switchboard-resilience`.
//! - [`retry`]: idempotency, jittered backoff, retry budget.
//! - [`h1`]: the gateway's HTTP/1.1 client, driven inside the request's task
//!   (hyper's client only for streamed request bodies and upgrades).
//! - [`h1_server`]: the gateway's HTTP/1.1 server connection (hyper's server
//!   only for HTTP/2 over TLS).
//! - [`pool`]: pools of upstream HTTP/1.1 connections, per worker (proxy) or per subscription (bridge).
//! - [`h2c`]: per-worker shared HTTP/2 upstream connections.
//! - [`tls`]: rustls termination, ALPN `h2` / `http/1.1`.
//! - [`reload`]: hot reload of routes, services and policies (arc-swap).
//! - [`correlation`], [`headers`]: request id, traceparent, forwarding headers.
//! - [`problem`]: RFC 9457 problem+json errors.
//! - [`body`]: request and response body types (no boxing).
//! - [`metrics`], [`access_log`]: atomics-based Prometheus metrics; off-thread access log.
//! - [`server`]: worker threads, `SO_REUSEPORT` listeners, graceful shutdown.
//! - [`admin`]: `/health`, `/ready`, `/metrics`, `/v1/routes`, `/v1/breakers`, `POST /v1/reload`, `/openapi.json`.
//! - [`discovery`]: instance sources: static lists and the registry.
//! - [`policy`]: the edge-policy phase (one branch for routes without policies), over
//!   [`versioning`], [`ratelimit`], [`idempotency`], [`cors`]; [`edge_redis`] is their Redis handle.
//! - [`allowlist`]: the networks upstreams may be in; [`admin_auth`]: bearer token on admin writes.
//! - [`dashboard`]: the live page `/dashboard` and its SSE stream `/v1/stream` on the admin listener.
//! - [`bridge`]: the HTTP event bridge: CloudEvents over HTTP onto the bus
//!   (`POST /v1/events`) and push subscriptions delivering to services.
//!
//! # Configuration defaults
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `gateway.listen` | `127.0.0.1:3000` | proxy listener |
//! | `gateway.admin` | `127.0.0.1:9900` | admin listener |
//! | `gateway.workers` | `0` (one per core) | proxy worker threads |
//! | `gateway.header_read_timeout` | `10s` | a client must send its header block within this (also the idle keep-alive limit; at least `10ms`) |
//! | `gateway.max_header_bytes` | `16384` | larger header blocks get 431 |
//! | `gateway.max_headers` | `100` | more headers get 431 (at most 256) |
//! | `gateway.drain_timeout` | `30s` | shutdown waits this long for in-flight requests |
//! | `gateway.lingering_time` | `30s` | after a response that left request bytes unread (a `413`, an early upstream answer, a refused head), the connection sends its FIN and reads and discards what the client still sends for at most this long, then closes (RFC 9112 §9.6; also ends at the client's FIN, after 16 MiB, or 500 ms into a shutdown) |
//! | `gateway.lingering_timeout` | `5s` | while lingering, the longest wait for the client's next bytes; `0s` closes right after the response |
//! | `gateway.access_log` | `true` | one JSON line per request on stdout |
//! | `gateway.connect_timeout` | `1s` | default upstream connect timeout |
//! | `gateway.pool_idle_timeout` | `60s` | idle upstream connections older than this are closed |
//! | `gateway.pool_max_idle` | `64` | idle upstream connections kept per instance and worker |
//! | `gateway.tls.cert`, `gateway.tls.key` | none (plain HTTP/1.1) | PEM certificate chain and private key, relative to the config file: `listen` terminates TLS (rustls, `ring`) and serves HTTP/2 or HTTP/1.1 as ALPN picks |
//! | `registry.store` | `memory://` | `memory://` or `redis://HOST:PORT` |
//! | `registry.token` | none | bearer token for registry writes (required off loopback) |
//! | `services[].instances` | `[]` | static `IP:PORT`s, registered in the registry |
//! | `services[].protocol` | `http1` | `h2c`: HTTP/2 cleartext to the instances (gRPC), one multiplexed connection per instance and worker |
//! | `services[].health` | none (always passing) | `path` `/health`, `interval` `2s`, `timeout` `1s`, `healthy_threshold` `2`, `unhealthy_threshold` `3` |
//! | `routes[].prefix`, `routes[].service` | required | |
//! | `routes[].methods`, `routes[].host` | any | narrow the match |
//! | `routes[].strip_prefix` / `rewrite` | `false` / none | drop or replace the prefix upstream |
//! | `routes[].timeout` | `30s` | total, all attempts |
//! | `routes[].attempt_timeout` | = `timeout` | one attempt |
//! | `routes[].connect_timeout` | `gateway.connect_timeout` | |
//! | `routes[].retry` | `attempts = 3`, `budget_percent = 20`, `min_per_second = 10`, `backoff = "10ms"`, `max_backoff = "200ms"` | |
//! | `routes[].breaker` | `failure_rate = 0.5`, `min_calls = 20`, `window = "10s"`, `open_for = "5s"` | per instance |
//! | `routes[].balance` | `p2c` | or `round_robin` |
//! | `routes[].max_body_bytes` | `10485760` | larger bodies get 413 |
//! | `routes[].retry_buffer_bytes` | `65536` | bodies up to this are buffered and replayable |
//! | `gateway.admin_token` | `registry.token` | bearer token for every write on the admin listener (admin and registry); required off loopback |
//! | `gateway.upstream_allow` | loopback, `10/8`, `172.16/12`, `192.168/16`, `::1`, `fc00::/7` | networks instances may be in (CIDR or address); others are refused by the registry API (403) and never proxied to |
//! | `gateway.upstream_deny` | `169.254.0.0/16`, `fe80::/10`, `fd00:ec2::254`, `100.100.100.200` | never proxied to, even inside `upstream_allow` |
//! | `routes[].version` | none | `{ major = N }` (prefix carries the version) or `{ header = "Api-Version", default = N }`: only instances whose registered version has that semver major |
//! | `routes[].deprecated` | none | `{ since, sunset, successor }` (RFC 3339 or `YYYY-MM-DD`; URI): `Deprecation: @unix`, `Sunset: HTTP-date`, `Link: <successor>; rel="successor-version"` |
//! | `routes[].rate_limit` | none | `rate` (required), `per = "1s"`, `burst = rate`, `key = "ip"` (or `"header:NAME"`, `"none"`), `store = "memory://"` (or `redis://HOST:PORT`, fails open), `max_keys = 100000`, `name = prefix` |
//! | `routes[].idempotency` | none | `ttl = "24h"` (at least `1s`; after it a key is new again), `max_response_bytes = 1048576` (a larger response reaches the client whole but is not kept: the key records the request as done, and a repeat with the same request gets 409 `/problems/idempotency-response-not-kept` naming the limit, never reaching the upstream again), `store = "memory://"` (or `redis://`), `max_keys = 100000`, `max_store_bytes = 67108864`, `client_header`, `name = prefix` |
//! | `routes[].cors` | none | `origins` (required; or `["*"]`), `methods = ["GET","HEAD","POST"]`, `headers = []`, `expose = []`, `credentials = false`, `max_age = "5s"` |
//! | `routes[].protocol` | the service's `protocol` | `http1` or `h2c` for this route |
//! | `bridge.bus` | none (bridge off) | bus URL of the HTTP event bridge |
//! | `bridge.publish` | `admin` | where `POST /v1/events` is served: `admin`, `proxy`, `both`, `off` |
//! | `bridge.path` | `/v1/events` | the publish path |
//! | `bridge.max_body_bytes` | `1048576` | larger publish bodies get 413 (at least 65536) |
//! | `subscriptions[]` | none | push subscriptions: `topic`, `service` (+ `path`) or `url`; see [`bridge::config::SubscriptionSpec`] for `name`, `group`, `max_in_flight` `32`, `ack_timeout` `10s`, `backoff`, `max_deliveries` `5`, `dead_letter_topic`, `breaker` |
//!
//! # Hot reload
//!
//! `switchboard gateway --config FILE` reloads on `SIGHUP`, when the file's
//! content changes (checked once a second) and on `POST /v1/reload` (an
//! admin write: bearer token when `gateway.admin_token` is set). Routes, services and every
//! per-route policy are swapped at once; requests in flight finish on the
//! config they started with and no connection is closed. An invalid file is
//! rejected with the errors `switchboard check` prints and the old config
//! keeps serving (`switchboard_config_reloads_total{result="error"}`). The
//! `[gateway]` table (listeners, workers, limits, pool, TLS) and `[registry]`
//! need a restart: a change there is logged and ignored. See [`reload`].
//!
//! # Protocols
//!
//! Clients: HTTP/1.1 (the gateway's own server, [`h1_server`]), or with
//! `[gateway.tls]` HTTP/1.1 and HTTP/2 (hyper's server) over TLS. A head the
//! server refuses (malformed, ambiguous framing, over the limits) gets a
//! problem+json 400 or 431 and the connection is closed.
//! Upstreams: HTTP/1.1 (pooled; requests with a buffered body go through the
//! gateway's own client in [`h1`], streamed bodies and upgrades through
//! hyper's) or h2c (multiplexed). gRPC works through
//! an h2c route: `te: trailers` is forwarded and response trailers
//! (`grpc-status`) reach the client. WebSocket (an HTTP/1.1 `Upgrade`) is
//! spliced to one instance after its `101`; spliced connections count in
//! `switchboard_gateway_upgraded_connections` and are cut when the drain
//! deadline passes at shutdown.

pub mod access_log;
pub mod admin;
pub mod admin_auth;
pub mod allowlist;
pub mod body;
pub mod breaker;
pub mod bridge;
pub mod config;
pub mod correlation;
pub mod cors;
pub mod dashboard;
pub mod discovery;
pub mod edge_redis;
pub mod h1;
pub mod h1_server;
pub mod h2c;
pub mod headers;
pub mod idempotency;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod problem;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod retry;
pub mod route;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod versioning;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use tokio::sync::watch;

pub use crate::breaker::{BreakerEvent, OnChange};
pub use crate::config::{Config, ConfigError, ConfigErrors, LoadError};
pub use crate::proxy::Gateway;
pub use crate::upstream::{Instance, InstanceList, InstanceStatus};

use crate::access_log::AccessLog;
use crate::metrics::Metrics;
use crate::pool::PoolConfig;
use crate::proxy::Routing;
use crate::reload::{Discovery, MapDiscovery, Reloader};
use crate::route::RouteTable;

/// Called on breaker transitions with the service name (passive health).
pub type BreakerListener = Arc<dyn Fn(&str, BreakerEvent) + Send + Sync>;

/// Assembles a gateway from a [`Config`] and its instance sources.
pub struct GatewayBuilder {
    config: Config,
    sources: HashMap<String, watch::Receiver<InstanceList>>,
    discovery: Option<Arc<dyn Discovery>>,
    access_dispatch: Option<tracing::Dispatch>,
    on_breaker: Option<BreakerListener>,
    admin_extra: Option<axum::Router>,
    openapi_extra: serde_json::Value,
    passive: Option<proxy::PassiveHealth>,
    extra_metrics: Option<admin::ExtraMetrics>,
    dashboard: dashboard::Sources,
    bridge: Option<bridge::Bridge>,
}

impl std::fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GatewayBuilder {
    /// A builder for `config`; add sources before [`start`](Self::start).
    pub fn new(config: Config) -> Self {
        Self {
            config,
            sources: HashMap::new(),
            discovery: None,
            access_dispatch: None,
            on_breaker: None,
            admin_extra: None,
            openapi_extra: serde_json::Value::Null,
            passive: None,
            extra_metrics: None,
            dashboard: dashboard::Sources::default(),
            bridge: None,
        }
    }

    /// Serves the HTTP event bridge: its admin routes (subscriptions, and
    /// publishing when it is on the admin listener), its OpenAPI paths and its
    /// metrics.
    pub fn bridge(mut self, bridge: bridge::Bridge) -> Self {
        self.bridge = Some(bridge);
        self
    }

    /// Instance sources by service name (a route's service without a source
    /// has no instances and answers 503).
    pub fn sources(mut self, sources: HashMap<String, watch::Receiver<InstanceList>>) -> Self {
        self.sources.extend(sources);
        self
    }

    /// Where services get their instances, now and after a reload (replaces
    /// [`sources`](Self::sources)).
    pub fn discovery(mut self, discovery: Arc<dyn Discovery>) -> Self {
        self.discovery = Some(discovery);
        self
    }

    /// Sends access-log events to this dispatcher instead of JSON on stdout.
    pub fn access_log_dispatch(mut self, dispatch: tracing::Dispatch) -> Self {
        self.access_dispatch = Some(dispatch);
        self
    }

    /// Hears every breaker transition (used to report passive health).
    pub fn on_breaker_change(mut self, f: BreakerListener) -> Self {
        self.on_breaker = Some(f);
        self
    }

    /// Merges `router` (e.g. the registry API) into the admin listener, and
    /// `openapi` (a document with `paths`/`components`) into `/openapi.json`.
    pub fn admin_extra(mut self, router: axum::Router, openapi: serde_json::Value) -> Self {
        self.admin_extra = Some(router);
        self.openapi_extra = openapi;
        self
    }

    /// Receives passive health outcomes `(service, instance id, ok)`: every
    /// failed attempt, and the first success after a failure.
    pub fn passive_health(mut self, f: proxy::PassiveHealth) -> Self {
        self.passive = Some(f);
        self
    }

    /// Appends more series (e.g. the registry's) to `/metrics`.
    pub fn extra_metrics(mut self, f: admin::ExtraMetrics) -> Self {
        self.extra_metrics = Some(f);
        self
    }

    /// Shows `bus` on the dashboard (events per topic, groups, lag, the latest
    /// events) and turns its statistics tap on.
    pub fn dashboard_bus(mut self, bus: switchboard_bus::Bus) -> Self {
        self.dashboard.bus = Some(bus);
        self
    }

    /// Shows the registry's view of every service on the dashboard (versions,
    /// last checks and TTL heartbeats, services no route uses).
    pub fn dashboard_registry(mut self, registry: switchboard_registry::Registry) -> Self {
        self.dashboard.registry = Some(registry);
        self
    }

    /// Binds the listeners and starts serving. Discovery followers and the
    /// admin server run on the calling tokio runtime; the proxy has its own
    /// worker threads.
    pub async fn start(self) -> io::Result<RunningGateway> {
        let cfg = self.config;
        let access = if cfg.gateway.access_log {
            AccessLog::spawn(self.access_dispatch)?
        } else {
            AccessLog::disabled()
        };
        if !cfg.gateway.admin.ip().is_loopback() && cfg.admin_token.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                RunError::InsecureAdmin(cfg.gateway.admin).to_string(),
            ));
        }
        let gw: &'static Gateway = Box::leak(Box::new(Gateway {
            routing: arc_swap::ArcSwap::from_pointee(Box::leak(Box::new(Routing {
                table: RouteTable::default(),
                states: Vec::new(),
            }))),
            metrics: Metrics::new(),
            access,
            pool: PoolConfig {
                idle_timeout: cfg.gateway.pool_idle_timeout,
                max_idle: cfg.gateway.pool_max_idle,
            },
            passive: self.passive,
            tls: cfg.gateway.tls.as_ref().map(tls::acceptor).transpose()?,
            upgrades: tokio_util::task::TaskTracker::new(),
            transitions: dashboard::Transitions::default(),
            publish: self
                .bridge
                .as_ref()
                .filter(|b| b.publish_on().0.proxy())
                .cloned(),
        }));
        let discovery = self
            .discovery
            .unwrap_or_else(|| Arc::new(MapDiscovery(self.sources)));
        let reloader = Reloader::install(gw, &cfg, discovery, self.on_breaker)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;

        let workers = if cfg.gateway.workers == 0 {
            std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
        } else {
            cfg.gateway.workers
        };
        let listeners = server::bind_reuseport(cfg.gateway.listen, workers)?;
        let listen = listeners[0].local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let threads = server::spawn_workers(gw, listeners, &cfg.gateway, &shutdown_rx)?;

        let ready = Arc::new(AtomicBool::new(true));
        let mut openapi_extra = self.openapi_extra;
        let mut extra_metrics = self.extra_metrics;
        if let Some(b) = &self.bridge {
            merge_paths(&mut openapi_extra, &bridge::openapi(b.publish_on().1));
            let (b, before) = (b.clone(), extra_metrics.take());
            extra_metrics = Some(Arc::new(move || {
                let mut text = before.as_ref().map(|f| f()).unwrap_or_default();
                text.push_str(&b.metrics_text());
                text
            }));
        }
        let mut app = admin::router(admin::AdminState {
            gw,
            reloader: Arc::clone(&reloader),
            ready: Arc::clone(&ready),
            openapi_extra: Arc::new(openapi_extra),
            extra_metrics,
        });
        if let Some(extra) = self.admin_extra {
            app = app.merge(extra);
        }
        let mut sources = self.dashboard;
        sources.store = Some(cfg.registry.store.clone());
        sources.token = cfg.admin_token.clone();
        let dashboard = dashboard::Dashboard::new(gw, sources);
        app = app.merge(dashboard.router());
        let sampler = dashboard.spawn_sampler(shutdown_rx.clone());
        if let Some(b) = &self.bridge {
            app = app.merge(b.router());
        }
        app = admin_auth::protect_writes(app, cfg.admin_token.clone());
        let admin_listener = tokio::net::TcpListener::bind(cfg.gateway.admin).await?;
        let admin_addr = admin_listener.local_addr()?;
        let mut admin_shutdown = shutdown_rx.clone();
        let admin_task = tokio::spawn(async move {
            let _ = axum::serve(admin_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = admin_shutdown.wait_for(|v| *v).await;
                })
                .await;
        });
        // Breakers read a clock refreshed every 10 ms instead of the OS clock
        // on every request.
        let coarse_clock =
            switchboard_resilience::clock::CoarseClock::start(std::time::Duration::from_millis(10))
                .ok();
        tracing::info!(%listen, admin = %admin_addr, workers, "gateway listening");
        Ok(RunningGateway {
            gw,
            reloader,
            listen,
            admin: admin_addr,
            ready,
            shutdown: shutdown_tx,
            threads,
            admin_task,
            sampler,
            dashboard,
            _coarse_clock: coarse_clock,
        })
    }
}

/// Adds `extra`'s `paths` to `doc`'s (creating them).
fn merge_paths(doc: &mut serde_json::Value, extra: &serde_json::Value) {
    if !doc.is_object() {
        *doc = serde_json::json!({});
    }
    if !doc["paths"].is_object() {
        doc["paths"] = serde_json::json!({});
    }
    if let (Some(paths), Some(more)) = (
        doc["paths"].as_object_mut(),
        extra.get("paths").and_then(|p| p.as_object()),
    ) {
        for (k, v) in more {
            paths.insert(k.clone(), v.clone());
        }
    }
}

/// A started gateway.
#[derive(Debug)]
pub struct RunningGateway {
    gw: &'static Gateway,
    reloader: Arc<Reloader>,
    listen: SocketAddr,
    admin: SocketAddr,
    ready: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    admin_task: tokio::task::JoinHandle<()>,
    sampler: tokio::task::JoinHandle<()>,
    dashboard: dashboard::Dashboard,
    _coarse_clock: Option<switchboard_resilience::clock::CoarseClock>,
}

impl RunningGateway {
    /// The proxy's bound address.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The admin listener's bound address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The engine (for metrics rendering and inspection).
    pub fn gateway(&self) -> &'static Gateway {
        self.gw
    }

    /// Swaps in new routes, services and policies (see [`reload`]).
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Reloads from `path` on `SIGHUP` and whenever its content changes
    /// (checked once a second), until shutdown.
    pub fn watch_config(&self, path: std::path::PathBuf) {
        let mut stop = self.shutdown.subscribe();
        let r = Arc::clone(&self.reloader);
        tokio::spawn(
            r.watch(path, std::time::Duration::from_secs(1), async move {
                let _ = stop.wait_for(|v| *v).await;
            }),
        );
    }

    /// The dashboard (its sampler runs once a second).
    pub fn dashboard(&self) -> &dashboard::Dashboard {
        &self.dashboard
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain
    /// deadline), and returns once every worker has stopped.
    pub async fn shutdown(self) {
        self.ready.store(false, Relaxed);
        let _ = self.shutdown.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        let _ = self.admin_task.await;
        let _ = self.sampler.await;
    }
}

/// Why [`run`] could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The registry store could not be opened or a static instance registered.
    #[error("registry: {0}")]
    Registry(#[from] switchboard_registry::RegistryError),
    /// A listener could not be bound.
    #[error("cannot listen: {0}")]
    Io(#[from] io::Error),
    /// The admin listener (which serves admin and registry writes) is off loopback without a token.
    #[error(
        "refusing to serve the admin API on non-loopback {0} without a token (set `gateway.admin_token` or `registry.token`)"
    )]
    InsecureAdmin(SocketAddr),
    /// The bridge's bus could not be opened.
    #[error("bridge bus: {0}")]
    Bus(#[from] switchboard_bus::BusError),
    /// A configured push subscription could not be started.
    #[error("bridge: {0}")]
    Subscribe(#[from] bridge::SubscribeError),
}

/// A gateway started together with its registry by [`start`].
#[derive(Debug)]
pub struct WithRegistry {
    /// The proxy and admin listeners.
    pub gateway: RunningGateway,
    /// The registry (embedded, or a view of the shared Redis store).
    pub registry: switchboard_registry::Registry,
    /// The HTTP event bridge, when `bridge.bus` is set.
    pub bridge: Option<bridge::Bridge>,
}

impl WithRegistry {
    /// Drains the gateway, stops the bridge's subscriptions (settling
    /// in-flight deliveries), then stops the registry's checks.
    pub async fn shutdown(self) {
        self.gateway.shutdown().await;
        if let Some(b) = &self.bridge {
            b.shutdown().await;
        }
        self.registry.shutdown().await;
    }
}

/// Starts the gateway with its registry (embedded, or shared through the
/// configured Redis store).
///
/// The static `[[services]]` are registered in the registry with their health
/// checks; the registry API is served on the admin listener (and merged into
/// `/openapi.json` and `/metrics`); failed attempts are reported to the
/// registry as passive health.
pub async fn start(config: Config) -> Result<WithRegistry, RunError> {
    use switchboard_registry::http::{self as reg_http, HttpOptions};
    use switchboard_registry::{PassiveOutcome, Registry, RegistryOptions};

    let token = config.admin_token.clone();
    if !config.gateway.admin.ip().is_loopback() && token.is_none() {
        return Err(RunError::InsecureAdmin(config.gateway.admin));
    }
    // The registry refuses registrations outside `gateway.upstream_allow`
    // (403 naming the address); discovery filters again (shared stores).
    let options = RegistryOptions::default().network(config.upstream_policy.to_registry());
    let registry = Registry::open(&config.registry.store, options).await?;
    discovery::register_static(&registry, &config).await?;
    let mut opts = HttpOptions::default();
    if let Some(t) = token {
        opts = opts.token(t);
    }
    let reporter = registry.clone();
    let metrics_registry = registry.clone();
    let bridge = match &config.bridge.bus {
        Some(url) => {
            let bus = switchboard_bus::Bus::open(url).await?;
            let mut o =
                bridge::BridgeOptions::new(bus, bridge::registry_resolver(registry.clone()));
            o.token = config.admin_token.clone();
            o.publish = config.bridge.publish;
            o.path = config.bridge.path.clone();
            o.max_body_bytes = config.bridge.max_body_bytes;
            o.connect_timeout = config.gateway.connect_timeout;
            o.pool = pool::PoolConfig {
                idle_timeout: config.gateway.pool_idle_timeout,
                max_idle: config.gateway.pool_max_idle,
            };
            o.subscriptions = config.subscriptions.clone();
            o.upstream_policy = config.upstream_policy.clone();
            Some(bridge::Bridge::start(o).await?)
        }
        None => None,
    };
    let mut builder = GatewayBuilder::new(config);
    if let Some(b) = &bridge {
        builder = builder.bridge(b.clone());
    }
    let gateway = builder
        .discovery(Arc::new(discovery::RegistryDiscovery::new(
            registry.clone(),
        )))
        .dashboard_registry(registry.clone())
        .admin_extra(
            reg_http::router(registry.clone(), opts),
            reg_http::openapi(),
        )
        .passive_health(Arc::new(move |service: &str, id: &str, ok: bool| {
            let outcome = if ok {
                PassiveOutcome::Success
            } else {
                PassiveOutcome::Failure
            };
            reporter.report(service, id, outcome);
        }))
        .extra_metrics(Arc::new(move || reg_http::metrics_text(&metrics_registry)))
        .start()
        .await?;
    Ok(WithRegistry {
        gateway,
        registry,
        bridge,
    })
}

/// [`start`], then serve until `shutdown` resolves; then stop accepting, drain
/// in-flight requests (up to `gateway.drain_timeout`) and return.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let running = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}

/// [`run`] for a config read from `path`, reloaded on `SIGHUP` and whenever
/// the file changes (see [`reload`]); `POST /v1/reload` on the admin listener
/// reloads it too.
pub async fn run_file(
    path: &std::path::Path,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let running = start(config).await?;
    running.gateway.watch_config(path.to_owned());
    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}
