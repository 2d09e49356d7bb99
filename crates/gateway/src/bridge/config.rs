//! `[bridge]` and `[[subscriptions]]`: the raw forms (TOML in the gateway
//! config, JSON on `PUT /v1/subscriptions/{name}`) and their validation.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard_bus::RetryBackoff;

use crate::config::RawBreaker;

/// The least body size the bridge may be configured to accept: CloudEvents
/// requires intermediaries to forward events of at least 64 KiB.
pub const MIN_BODY_BYTES: u64 = 64 * 1024;

/// Where `POST /v1/events` is served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishOn {
    /// On the admin listener (default).
    #[default]
    Admin,
    /// On the proxy listener, before routing.
    Proxy,
    /// On both listeners.
    Both,
    /// Nowhere: the bridge only pushes.
    Off,
}

impl PublishOn {
    /// Whether the admin listener serves publishing.
    pub fn admin(self) -> bool {
        matches!(self, PublishOn::Admin | PublishOn::Both)
    }

    /// Whether the proxy listener serves publishing.
    pub fn proxy(self) -> bool {
        matches!(self, PublishOn::Proxy | PublishOn::Both)
    }
}

/// `[bridge]`: the HTTP event bridge (off unless `bus` is set).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBridge {
    /// Bus URL (`memory://`, `redis://HOST:PORT`, `nats://HOST:PORT`); none turns the bridge off.
    pub bus: Option<String>,
    /// Where `POST /v1/events` is served: `admin`, `proxy`, `both` or `off`.
    pub publish: PublishOn,
    /// The path publishing is served on (on the proxy listener it takes
    /// precedence over the routes).
    pub path: String,
    /// Largest publish request body (413 beyond); at least 65536.
    pub max_body_bytes: u64,
}

impl Default for RawBridge {
    fn default() -> Self {
        Self {
            bus: None,
            publish: PublishOn::Admin,
            path: "/v1/events".into(),
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// `backoff = { initial, max, multiplier }`: the redelivery backoff (jittered).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBackoff {
    /// First delay.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Ceiling.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Growth per attempt (at least 1).
    pub multiplier: f64,
}

impl Default for RawBackoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

/// A push subscription: `[[subscriptions]]` in the config, or the JSON body of
/// `PUT /v1/subscriptions/{name}`.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `name` | = `group` | the subscription's name (the admin API's `{name}`) |
/// | `topic` | required | the event type consumed |
/// | `group` | = `name` | the bus consumer group (every gateway in a group shares the events) |
/// | `service` / `url` | one required | target: a registered service (balanced, with breakers) or `http://IP:PORT/path` |
/// | `path` | `/` | the request path on the service's instances |
/// | `max_in_flight` | `32` | deliveries in flight at once |
/// | `ack_timeout` | `10s` | a delivery not answered by then is retried |
/// | `backoff` | `initial = "100ms"`, `max = "10s"`, `multiplier = 2.0` | before a redelivery; `Retry-After` can only lengthen it |
/// | `max_deliveries` | `5` | then the event goes to the dead-letter topic |
/// | `dead_letter_topic` | `deadletter` | |
/// | `breaker` | as for routes | per target instance |
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// The name (config: defaults to `group`; API: the path's `{name}`).
    #[serde(default)]
    pub name: Option<String>,
    /// The topic (event type) consumed.
    pub topic: String,
    /// The bus consumer group (default: the name).
    #[serde(default)]
    pub group: Option<String>,
    /// Target service, resolved through the registry.
    #[serde(default)]
    pub service: Option<String>,
    /// Path requested on the service's instances (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// Target URL instead of a service: `http://IP:PORT[/path]`.
    #[serde(default)]
    pub url: Option<String>,
    /// Deliveries in flight at once.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// How long one delivery may take before it counts as failed.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Redelivery backoff.
    #[serde(default)]
    pub backoff: RawBackoff,
    /// Deliveries before the event is dead-lettered.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// Where dead letters go.
    #[serde(default = "default_dlq")]
    pub dead_letter_topic: String,
    /// Per-instance circuit breaker.
    #[serde(default, skip_serializing)]
    pub breaker: RawBreaker,
}

fn default_in_flight() -> usize {
    32
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_deliveries() -> u32 {
    5
}
fn default_dlq() -> String {
    switchboard_bus::subscribe::DEFAULT_DEAD_LETTER_TOPIC.to_owned()
}

/// Where a subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A registered service's passing instances, at `path`.
    Service {
        /// Service name.
        service: String,
        /// Request path.
        path: String,
    },
    /// One fixed address.
    Url {
        /// Where it listens.
        addr: SocketAddr,
        /// Request path (with query, if any).
        path: String,
    },
}

/// A validated subscription.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Its name.
    pub name: String,
    /// The bus consumer group.
    pub group: String,
    /// Where it delivers.
    pub target: Target,
    /// Redelivery backoff.
    pub backoff: RetryBackoff,
    /// As given.
    pub spec: SubscriptionSpec,
}

/// A bus topic or group name: what every backend can represent.
pub(crate) fn valid_bus_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !s.split('.').any(str::is_empty)
}

impl SubscriptionSpec {
    /// Validates; errors are `(key, message)` pairs, lowercase.
    pub fn resolve(
        &self,
        name_from_path: Option<&str>,
    ) -> Result<Subscription, Vec<(String, String)>> {
        let mut errs: Vec<(String, String)> = Vec::new();
        let mut err = |k: &str, m: String| errs.push((k.to_owned(), m));
        let name = match (name_from_path, &self.name, &self.group) {
            (Some(p), Some(n), _) if p != n => {
                err("name", format!("`{n}` differs from the path's `{p}`"));
                p.to_owned()
            }
            (Some(p), _, _) => p.to_owned(),
            (None, Some(n), _) => n.clone(),
            (None, None, Some(g)) => g.clone(),
            (None, None, None) => {
                err("name", "set `name` or `group`".into());
                String::new()
            }
        };
        let group = self.group.clone().unwrap_or_else(|| name.clone());
        if !name.is_empty() && !valid_bus_name(&name) {
            err(
                "name",
                format!("`{name}`: use ASCII letters, digits, `_`, `-` and `.` (1 to 200)"),
            );
        }
        if !group.is_empty() && !valid_bus_name(&group) {
            err(
                "group",
                format!("`{group}`: use ASCII letters, digits, `_`, `-` and `.` (1 to 200)"),
            );
        }
        if !valid_bus_name(&self.topic) {
            err(
                "topic",
                format!(
                    "`{}`: an event type of ASCII letters, digits, `_`, `-` and `.`",
                    self.topic
                ),
            );
        }
        if !valid_bus_name(&self.dead_letter_topic) || self.dead_letter_topic == self.topic {
            err(
                "dead_letter_topic",
                format!(
                    "`{}` must be a valid topic other than `topic`",
                    self.dead_letter_topic
                ),
            );
        }
        let path = self.path.clone().unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || path.contains(['#', ' ']) {
            err("path", format!("`{path}` must be a path starting with `/`"));
        }
        let target = match (&self.service, &self.url) {
            (Some(s), None) => {
                if switchboard_registry::validate::service_name(s).is_err() {
                    err("service", format!("`{s}` must match [a-z0-9-]{{1,63}}"));
                }
                Some(Target::Service {
                    service: s.clone(),
                    path,
                })
            }
            (None, Some(u)) => {
                if self.path.is_some() {
                    err("path", "give the path inside `url`".into());
                }
                match parse_url(u) {
                    Ok((addr, path)) => Some(Target::Url { addr, path }),
                    Err(m) => {
                        err("url", m);
                        None
                    }
                }
            }
            _ => {
                err("service", "set exactly one of `service` and `url`".into());
                None
            }
        };
        if self.max_in_flight == 0 {
            err("max_in_flight", "must be at least 1".into());
        }
        if self.max_deliveries == 0 {
            err("max_deliveries", "must be at least 1".into());
        }
        if self.ack_timeout.is_zero() {
            err("ack_timeout", "must be positive".into());
        }
        let backoff = match RetryBackoff::new(
            self.backoff.initial,
            self.backoff.max,
            self.backoff.multiplier,
        ) {
            Ok(b) => b,
            Err(e) => {
                err("backoff", e.to_string());
                RetryBackoff::default()
            }
        };
        if let Err(e) = crate::breaker::breaker_config(&self.breaker).validate() {
            err("breaker", e.to_string());
        }
        match target {
            Some(target) if errs.is_empty() => Ok(Subscription {
                name,
                group,
                target,
                backoff,
                spec: self.clone(),
            }),
            _ => Err(errs),
        }
    }
}

/// Validates `[bridge]` and every `[[subscriptions]]` entry, reporting each
/// problem through `err(span, key, message)`; returns the valid subscriptions.
pub(crate) fn resolve_all(
    bridge: &RawBridge,
    specs: &[SubscriptionSpec],
    err: &mut impl FnMut(std::ops::Range<usize>, String, String),
) -> Vec<Subscription> {
    if bridge.max_body_bytes < MIN_BODY_BYTES {
        err(
            0..0,
            "bridge.max_body_bytes".into(),
            format!(
                "must be at least {MIN_BODY_BYTES} (CloudEvents intermediaries forward 64 KiB)"
            ),
        );
    }
    if !bridge.path.starts_with('/') || bridge.path.contains(['?', '#', ' ']) {
        err(
            0..0,
            "bridge.path".into(),
            "must be a path starting with `/`".into(),
        );
    }
    if let Some(url) = &bridge.bus
        && !["memory://", "redis://", "redis+pubsub://", "nats://"]
            .iter()
            .any(|p| url.starts_with(p))
    {
        err(
            0..0,
            "bridge.bus".into(),
            format!(
                "unsupported bus `{url}` (use memory://, redis://HOST:PORT, redis+pubsub://HOST:PORT or nats://HOST:PORT)"
            ),
        );
    }
    let mut out: Vec<Subscription> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        if bridge.bus.is_none() {
            err(
                0..0,
                format!("subscriptions[{i}]"),
                "push subscriptions need the bridge: set `bridge.bus`".into(),
            );
        }
        match spec.resolve(None) {
            Ok(s) => {
                if out.iter().any(|o| o.name == s.name) {
                    err(
                        0..0,
                        format!("subscriptions[{i}].name"),
                        format!("duplicate subscription `{}`", s.name),
                    );
                }
                out.push(s);
            }
            Err(errs) => {
                for (k, m) in errs {
                    err(0..0, format!("subscriptions[{i}].{k}"), m);
                }
            }
        }
    }
    out
}

/// `http://IP:PORT[/path]`: the gateway does not resolve names on the delivery
/// path, like instances in the registry (`localhost` is taken as 127.0.0.1).
fn parse_url(u: &str) -> Result<(SocketAddr, String), String> {
    let uri: http::Uri = u.parse().map_err(|e| format!("`{u}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("`{u}`: only http:// URLs are supported"));
    }
    let host = uri.host().unwrap_or("");
    let host = if host.eq_ignore_ascii_case("localhost") {
        "127.0.0.1"
    } else {
        host.trim_start_matches('[').trim_end_matches(']')
    };
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| format!("`{u}`: the host must be an IP address (or localhost)"))?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    Ok((SocketAddr::new(ip, port), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> SubscriptionSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn resolves_defaults_and_targets() {
        let s = spec(serde_json::json!({"topic": "order.confirmed", "service": "notify"}))
            .resolve(Some("notify-orders"))
            .unwrap();
        assert_eq!(
            (s.name.as_str(), s.group.as_str()),
            ("notify-orders", "notify-orders")
        );
        assert_eq!(
            s.target,
            Target::Service {
                service: "notify".into(),
                path: "/".into()
            }
        );
        let s = spec(serde_json::json!({"topic": "t", "group": "g", "url": "http://localhost:8080/hook?x=1"}))
            .resolve(None)
            .unwrap();
        assert_eq!(s.name, "g");
        assert_eq!(
            s.target,
            Target::Url {
                addr: "127.0.0.1:8080".parse().unwrap(),
                path: "/hook?x=1".into()
            }
        );
    }

    #[test]
    fn names_every_bad_key() {
        let keys = |j: serde_json::Value, name: Option<&str>| -> Vec<String> {
            spec(j)
                .resolve(name)
                .unwrap_err()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(
            keys(serde_json::json!({"topic": "t"}), Some("n")),
            ["service"]
        );
        assert_eq!(
            keys(
                serde_json::json!({"topic": "t", "service": "a", "url": "http://1.2.3.4/"}),
                Some("n")
            ),
            ["service"]
        );
        assert_eq!(
            keys(
                serde_json::json!({"topic": "t", "url": "https://x.example/"}),
                Some("n")
            ),
            ["url"]
        );
        assert_eq!(
            keys(
                serde_json::json!({"topic": "a b", "service": "s"}),
                Some("n")
            ),
            ["topic"]
        );
        assert_eq!(
            keys(
                serde_json::json!({"topic": "t", "service": "s", "max_deliveries": 0, "max_in_flight": 0}),
                Some("n")
            ),
            ["max_in_flight", "max_deliveries"]
        );
        assert_eq!(
            keys(serde_json::json!({"topic": "t", "service": "s"}), None),
            ["name"]
        );
        assert_eq!(
            keys(
                serde_json::json!({"topic": "t", "service": "s", "name": "x"}),
                Some("y")
            ),
            ["name"]
        );
        assert!(
            serde_json::from_value::<SubscriptionSpec>(
                serde_json::json!({"topic": "t", "bogus": 1})
            )
            .is_err()
        );
    }
}
