//! One breaker per key (per upstream instance), in bounded memory.

use super::config::BreakerConfig;
use super::core::{Breaker, OwnedPermit, Snapshot, State, Transition};
use super::error::{BreakerOpen, InvalidBreakerConfig};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

type KeyedListener<K> = Arc<dyn Fn(&K, &Transition) + Send + Sync>;

#[derive(Clone)]
struct Entry {
    breaker: Breaker,
    /// Insertion order, for eviction.
    seq: u64,
}

/// A set of breakers, one per key, all with the same configuration.
///
/// Lookups read an immutable map snapshot (arc-swap), so the request path
/// takes no lock; inserting a new key copies the map, which is fine because
/// upstream instances come and go rarely. At most `capacity` breakers are
/// kept: inserting into a full set evicts the oldest breaker that is closed
/// and held by no one else, or failing that the oldest one.
///
/// ```
/// use switchboard_resilience::breaker::{BreakerConfig, KeyedBreakers, Outcome};
///
/// let breakers = KeyedBreakers::new(BreakerConfig::default(), 1024).unwrap();
/// let permit = breakers.try_acquire(&"10.0.0.7:4001").unwrap();
/// permit.record(Outcome::Success);
/// assert_eq!(breakers.len(), 1);
/// ```
pub struct KeyedBreakers<K> {
    map: ArcSwap<HashMap<K, Entry>>,
    config: BreakerConfig,
    capacity: usize,
    /// Serializes writers (insert, remove, retain); readers never take it.
    write: Mutex<u64>,
    listener: Option<KeyedListener<K>>,
}

impl<K: fmt::Debug> fmt::Debug for KeyedBreakers<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreakers")
            .field("len", &self.map.load().len())
            .field("capacity", &self.capacity)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<K> KeyedBreakers<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// An empty set holding at most `capacity` (at least 1) breakers built from `config`.
    pub fn new(config: BreakerConfig, capacity: usize) -> Result<Self, InvalidBreakerConfig> {
        Self::build(config, capacity, None)
    }

    /// Like [`new`](KeyedBreakers::new), and calls `listener` with the key
    /// after every state change of any breaker in the set.
    pub fn with_listener(
        config: BreakerConfig,
        capacity: usize,
        listener: impl Fn(&K, &Transition) + Send + Sync + 'static,
    ) -> Result<Self, InvalidBreakerConfig> {
        Self::build(config, capacity, Some(Arc::new(listener)))
    }

    fn build(
        config: BreakerConfig,
        capacity: usize,
        listener: Option<KeyedListener<K>>,
    ) -> Result<Self, InvalidBreakerConfig> {
        config.validate()?;
        Ok(Self {
            map: ArcSwap::from_pointee(HashMap::new()),
            config,
            capacity: capacity.max(1),
            write: Mutex::new(0),
            listener,
        })
    }

    /// The breaker for `key`, created if there is none.
    pub fn get(&self, key: &K) -> Breaker {
        if let Some(entry) = self.map.load().get(key) {
            return entry.breaker.clone();
        }
        self.insert(key)
    }

    /// The breaker for `key`, if there is one.
    pub fn get_existing(&self, key: &K) -> Option<Breaker> {
        self.map.load().get(key).map(|e| e.breaker.clone())
    }

    /// Asks `key`'s breaker (created if needed) for leave to make a call.
    pub fn try_acquire(&self, key: &K) -> Result<OwnedPermit, BreakerOpen> {
        if let Some(entry) = self.map.load().get(key) {
            return entry.breaker.try_acquire_owned();
        }
        self.insert(key).try_acquire_owned()
    }

    #[cold]
    fn insert(&self, key: &K) -> Breaker {
        let mut seq = self.write.lock();
        let current = self.map.load_full();
        if let Some(entry) = current.get(key) {
            return entry.breaker.clone();
        }
        let listener = self.listener.clone().map(|listener| {
            let key = key.clone();
            Arc::new(move |t: &Transition| listener(&key, t)) as Arc<_>
        });
        let breaker = Breaker::build(self.config.clone(), listener)
            .expect("the configuration was validated when the set was built");
        let mut next = HashMap::clone(&current);
        if next.len() >= self.capacity
            && let Some(victim) = Self::victim(&next)
        {
            next.remove(&victim);
        }
        *seq += 1;
        next.insert(
            key.clone(),
            Entry {
                breaker: breaker.clone(),
                seq: *seq,
            },
        );
        self.map.store(Arc::new(next));
        breaker
    }

    /// The key to evict: the oldest closed breaker nobody else holds, else the oldest.
    fn victim(map: &HashMap<K, Entry>) -> Option<K> {
        let idle = map
            .iter()
            // The map itself and its previous snapshot may each hold a handle.
            .filter(|(_, e)| e.breaker.state() == State::Closed && e.breaker.handles() <= 2)
            .min_by_key(|(_, e)| e.seq);
        idle.or_else(|| map.iter().min_by_key(|(_, e)| e.seq))
            .map(|(k, _)| k.clone())
    }

    /// Forgets `key`'s breaker (e.g. when the instance deregisters).
    pub fn remove(&self, key: &K) -> Option<Breaker> {
        let _guard = self.write.lock();
        let current = self.map.load_full();
        current.get(key)?;
        let mut next = HashMap::clone(&current);
        let removed = next.remove(key).map(|e| e.breaker);
        self.map.store(Arc::new(next));
        removed
    }

    /// Keeps only the breakers for which `keep` returns true.
    pub fn retain(&self, mut keep: impl FnMut(&K, &Breaker) -> bool) {
        let _guard = self.write.lock();
        let mut next = HashMap::clone(&self.map.load_full());
        next.retain(|k, e| keep(k, &e.breaker));
        self.map.store(Arc::new(next));
    }

    /// How many breakers the set holds.
    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    /// True when the set holds no breaker.
    pub fn is_empty(&self) -> bool {
        self.map.load().is_empty()
    }

    /// The most breakers the set keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A snapshot of every breaker, for `/v1/breakers` and metrics.
    pub fn snapshots(&self) -> Vec<(K, Snapshot)> {
        self.map
            .load()
            .iter()
            .map(|(k, e)| (k.clone(), e.breaker.snapshot()))
            .collect()
    }
}
