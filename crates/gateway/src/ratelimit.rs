//! Per-route rate limits: GCRA from `switchboard-resilience` in memory, or
//! the same algorithm in one Lua script on Redis so several gateways enforce
//! one limit.
//!
//! `rate_limit = { rate = 100, per = "1s", burst = 100, key = "ip", store = "memory://" }`
//!
//! - `key`: `"ip"` (the client address), `"header:NAME"` (an API key; requests
//!   without the header share one bucket), or `"none"` (one bucket for the route).
//! - Memory: a plain limiter for `none`, a keyed one (bounded to `max_keys`
//!   keys, oldest forgiven first) otherwise.
//! - Redis (`store = "redis://HOST:PORT"`): `EVALSHA` of [`GCRA_SCRIPT`] with
//!   the server's clock (`TIME`), so gateways with skewed clocks agree. Keys
//!   are `switchboard:gw:rl:{name}:{key}` with a TTL of one burst window.
//!   **When Redis is unreachable the limit fails open**: the request passes,
//!   `switchboard_gateway_rate_limit_store_errors_total` counts it and a warning is logged
//!   at most once per 10 s per route. A gateway protects its upstreams with
//!   breakers and timeouts too; refusing all traffic because the limiter's
//!   store is down would turn a Redis outage into a full outage.
//!
//! Over the limit: 429 problem+json with `Retry-After`, and the IETF
//! `RateLimit-Policy: "NAME";q=BURST;w=WINDOW` and `RateLimit: "NAME";r=0;t=SECS`
//! fields (draft-ietf-httpapi-ratelimit-headers, structured-field form).
//! Allowed requests carry no extra headers (no allocation on the hot path).
//!
//! On a config reload a route whose config changed gets a new limiter
//! (memory buckets start full again); unchanged routes keep theirs, and Redis
//! buckets live in Redis and carry over either way.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use switchboard_resilience::rate_limit::{KeyedRateLimiter, RateLimiter, quota};

use crate::edge_redis::{KEY_PREFIX, LogLimiter, RedisHandle};

/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `RateLimit-Policy`.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// GCRA on Redis. `KEYS[1]`: the bucket; `ARGV[1]`: emission interval (µs);
/// `ARGV[2]`: burst tolerance (µs, interval × burst). Returns `{1, 0}` when
/// allowed, `{0, wait_µs}` when not. Time comes from the server so every
/// gateway sees one clock.
pub const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new = tat + interval
local ahead = new - now
if ahead > tolerance then
  return {0, ahead - tolerance}
end
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.ceil(ahead / 1000) + 1)
return {1, 0}
";

/// `rate_limit = { ... }` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Requests allowed per `per`.
    pub rate: u32,
    /// The period of `rate` (default `1s`).
    #[serde(default = "one_second", with = "humantime_serde")]
    pub per: Duration,
    /// Requests allowed at once after a quiet period (default `rate`).
    #[serde(default)]
    pub burst: Option<u32>,
    /// `ip`, `header:NAME` or `none` (default `ip`).
    #[serde(default = "default_key")]
    pub key: String,
    /// `memory://` (default) or `redis://HOST:PORT`.
    #[serde(default = "default_store")]
    pub store: String,
    /// Most keys remembered by the memory store (default 100000).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Name in the `RateLimit` headers and in Redis keys (default: the route prefix).
    #[serde(default)]
    pub name: Option<String>,
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn default_key() -> String {
    "ip".into()
}
pub(crate) fn default_store() -> String {
    "memory://".into()
}
pub(crate) fn default_max_keys() -> usize {
    100_000
}

/// What a limit is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The client's IP address.
    Ip,
    /// A request header (an API key).
    Header(HeaderName),
    /// One bucket for everyone.
    None,
}

/// Parses `ip`, `none`, `header:NAME`.
pub fn parse_key_source(s: &str) -> Result<KeySource, String> {
    match s {
        "ip" => Ok(KeySource::Ip),
        "none" => Ok(KeySource::None),
        _ => match s.strip_prefix("header:") {
            Some(h) => HeaderName::from_bytes(h.trim().as_bytes())
                .map(KeySource::Header)
                .map_err(|_| format!("`{h}` is not a valid header name")),
            None => Err(format!(
                "`{s}` is not a key (use \"ip\", \"none\" or \"header:NAME\")"
            )),
        },
    }
}

/// A resolved rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Requests per `per`.
    pub rate: u32,
    /// Period.
    pub per: Duration,
    /// Burst.
    pub burst: u32,
    /// Key.
    pub key: KeySource,
    /// Store URL.
    pub store: String,
    /// Memory bound.
    pub max_keys: usize,
    /// Policy name.
    pub name: String,
}

impl RawRateLimit {
    /// Validates; errors are `(key suffix, message)`.
    pub fn resolve(&self, prefix: &str) -> Result<RateLimitConfig, (String, String)> {
        let e = |k: &str, m: String| (format!("rate_limit.{k}"), m);
        let burst = self.burst.unwrap_or(self.rate);
        quota(self.rate, self.per, burst).map_err(|x| e("rate", x.to_string()))?;
        let key = parse_key_source(&self.key).map_err(|m| e("key", m))?;
        crate::idempotency::check_store_url(&self.store).map_err(|m| e("store", m))?;
        if self.max_keys == 0 {
            return Err(e("max_keys", "must be at least 1".into()));
        }
        let name = self.name.clone().unwrap_or_else(|| prefix.to_owned());
        if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(e(
                "name",
                "must be 1 to 128 printable ASCII characters".into(),
            ));
        }
        Ok(RateLimitConfig {
            rate: self.rate,
            per: self.per,
            burst,
            key,
            store: self.store.clone(),
            max_keys: self.max_keys,
            name,
        })
    }
}

/// A structured-field string (RFC 9651 §3.3.3): quoted, `"` and `\` escaped.
pub fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

enum Memory {
    One(RateLimiter),
    Ip(KeyedRateLimiter<IpAddr>),
    Header(KeyedRateLimiter<Box<[u8]>>),
}

enum Store {
    Memory(Memory),
    Redis {
        redis: Arc<RedisHandle>,
        script: redis::Script,
        key_prefix: String,
    },
}

/// A route's limiter.
pub struct RateLimit {
    config: RateLimitConfig,
    store: Store,
    policy: HeaderValue,
    interval_us: u64,
    /// Store failures (each one let a request through).
    pub store_errors: AtomicU64,
    /// Requests refused.
    pub limited: AtomicU64,
    log: LogLimiter,
    epoch: Instant,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RateLimit {
    /// Builds the limiter; `redis` gives the shared handle for a Redis URL.
    pub fn new(
        config: &RateLimitConfig,
        redis: &mut dyn FnMut(&str) -> Result<Arc<RedisHandle>, String>,
    ) -> Result<Self, String> {
        let q = quota(config.rate, config.per, config.burst).map_err(|e| e.to_string())?;
        let store = if config.store.starts_with("redis://") {
            Store::Redis {
                redis: redis(&config.store)?,
                script: redis::Script::new(GCRA_SCRIPT),
                key_prefix: format!("{KEY_PREFIX}rl:{}:", config.name),
            }
        } else {
            Store::Memory(match &config.key {
                KeySource::None => Memory::One(RateLimiter::new(q)),
                KeySource::Ip => Memory::Ip(
                    KeyedRateLimiter::new(q, config.max_keys).map_err(|e| e.to_string())?,
                ),
                KeySource::Header(_) => Memory::Header(
                    KeyedRateLimiter::new(q, config.max_keys).map_err(|e| e.to_string())?,
                ),
            })
        };
        // A full burst refills in burst × interval: that is the window the
        // quota `q = burst` applies to.
        let interval = config.per / config.rate;
        let window = (interval * config.burst).as_secs_f64().ceil().max(1.0) as u64;
        let policy = HeaderValue::from_str(&format!(
            "{};q={};w={window}",
            sf_string(&config.name),
            config.burst
        ))
        .map_err(|e| e.to_string())?;
        Ok(Self {
            config: config.clone(),
            store,
            policy,
            interval_us: u64::try_from(interval.as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
            store_errors: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            log: LogLimiter::default(),
            epoch: Instant::now(),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// `Ok` to pass, `Err(retry_after)` when over the limit.
    pub async fn check(&self, client: IpAddr, headers: &HeaderMap) -> Result<(), Duration> {
        let r = match &self.store {
            Store::Memory(m) => match m {
                Memory::One(l) => l.check(),
                Memory::Ip(l) => l.check(&client),
                Memory::Header(l) => {
                    let KeySource::Header(name) = &self.config.key else {
                        return Ok(());
                    };
                    let key: Box<[u8]> = headers
                        .get(name)
                        .map_or_else(|| Box::from(&b""[..]), |v| Box::from(v.as_bytes()));
                    check_keyed(l, &key)
                }
            }
            .map_err(|l| l.retry_after),
            Store::Redis {
                redis,
                script,
                key_prefix,
            } => {
                self.check_redis(redis, script, key_prefix, client, headers)
                    .await
            }
        };
        if r.is_err() {
            self.limited.fetch_add(1, Relaxed);
        }
        r
    }

    async fn check_redis(
        &self,
        redis: &RedisHandle,
        script: &redis::Script,
        key_prefix: &str,
        client: IpAddr,
        headers: &HeaderMap,
    ) -> Result<(), Duration> {
        let mut key = key_prefix.as_bytes().to_vec();
        match &self.config.key {
            KeySource::Ip => key.extend_from_slice(client.to_string().as_bytes()),
            KeySource::Header(h) => {
                if let Some(v) = headers.get(h) {
                    key.extend_from_slice(v.as_bytes());
                }
            }
            KeySource::None => {}
        }
        let tolerance = self
            .interval_us
            .saturating_mul(u64::from(self.config.burst));
        let mut inv = script.key(key);
        inv.arg(self.interval_us).arg(tolerance);
        let res: Result<(i64, i64), _> = redis
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await;
        match res {
            Ok((1, _)) => Ok(()),
            Ok((_, wait_us)) => Err(Duration::from_micros(
                u64::try_from(wait_us).unwrap_or(0).max(1),
            )),
            Err(e) => {
                self.store_errors.fetch_add(1, Relaxed);
                if self.log.allow(self.epoch, Duration::from_secs(10)) {
                    tracing::warn!(limit = %self.config.name, error = %e, "rate-limit store unavailable; letting requests through (fail open)");
                }
                Ok(())
            }
        }
    }

    /// Adds `Retry-After`, `RateLimit-Policy` and `RateLimit` to a 429.
    pub fn limited_headers(&self, h: &mut HeaderMap, retry_after: Duration) {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        let secs = secs.max(1);
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        h.insert(RATELIMIT_POLICY.clone(), self.policy.clone());
        if let Ok(v) =
            HeaderValue::from_str(&format!("{};r=0;t={secs}", sf_string(&self.config.name)))
        {
            h.insert(RATELIMIT.clone(), v);
        }
    }
}

fn check_keyed<K: Hash + Eq + Clone>(
    l: &KeyedRateLimiter<K>,
    key: &K,
) -> Result<(), switchboard_resilience::rate_limit::RateLimited> {
    l.check(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sources() {
        assert_eq!(parse_key_source("ip"), Ok(KeySource::Ip));
        assert_eq!(parse_key_source("none"), Ok(KeySource::None));
        assert_eq!(
            parse_key_source("header:X-Api-Key"),
            Ok(KeySource::Header(HeaderName::from_static("x-api-key")))
        );
        assert!(
            parse_key_source("header:bad key")
                .unwrap_err()
                .contains("`bad key`")
        );
        assert!(parse_key_source("cookie").unwrap_err().contains("`cookie`"));
    }

    #[test]
    fn policy_header_form() {
        let c = RawRateLimit {
            rate: 10,
            per: Duration::from_secs(1),
            burst: Some(20),
            key: "none".into(),
            store: "memory://".into(),
            max_keys: 10,
            name: None,
        }
        .resolve("/users")
        .unwrap();
        let l = RateLimit::new(&c, &mut |_| Err("no redis".into())).unwrap();
        let mut h = HeaderMap::new();
        l.limited_headers(&mut h, Duration::from_millis(1500));
        assert_eq!(h["ratelimit-policy"], "\"/users\";q=20;w=2");
        assert_eq!(h["ratelimit"], "\"/users\";r=0;t=2");
        assert_eq!(h["retry-after"], "2");
    }

    #[test]
    fn invalid_values_are_named() {
        let raw = |rate, key: &str, store: &str| RawRateLimit {
            rate,
            per: Duration::from_secs(1),
            burst: None,
            key: key.into(),
            store: store.into(),
            max_keys: 10,
            name: None,
        };
        assert_eq!(
            raw(0, "ip", "memory://").resolve("/").unwrap_err().0,
            "rate_limit.rate"
        );
        assert_eq!(
            raw(1, "x", "memory://").resolve("/").unwrap_err().0,
            "rate_limit.key"
        );
        assert_eq!(
            raw(1, "ip", "nats://x").resolve("/").unwrap_err().0,
            "rate_limit.store"
        );
    }

    proptest::proptest! {
        #[test]
        fn key_source_never_panics(s in "\\PC{0,40}") {
            let _ = parse_key_source(&s);
        }

        #[test]
        fn sf_string_round_trips(s in "[ -~]{0,40}") {
            let q = sf_string(&s);
            proptest::prop_assert!(HeaderValue::from_str(&q).is_ok());
            // Unescape and compare.
            let inner = &q[1..q.len() - 1];
            let mut out = String::new();
            let mut esc = false;
            for c in inner.chars() {
                if esc { out.push(c); esc = false; } else if c == '\\' { esc = true; } else {
                    proptest::prop_assert!(c != '"');
                    out.push(c);
                }
            }
            proptest::prop_assert_eq!(out, s);
        }
    }
}
