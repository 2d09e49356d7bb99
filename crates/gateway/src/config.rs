//! The gateway's TOML configuration: raw serde form, validation with
//! file/line/column/key errors, and the resolved runtime form.
//!
//! Parsing is two steps (as in ripgrep's lowargs/hiargs): [`RawConfig`] mirrors
//! the file (every table `deny_unknown_fields`), then [`RawConfig::resolve`]
//! checks cross-references (routes to unknown services, duplicate prefixes,
//! impossible values) and produces [`Config`], which the engine uses.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// One configuration error, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the error is in.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key path, e.g. `routes[1].timeout`.
    pub key: String,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: key `{}`: {}",
            self.file.display(),
            self.line,
            self.column,
            self.key,
            self.message
        )
    }
}

/// Every error found in a configuration file (at least one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reading a config file failed: I/O or content.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
}

// ---------------------------------------------------------------------------
// Raw form: mirrors the file.

/// The file as written. Every table rejects unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[gateway]`: listeners and edge limits.
    #[serde(default)]
    pub gateway: RawGateway,
    /// `[registry]`: where instances are stored.
    #[serde(default)]
    pub registry: RawRegistry,
    /// `[[services]]`: static instances.
    #[serde(default)]
    pub services: Vec<RawService>,
    /// `[[routes]]`: the route table.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// `[bridge]`: the HTTP event bridge.
    #[serde(default)]
    pub bridge: crate::bridge::config::RawBridge,
    /// `[[subscriptions]]`: the bridge's push subscriptions.
    #[serde(default)]
    pub subscriptions: Vec<crate::bridge::config::SubscriptionSpec>,
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGateway {
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// Address of the admin listener (metrics, registry API).
    pub admin: SocketAddr,
    /// Worker threads for the proxy; 0 means one per core.
    pub workers: usize,
    /// A client must send its whole header block within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest accepted request header block, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Most headers accepted in one request (431 beyond).
    pub max_headers: usize,
    /// On shutdown, how long in-flight requests get to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// After a response that left request bytes unread, the longest the
    /// connection lingers, reading and discarding them before it closes
    /// (RFC 9112 §9.6; nginx's `lingering_time`).
    #[serde(with = "humantime_serde")]
    pub lingering_time: Duration,
    /// While lingering, the longest wait for the client's next bytes; `0s`
    /// closes right after the response (nginx's `lingering_timeout`).
    #[serde(with = "humantime_serde")]
    pub lingering_timeout: Duration,
    /// Emit one access-log line per request.
    pub access_log: bool,
    /// Default upstream connect timeout for routes.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle pooled upstream connections are closed after this long.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Most idle pooled connections kept per instance and worker.
    pub pool_max_idle: usize,
    /// Bearer token for admin writes (defaults to `registry.token`).
    pub admin_token: Option<String>,
    /// Networks the gateway may proxy to (CIDR or bare addresses).
    pub upstream_allow: Vec<String>,
    /// Networks it never proxies to, even inside `upstream_allow`.
    pub upstream_deny: Vec<String>,
    /// `[gateway.tls]`: terminate TLS on `listen` (HTTP/1.1 and HTTP/2 by ALPN).
    pub tls: Option<RawTls>,
}

/// `[gateway.tls]`: PEM files, relative to the config file's directory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Certificate chain (leaf first), PEM.
    pub cert: Spanned<PathBuf>,
    /// Private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub key: Spanned<PathBuf>,
}

/// How the gateway talks to a service's instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1, a pool of connections per instance (and WebSocket upgrades).
    #[default]
    Http1,
    /// HTTP/2 over cleartext (prior knowledge): one multiplexed connection
    /// per instance and worker; needed for gRPC.
    H2c,
}

impl Default for RawGateway {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9900)),
            workers: 0,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            drain_timeout: Duration::from_secs(30),
            lingering_time: crate::h1_server::linger::Linger::DEFAULT.time,
            lingering_timeout: crate::h1_server::linger::Linger::DEFAULT.timeout,
            access_log: true,
            connect_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle: 64,
            admin_token: None,
            upstream_allow: crate::allowlist::DEFAULT_ALLOW
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            upstream_deny: crate::allowlist::DEFAULT_DENY
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            tls: None,
        }
    }
}

/// `[registry]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRegistry {
    /// Store URL: `memory://` or `redis://HOST:PORT`.
    pub store: String,
    /// Bearer token required for registry writes.
    pub token: Option<String>,
}

impl Default for RawRegistry {
    fn default() -> Self {
        Self {
            store: "memory://".into(),
            token: None,
        }
    }
}

/// `[[services]]`: a service with static instances.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// Service name that routes refer to.
    pub name: Spanned<String>,
    /// `host:port` of each instance.
    #[serde(default)]
    pub instances: Vec<Spanned<String>>,
    /// Active health check; without one, static instances are passing.
    pub health: Option<RawHealth>,
    /// `http1` (default) or `h2c`; a route may override it.
    #[serde(default)]
    pub protocol: Protocol,
}

/// `health = { ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    /// Path probed with GET; a 2xx is healthy.
    pub path: String,
    /// Time between probes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Time a probe may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that make an instance passing.
    pub healthy_threshold: u32,
    /// Consecutive failures that make an instance critical.
    pub unhealthy_threshold: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            path: "/health".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// `[[routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Path prefix, matched on segment boundaries.
    pub prefix: Spanned<String>,
    /// Service the route sends to.
    pub service: Spanned<String>,
    /// Only these methods match (all when absent).
    #[serde(default)]
    pub methods: Option<Spanned<Vec<String>>>,
    /// Only this Host (without port) matches (any when absent).
    #[serde(default)]
    pub host: Option<String>,
    /// Remove the prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the prefix with this path before forwarding.
    #[serde(default)]
    pub rewrite: Option<Spanned<String>>,
    /// Total time for the request, all attempts included.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Time for one attempt (defaults to `timeout`).
    #[serde(default, with = "humantime_serde")]
    pub attempt_timeout: Option<Duration>,
    /// Upstream connect timeout (defaults to `gateway.connect_timeout`).
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Retry policy.
    #[serde(default)]
    pub retry: RawRetry,
    /// Per-instance circuit breaker.
    #[serde(default)]
    pub breaker: RawBreaker,
    /// `p2c` (default) or `round_robin`.
    #[serde(default)]
    pub balance: Balance,
    /// Largest request body accepted (413 beyond).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// Bodies up to this size are buffered so a retry can replay them.
    #[serde(default = "default_retry_buffer")]
    pub retry_buffer_bytes: u64,
    /// Instance selection by semver major ([`crate::versioning`]).
    #[serde(default)]
    pub version: Option<Spanned<crate::versioning::RawVersion>>,
    /// Deprecation headers ([`crate::versioning`]).
    #[serde(default)]
    pub deprecated: Option<Spanned<crate::versioning::RawDeprecated>>,
    /// Rate limit ([`crate::ratelimit`]).
    #[serde(default)]
    pub rate_limit: Option<Spanned<crate::ratelimit::RawRateLimit>>,
    /// Idempotency keys ([`crate::idempotency`]).
    #[serde(default)]
    pub idempotency: Option<Spanned<crate::idempotency::RawIdempotency>>,
    /// CORS ([`crate::cors`]).
    #[serde(default)]
    pub cors: Option<Spanned<crate::cors::RawCors>>,
    /// `http1` or `h2c` upstream (defaults to the service's `protocol`).
    #[serde(default)]
    pub protocol: Option<Protocol>,
}

fn default_max_body() -> u64 {
    10 * 1024 * 1024
}

fn default_retry_buffer() -> u64 {
    64 * 1024
}

/// `retry = { ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    /// Most attempts per request, the first included (1 disables retries).
    pub attempts: u32,
    /// Retries may add at most this percentage of requests.
    pub budget_percent: u32,
    /// Retries always allowed per second on top of the percentage.
    pub min_per_second: u32,
    /// First backoff (jittered, doubling).
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Backoff ceiling.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            attempts: 3,
            budget_percent: 20,
            min_per_second: 10,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
        }
    }
}

/// `breaker = { ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBreaker {
    /// Failure rate in `(0, 1]` over the window that opens the breaker.
    pub failure_rate: f64,
    /// Calls needed in the window before the rate counts.
    pub min_calls: u32,
    /// Sliding window the rate is computed over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long an open breaker ejects its instance before a probe.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Default for RawBreaker {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        }
    }
}

/// How a route picks among a service's instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Power of two choices on outstanding requests.
    #[default]
    P2c,
    /// Round robin.
    RoundRobin,
}

// ---------------------------------------------------------------------------
// Resolved form.

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listener and edge settings.
    pub gateway: GatewaySettings,
    /// Registry store.
    pub registry: RegistrySettings,
    /// Static services.
    pub services: Vec<ServiceConfig>,
    /// Routes, in file order.
    pub routes: Vec<RouteConfig>,
    /// Networks upstream instances may be in (`gateway.upstream_allow` / `upstream_deny`).
    pub upstream_policy: crate::allowlist::UpstreamPolicy,
    /// Token for admin writes: `gateway.admin_token`, else `registry.token`.
    pub admin_token: Option<String>,
    /// The HTTP event bridge (off unless `bridge.bus` is set).
    pub bridge: crate::bridge::config::RawBridge,
    /// The bridge's push subscriptions.
    pub subscriptions: Vec<crate::bridge::config::Subscription>,
}

/// Resolved `[gateway]` (same fields as [`RawGateway`], workers resolved).
pub type GatewaySettings = RawGateway;

/// Resolved `[registry]`.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Store URL.
    pub store: String,
    /// Write token.
    pub token: Option<String>,
}

/// A static service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Name.
    pub name: String,
    /// Instance addresses.
    pub instances: Vec<SocketAddr>,
    /// Active health check.
    pub health: Option<RawHealth>,
    /// Upstream protocol.
    pub protocol: Protocol,
}

/// A resolved route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Prefix (no trailing slash unless it is `/`).
    pub prefix: String,
    /// Service name.
    pub service: String,
    /// Allowed methods, `None` for all.
    pub methods: Option<Vec<http::Method>>,
    /// Required host (lowercase, no port).
    pub host: Option<String>,
    /// Replacement for the prefix: `Some("")` strips it.
    pub rewrite: Option<String>,
    /// Total timeout.
    pub timeout: Duration,
    /// Per-attempt timeout.
    pub attempt_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Retry policy.
    pub retry: RawRetry,
    /// Breaker policy.
    pub breaker: RawBreaker,
    /// Balancer.
    pub balance: Balance,
    /// Body limit.
    pub max_body_bytes: u64,
    /// Replay buffer limit.
    pub retry_buffer_bytes: u64,
    /// Upstream protocol (the route's, else the service's).
    pub protocol: Protocol,
    /// Edge policies (versioning, rate limit, idempotency, CORS).
    pub policy: PolicyConfig,
}

/// A route's edge policies, resolved; all `None` costs the request path nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Version selection.
    pub version: Option<crate::versioning::VersionSelect>,
    /// Deprecation headers.
    pub deprecated: Option<crate::versioning::Deprecation>,
    /// Rate limit.
    pub rate_limit: Option<crate::ratelimit::RateLimitConfig>,
    /// Idempotency keys.
    pub idempotency: Option<crate::idempotency::IdempotencyConfig>,
    /// CORS.
    pub cors: Option<crate::cors::Cors>,
}

/// Default total route timeout.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(30);

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            file: path.to_owned(),
            source,
        })?;
        Ok(Config::parse(path, &text)?)
    }

    /// Parses and validates `text`; `file` only names the source in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = first_line(e.message());
            ConfigErrors(vec![locate(file, text, span, None, message)])
        })?;
        raw.resolve(file, text)
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_owned()
}

impl RawConfig {
    /// Checks cross-references and values; `file` and `text` locate errors.
    pub fn resolve(self, file: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let mut err = |span: Range<usize>, key: String, msg: String| {
            errors.push(locate(file, text, span, Some(key), msg));
        };
        let mut g = self.gateway;
        if let Some(tls) = &mut g.tls {
            // Relative paths are relative to the config file.
            let dir = file.parent().unwrap_or(Path::new(""));
            for (name, p) in [("cert", &mut tls.cert), ("key", &mut tls.key)] {
                let joined = dir.join(p.get_ref());
                *p.get_mut() = joined;
                if let Err(e) = crate::tls::check_file(name, p.get_ref()) {
                    err(p.span(), format!("gateway.tls.{name}"), e);
                }
            }
        }
        if g.max_header_bytes < 1024 {
            err(
                0..0,
                "gateway.max_header_bytes".into(),
                "must be at least 1024".into(),
            );
        }
        if g.header_read_timeout < Duration::from_millis(10) {
            // Zero would close every connection before its first byte.
            err(
                0..0,
                "gateway.header_read_timeout".into(),
                "must be at least 10ms".into(),
            );
        }
        if g.max_headers == 0 || g.max_headers > crate::h1_server::MAX_HEADERS_LIMIT {
            err(
                0..0,
                "gateway.max_headers".into(),
                format!(
                    "must be between 1 and {}",
                    crate::h1_server::MAX_HEADERS_LIMIT
                ),
            );
        }
        if !(self.registry.store.starts_with("memory://")
            || self.registry.store.starts_with("redis://"))
        {
            err(
                0..0,
                "registry.store".into(),
                format!(
                    "unsupported store `{}` (use memory:// or redis://HOST:PORT)",
                    self.registry.store
                ),
            );
        }

        // Networks: errors point at the key's first occurrence in the file.
        let mut nets = |key: &str, list: &[String]| -> Vec<ipnet::IpNet> {
            let span = key_span(text, key);
            let mut out = Vec::new();
            for (j, n) in list.iter().enumerate() {
                match crate::allowlist::parse_net(n) {
                    Ok(x) => out.push(x),
                    Err(m) => err(span.clone(), format!("gateway.{key}[{j}]"), m),
                }
            }
            out
        };
        let upstream_policy = crate::allowlist::UpstreamPolicy::new(
            nets("upstream_allow", &g.upstream_allow),
            nets("upstream_deny", &g.upstream_deny),
        );
        if let (Some(a), Some(r)) = (&g.admin_token, &self.registry.token)
            && a != r
        {
            err(
                key_span(text, "admin_token"),
                "gateway.admin_token".into(),
                "differs from `registry.token`; the admin listener serves both APIs, set one token"
                    .into(),
            );
        }
        if g.admin_token.as_deref().is_some_and(str::is_empty) {
            err(
                key_span(text, "admin_token"),
                "gateway.admin_token".into(),
                "must not be empty (remove the key to use `registry.token`)".into(),
            );
        }

        let mut services = Vec::new();
        for (i, s) in self.services.into_iter().enumerate() {
            let name = s.name.get_ref().clone();
            if switchboard_registry::validate::service_name(&name).is_err() {
                err(
                    s.name.span(),
                    format!("services[{i}].name"),
                    "must match [a-z0-9-]{1,63} (the registry's service names)".into(),
                );
            }
            if services.iter().any(|x: &ServiceConfig| x.name == name) {
                err(
                    s.name.span(),
                    format!("services[{i}].name"),
                    format!("duplicate service `{name}`"),
                );
            }
            let mut instances = Vec::new();
            for (j, inst) in s.instances.iter().enumerate() {
                match inst.get_ref().parse::<SocketAddr>() {
                    Ok(a) => {
                        if let Some(why) = upstream_policy.refusal(a.ip()) {
                            err(inst.span(), format!("services[{i}].instances[{j}]"), why);
                        }
                        instances.push(a);
                    }
                    Err(_) => err(
                        inst.span(),
                        format!("services[{i}].instances[{j}]"),
                        format!("`{}` is not an IP:PORT address", inst.get_ref()),
                    ),
                }
            }
            if let Some(h) = &s.health {
                if !h.path.starts_with('/') {
                    err(
                        0..0,
                        format!("services[{i}].health.path"),
                        "must start with `/`".into(),
                    );
                }
                if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
                    err(
                        0..0,
                        format!("services[{i}].health"),
                        "thresholds must be at least 1".into(),
                    );
                }
            }
            services.push(ServiceConfig {
                name,
                instances,
                health: s.health,
                protocol: s.protocol,
            });
        }

        let mut routes: Vec<RouteConfig> = Vec::new();
        let mut route_spans: Vec<Range<usize>> = Vec::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            let mut prefix = r.prefix.get_ref().clone();
            if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
                err(
                    r.prefix.span(),
                    format!("routes[{i}].prefix"),
                    "must be a path starting with `/`".into(),
                );
            }
            while prefix.len() > 1 && prefix.ends_with('/') {
                prefix.pop();
            }
            let service = r.service.get_ref().clone();
            if !services.iter().any(|s| s.name == service) {
                err(
                    r.service.span(),
                    format!("routes[{i}].service"),
                    format!(
                        "unknown service `{service}` (declare it in [[services]], \
                         with `instances = []` if all its instances register dynamically)"
                    ),
                );
            }
            let methods = match &r.methods {
                None => None,
                Some(m) => {
                    let mut out = Vec::new();
                    for name in m.get_ref() {
                        match http::Method::from_bytes(name.to_ascii_uppercase().as_bytes()) {
                            Ok(x) => out.push(x),
                            Err(_) => err(
                                m.span(),
                                format!("routes[{i}].methods"),
                                format!("`{name}` is not an HTTP method"),
                            ),
                        }
                    }
                    if out.is_empty() {
                        err(
                            m.span(),
                            format!("routes[{i}].methods"),
                            "must not be empty".into(),
                        );
                    }
                    Some(out)
                }
            };
            let host = r.host.map(|h| h.to_ascii_lowercase());
            let rewrite = match (&r.rewrite, r.strip_prefix) {
                (Some(rw), true) => {
                    err(
                        rw.span(),
                        format!("routes[{i}].rewrite"),
                        "set either `strip_prefix` or `rewrite`, not both".into(),
                    );
                    None
                }
                (Some(rw), false) => {
                    let mut v = rw.get_ref().clone();
                    if !v.starts_with('/') {
                        err(
                            rw.span(),
                            format!("routes[{i}].rewrite"),
                            "must be a path starting with `/`".into(),
                        );
                    }
                    while v.ends_with('/') {
                        v.pop();
                    }
                    Some(v)
                }
                (None, true) => Some(String::new()),
                (None, false) => None,
            };
            let timeout = r.timeout.unwrap_or(DEFAULT_ROUTE_TIMEOUT);
            let attempt_timeout = r.attempt_timeout.unwrap_or(timeout).min(timeout);
            if timeout.is_zero() {
                err(
                    r.prefix.span(),
                    format!("routes[{i}].timeout"),
                    "must be positive".into(),
                );
            }
            if r.retry.attempts == 0 {
                err(
                    r.prefix.span(),
                    format!("routes[{i}].retry.attempts"),
                    "must be at least 1".into(),
                );
            }
            if !(r.breaker.failure_rate > 0.0 && r.breaker.failure_rate <= 1.0) {
                err(
                    r.prefix.span(),
                    format!("routes[{i}].breaker.failure_rate"),
                    "must be in (0, 1]".into(),
                );
            }
            if let Err(e) = crate::breaker::breaker_config(&r.breaker).validate() {
                err(
                    r.prefix.span(),
                    format!("routes[{i}].breaker"),
                    e.to_string(),
                );
            }
            let mut policy = PolicyConfig::default();
            {
                let mut bad = |span: Range<usize>, (k, m): (String, String)| {
                    err(span, format!("routes[{i}].{k}"), m);
                };
                if let Some(v) = &r.version {
                    match v.get_ref().resolve() {
                        Ok(x) => policy.version = Some(x),
                        Err(e) => bad(v.span(), e),
                    }
                }
                if let Some(v) = &r.deprecated {
                    match v.get_ref().resolve() {
                        Ok(x) => policy.deprecated = Some(x),
                        Err(e) => bad(v.span(), e),
                    }
                }
                if let Some(v) = &r.rate_limit {
                    match v.get_ref().resolve(&prefix) {
                        Ok(x) => policy.rate_limit = Some(x),
                        Err(e) => bad(v.span(), e),
                    }
                }
                if let Some(v) = &r.idempotency {
                    match v.get_ref().resolve(&prefix, timeout) {
                        Ok(x) => policy.idempotency = Some(x),
                        Err(e) => bad(v.span(), e),
                    }
                }
                if let Some(v) = &r.cors {
                    match v.get_ref().resolve() {
                        Ok(x) => policy.cors = Some(x),
                        Err(e) => bad(v.span(), e),
                    }
                }
            }
            let cfg = RouteConfig {
                prefix,
                service,
                methods,
                host,
                rewrite,
                timeout,
                attempt_timeout,
                connect_timeout: r.connect_timeout.unwrap_or(g.connect_timeout),
                retry: r.retry,
                breaker: r.breaker,
                balance: r.balance,
                max_body_bytes: r.max_body_bytes,
                retry_buffer_bytes: r.retry_buffer_bytes.min(r.max_body_bytes),
                policy,
                protocol: r.protocol.unwrap_or_else(|| {
                    services
                        .iter()
                        .find(|s| s.name == r.service.get_ref().as_str())
                        .map_or_else(Protocol::default, |s| s.protocol)
                }),
            };
            if let Some(j) = routes.iter().position(|o| overlaps(o, &cfg)) {
                err(
                    r.prefix.span(),
                    format!("routes[{i}].prefix"),
                    format!(
                        "duplicate prefix `{}` (already used by routes[{j}] at line {})",
                        cfg.prefix,
                        line_col(text, route_spans[j].start).0
                    ),
                );
            }
            route_spans.push(r.prefix.span());
            routes.push(cfg);
        }

        let subscriptions =
            crate::bridge::config::resolve_all(&self.bridge, &self.subscriptions, &mut err);

        if errors.is_empty() {
            let admin_token = g
                .admin_token
                .clone()
                .or_else(|| self.registry.token.clone())
                .filter(|t| !t.is_empty());
            Ok(Config {
                gateway: g,
                registry: RegistrySettings {
                    store: self.registry.store,
                    token: self.registry.token,
                },
                services,
                routes,
                upstream_policy,
                admin_token,
                bridge: self.bridge,
                subscriptions,
            })
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// Two routes conflict when the same request could match both equally.
fn overlaps(a: &RouteConfig, b: &RouteConfig) -> bool {
    a.prefix == b.prefix
        && a.host == b.host
        && match (&a.methods, &b.methods) {
            (Some(x), Some(y)) => x.iter().any(|m| y.contains(m)),
            _ => true,
        }
}

/// The span of the first `key =` in `text` (for keys without a serde span).
fn key_span(text: &str, key: &str) -> Range<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find(key) {
        let at = from + i;
        let before_ok =
            at == 0 || text[..at].ends_with(|c: char| c.is_whitespace() || c == '{' || c == ',');
        let after = text[at + key.len()..].trim_start();
        if before_ok && after.starts_with('=') {
            return at..at + key.len();
        }
        from = at + key.len();
    }
    0..0
}

/// 1-based line and column of byte offset `pos`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Builds an error at `span`; when `key` is unknown it is derived from the text.
fn locate(
    file: &Path,
    text: &str,
    span: Range<usize>,
    key: Option<String>,
    message: String,
) -> ConfigError {
    let (line, column) = line_col(text, span.start);
    let key = key.unwrap_or_else(|| key_at(text, span));
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        key,
        message,
    }
}

/// Best-effort dotted key for a span: the enclosing table header plus the
/// `key =` names before the span on its line (inline tables nest).
fn key_at(text: &str, span: Range<usize>) -> String {
    let start = span.start.min(text.len());
    let end = span.end.clamp(start, text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_prefix = &text[line_start..start];
    let spanned = text.get(start..end).unwrap_or("");

    // Table path from the closest header above, with array indices.
    let mut table = String::new();
    let mut counts: Vec<(String, usize)> = Vec::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|x| x.split("]]").next()) {
            let name = name.trim().to_owned();
            let n = match counts.iter_mut().find(|(k, _)| *k == name) {
                Some((_, c)) => {
                    *c += 1;
                    *c
                }
                None => {
                    counts.push((name.clone(), 0));
                    0
                }
            };
            table = format!("{name}[{n}]");
        } else if let Some(name) = l.strip_prefix('[').and_then(|x| x.split(']').next()) {
            table = name.trim().to_owned();
        }
    }
    // Keys on this line before the span, nested by inline-table braces.
    let mut parts: Vec<String> = Vec::new();
    let mut depth = 0usize;
    let mut token_start = 0usize;
    let mut in_str = false;
    for (i, ch) in line_prefix.char_indices() {
        match ch {
            '"' => in_str = !in_str,
            _ if in_str => {}
            '{' => {
                depth += 1;
                token_start = i + 1;
            }
            '}' => {
                depth = depth.saturating_sub(1);
                token_start = i + 1;
            }
            ',' => {
                // The previous key at this depth is complete.
                parts.truncate(depth);
                token_start = i + 1;
            }
            '=' => {
                let k = line_prefix[token_start..i].trim().trim_matches('"');
                parts.truncate(depth);
                if !k.is_empty() {
                    parts.push(k.to_owned());
                }
                token_start = i + 1;
            }
            _ => {}
        }
    }
    parts.truncate(depth + 1);
    // A span at a key position is the key itself (an unknown field).
    if parts.len() <= depth {
        let k = spanned
            .split(['=', ' ', '\n'])
            .next()
            .unwrap_or("")
            .trim_matches(['[', ']', '"']);
        if !k.is_empty() && !spanned.starts_with('[') && !spanned.starts_with('"') {
            parts.push(k.to_owned());
        }
    }
    let mut key = table;
    for p in parts {
        if !key.is_empty() {
            key.push('.');
        }
        key.push_str(&p);
    }
    if key.is_empty() {
        "(top level)".into()
    } else {
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
listen = "127.0.0.1:3000"
admin  = "127.0.0.1:9900"

[registry]
store = "memory://"

[[services]]
name = "user-service"
instances = ["127.0.0.1:4001", "127.0.0.1:4002"]
health = { path = "/health", interval = "2s", timeout = "1s", healthy_threshold = 2, unhealthy_threshold = 3 }

[[routes]]
prefix = "/users"
service = "user-service"
strip_prefix = true
timeout = "5s"
retry = { attempts = 3, budget_percent = 20 }
breaker = { failure_rate = 0.5, min_calls = 20, window = "10s", open_for = "5s" }
"#;

    fn errs(text: &str) -> Vec<ConfigError> {
        Config::parse(Path::new("gw.toml"), text).unwrap_err().0
    }

    #[test]
    fn design_example_parses() {
        let c = Config::parse(Path::new("gw.toml"), GOOD).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].rewrite.as_deref(), Some(""));
        assert_eq!(c.routes[0].timeout, Duration::from_secs(5));
        assert_eq!(c.services[0].instances.len(), 2);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = GOOD.replace("strip_prefix = true", "strip_prefix = true\nbogus = 1");
        let e = &errs(&text)[0];
        assert_eq!(e.key, "routes[0].bogus");
        assert_eq!(e.line, 18);
        assert_eq!(e.column, 1);
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(
            e.to_string()
                .starts_with("gw.toml:18:1: key `routes[0].bogus`"),
            "{e}"
        );
    }

    #[test]
    fn server_limits_that_cannot_work_are_errors() {
        for (table, key, want) in [
            (
                "header_read_timeout = \"0s\"",
                "gateway.header_read_timeout",
                "at least 10ms",
            ),
            (
                "max_headers = 300",
                "gateway.max_headers",
                "between 1 and 256",
            ),
            (
                "max_headers = 0",
                "gateway.max_headers",
                "between 1 and 256",
            ),
        ] {
            let text = format!("[gateway]\n{table}\n{}", GOOD.replace("[gateway]\n", ""));
            let e = errs(&text);
            assert!(
                e.iter().any(|e| e.key == key && e.message.contains(want)),
                "{table}: {e:?}"
            );
        }
    }

    #[test]
    fn bad_duration_names_key() {
        let e = &errs(&GOOD.replace("timeout = \"5s\"", "timeout = \"5 parsecs\""))[0];
        assert_eq!(e.key, "routes[0].timeout");
        assert_eq!(e.line, 18);
    }

    #[test]
    fn bad_nested_duration_names_inline_key() {
        let e = &errs(&GOOD.replace("window = \"10s\"", "window = \"ten\""))[0];
        assert_eq!(e.key, "routes[0].breaker.window", "{e}");
        assert_eq!(e.line, 20);
    }

    #[test]
    fn unknown_service_and_duplicate_prefix() {
        let text = format!("{GOOD}\n[[routes]]\nprefix = \"/users/\"\nservice = \"nope\"\n");
        let e = errs(&text);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].key, "routes[1].service");
        assert!(e[0].message.contains("unknown service `nope`"));
        assert_eq!(e[0].line, 24);
        assert_eq!(e[1].key, "routes[1].prefix");
        assert!(e[1].message.contains("duplicate prefix"));
        assert_eq!(e[1].line, 23);
    }

    #[test]
    fn methods_disambiguate_prefixes() {
        let text = format!(
            "{GOOD}\n[[routes]]\nprefix = \"/users\"\nservice = \"user-service\"\nmethods = [\"POST\"]\n"
        );
        let e = errs(&text);
        assert!(e[0].message.contains("duplicate prefix"));
        let text = GOOD.replace(
            "strip_prefix = true",
            "strip_prefix = true\nmethods = [\"GET\"]",
        ) + "\n[[routes]]\nprefix = \"/users\"\nservice = \"user-service\"\nmethods = [\"POST\"]\n";
        assert!(Config::parse(Path::new("gw.toml"), &text).is_ok());
    }

    #[test]
    fn bad_address_and_bad_types() {
        let e = &errs(&GOOD.replace("127.0.0.1:4002", "localhost"))[0];
        assert_eq!(e.key, "services[0].instances[1]");
        let e = &errs(&GOOD.replace("strip_prefix = true", "strip_prefix = \"yes\""))[0];
        assert_eq!(e.key, "routes[0].strip_prefix");
        let e = &errs("[gateway]\nlisten = \"nowhere\"\n")[0];
        assert_eq!(e.key, "gateway.listen");
        assert_eq!((e.line, e.column), (2, 10));
    }

    #[test]
    fn empty_file_is_valid() {
        let c = Config::parse(Path::new("x"), "").unwrap();
        assert!(c.routes.is_empty());
        assert!(c.gateway.access_log);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,300}") {
            let _ = Config::parse(Path::new("p.toml"), &s);
        }

        #[test]
        fn mutated_valid_config_never_panics(pos in 0usize..700, junk in "[\\[\\]{}=\",a-z0-9 \n]{0,12}") {
            let mut text = GOOD.to_owned();
            let mut p = pos.min(text.len());
            while !text.is_char_boundary(p) { p -= 1; }
            text.insert_str(p, &junk);
            if let Err(e) = Config::parse(Path::new("p.toml"), &text) {
                for x in e.0 {
                    proptest::prop_assert!(x.line >= 1 && x.column >= 1);
                    proptest::prop_assert!(!x.key.is_empty());
                }
            }
        }
    }
}
