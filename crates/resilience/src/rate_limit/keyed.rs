//! A rate limit per key (per client IP, per API key) in bounded memory.

use super::clock::TokioClock;
use super::error::{InvalidRateLimit, RateLimited};
use governor::Quota;
use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;

const SHARDS: usize = 16;

/// governor's keyed state (each key's theoretical arrival time), kept in
/// sharded maps of bounded size.
///
/// governor's own keyed stores grow without bound until someone calls
/// `retain_recent`; a gateway limiting per client IP cannot let an attacker
/// with many addresses grow its memory. Each shard holds at most
/// `max_keys / 16` keys: inserting into a full shard first drops the keys whose
/// state is as good as new (their theoretical arrival time has passed), and
/// if none has, the key closest to that, which only forgives that client a
/// little early.
struct BoundedStore<K> {
    shards: Box<[Mutex<HashMap<K, Nanos>>]>,
    per_shard: usize,
    hasher: RandomState,
    clock: TokioClock,
    start: u64,
}

impl<K> fmt::Debug for BoundedStore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedStore")
            .field("per_shard", &self.per_shard)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> BoundedStore<K> {
    fn new(max_keys: usize, clock: TokioClock) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            start: clock.nanos(),
            clock,
        }
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, Nanos>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

/// The store handed to governor, shared with the limiter so it can count keys.
struct SharedStore<K>(Arc<BoundedStore<K>>);

impl<K: Hash + Eq + Clone> StateStore for SharedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl<K: Hash + Eq + Clone> BoundedStore<K> {
    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut shard = self.shard(key).lock();
        let previous = shard.get(key).copied();
        let (value, next) = f(previous)?;
        if previous.is_none() && shard.len() >= self.per_shard {
            let now = Nanos::from(self.clock.nanos().saturating_sub(self.start));
            shard.retain(|_, tat| *tat > now);
            if shard.len() >= self.per_shard
                && let Some(oldest) = shard
                    .iter()
                    .min_by_key(|(_, tat)| **tat)
                    .map(|(k, _)| k.clone())
            {
                shard.remove(&oldest);
            }
        }
        shard.insert(key.clone(), next);
        Ok(value)
    }
}

type Inner<K> = governor::RateLimiter<K, SharedStore<K>, TokioClock, NoOpMiddleware<Nanos>>;

/// A GCRA rate limit per key, with at most about `max_keys` keys remembered.
///
/// ```
/// use std::num::NonZeroU32;
/// use switchboard_resilience::rate_limit::{KeyedRateLimiter, Quota};
///
/// let quota = Quota::per_second(NonZeroU32::new(10).unwrap());
/// let limiter = KeyedRateLimiter::new(quota, 100_000).unwrap();
/// assert!(limiter.check(&"203.0.113.9").is_ok());
/// ```
pub struct KeyedRateLimiter<K: Hash + Eq + Clone> {
    inner: Inner<K>,
    store: Arc<BoundedStore<K>>,
    clock: TokioClock,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> fmt::Debug for KeyedRateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> KeyedRateLimiter<K> {
    /// A limiter applying `quota` to each key separately.
    pub fn new(quota: Quota, max_keys: usize) -> Result<Self, InvalidRateLimit> {
        if max_keys == 0 {
            return Err(InvalidRateLimit::ZeroKeys);
        }
        let clock = TokioClock::new();
        let store = Arc::new(BoundedStore::new(max_keys, clock));
        Ok(Self {
            inner: governor::RateLimiter::new(quota, SharedStore(Arc::clone(&store)), clock),
            store,
            clock,
            max_keys,
        })
    }

    /// Lets one call for `key` through, or says when the next would be allowed.
    pub fn check(&self, key: &K) -> Result<(), RateLimited> {
        self.inner.check_key(key).map_err(|not_until| RateLimited {
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Waits until a call for `key` is allowed.
    pub async fn acquire(&self, key: &K) {
        while let Err(limited) = self.check(key) {
            tokio::time::sleep(limited.retry_after).await;
        }
    }

    /// How many keys are remembered now.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured bound on remembered keys (rounded up to a multiple of 16).
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }
}
