//! Idempotency keys for POST and PATCH (draft-ietf-httpapi-idempotency-key-header).
//!
//! `idempotency = { ttl = "24h", max_response_bytes = 1048576, store = "memory://" }`
//!
//! A POST or PATCH carrying `Idempotency-Key` (an sf-string `"k"` or a bare
//! token, at most 255 bytes) on a route with this table:
//! - first time: the request is forwarded while the key is locked "in flight";
//!   the response (status, headers, body up to `max_response_bytes`) is then
//!   stored for `ttl`;
//! - same key, same fingerprint (method, path and query, SHA-256 of the body):
//!   the stored response, with `Idempotent-Replayed: true`;
//! - same key while the first request is still in flight: 409;
//! - same key, same fingerprint, but the first response was too large to
//!   keep (see below): 409 `/problems/idempotency-response-not-kept`, and the
//!   request is not forwarded again;
//! - same key, different fingerprint: 422.
//!
//! Keys are scoped by the route (`name`, default the prefix) and, with
//! `client_header = "X-Api-Key"`, by that header's value, so two clients cannot
//! see each other's responses. Key and scope are hashed (SHA-256): the store
//! holds fixed-size keys whatever the client sends.
//!
//! Not stored (the lock is released, so a repeat runs again): gateway errors
//! and upstream 5xx, 408 and 429 (the client should retry those).
//!
//! Done, not kept: a response whose body exceeds `max_response_bytes`, by
//! `Content-Length` or once the streamed body passes it, still reaches the
//! client whole, but only a small record stays under the key (its
//! fingerprint and the limit, for the same `ttl`; a warning is logged at most
//! once per 10 s per route). The upstream has done the work, so a repeat with
//! the same key and fingerprint is never forwarded again (that would be a
//! second charge): it gets 409 whose `detail` says the request was already
//! processed and names the limit in bytes. A different fingerprint still gets 422.
//! A body too large to fingerprint (over `retry_buffer_bytes`) gets 413.
//!
//! Stores: memory (sharded maps bounded by `max_keys` entries and
//! `max_store_bytes` of bodies; expired entries go first, then the ones
//! closest to expiry), or Redis: `SET key L<fp> NX PX lock_ttl` takes the
//! in-flight lock, a compare-and-set script replaces it with the response
//! (`D<fp><Stored::encode>`) or the done-not-kept record (`N<fp><limit>`,
//! the limit a big-endian u64), both `PX ttl`, and a compare-and-delete
//! script releases it. When Redis is
//! unreachable the request is forwarded without idempotency protection
//! (counted in `switchboard_gateway_idempotency_store_errors_total`, logged at most once
//! per 10 s): the same fail-open choice as rate limits.
//!
//! The lock lives for the route's `timeout` plus 5 s, so a gateway that dies
//! mid-request does not block the key for longer.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use parking_lot::Mutex;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::edge_redis::{KEY_PREFIX, LogLimiter, RedisHandle};

/// `Idempotent-Replayed`, set on replayed responses.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest accepted key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// `idempotency = { ... }` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdempotency {
    /// How long a response is kept.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Largest response body stored; a larger one leaves a "done, not kept"
    /// record, so a repeat gets 409 instead of running again.
    pub max_response_bytes: usize,
    /// `memory://` or `redis://HOST:PORT`.
    pub store: String,
    /// Most keys kept by the memory store.
    pub max_keys: usize,
    /// Most body bytes kept by the memory store.
    pub max_store_bytes: usize,
    /// Scope keys by this request header too (a client's API key).
    pub client_header: Option<String>,
    /// Scope name (default: the route prefix); routes with one name share keys.
    pub name: Option<String>,
}

impl Default for RawIdempotency {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            max_response_bytes: 1024 * 1024,
            store: crate::ratelimit::default_store(),
            max_keys: crate::ratelimit::default_max_keys(),
            max_store_bytes: 64 * 1024 * 1024,
            client_header: None,
            name: None,
        }
    }
}

/// A resolved idempotency policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// Response lifetime.
    pub ttl: Duration,
    /// In-flight lock lifetime (route timeout + 5 s).
    pub lock_ttl: Duration,
    /// Largest stored body.
    pub max_response_bytes: usize,
    /// Store URL.
    pub store: String,
    /// Memory bound (entries).
    pub max_keys: usize,
    /// Memory bound (body bytes).
    pub max_store_bytes: usize,
    /// Extra scope header.
    pub client_header: Option<HeaderName>,
    /// Scope name.
    pub name: String,
}

/// Checks a store URL: `memory://` or `redis://...` that the redis crate accepts.
pub fn check_store_url(s: &str) -> Result<(), String> {
    if s == "memory://" {
        return Ok(());
    }
    let shown = switchboard_resilience::redact::redact_url(s);
    if s.starts_with("redis://") {
        return redis::Client::open(s)
            .map(|_| ())
            .map_err(|e| format!("`{shown}`: {e}"));
    }
    Err(format!(
        "unsupported store `{shown}` (use memory:// or redis://HOST:PORT)"
    ))
}

impl RawIdempotency {
    /// Validates; errors are `(key suffix, message)`.
    pub fn resolve(
        &self,
        prefix: &str,
        route_timeout: Duration,
    ) -> Result<IdempotencyConfig, (String, String)> {
        let e = |k: &str, m: &str| (format!("idempotency.{k}"), m.to_owned());
        if self.ttl < Duration::from_secs(1) {
            return Err(e("ttl", "must be at least 1s"));
        }
        if self.max_keys == 0 {
            return Err(e("max_keys", "must be at least 1"));
        }
        if self.max_store_bytes < self.max_response_bytes {
            return Err(e(
                "max_store_bytes",
                "must be at least `max_response_bytes`",
            ));
        }
        check_store_url(&self.store).map_err(|m| ("idempotency.store".to_owned(), m))?;
        let client_header = match &self.client_header {
            None => None,
            Some(h) => Some(HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                (
                    "idempotency.client_header".to_owned(),
                    format!("`{h}` is not a valid header name"),
                )
            })?),
        };
        Ok(IdempotencyConfig {
            ttl: self.ttl,
            lock_ttl: route_timeout + Duration::from_secs(5),
            max_response_bytes: self.max_response_bytes,
            store: self.store.clone(),
            max_keys: self.max_keys,
            max_store_bytes: self.max_store_bytes,
            client_header,
            name: self.name.clone().unwrap_or_else(|| prefix.to_owned()),
        })
    }
}

/// The key from an `Idempotency-Key` value: an sf-string (`"abc"`) or a bare
/// token. `None` when empty, too long, or not printable ASCII.
pub fn parse_key(v: &[u8]) -> Option<&[u8]> {
    let v = v.trim_ascii();
    let inner = match v {
        [b'"', rest @ .., b'"'] => {
            if rest.iter().any(|&b| b == b'"' || b == b'\\') {
                return None;
            }
            rest
        }
        _ => v,
    };
    (!inner.is_empty()
        && inner.len() <= MAX_KEY_BYTES
        && inner.iter().all(|&b| (0x20..0x7f).contains(&b)))
    .then_some(inner)
}

/// A stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Status.
    pub status: StatusCode,
    /// Headers (without `x-request-id` and `content-length`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body.
    pub body: Bytes,
}

impl Stored {
    /// Length-prefixed binary form (for Redis).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        out.extend_from_slice(&(self.headers.len() as u32).to_be_bytes());
        for (n, v) in &self.headers {
            out.extend_from_slice(&(n.as_str().len() as u32).to_be_bytes());
            out.extend_from_slice(n.as_str().as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(&self.body);
    }

    /// Reads [`Stored::encode`]'s form; `None` when malformed.
    pub fn decode(mut b: &[u8]) -> Option<Stored> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if b.len() < n {
                return None;
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Some(h)
        }
        fn u32_of(b: &mut &[u8]) -> Option<usize> {
            let x = take(b, 4)?;
            Some(u32::from_be_bytes([x[0], x[1], x[2], x[3]]) as usize)
        }
        let s = take(&mut b, 2)?;
        let status = StatusCode::from_u16(u16::from_be_bytes([s[0], s[1]])).ok()?;
        let n = u32_of(&mut b)?;
        let mut headers = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            let l = u32_of(&mut b)?;
            let name = HeaderName::from_bytes(take(&mut b, l)?).ok()?;
            let l = u32_of(&mut b)?;
            let value = HeaderValue::from_bytes(take(&mut b, l)?).ok()?;
            headers.push((name, value));
        }
        Some(Stored {
            status,
            headers,
            body: Bytes::copy_from_slice(b),
        })
    }

    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum::<usize>()
    }
}

/// What a finished request leaves under its key.
#[derive(Debug, Clone)]
enum Done {
    /// The response, replayed to a repeat.
    Kept(Arc<Stored>),
    /// The request ran, but its response body passed `limit` bytes (the
    /// route's `max_response_bytes` then): nothing to replay, and a repeat
    /// must not run again.
    TooLarge { limit: u64 },
}

impl Done {
    /// Bytes it counts against `max_store_bytes`.
    fn size(&self) -> usize {
        match self {
            Done::Kept(s) => s.size(),
            Done::TooLarge { .. } => 0,
        }
    }
}

/// The outcome of presenting a key.
#[derive(Debug)]
pub enum Begin {
    /// First use: forward the request, then [`Lock::complete`],
    /// [`Lock::too_large`] or drop.
    Proceed(Lock),
    /// Already answered: replay this.
    Replay(Arc<Stored>),
    /// Already answered, but the response body passed `limit` bytes and was
    /// not kept (409): the request must not be forwarded again.
    NotKept {
        /// The `max_response_bytes` the response passed.
        limit: u64,
    },
    /// The first request with this key is still running (409).
    InFlight,
    /// The key was used with a different request (422).
    Mismatch,
    /// The store is unavailable: forward without protection.
    Unprotected,
}

type Key = [u8; 32];

/// Hashes a request into its fingerprint.
pub fn fingerprint(method: &Method, path_and_query: &str, body: &[u8]) -> Key {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0]);
    h.update(path_and_query.as_bytes());
    h.update([0]);
    h.update(Sha256::digest(body));
    h.finalize().into()
}

struct Entry {
    fp: Key,
    /// `None` while in flight.
    done: Option<Done>,
    expires: Instant,
}

struct Shard {
    map: HashMap<Key, Entry>,
    bytes: usize,
}

const SHARDS: usize = 16;

struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    per_shard_keys: usize,
    per_shard_bytes: usize,
    hasher: RandomState,
}

impl MemoryStore {
    fn shard(&self, k: &Key) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(k) as usize) % SHARDS]
    }

    fn begin(&self, key: Key, fp: Key, lock_ttl: Duration) -> Begin {
        let now = Instant::now();
        let mut s = self.shard(&key).lock();
        if let Some(e) = s.map.get(&key)
            && e.expires > now
        {
            return if e.fp != fp {
                Begin::Mismatch
            } else {
                match &e.done {
                    Some(Done::Kept(d)) => Begin::Replay(Arc::clone(d)),
                    Some(Done::TooLarge { limit }) => Begin::NotKept { limit: *limit },
                    None => Begin::InFlight,
                }
            };
        }
        if let Some(old) = s.map.remove(&key) {
            s.bytes -= old.done.map_or(0, |d| d.size());
        }
        self.make_room(&mut s, now, 1, 0);
        s.map.insert(
            key,
            Entry {
                fp,
                done: None,
                expires: now + lock_ttl,
            },
        );
        Begin::Proceed(Lock::memory(key, fp))
    }

    /// Evicts expired entries, then the ones expiring soonest, until one more
    /// entry of `bytes` fits.
    fn make_room(&self, s: &mut Shard, now: Instant, keys: usize, bytes: usize) {
        let fits = |s: &Shard| {
            s.map.len() + keys <= self.per_shard_keys && s.bytes + bytes <= self.per_shard_bytes
        };
        if fits(s) {
            return;
        }
        let mut freed = 0;
        s.map.retain(|_, e| {
            let keep = e.expires > now;
            if !keep {
                freed += e.done.as_ref().map_or(0, Done::size);
            }
            keep
        });
        s.bytes -= freed;
        while !fits(s) {
            let Some(k) = s.map.iter().min_by_key(|(_, e)| e.expires).map(|(k, _)| *k) else {
                return;
            };
            if let Some(e) = s.map.remove(&k) {
                s.bytes -= e.done.map_or(0, |d| d.size());
            }
        }
    }

    fn complete(&self, key: Key, fp: Key, done: Done, ttl: Duration) {
        let now = Instant::now();
        let size = done.size();
        let mut s = self.shard(&key).lock();
        // Only our own lock is replaced (it may have expired and been retaken).
        if !s
            .map
            .get(&key)
            .is_some_and(|e| e.fp == fp && e.done.is_none())
        {
            return;
        }
        s.map.remove(&key);
        self.make_room(&mut s, now, 1, size);
        s.bytes += size;
        s.map.insert(
            key,
            Entry {
                fp,
                done: Some(done),
                expires: now + ttl,
            },
        );
    }

    fn release(&self, key: Key, fp: Key) {
        let mut s = self.shard(&key).lock();
        if s.map
            .get(&key)
            .is_some_and(|e| e.fp == fp && e.done.is_none())
        {
            s.map.remove(&key);
        }
    }
}

const COMPLETE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

struct RedisStore {
    redis: Arc<RedisHandle>,
    complete: redis::Script,
    release: redis::Script,
}

enum Backend {
    Memory(MemoryStore),
    Redis(RedisStore),
}

/// A route's idempotency policy and store.
pub struct Idempotency {
    config: IdempotencyConfig,
    backend: Backend,
    /// Store failures (each one forwarded a request unprotected).
    pub store_errors: AtomicU64,
    /// Responses replayed.
    pub replayed: AtomicU64,
    log: LogLimiter,
    too_large_log: LogLimiter,
    epoch: Instant,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The in-flight lock of one key. Dropping it without
/// [`complete`](Lock::complete) releases the key (the client left, or the
/// response is not worth keeping).
#[derive(Debug)]
pub struct Lock {
    key: Key,
    fp: Key,
    owner: Option<Arc<Idempotency>>,
}

impl Lock {
    fn memory(key: Key, fp: Key) -> Self {
        Lock {
            key,
            fp,
            owner: None,
        }
    }

    /// Stores the response for the key's TTL.
    pub async fn complete(mut self, stored: Stored) {
        let Some(owner) = self.owner.take() else {
            return;
        };
        owner
            .store(self.key, self.fp, Done::Kept(Arc::new(stored)))
            .await;
    }

    /// Records, for the key's TTL, that the request ran but its response
    /// body passed `max_response_bytes`: a repeat then gets 409 instead of
    /// running again (the upstream did the work once already), and the
    /// warning is logged at most once per 10 s.
    pub async fn too_large(mut self) {
        let Some(owner) = self.owner.take() else {
            return;
        };
        owner.too_large_to_keep();
        let limit = owner.config.max_response_bytes as u64;
        owner
            .store(self.key, self.fp, Done::TooLarge { limit })
            .await;
    }

    /// Releases the key now (a repeat runs again), waiting for the store.
    pub async fn release(mut self) {
        let Some(owner) = self.owner.take() else {
            return;
        };
        owner.release_now(self.key, self.fp).await;
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            owner.release(self.key, self.fp);
        }
    }
}

impl Idempotency {
    /// Builds the policy; `redis` gives the shared handle for a Redis URL.
    pub fn new(
        config: &IdempotencyConfig,
        redis: &mut dyn FnMut(&str) -> Result<Arc<RedisHandle>, String>,
    ) -> Result<Self, String> {
        let backend = if config.store.starts_with("redis://") {
            Backend::Redis(RedisStore {
                redis: redis(&config.store)?,
                complete: redis::Script::new(COMPLETE_SCRIPT),
                release: redis::Script::new(RELEASE_SCRIPT),
            })
        } else {
            Backend::Memory(MemoryStore {
                shards: (0..SHARDS)
                    .map(|_| {
                        Mutex::new(Shard {
                            map: HashMap::new(),
                            bytes: 0,
                        })
                    })
                    .collect(),
                per_shard_keys: config.max_keys.div_ceil(SHARDS).max(1),
                per_shard_bytes: config
                    .max_store_bytes
                    .div_ceil(SHARDS)
                    .max(config.max_response_bytes),
                hasher: RandomState::new(),
            })
        };
        Ok(Self {
            config: config.clone(),
            backend,
            store_errors: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            log: LogLimiter::default(),
            too_large_log: LogLimiter::default(),
            epoch: Instant::now(),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.config
    }

    /// The scoped store key for `key` on this route.
    pub fn scoped_key(&self, key: &[u8], headers: &HeaderMap) -> Key {
        let mut h = Sha256::new();
        h.update(self.config.name.as_bytes());
        h.update([0]);
        if let Some(name) = &self.config.client_header {
            h.update(headers.get(name).map_or(&b""[..], HeaderValue::as_bytes));
        }
        h.update([0]);
        h.update(key);
        h.finalize().into()
    }

    fn redis_key(key: &Key) -> String {
        let mut s = String::with_capacity(KEY_PREFIX.len() + 5 + 64);
        s.push_str(KEY_PREFIX);
        s.push_str("idem:");
        for b in key {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    fn lock_value(fp: &Key) -> Vec<u8> {
        let mut v = Vec::with_capacity(33);
        v.push(b'L');
        v.extend_from_slice(fp);
        v
    }

    fn store_failed(&self, e: &dyn std::fmt::Display) {
        self.store_errors.fetch_add(1, Relaxed);
        if self.log.allow(self.epoch, Duration::from_secs(10)) {
            tracing::warn!(scope = %self.config.name, error = %e, "idempotency store unavailable; forwarding without protection");
        }
    }

    /// Notes a response not kept because its body exceeds
    /// `max_response_bytes`: logged at most once per 10 s, since a route
    /// whose responses are all that large would otherwise log every request.
    fn too_large_to_keep(&self) {
        if self
            .too_large_log
            .allow(self.epoch, Duration::from_secs(10))
        {
            tracing::warn!(scope = %self.config.name, limit = self.config.max_response_bytes, "idempotent response too large to keep; a repeat with its key gets 409 and is not forwarded");
        }
    }

    /// Presents `key` with the request's fingerprint.
    pub async fn begin(self: &Arc<Self>, key: Key, fp: Key) -> Begin {
        let r = match &self.backend {
            Backend::Memory(m) => m.begin(key, fp, self.config.lock_ttl),
            Backend::Redis(r) => self.begin_redis(r, key, fp).await,
        };
        match r {
            Begin::Proceed(mut lock) => {
                lock.owner = Some(Arc::clone(self));
                Begin::Proceed(lock)
            }
            Begin::Replay(s) => {
                self.replayed.fetch_add(1, Relaxed);
                Begin::Replay(s)
            }
            other => other,
        }
    }

    async fn begin_redis(&self, r: &RedisStore, key: Key, fp: Key) -> Begin {
        let rk = Self::redis_key(&key);
        let lock = Self::lock_value(&fp);
        let px = u64::try_from(self.config.lock_ttl.as_millis()).unwrap_or(u64::MAX);
        for _ in 0..2 {
            let (rk2, lock2) = (rk.clone(), lock.clone());
            let set: Result<Option<String>, _> = r
                .redis
                .run(|mut c| async move {
                    redis::cmd("SET")
                        .arg(rk2)
                        .arg(lock2)
                        .arg("NX")
                        .arg("PX")
                        .arg(px)
                        .query_async(&mut c)
                        .await
                })
                .await;
            match set {
                Err(e) => {
                    self.store_failed(&e);
                    return Begin::Unprotected;
                }
                Ok(Some(_)) => return Begin::Proceed(Lock::memory(key, fp)),
                Ok(None) => {}
            }
            let rk2 = rk.clone();
            let got: Result<Option<Vec<u8>>, _> = r
                .redis
                .run(|mut c| async move { redis::cmd("GET").arg(rk2).query_async(&mut c).await })
                .await;
            match got {
                Err(e) => {
                    self.store_failed(&e);
                    return Begin::Unprotected;
                }
                // Expired between SET and GET: try to take it again.
                Ok(None) => continue,
                Ok(Some(v)) => {
                    if v.len() < 33 || v[1..33] != fp {
                        return Begin::Mismatch;
                    }
                    let decoded = match v[0] {
                        b'L' => return Begin::InFlight,
                        b'N' => v[33..].try_into().ok().map(|l| Begin::NotKept {
                            limit: u64::from_be_bytes(l),
                        }),
                        _ => Stored::decode(&v[33..]).map(|s| Begin::Replay(Arc::new(s))),
                    };
                    return decoded.unwrap_or_else(|| {
                        self.store_failed(&"malformed stored response");
                        Begin::Unprotected
                    });
                }
            }
        }
        Begin::Unprotected
    }

    async fn store(&self, key: Key, fp: Key, done: Done) {
        match &self.backend {
            Backend::Memory(m) => m.complete(key, fp, done, self.config.ttl),
            Backend::Redis(r) => {
                let value = match &done {
                    Done::Kept(stored) => {
                        let mut v = Vec::with_capacity(33 + stored.body.len() + 256);
                        v.push(b'D');
                        v.extend_from_slice(&fp);
                        stored.encode(&mut v);
                        v
                    }
                    Done::TooLarge { limit } => {
                        let mut v = Vec::with_capacity(33 + 8);
                        v.push(b'N');
                        v.extend_from_slice(&fp);
                        v.extend_from_slice(&limit.to_be_bytes());
                        v
                    }
                };
                let mut inv = r.complete.key(Self::redis_key(&key));
                inv.arg(Self::lock_value(&fp))
                    .arg(value)
                    .arg(u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX));
                let res: Result<i64, _> = r
                    .redis
                    .run(|mut c| async move { inv.invoke_async(&mut c).await })
                    .await;
                if let Err(e) = res {
                    self.store_failed(&e);
                }
            }
        }
    }

    async fn release_now(&self, key: Key, fp: Key) {
        match &self.backend {
            Backend::Memory(m) => m.release(key, fp),
            Backend::Redis(r) => {
                let mut inv = r.release.key(Self::redis_key(&key));
                inv.arg(Self::lock_value(&fp));
                let res: Result<i64, _> = r
                    .redis
                    .run(|mut c| async move { inv.invoke_async(&mut c).await })
                    .await;
                if let Err(e) = res {
                    self.store_failed(&e);
                }
            }
        }
    }

    fn release(self: Arc<Self>, key: Key, fp: Key) {
        match &self.backend {
            Backend::Memory(m) => m.release(key, fp),
            Backend::Redis(_) => {
                // Drop cannot wait (the client left mid-request): release in
                // the background; the lock expires on its own if this fails.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move { self.release_now(key, fp).await });
                }
            }
        }
    }

    /// True when a response with `status` is kept.
    pub fn keeps(status: StatusCode) -> bool {
        !status.is_server_error()
            && status != StatusCode::REQUEST_TIMEOUT
            && status != StatusCode::TOO_MANY_REQUESTS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(parse_key(b"\"abc-1\""), Some(&b"abc-1"[..]));
        assert_eq!(parse_key(b" abc "), Some(&b"abc"[..]));
        assert_eq!(parse_key(b"\"\""), None);
        assert_eq!(parse_key(b""), None);
        assert_eq!(parse_key(&[b'a'; 256]), None);
        assert_eq!(parse_key(b"\"a\"b\""), None);
    }

    #[test]
    fn store_errors_hide_the_password() {
        for url in [
            "nats://:hunter2@h:1",
            "redis://:hunter2@h:notaport",
            "redis://u:hunter2@",
        ] {
            let e = check_store_url(url).unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.contains("***"), "{e}");
        }
        let e = RedisHandle::new("redis://:hunter2@h:notaport").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let h = RedisHandle::new("redis://:hunter2@127.0.0.1:1").unwrap();
        assert_eq!(h.url(), "redis://***@127.0.0.1:1");
    }

    fn cfg(max_keys: usize, max_store_bytes: usize) -> IdempotencyConfig {
        RawIdempotency {
            max_keys,
            max_store_bytes,
            max_response_bytes: 10,
            ..Default::default()
        }
        .resolve("/r", Duration::from_secs(1))
        .unwrap()
    }

    fn stored(body: &'static str) -> Stored {
        Stored {
            status: StatusCode::CREATED,
            headers: vec![(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("1"),
            )],
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[tokio::test]
    async fn memory_store_states() {
        let i = Arc::new(Idempotency::new(&cfg(100, 1000), &mut |_| Err("x".into())).unwrap());
        let k = i.scoped_key(b"k1", &HeaderMap::new());
        let fp = fingerprint(&Method::POST, "/r", b"body");
        let Begin::Proceed(lock) = i.begin(k, fp).await else {
            panic!("first use proceeds")
        };
        assert!(matches!(i.begin(k, fp).await, Begin::InFlight));
        let other = fingerprint(&Method::POST, "/r", b"other");
        assert!(matches!(i.begin(k, other).await, Begin::Mismatch));
        lock.complete(stored("hi")).await;
        let Begin::Replay(s) = i.begin(k, fp).await else {
            panic!("replays")
        };
        assert_eq!(s.body, "hi");
        // A dropped lock frees the key.
        let k2 = i.scoped_key(b"k2", &HeaderMap::new());
        let Begin::Proceed(lock) = i.begin(k2, fp).await else {
            panic!()
        };
        drop(lock);
        assert!(matches!(i.begin(k2, fp).await, Begin::Proceed(_)));
        // A response too large to keep leaves a record: a repeat is refused
        // (naming the limit), never let through again.
        let k3 = i.scoped_key(b"k3", &HeaderMap::new());
        let Begin::Proceed(lock) = i.begin(k3, fp).await else {
            panic!()
        };
        lock.too_large().await;
        assert!(matches!(
            i.begin(k3, fp).await,
            Begin::NotKept { limit: 10 }
        ));
        assert!(matches!(i.begin(k3, other).await, Begin::Mismatch));
        assert_eq!(i.replayed.load(Relaxed), 1, "a refusal is not a replay");
    }

    #[tokio::test]
    async fn memory_store_is_bounded() {
        let i = Arc::new(Idempotency::new(&cfg(16, 16 * 10), &mut |_| Err("x".into())).unwrap());
        let fp = fingerprint(&Method::POST, "/r", b"");
        for n in 0..1000u32 {
            let k = i.scoped_key(&n.to_be_bytes(), &HeaderMap::new());
            if let Begin::Proceed(l) = i.begin(k, fp).await {
                l.complete(stored("0123456789")).await;
            }
        }
        let Backend::Memory(m) = &i.backend else {
            panic!()
        };
        let (keys, bytes): (usize, usize) = m
            .shards
            .iter()
            .map(|s| {
                let s = s.lock();
                (s.map.len(), s.bytes)
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert!(keys <= 16, "{keys}");
        assert!(bytes <= 16 * 10 + 16 * 10, "{bytes}");
    }

    #[test]
    fn scope_separates_clients() {
        let mut c = cfg(10, 1000);
        c.client_header = Some(HeaderName::from_static("x-api-key"));
        let i = Idempotency::new(&c, &mut |_| Err("x".into())).unwrap();
        let mut a = HeaderMap::new();
        a.insert("x-api-key", HeaderValue::from_static("a"));
        let mut b = HeaderMap::new();
        b.insert("x-api-key", HeaderValue::from_static("b"));
        assert_ne!(i.scoped_key(b"k", &a), i.scoped_key(b"k", &b));
        assert_eq!(i.scoped_key(b"k", &a), i.scoped_key(b"k", &a));
    }

    proptest::proptest! {
        #[test]
        fn stored_round_trips(status in 200u16..600, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
                              hv in "[ -~]{0,20}", hn in "[a-z][a-z0-9-]{0,10}") {
            let s = Stored {
                status: StatusCode::from_u16(status).unwrap(),
                headers: vec![(HeaderName::from_bytes(hn.as_bytes()).unwrap(), HeaderValue::from_str(&hv).unwrap())],
                body: Bytes::from(body),
            };
            let mut out = Vec::new();
            s.encode(&mut out);
            proptest::prop_assert_eq!(Stored::decode(&out), Some(s));
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let _ = Stored::decode(&b);
        }

        #[test]
        fn parse_key_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Some(k) = parse_key(&b) {
                proptest::prop_assert!(!k.is_empty() && k.len() <= MAX_KEY_BYTES);
            }
        }
    }
}
