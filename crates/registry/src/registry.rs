//! [`Registry`]: the catalog of instances, their checker tasks, and the
//! lock-free per-service snapshots readers use.
//!
//! Each service has a slot: a mutex-guarded state that writers (registration,
//! checker tasks, passive reports, store notifications) change, and an
//! [`ArcSwap`] of the immutable [`ServiceView`] rebuilt after every change.
//! Readers only ever load the snapshot; the mutex is per service and held for
//! microseconds, never across an await.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::health::HealthState;
use crate::model::{
    CheckKind, CheckSpec, Instance, PassiveOutcome, Registration, ServiceSummary, ServiceView,
    Status,
};
use crate::probe::{NetProber, ProbeTarget, Prober, run_check};
use crate::store::redis::{Record, RedisStore};
use crate::validate::{self, NetworkPolicy, ValidationError};
use crate::watch::ServiceWatch;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The input broke a rule; the field is named.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Well-formed, but the network policy refuses the address (HTTP 403).
    #[error(transparent)]
    Forbidden(ValidationError),
    /// No such instance.
    #[error("instance {id} of service {service} is not registered")]
    NotFound {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
    },
    /// The store URL has an unknown scheme or is malformed.
    #[error("unsupported store url {0:?}: expected memory:// or redis://HOST:PORT")]
    UnsupportedStore(String),
    /// The shared store (Redis) could not be reached or answered an error.
    #[error("store unavailable: {0}")]
    Store(String),
}

/// Services without instances that [`Registry::watch`] still creates a slot for.
pub const MAX_WATCHED_SERVICES: usize = 10_000;

/// Tuning of a [`Registry`]. Every field has a production-safe default.
#[derive(Clone)]
#[non_exhaustive]
pub struct RegistryOptions {
    /// Which addresses instances may register with.
    pub network: NetworkPolicy,
    /// Runs active checks; replace it in tests to script results.
    pub prober: Arc<dyn Prober>,
    /// Consecutive passive failures (reported by callers) that suspect an instance. Default 3.
    pub passive_failures: u32,
    /// How long a suspected instance stays out of `passing`, unless an active check
    /// passes first. Default 10s.
    pub passive_ejection: Duration,
    /// Redis store: period of the full resynchronisation that repairs lost notifications. Default 5s.
    pub resync_interval: Duration,
    /// Redis store: prefix of every key and channel. Default `switchboard:registry`.
    pub redis_prefix: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            network: NetworkPolicy::default(),
            prober: Arc::new(NetProber),
            passive_failures: 3,
            passive_ejection: Duration::from_secs(10),
            resync_interval: Duration::from_secs(5),
            redis_prefix: "switchboard:registry".into(),
        }
    }
}

impl RegistryOptions {
    /// Replaces the prober.
    #[must_use]
    pub fn prober(mut self, prober: Arc<dyn Prober>) -> Self {
        self.prober = prober;
        self
    }

    /// Replaces the network policy.
    #[must_use]
    pub fn network(mut self, network: NetworkPolicy) -> Self {
        self.network = network;
        self
    }

    /// Sets the passive failure count and ejection time.
    #[must_use]
    pub fn passive(mut self, failures: u32, ejection: Duration) -> Self {
        self.passive_failures = failures.max(1);
        self.passive_ejection = ejection;
        self
    }

    /// Sets the Redis full-resync period.
    #[must_use]
    pub fn resync_interval(mut self, every: Duration) -> Self {
        self.resync_interval = every;
        self
    }

    /// Sets the Redis key prefix.
    #[must_use]
    pub fn redis_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.redis_prefix = prefix.into();
        self
    }
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("network", &self.network)
            .field("passive_failures", &self.passive_failures)
            .field("passive_ejection", &self.passive_ejection)
            .field("resync_interval", &self.resync_interval)
            .field("redis_prefix", &self.redis_prefix)
            .finish_non_exhaustive()
    }
}

/// The service registry: register, deregister, heartbeat, watch.
///
/// Cheap to clone (an `Arc` inside). Background tasks (checks, Redis
/// subscription) stop when the last clone is dropped.
#[derive(Clone)]
pub struct Registry {
    pub(crate) inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("store", &self.inner.store.kind())
            .field("services", &self.inner.slots.load().len())
            .finish_non_exhaustive()
    }
}

pub(crate) enum Store {
    Memory,
    Redis(Box<RedisStore>),
}

impl Store {
    fn kind(&self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Redis(_) => "redis",
        }
    }
}

pub(crate) struct Inner {
    pub(crate) opts: RegistryOptions,
    slots: ArcSwap<SlotMap>,
    slots_write: Mutex<()>,
    index: AtomicU64,
    generation: AtomicU64,
    pub(crate) store: Store,
    pub(crate) cancel: CancellationToken,
    /// What watches of unknown services get once [`MAX_WATCHED_SERVICES`] is reached.
    detached: Slot,
}

/// Service name -> slot. Hashed with a small multiplicative hash: the lookup is
/// on the gateway's request path and names are short, validated, and only
/// added by registrations and watches.
type SlotMap = HashMap<String, Arc<Slot>, std::hash::BuildHasherDefault<NameHasher>>;

/// FxHash (rustc's hasher): a word at a time, rotate-xor-multiply.
#[derive(Default, Clone, Copy)]
struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0xf135_7aea_2e62_a9c5;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(tail) ^ (rest.len() as u64) << 56)
            .wrapping_mul(K);
    }

    fn write_u8(&mut self, i: u8) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(i)).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) struct Slot {
    pub(crate) name: String,
    state: Mutex<ServiceState>,
    view: Arc<ArcSwap<ServiceView>>,
    tx: watch::Sender<u64>,
    /// Entries whose passive failure count is above zero.
    failing: std::sync::atomic::AtomicUsize,
}

impl Slot {
    /// Sets an entry's passive failure count, keeping `failing` in step (call with the state locked).
    fn set_failures(&self, entry: &mut Entry, n: u32) {
        match (entry.passive_failures > 0, n > 0) {
            (false, true) => {
                self.failing.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                self.failing.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
        entry.passive_failures = n;
    }

    /// Forgets a removed entry's failures (call with the state locked).
    fn forget(&self, entry: &mut Entry) {
        self.set_failures(entry, 0);
    }

    fn new(name: &str) -> Self {
        Slot {
            failing: std::sync::atomic::AtomicUsize::new(0),
            name: name.to_owned(),
            state: Mutex::new(ServiceState::default()),
            view: Arc::new(ArcSwap::from_pointee(ServiceView::default())),
            tx: watch::Sender::new(0),
        }
    }
}

#[derive(Default)]
struct ServiceState {
    instances: BTreeMap<String, Entry>,
}

struct Entry {
    reg: Registration,
    generation: u64,
    status: Status,
    last_check: Option<SystemTime>,
    last_heartbeat: Instant,
    /// When the registry last accepted a heartbeat renewing the TTL check
    /// (wall clock, for display; the deadline uses `last_heartbeat`). With the
    /// Redis store, Redis's clock, and any process's heartbeat (see
    /// [`Registry::heartbeats`]).
    heartbeat_at: Option<SystemTime>,
    passive_failures: u32,
    ejected_until: Option<Instant>,
    wake: Arc<Notify>,
    _task: Option<AbortOnDrop>,
}

impl Entry {
    fn effective_status(&self, now: Instant) -> Status {
        match self.ejected_until {
            Some(until) if until > now => Status::Critical,
            _ => self.status,
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The status an instance has right after registration: `critical` for active
/// checks (no traffic before the first check passes), `passing` for TTL checks
/// (the registration counts as the first heartbeat) and for no check.
pub(crate) fn initial_status(reg: &Registration) -> Status {
    match &reg.check {
        Some(c) if c.is_active() => Status::Critical,
        _ => Status::Passing,
    }
}

/// What a store holds about one instance (used by the Redis mirror).
#[derive(Debug, Clone)]
pub(crate) struct Known {
    pub(crate) reg: Registration,
    pub(crate) generation: u64,
    pub(crate) status: Status,
    pub(crate) last_check: Option<SystemTime>,
}

impl Registry {
    /// Opens a registry on a store URL: `memory://` (in-process) or
    /// `redis://HOST:PORT[/DB]` (shared by every process using the same Redis).
    pub async fn open(store_url: &str, opts: RegistryOptions) -> Result<Registry, RegistryError> {
        let url = store_url.trim();
        if url == "memory://" || url == "memory" || url == "mem://" {
            return Ok(Self::memory(opts));
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            let store = RedisStore::connect(url, &opts).await?;
            let registry = Self::with_store(opts, Store::Redis(Box::new(store)));
            crate::store::redis::start(&registry).await?;
            return Ok(registry);
        }
        Err(RegistryError::UnsupportedStore(crate::store::redact_url(
            store_url,
        )))
    }

    /// An in-process registry (the `memory://` store). Must be called inside a Tokio runtime
    /// before anything registers (checker tasks are spawned on it).
    pub fn memory(opts: RegistryOptions) -> Registry {
        Self::with_store(opts, Store::Memory)
    }

    fn with_store(opts: RegistryOptions, store: Store) -> Registry {
        let cancel = CancellationToken::new();
        let inner = Arc::new(Inner {
            opts,
            slots: ArcSwap::from_pointee(SlotMap::default()),
            slots_write: Mutex::new(()),
            index: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            store,
            cancel: cancel.clone(),
            detached: Slot::new(""),
        });
        Registry {
            inner,
            _guard: Arc::new(cancel.drop_guard()),
        }
    }

    /// The store kind: `"memory"` or `"redis"`.
    pub fn store_kind(&self) -> &'static str {
        self.inner.store.kind()
    }

    /// Registers (or re-registers) an instance and returns it as readers will see it.
    ///
    /// Registering again with the same body changes nothing (idempotent, the
    /// status is kept); a different body replaces the instance and restarts its check.
    pub async fn register(
        &self,
        service: &str,
        id: &str,
        registration: Registration,
    ) -> Result<Instance, RegistryError> {
        validate::service_name(service)?;
        validate::instance_id(id)?;
        validate::registration(&registration)?;
        self.inner
            .opts
            .network
            .check(&registration.address)
            .map_err(RegistryError::Forbidden)?;
        let slot = self.inner.slot(service);
        if let Some(existing) = self.inner.same_registration(&slot, id, &registration) {
            if let Store::Redis(store) = &self.inner.store {
                // Re-registration is also how clients repair a Redis that lost its data.
                store.ensure(&slot.name, id, &existing, true).await?;
            }
            return Ok(self.inner.instance(&slot, id).expect("just checked"));
        }
        let known = Known {
            status: initial_status(&registration),
            reg: registration,
            generation: self.inner.next_generation(),
            last_check: None,
        };
        match &self.inner.store {
            Store::Memory => self.inner.upsert(&slot, id, known),
            Store::Redis(store) => {
                let _sync = store.lock().await;
                store.put(service, id, &known).await?;
                self.inner.upsert(&slot, id, known);
            }
        }
        Ok(self.inner.instance(&slot, id).expect("just inserted"))
    }

    /// Renews the TTL of an instance's check (and marks it alive for any check kind).
    pub async fn heartbeat(&self, service: &str, id: &str) -> Result<(), RegistryError> {
        validate::service_name(service)?;
        validate::instance_id(id)?;
        let not_found = || RegistryError::NotFound {
            service: service.to_owned(),
            id: id.to_owned(),
        };
        if let Store::Redis(store) = &self.inner.store
            && self.inner.instance_by_name(service, id).is_none()
        {
            // Registered through another process and not announced here yet.
            store.resync_service(&self.inner, service).await?;
        }
        let slot = self.inner.existing_slot(service).ok_or_else(not_found)?;
        let at = SystemTime::now();
        let ttl = {
            let mut state = slot.state.lock();
            let entry = state.instances.get_mut(id).ok_or_else(not_found)?;
            entry.last_heartbeat = Instant::now();
            match &entry.reg.check {
                Some(CheckSpec {
                    kind: CheckKind::Ttl { .. },
                    ..
                }) => {
                    // Only a TTL checker cares; waking an HTTP checker would probe early.
                    entry.wake.notify_one();
                    if matches!(self.inner.store, Store::Memory) {
                        entry.heartbeat_at = Some(at);
                    }
                    RedisStore::ttl_meta(&entry.reg).map(|meta| (entry.generation, meta))
                }
                _ => None,
            }
        };
        if let (Store::Redis(store), Some((generation, meta))) = (&self.inner.store, ttl) {
            // A critical instance turns passing in Redis and is announced; every
            // process (this one too) applies it from the notification. Not
            // re-read here: that waits for the mirror's lock, and slow
            // heartbeats under load would let more instances expire.
            let recorded = store.heartbeat(service, id, generation, &meta).await?;
            // Shown as a TTL pass only once Redis has the new deadline, at the
            // time Redis recorded (what the other processes will show too).
            let mut state = slot.state.lock();
            if let Some(e) = state.instances.get_mut(id)
                && e.generation == generation
            {
                e.heartbeat_at = e.heartbeat_at.max(Some(recorded.unwrap_or(at)));
            }
        }
        Ok(())
    }

    /// When the registry last accepted a heartbeat from each TTL instance of
    /// `service` (wall clock), by id; instances without one since they
    /// registered are left out, and so are heartbeats of other check kinds
    /// (they renew nothing). Read from memory, never from the store.
    ///
    /// With the Redis store, this is the latest heartbeat that any process on
    /// the same Redis accepted, in Redis's clock (`TIME`, ms): each heartbeat
    /// records its time in Redis, and every process reads the times recorded
    /// since its last look with its TTL scan, without a notification per
    /// heartbeat. A heartbeat accepted by another process shows here within
    /// one scan interval (250 ms) plus a Redis round trip, or, for an
    /// instance this process learned of only after that scan, within one
    /// `resync_interval` (every full resync re-reads all the times).
    /// Instances last heartbeated through a version without this show none
    /// until their next heartbeat here or through a newer process.
    pub fn heartbeats(&self, service: &str) -> BTreeMap<String, SystemTime> {
        let Some(slot) = self.inner.existing_slot(service) else {
            return BTreeMap::new();
        };
        let state = slot.state.lock();
        state
            .instances
            .iter()
            .filter_map(|(id, e)| e.heartbeat_at.map(|t| (id.clone(), t)))
            .collect()
    }

    /// Removes an instance. Returns whether it was registered.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<bool, RegistryError> {
        validate::service_name(service)?;
        validate::instance_id(id)?;
        let mut existed = false;
        let _sync = match &self.inner.store {
            Store::Memory => None,
            Store::Redis(store) => {
                let sync = store.lock().await;
                existed = store.delete(service, id, None).await?;
                Some(sync)
            }
        };
        if let Some(slot) = self.inner.existing_slot(service) {
            existed |= self.inner.remove(&slot, id, None);
        }
        Ok(existed)
    }

    /// Reports what a caller saw when using an instance (passive health).
    ///
    /// `passive_failures` failures in a row take the instance out of `passing`
    /// for `passive_ejection` and trigger an immediate active check, whose
    /// passing result restores it. Unknown instances are ignored.
    pub fn report(&self, service: &str, id: &str, outcome: PassiveOutcome) {
        let Some(slot) = self.inner.existing_slot(service) else {
            return;
        };
        // The common case on the gateway's request path: a success while nothing in
        // the service has failed recently. Answered without taking the lock.
        if outcome == PassiveOutcome::Success && slot.failing.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut state = slot.state.lock();
        let Some(entry) = state.instances.get_mut(id) else {
            return;
        };
        match outcome {
            PassiveOutcome::Success => slot.set_failures(entry, 0),
            PassiveOutcome::Failure => {
                slot.set_failures(entry, entry.passive_failures.saturating_add(1));
                let now = Instant::now();
                let ejected = entry.ejected_until.is_some_and(|u| u > now);
                if entry.passive_failures >= self.inner.opts.passive_failures && !ejected {
                    let until = now + self.inner.opts.passive_ejection;
                    entry.ejected_until = Some(until);
                    slot.set_failures(entry, 0);
                    entry.wake.notify_one();
                    tracing::info!(service, id, "instance suspected by passive failures");
                    self.inner.rebuild(&slot, &state);
                    drop(state);
                    let inner = Arc::clone(&self.inner);
                    let id = id.to_owned();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = tokio::time::sleep_until(until) => inner.end_ejection(&slot, &id, until),
                            () = inner.cancel.cancelled() => {}
                        }
                    });
                }
            }
        }
    }

    /// Summaries of every service with at least one instance, sorted by name.
    pub fn services(&self) -> Vec<ServiceSummary> {
        let slots = self.inner.slots.load();
        let mut out: Vec<ServiceSummary> = slots
            .values()
            .filter_map(|slot| {
                let view = slot.view.load();
                (!view.instances.is_empty()).then(|| ServiceSummary {
                    service: slot.name.clone(),
                    instances: view.instances.len(),
                    passing: view.passing.len(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// The current snapshot of a service, lock-free; `None` if it was never seen.
    ///
    /// This is the hot-path lookup (tens of nanoseconds): one atomic load of
    /// the service map, one hash lookup, one atomic load of the view.
    pub fn view(&self, service: &str) -> Option<Arc<ServiceView>> {
        self.inner
            .slots
            .load()
            .get(service)
            .map(|slot| slot.view.load_full())
    }

    /// A fresh snapshot of a service including each instance's latest check time
    /// (the lock-free view is only rebuilt on changes, not on every check).
    pub fn snapshot(&self, service: &str) -> ServiceView {
        match self.inner.existing_slot(service) {
            Some(slot) => self.inner.build_view(&slot, &slot.state.lock(), None),
            None => ServiceView::default(),
        }
    }

    /// Watches a service (registered or not yet): a lock-free snapshot plus change notifications.
    ///
    /// Watching a service that was never registered creates an empty slot for it,
    /// up to [`MAX_WATCHED_SERVICES`]; past that, such a watch is detached (it
    /// stays empty), so unauthenticated blocking queries cannot grow memory without bound.
    pub fn watch(&self, service: &str) -> ServiceWatch {
        let slot = match self.inner.existing_slot(service) {
            Some(slot) => slot,
            None if self.inner.slots.load().len() >= MAX_WATCHED_SERVICES => {
                // One shared, never-changing empty slot; its sender lives with the registry.
                let detached = &self.inner.detached;
                return ServiceWatch::new(Arc::clone(&detached.view), detached.tx.subscribe());
            }
            None => self.inner.slot(service),
        };
        ServiceWatch::new(Arc::clone(&slot.view), slot.tx.subscribe())
    }

    /// Number of instances whose checks this process runs right now (for the
    /// Redis store, the active checks whose lease it holds; TTL instances are
    /// expired by every process's scanner and not counted).
    pub fn checks_owned(&self) -> usize {
        match &self.inner.store {
            Store::Memory => self
                .inner
                .slots
                .load()
                .values()
                .map(|s| {
                    s.state
                        .lock()
                        .instances
                        .values()
                        .filter(|e| e.reg.check.is_some())
                        .count()
                })
                .sum(),
            Store::Redis(store) => store.leases_held(),
        }
    }

    /// Stops background work: checks, subscriptions; Redis leases are released
    /// so another process takes the checks over at once. Dropping every clone
    /// without calling this behaves like a crash (leases expire).
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        if let Store::Redis(store) = &self.inner.store {
            store.release_leases().await;
        }
    }
}

/// Jitter derived from the instance identity and a per-process random seed,
/// so 10,000 checks do not fire in the same millisecond. It stays at least
/// 2 ms (the timer's resolution, with rounding) away from a whole number of
/// intervals, so a check never shares a timer tick with a deadline set a
/// whole number of intervals after the registration: with a paused clock
/// (the registry's tests) which of the two ran first was left to chance,
/// about once in a thousand runs.
fn jitter(service: &str, id: &str, interval: Duration) -> Duration {
    static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let h = SEED
        .get_or_init(std::collections::hash_map::RandomState::new)
        .hash_one((service, id));
    let nanos = u64::try_from(interval.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    const EDGE: u64 = 2_000_000;
    if nanos > 4 * EDGE {
        Duration::from_nanos(EDGE + h % (nanos - 2 * EDGE))
    } else {
        Duration::from_nanos(h % nanos)
    }
}

impl Inner {
    fn next_generation(&self) -> u64 {
        // Unique across processes sharing Redis: time-based high bits, counter low bits.
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        let t = u64::try_from(t).unwrap_or(0);
        let c = self.generation.fetch_add(1, Ordering::Relaxed);
        (t << 12) ^ (c & 0xfff) ^ (std::process::id() as u64).rotate_left(48)
    }

    pub(crate) fn existing_slot(&self, service: &str) -> Option<Arc<Slot>> {
        self.slots.load().get(service).cloned()
    }

    pub(crate) fn slot(&self, service: &str) -> Arc<Slot> {
        if let Some(slot) = self.existing_slot(service) {
            return slot;
        }
        let _w = self.slots_write.lock();
        let current = self.slots.load_full();
        if let Some(slot) = current.get(service) {
            return Arc::clone(slot);
        }
        let slot = Arc::new(Slot::new(service));
        let mut next = SlotMap::clone(&current);
        next.insert(service.to_owned(), Arc::clone(&slot));
        self.slots.store(Arc::new(next));
        slot
    }

    pub(crate) fn slot_names(&self) -> Vec<String> {
        self.slots.load().keys().cloned().collect()
    }

    fn same_registration(&self, slot: &Slot, id: &str, reg: &Registration) -> Option<Known> {
        let state = slot.state.lock();
        state
            .instances
            .get(id)
            .filter(|e| &e.reg == reg)
            .map(|e| Known {
                reg: e.reg.clone(),
                generation: e.generation,
                status: e.status,
                last_check: e.last_check,
            })
    }

    fn instance_by_name(&self, service: &str, id: &str) -> Option<Instance> {
        let slot = self.existing_slot(service)?;
        self.instance(&slot, id)
    }

    fn instance(&self, slot: &Slot, id: &str) -> Option<Instance> {
        let state = slot.state.lock();
        let e = state.instances.get(id)?;
        Some(Instance::new(
            &slot.name,
            id,
            &e.reg,
            e.effective_status(Instant::now()),
            e.last_check,
            e.heartbeat_at,
        ))
    }

    /// The instances this process knows for a service (Redis mirror input/output).
    pub(crate) fn known(&self, slot: &Slot) -> BTreeMap<String, Known> {
        slot.state
            .lock()
            .instances
            .iter()
            .map(|(id, e)| {
                (
                    id.clone(),
                    Known {
                        reg: e.reg.clone(),
                        generation: e.generation,
                        status: e.status,
                        last_check: e.last_check,
                    },
                )
            })
            .collect()
    }

    /// Inserts or updates an instance; a new generation replaces the entry and its checker.
    pub(crate) fn upsert(self: &Arc<Self>, slot: &Arc<Slot>, id: &str, known: Known) {
        let mut state = slot.state.lock();
        if let Some(e) = state.instances.get_mut(id)
            && e.generation == known.generation
        {
            let changed = e.status != known.status;
            if known.last_check > e.last_check {
                e.last_check = known.last_check;
            }
            if changed {
                e.status = known.status;
                self.rebuild(slot, &state);
            }
            return;
        }
        let wake = Arc::new(Notify::new());
        // Redis store: TTL instances have no task; one scanner per process
        // expires them (see `store::redis`).
        let shared_ttl = matches!(self.store, Store::Redis(_))
            && matches!(
                known.reg.check.as_ref().map(|c| &c.kind),
                Some(CheckKind::Ttl { .. })
            );
        let task = known.reg.check.clone().filter(|_| !shared_ttl).map(|spec| {
            let handle = tokio::spawn(check_loop(
                Arc::clone(self),
                Arc::clone(slot),
                id.to_owned(),
                known.generation,
                spec,
                known.reg.clone(),
                Arc::clone(&wake),
                known.status,
            ));
            AbortOnDrop(handle.abort_handle())
        });
        if let Some(mut old) = state.instances.remove(id) {
            slot.forget(&mut old);
        }
        state.instances.insert(
            id.to_owned(),
            Entry {
                reg: known.reg,
                generation: known.generation,
                status: known.status,
                last_check: known.last_check,
                last_heartbeat: Instant::now(),
                heartbeat_at: None,
                passive_failures: 0,
                ejected_until: None,
                wake,
                _task: task,
            },
        );
        self.rebuild(slot, &state);
    }

    /// Removes an instance (only the given generation, when one is given).
    pub(crate) fn remove(&self, slot: &Slot, id: &str, generation: Option<u64>) -> bool {
        let mut state = slot.state.lock();
        let matches = state
            .instances
            .get(id)
            .is_some_and(|e| generation.is_none_or(|g| g == e.generation));
        if matches {
            if let Some(mut old) = state.instances.remove(id) {
                slot.forget(&mut old);
            }
            self.rebuild(slot, &state);
        }
        matches
    }

    fn end_ejection(&self, slot: &Slot, id: &str, until: Instant) {
        let mut state = slot.state.lock();
        if let Some(e) = state.instances.get_mut(id)
            && e.ejected_until == Some(until)
        {
            e.ejected_until = None;
            self.rebuild(slot, &state);
        }
    }

    fn build_view(&self, slot: &Slot, state: &ServiceState, index: Option<u64>) -> ServiceView {
        let now = Instant::now();
        let instances: Vec<Instance> = state
            .instances
            .iter()
            .map(|(id, e)| {
                Instance::new(
                    &slot.name,
                    id,
                    &e.reg,
                    e.effective_status(now),
                    e.last_check,
                    e.heartbeat_at,
                )
            })
            .collect();
        let passing = instances
            .iter()
            .filter(|i| i.status == Status::Passing)
            .cloned()
            .collect();
        ServiceView {
            index: index.unwrap_or_else(|| slot.view.load().index),
            instances,
            passing,
        }
    }

    /// Publishes a new snapshot; called with the slot's state locked so views are published in order.
    fn rebuild(&self, slot: &Slot, state: &ServiceState) {
        let index = self.index.fetch_add(1, Ordering::SeqCst) + 1;
        let view = self.build_view(slot, state, Some(index));
        slot.view.store(Arc::new(view));
        slot.tx.send_replace(index);
    }

    fn entry_status(&self, slot: &Slot, id: &str, generation: u64) -> Option<Status> {
        let state = slot.state.lock();
        state
            .instances
            .get(id)
            .filter(|e| e.generation == generation)
            .map(|e| e.status)
    }

    fn touch(&self, slot: &Slot, id: &str, generation: u64, at: SystemTime) {
        let mut state = slot.state.lock();
        if let Some(e) = state.instances.get_mut(id)
            && e.generation == generation
        {
            e.last_check = Some(at);
        }
    }

    /// Sets the status an active check or TTL decided; in Redis mode it is stored first.
    async fn publish_status(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        id: &str,
        generation: u64,
        status: Status,
        at: Option<SystemTime>,
    ) -> Result<(), RegistryError> {
        let _sync = match &self.store {
            Store::Memory => None,
            Store::Redis(store) => {
                let sync = store.lock().await;
                store
                    .set_status(&slot.name, id, generation, status, at)
                    .await?;
                Some(sync)
            }
        };
        let mut state = slot.state.lock();
        if let Some(e) = state.instances.get_mut(id)
            && e.generation == generation
        {
            if at.is_some() {
                e.last_check = at;
            }
            if e.status != status {
                tracing::info!(service = %slot.name, id, %status, "instance status changed");
                e.status = status;
                if status == Status::Passing {
                    // A passing active check clears a passive suspicion early.
                    e.ejected_until = None;
                }
                self.rebuild(slot, &state);
            }
        }
        Ok(())
    }

    async fn deregister_critical(self: &Arc<Self>, slot: &Arc<Slot>, id: &str, generation: u64) {
        tracing::info!(service = %slot.name, id, "deregistering instance critical for too long");
        let _sync = match &self.store {
            Store::Memory => None,
            Store::Redis(store) => {
                let sync = store.lock().await;
                if let Err(error) = store.delete(&slot.name, id, Some(generation)).await {
                    tracing::warn!(service = %slot.name, id, %error, "could not deregister");
                    return;
                }
                Some(sync)
            }
        };
        self.remove(slot, id, Some(generation));
    }

    /// Whether this process should run the check now (always, for the memory store).
    async fn own_check(&self, service: &str, id: &str, hold: Duration) -> bool {
        match &self.store {
            Store::Memory => true,
            Store::Redis(store) => store.lease(service, id, hold).await,
        }
    }

    /// Time left before a TTL check expires; `None` when the instance is gone.
    fn ttl_remaining(
        &self,
        slot: &Slot,
        id: &str,
        generation: u64,
        ttl: Duration,
    ) -> Option<Duration> {
        let last = {
            let state = slot.state.lock();
            let e = state
                .instances
                .get(id)
                .filter(|e| e.generation == generation)?;
            e.last_heartbeat
        };
        Some((last + ttl).saturating_duration_since(Instant::now()))
    }

    /// Moves instances' heartbeat times forward to what a shared store
    /// recorded (never back: a time read before a newer local heartbeat is
    /// older). Unknown instances and non-TTL ones are skipped. The views are
    /// not rebuilt (a heartbeat is not a change of the view; snapshots read the
    /// entries).
    pub(crate) fn apply_heartbeats(&self, beats: Vec<(String, String, SystemTime)>) {
        let mut slot: Option<Arc<Slot>> = None;
        for (service, id, at) in beats {
            if slot.as_ref().is_none_or(|s| s.name != service) {
                slot = self.existing_slot(&service);
            }
            let Some(slot) = &slot else { continue };
            let mut state = slot.state.lock();
            if let Some(e) = state.instances.get_mut(&id)
                && matches!(
                    e.reg.check.as_ref().map(|c| &c.kind),
                    Some(CheckKind::Ttl { .. })
                )
            {
                e.heartbeat_at = e.heartbeat_at.max(Some(at));
            }
        }
    }

    pub(crate) fn apply_records(
        self: &Arc<Self>,
        service: &str,
        records: BTreeMap<String, Record>,
    ) {
        let slot = self.slot(service);
        let current = self.known(&slot);
        for id in current.keys() {
            if !records.contains_key(id) {
                self.remove(&slot, id, None);
            }
        }
        for (id, record) in records {
            self.upsert(&slot, &id, record.into_known());
        }
    }
}

/// Runs the checks of one instance until it is removed (the task is aborted) or the registry stops.
#[allow(clippy::too_many_arguments)]
async fn check_loop(
    inner: Arc<Inner>,
    slot: Arc<Slot>,
    id: String,
    generation: u64,
    spec: CheckSpec,
    reg: Registration,
    wake: Arc<Notify>,
    initial: Status,
) {
    let cancel = inner.cancel.clone();
    tokio::select! {
        () = cancel.cancelled() => {}
        () = async {
            match spec.kind.clone() {
                CheckKind::Ttl { ttl } => ttl_loop(&inner, &slot, &id, generation, &spec, ttl, &wake).await,
                kind => active_loop(&inner, &slot, &id, generation, &spec, &reg, kind, &wake, initial).await,
            }
        } => {}
    }
}

/// How often a check's time is written to a shared store when its status did not change.
const SHARE_LAST_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How long a non-owner waits before trying to take a check over: half an
/// interval, so a dead owner's checks move within two intervals.
fn retry_after(interval: Duration) -> Duration {
    (interval / 2).max(Duration::from_millis(25))
}

/// How long a lease is held: renewed every interval, so it survives one late tick.
fn lease_hold(interval: Duration) -> Duration {
    interval + interval / 2
}

#[allow(clippy::too_many_arguments)]
async fn active_loop(
    inner: &Arc<Inner>,
    slot: &Arc<Slot>,
    id: &str,
    generation: u64,
    spec: &CheckSpec,
    reg: &Registration,
    kind: CheckKind,
    wake: &Notify,
    initial: Status,
) {
    let target = ProbeTarget {
        service: slot.name.clone(),
        id: id.to_owned(),
        address: reg.address.clone(),
        port: reg.port,
        kind,
    };
    let mut probe = inner.opts.prober.probe(&target);
    let mut health: Option<HealthState> = None;
    let mut critical_since: Option<Instant> = None;
    let mut last_shared: Option<Instant> = None;
    tokio::select! {
        () = tokio::time::sleep(jitter(&slot.name, id, spec.interval)) => {}
        () = wake.notified() => {}
    }
    loop {
        if !inner
            .own_check(&slot.name, id, lease_hold(spec.interval))
            .await
        {
            // Someone else checks it; forget local counters so a takeover resumes from the stored status.
            health = None;
            critical_since = None;
            tokio::time::sleep(retry_after(spec.interval)).await;
            continue;
        }
        let Some(current) = inner.entry_status(slot, id, generation) else {
            return;
        };
        let health = health.get_or_insert_with(|| {
            let fresh = current == initial
                && current == Status::Critical
                && inner.entry_never_checked(slot, id);
            if fresh {
                HealthState::new(spec.healthy_threshold, spec.unhealthy_threshold)
            } else {
                HealthState::resume(current, spec.healthy_threshold, spec.unhealthy_threshold)
            }
        });
        let result = run_check(&mut probe, spec.timeout).await;
        let now = SystemTime::now();
        let before = health.status();
        match health.observe(result) {
            Some(new) => {
                if let Err(error) = inner
                    .publish_status(slot, id, generation, new, Some(now))
                    .await
                {
                    tracing::warn!(service = %slot.name, id, %error, "could not store status");
                    health.set_status(before);
                }
            }
            None => {
                inner.touch(slot, id, generation, now);
                // Shared store: let the other processes see recent check times too,
                // at most every few seconds per instance.
                if let Store::Redis(store) = &inner.store
                    && last_shared.is_none_or(|t: Instant| t.elapsed() >= SHARE_LAST_CHECK_EVERY)
                {
                    last_shared = Some(Instant::now());
                    let _ = store
                        .touch(&slot.name, id, generation, health.status(), now)
                        .await;
                }
            }
        }
        if health.status() == Status::Critical {
            let since = *critical_since.get_or_insert_with(Instant::now);
            if let Some(after) = spec.deregister_critical_after
                && since.elapsed() >= after
            {
                inner.deregister_critical(slot, id, generation).await;
                return;
            }
        } else {
            critical_since = None;
        }
        tokio::select! {
            () = tokio::time::sleep(spec.interval) => {}
            () = wake.notified() => {}
        }
    }
}

async fn ttl_loop(
    inner: &Arc<Inner>,
    slot: &Arc<Slot>,
    id: &str,
    generation: u64,
    spec: &CheckSpec,
    ttl: Duration,
    wake: &Notify,
) {
    // Memory store only (the Redis store expires TTL instances with one scanner
    // per process): sleep exactly until the deadline.
    let mut critical_since: Option<Instant> = None;
    loop {
        let Some(remaining) = inner.ttl_remaining(slot, id, generation, ttl) else {
            return;
        };
        let Some(status) = inner.entry_status(slot, id, generation) else {
            return;
        };
        let mut wait = remaining;
        if remaining.is_zero() {
            if status != Status::Critical {
                let _ = inner
                    .publish_status(slot, id, generation, Status::Critical, None)
                    .await;
            }
            let since = *critical_since.get_or_insert_with(Instant::now);
            match spec.deregister_critical_after {
                Some(after) if since.elapsed() >= after => {
                    inner.deregister_critical(slot, id, generation).await;
                    return;
                }
                Some(after) => wait = after - since.elapsed(),
                None => wait = Duration::from_secs(3600),
            }
        } else {
            critical_since = None;
            if status != Status::Passing {
                let _ = inner
                    .publish_status(slot, id, generation, Status::Passing, None)
                    .await;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {}
        }
    }
}

impl Inner {
    fn entry_never_checked(&self, slot: &Slot, id: &str) -> bool {
        slot.state
            .lock()
            .instances
            .get(id)
            .is_some_and(|e| e.last_check.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::jitter;
    use proptest::prelude::*;
    use std::time::Duration;

    proptest! {
        /// A first check never lands within 2 ms of a whole number of
        /// intervals (the timer rounds up to the millisecond).
        #[test]
        fn jitter_keeps_off_whole_intervals(service in "[a-z]{1,8}", id in "[a-z0-9]{1,8}", ms in 9u64..100_000) {
            let interval = Duration::from_millis(ms);
            let j = jitter(&service, &id, interval);
            prop_assert!(j >= Duration::from_millis(2), "{j:?}");
            prop_assert!(j + Duration::from_millis(2) <= interval, "{j:?} of {interval:?}");
        }
    }
}
