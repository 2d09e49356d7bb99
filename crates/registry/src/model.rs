//! The data model: what a registration says, what an instance looks like, and
//! the snapshot of one service that readers get.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::validate::{self, ValidationError};

/// Health of an instance, as in Consul.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Answers its check: routable.
    Passing,
    /// Alive but asks for less traffic (HTTP 429): not in [`ServiceView::passing`].
    Warning,
    /// Failing, not yet checked, TTL expired, or suspected by callers: never routed to.
    Critical,
}

impl Status {
    /// `"passing"`, `"warning"` or `"critical"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    /// Higher is healthier; used to tell recovery from degradation.
    pub(crate) fn rank(self) -> u8 {
        match self {
            Status::Passing => 2,
            Status::Warning => 1,
            Status::Critical => 0,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of active check an instance has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `GET http://address:port{path}`: 2xx passing, 429 warning, anything else critical.
    Http {
        /// Path and query, starting with `/`.
        path: String,
    },
    /// A TCP connect to `address:port`: connected is passing, anything else critical.
    Tcp,
    /// The instance must heartbeat within `ttl` or turns critical.
    Ttl {
        /// How long a heartbeat keeps the instance passing.
        ttl: Duration,
    },
}

/// An instance's health check, as in the registration body's `check` object.
///
/// JSON: exactly one of `"http": "/path"`, `"tcp": true` or `"ttl": "10s"`, plus
/// optional `interval` (default 10s), `timeout` (default 2s, at most `interval`),
/// `healthy_threshold` (default 2), `unhealthy_threshold` (default 3) and
/// `deregister_critical_after` (default: never). Durations are humantime strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// HTTP, TCP or TTL.
    pub kind: CheckKind,
    /// Time between two active checks (HTTP, TCP).
    pub interval: Duration,
    /// How long one active check may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive better results needed before the status improves.
    pub healthy_threshold: u32,
    /// Consecutive worse results needed before the status degrades.
    pub unhealthy_threshold: u32,
    /// An instance critical for this long is deregistered.
    pub deregister_critical_after: Option<Duration>,
}

impl CheckSpec {
    /// Default interval between active checks.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    /// Default timeout of one active check (capped at the interval).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default `healthy_threshold`.
    pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
    /// Default `unhealthy_threshold`.
    pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;

    fn with_kind(kind: CheckKind) -> Self {
        CheckSpec {
            kind,
            interval: Self::DEFAULT_INTERVAL,
            timeout: Self::DEFAULT_TIMEOUT,
            healthy_threshold: Self::DEFAULT_HEALTHY_THRESHOLD,
            unhealthy_threshold: Self::DEFAULT_UNHEALTHY_THRESHOLD,
            deregister_critical_after: None,
        }
    }

    /// An HTTP check of `path` with default timings.
    pub fn http(path: impl Into<String>) -> Self {
        Self::with_kind(CheckKind::Http { path: path.into() })
    }

    /// A TCP connect check with default timings.
    pub fn tcp() -> Self {
        Self::with_kind(CheckKind::Tcp)
    }

    /// A TTL check: the instance must heartbeat at least every `ttl`.
    pub fn ttl(ttl: Duration) -> Self {
        Self::with_kind(CheckKind::Ttl { ttl })
    }

    /// Sets the interval (and caps the timeout at it).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self.timeout = self.timeout.min(interval);
        self
    }

    /// Sets the timeout of one check.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets both thresholds.
    #[must_use]
    pub fn thresholds(mut self, healthy: u32, unhealthy: u32) -> Self {
        self.healthy_threshold = healthy;
        self.unhealthy_threshold = unhealthy;
        self
    }

    /// Deregisters the instance once it has been critical for `after`.
    #[must_use]
    pub fn deregister_critical_after(mut self, after: Duration) -> Self {
        self.deregister_critical_after = Some(after);
        self
    }

    /// True for checks the registry runs itself (HTTP, TCP), false for TTL.
    pub fn is_active(&self) -> bool {
        !matches!(self.kind, CheckKind::Ttl { .. })
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        match &self.kind {
            CheckKind::Http { path } => {
                map.insert("http".into(), path.clone().into());
            }
            CheckKind::Tcp => {
                map.insert("tcp".into(), true.into());
            }
            CheckKind::Ttl { ttl } => {
                map.insert("ttl".into(), fmt_duration(*ttl).into());
            }
        }
        map.insert("interval".into(), fmt_duration(self.interval).into());
        map.insert("timeout".into(), fmt_duration(self.timeout).into());
        map.insert("healthy_threshold".into(), self.healthy_threshold.into());
        map.insert(
            "unhealthy_threshold".into(),
            self.unhealthy_threshold.into(),
        );
        if let Some(after) = self.deregister_critical_after {
            map.insert(
                "deregister_critical_after".into(),
                fmt_duration(after).into(),
            );
        }
        serde_json::Value::Object(map)
    }
}

pub(crate) fn fmt_duration(d: Duration) -> String {
    crate::validate::fmt_ms(d)
}

impl Serialize for CheckSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for CheckSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        validate::parse_check(&value, "check").map_err(serde::de::Error::custom)
    }
}

/// The body of `PUT /v1/services/{service}/instances/{id}`: what an instance says about itself.
///
/// ```json
/// {"address": "127.0.0.1", "port": 4001, "version": "1.4.0", "tags": [], "metadata": {},
///  "check": {"http": "/health", "interval": "2s"}}
/// ```
/// Deserializing validates the shape (field types, check fields); the network
/// policy on `address` is applied by the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// IP address or hostname.
    pub address: String,
    /// TCP port, 1-65535.
    pub port: u16,
    /// Semantic version of the running build.
    pub version: Option<semver::Version>,
    /// Free-form labels.
    pub tags: Vec<String>,
    /// Free-form key/value pairs.
    pub metadata: BTreeMap<String, String>,
    /// Health check; `None` means always passing (unless callers report failures).
    pub check: Option<CheckSpec>,
}

impl Registration {
    /// A registration of `address:port` with no version, tags, metadata or check.
    pub fn new(address: impl Into<String>, port: u16) -> Self {
        Registration {
            address: address.into(),
            port,
            version: None,
            tags: Vec::new(),
            metadata: BTreeMap::new(),
            check: None,
        }
    }

    /// Sets the version.
    #[must_use]
    pub fn version(mut self, version: semver::Version) -> Self {
        self.version = Some(version);
        self
    }

    /// Adds a tag.
    #[must_use]
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds a metadata entry.
    #[must_use]
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the health check.
    #[must_use]
    pub fn check(mut self, check: CheckSpec) -> Self {
        self.check = Some(check);
        self
    }

    /// Parses and validates a JSON body, naming the offending field on error.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, ValidationError> {
        validate::parse_registration(value)
    }

    /// The JSON body form.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        map.insert("address".into(), self.address.clone().into());
        map.insert("port".into(), self.port.into());
        map.insert(
            "version".into(),
            self.version
                .as_ref()
                .map_or(serde_json::Value::Null, |v| v.to_string().into()),
        );
        map.insert("tags".into(), self.tags.clone().into());
        map.insert(
            "metadata".into(),
            serde_json::to_value(&self.metadata).unwrap_or_default(),
        );
        if let Some(check) = &self.check {
            map.insert("check".into(), check.to_json());
        }
        serde_json::Value::Object(map)
    }
}

impl Serialize for Registration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Registration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        validate::parse_registration(&value).map_err(serde::de::Error::custom)
    }
}

/// One registered instance as readers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// Instance id, unique within its service.
    pub id: String,
    /// Service name.
    pub service: String,
    /// IP address or hostname.
    pub address: String,
    /// TCP port.
    pub port: u16,
    /// Semantic version, if registered with one.
    pub version: Option<semver::Version>,
    /// Current status (active checks combined with passive reports).
    pub status: Status,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// When the last active check completed (RFC 3339), if any. In a lock-free
    /// [`ServiceView`] this is as of the view's last change (views are not rebuilt
    /// on every check); [`crate::Registry::snapshot`] and the HTTP API give the latest.
    #[serde(serialize_with = "ser_time")]
    pub last_check: Option<SystemTime>,
    /// When the registry last accepted a heartbeat renewing the instance's
    /// TTL check (RFC 3339), if any since it registered; as
    /// [`crate::Registry::heartbeats`], so with the Redis store the latest
    /// heartbeat any process on that Redis accepted, seen within a TTL scan
    /// (250 ms) or at worst one resync interval. Same freshness as
    /// `last_check`. Absent in the JSON of older registries (read as `None`).
    #[serde(serialize_with = "ser_time")]
    pub last_heartbeat: Option<SystemTime>,
    #[serde(skip)]
    socket_addr: Option<SocketAddr>,
}

fn ser_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string()),
        None => s.serialize_none(),
    }
}

impl Instance {
    pub(crate) fn new(
        service: &str,
        id: &str,
        reg: &Registration,
        status: Status,
        last_check: Option<SystemTime>,
        last_heartbeat: Option<SystemTime>,
    ) -> Self {
        let socket_addr = reg
            .address
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, reg.port));
        Instance {
            id: id.to_owned(),
            service: service.to_owned(),
            address: reg.address.clone(),
            port: reg.port,
            version: reg.version.clone(),
            status,
            tags: reg.tags.clone(),
            metadata: reg.metadata.clone(),
            last_check,
            last_heartbeat,
            socket_addr,
        }
    }

    /// The later of [`Instance::last_check`] and [`Instance::last_heartbeat`]:
    /// when the registry last heard the instance was alive, the "last check"
    /// that the dashboard and `switchboard services` show.
    pub fn last_seen(&self) -> Option<SystemTime> {
        self.last_check.max(self.last_heartbeat)
    }

    /// `address:port` when the address is an IP literal; `None` for hostnames
    /// (resolve [`Instance::host_port`] instead).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.socket_addr
    }

    /// `address:port` as a string, with IPv6 addresses in brackets.
    pub fn host_port(&self) -> String {
        match self.socket_addr {
            Some(sa) => sa.to_string(),
            None => format!("{}:{}", self.address, self.port),
        }
    }
}

/// An immutable snapshot of one service, swapped atomically on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    /// Change index: grows with every change of this service (Consul's `X-Consul-Index`).
    pub index: u64,
    /// Every registered instance, sorted by id.
    pub instances: Vec<Instance>,
    /// The routable instances: status [`Status::Passing`] only, as with Consul's
    /// `?passing`. Instances in `warning` (HTTP 429) are left out so an overloaded
    /// instance sheds load; use [`ServiceView::routable`] to fall back to them.
    #[serde(skip)]
    pub passing: Vec<Instance>,
}

impl ServiceView {
    /// `passing` when any, else the `warning` instances (still alive, just busy),
    /// else nothing.
    pub fn routable(&self) -> Vec<&Instance> {
        if self.passing.is_empty() {
            self.instances
                .iter()
                .filter(|i| i.status == Status::Warning)
                .collect()
        } else {
            self.passing.iter().collect()
        }
    }
}

/// One line of `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Service name.
    pub service: String,
    /// Number of registered instances.
    pub instances: usize,
    /// Number of instances with status `passing`.
    pub passing: usize,
}

/// What a caller (the gateway's breaker) saw when it used an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassiveOutcome {
    /// The call succeeded: clears the instance's passive failure count.
    Success,
    /// The call failed (connect error, 5xx, timeout).
    Failure,
}

/// The JSON form of an [`Instance`] as the HTTP API returns it.
#[derive(Deserialize)]
struct InstanceWire {
    id: String,
    #[serde(default)]
    service: String,
    address: String,
    port: u16,
    #[serde(default)]
    version: Option<semver::Version>,
    status: Status,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    last_check: Option<String>,
    #[serde(default)]
    last_heartbeat: Option<String>,
}

impl<'de> Deserialize<'de> for Instance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = InstanceWire::deserialize(d)?;
        let time = |t: Option<String>| match t {
            Some(s) => humantime::parse_rfc3339(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        };
        let last_check = time(w.last_check)?;
        let last_heartbeat = time(w.last_heartbeat)?;
        let socket_addr = w
            .address
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, w.port));
        Ok(Instance {
            id: w.id,
            service: w.service,
            address: w.address,
            port: w.port,
            version: w.version,
            status: w.status,
            tags: w.tags,
            metadata: w.metadata,
            last_check,
            last_heartbeat,
            socket_addr,
        })
    }
}

impl ServiceView {
    /// Builds a view from all instances, deriving `passing`.
    pub fn from_instances(index: u64, instances: Vec<Instance>) -> Self {
        let passing = instances
            .iter()
            .filter(|i| i.status == Status::Passing)
            .cloned()
            .collect();
        ServiceView {
            index,
            instances,
            passing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_json_carries_the_last_heartbeat_and_reads_older_registries() {
        let at = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let mut i = Instance::new(
            "orders",
            "o1",
            &Registration::new("127.0.0.1", 4001),
            Status::Passing,
            Some(at(100)),
            Some(at(160)),
        );
        let json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["last_heartbeat"], "1970-01-01T00:02:40.000Z");
        let back: Instance = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, i);
        assert_eq!(i.last_seen(), Some(at(160)), "the later of the two");
        i.last_check = Some(at(200));
        assert_eq!(i.last_seen(), Some(at(200)));
        i.last_heartbeat = None;
        assert_eq!(i.last_seen(), Some(at(200)));

        // A registry from before the field: no heartbeat, not an error.
        let mut old = json;
        old.as_object_mut().unwrap().remove("last_heartbeat");
        let back: Instance = serde_json::from_value(old).unwrap();
        assert_eq!(back.last_heartbeat, None);
        assert_eq!(back.last_seen(), Some(at(100)));
    }
}
