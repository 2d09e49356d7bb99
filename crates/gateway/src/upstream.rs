//! Discovery snapshots and balancing.
//!
//! Discovery hands each service's instance list to the engine through a
//! `tokio::sync::watch` channel. For every route a background task turns each
//! new list into an immutable [`Upstreams`] snapshot (passing instances only,
//! each with its breaker and outstanding-request counter, carried over from the
//! previous snapshot by instance id) and publishes it with an `ArcSwap`. The
//! request path reads the snapshot without a lock and picks an instance with
//! power-of-two-choices on outstanding requests, or round robin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::watch;

use crate::breaker::InstanceBreaker;
use crate::config::{Balance, RawBreaker};
use crate::correlation::random_below;
use crate::versioning::VersionSelect;

/// Health of an instance as discovery reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Receives traffic.
    Passing,
    /// Degraded: receives no traffic from the gateway.
    Warning,
    /// Failing.
    Critical,
}

impl InstanceStatus {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Passing => "passing",
            InstanceStatus::Warning => "warning",
            InstanceStatus::Critical => "critical",
        }
    }
}

/// An instance as discovery reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Registry id, unique within the service.
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its health.
    pub status: InstanceStatus,
    /// Its registered semantic version, if any (versioned routes select by major).
    pub version: Option<semver::Version>,
}

/// A service's instance list, as published by discovery.
pub type InstanceList = Arc<Vec<Instance>>;

/// One instance as one route sees it: address, breaker, load.
#[derive(Debug)]
pub struct Upstream {
    /// Registry id.
    pub id: String,
    /// Address.
    pub addr: SocketAddr,
    /// `Host` header sent to it.
    pub host: HeaderValue,
    /// Requests in flight (P2C load signal), counted per worker thread like
    /// Envoy's per-worker balancers, so workers never share the cache line.
    pub outstanding: Load,
    /// Its circuit breaker.
    pub breaker: InstanceBreaker,
    /// A failure was reported to passive health and no success since.
    pub suspect: AtomicBool,
    /// Major of the registered version.
    pub major: Option<u64>,
}

#[repr(align(128))]
#[derive(Debug, Default)]
struct Slot(AtomicU32);

/// In-flight requests of one instance, one counter per worker shard.
#[derive(Debug, Default)]
pub struct Load {
    slots: [Slot; crate::metrics::SHARDS],
}

impl Load {
    /// One more request from this thread.
    pub fn inc(&self) {
        self.slots[crate::metrics::shard()].0.fetch_add(1, Relaxed);
    }
    /// One request from this thread finished.
    pub fn dec(&self) {
        self.slots[crate::metrics::shard()].0.fetch_sub(1, Relaxed);
    }
    /// This thread's count.
    pub fn local(&self) -> u32 {
        self.slots[crate::metrics::shard()].0.load(Relaxed)
    }
    /// All threads' count.
    pub fn total(&self) -> u32 {
        self.slots.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

/// An immutable view of a route's usable instances.
#[derive(Debug, Default)]
pub struct Upstreams {
    /// Passing instances.
    pub passing: Vec<Arc<Upstream>>,
    /// Instances known to discovery, with their status (for metrics).
    pub all: Vec<Instance>,
    /// Passing instances by major version, for routes that read the major
    /// from a header (empty otherwise).
    pub by_major: Vec<(u64, Vec<Arc<Upstream>>)>,
}

/// The balancer's answer.
#[derive(Debug)]
pub enum Pick {
    /// Use this instance (its breaker admitted a call a moment ago; the
    /// caller asks for its own permit).
    Instance(Arc<Upstream>),
    /// There is no passing instance (or all were tried).
    NoneHealthy,
    /// Every candidate's breaker is open; retry after this long.
    AllOpen(Duration),
}

/// A route's live upstream set.
#[derive(Debug)]
pub struct RouteUpstreams {
    /// Current snapshot.
    pub current: ArcSwap<Upstreams>,
    balance: Balance,
    rr: AtomicUsize,
    breaker: RawBreaker,
    filter: SnapshotFilter,
}

/// What a route keeps of discovery's list, applied once per update.
#[derive(Debug, Clone, Default)]
pub struct SnapshotFilter {
    /// Networks instances may be in; others are dropped (never connected to).
    pub networks: crate::allowlist::UpstreamPolicy,
    /// How the route selects by major version.
    pub version: Option<VersionSelect>,
}

impl RouteUpstreams {
    /// An empty set (filled by [`RouteUpstreams::update`]).
    pub fn new(balance: Balance, breaker: RawBreaker) -> Self {
        Self::with_filter(balance, breaker, SnapshotFilter::default())
    }

    /// An empty set whose snapshots keep only what `filter` allows.
    pub fn with_filter(balance: Balance, breaker: RawBreaker, filter: SnapshotFilter) -> Self {
        Self {
            current: ArcSwap::from_pointee(Upstreams::default()),
            balance,
            rr: AtomicUsize::new(0),
            breaker,
            filter,
        }
    }

    /// Publishes a new snapshot from a discovery list, keeping the state
    /// (breaker, load) of instances that are still there.
    pub fn update(&self, list: &[Instance], on_breaker_change: &crate::breaker::OnChange) {
        let old = self.current.load_full();
        let pinned = match &self.filter.version {
            Some(VersionSelect::Pinned(m)) => Some(*m),
            _ => None,
        };
        let passing: Vec<Arc<Upstream>> = list
            .iter()
            .filter(|i| i.status == InstanceStatus::Passing)
            .filter(|i| {
                let ok = self.filter.networks.permits(i.addr.ip());
                if !ok {
                    tracing::warn!(instance = %i.id, address = %i.addr, "instance address is outside gateway.upstream_allow; never proxied to");
                }
                ok
            })
            .filter(|i| pinned.is_none_or(|m| i.version.as_ref().is_some_and(|v| v.major == m)))
            .map(|i| {
                old.passing
                    .iter()
                    .find(|u| u.id == i.id && u.addr == i.addr)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Upstream {
                            id: i.id.clone(),
                            addr: i.addr,
                            host: HeaderValue::from_str(&i.addr.to_string())
                                .unwrap_or(HeaderValue::from_static("upstream")),
                            outstanding: Load::default(),
                            breaker: InstanceBreaker::new(&self.breaker, i, on_breaker_change),
                            suspect: AtomicBool::new(false),
                            major: i.version.as_ref().map(|v| v.major),
                        })
                    })
            })
            .collect();
        let mut by_major: Vec<(u64, Vec<Arc<Upstream>>)> = Vec::new();
        if let Some(VersionSelect::Header { .. }) = &self.filter.version {
            for u in &passing {
                let Some(m) = u.major else { continue };
                match by_major.iter_mut().find(|(x, _)| *x == m) {
                    Some((_, l)) => l.push(Arc::clone(u)),
                    None => by_major.push((m, vec![Arc::clone(u)])),
                }
            }
        }
        self.current.store(Arc::new(Upstreams {
            passing,
            all: list.to_vec(),
            by_major,
        }));
    }

    /// Picks an instance not in `tried` whose breaker admits a call.
    pub fn pick(&self, tried: &[SocketAddr]) -> Pick {
        self.pick_major(tried, None)
    }

    /// [`pick`](Self::pick) among the instances of one major version
    /// (`None`: all the route's instances).
    pub fn pick_major(&self, tried: &[SocketAddr], major: Option<u64>) -> Pick {
        let snap = self.current.load();
        let list = match major {
            None => &snap.passing,
            Some(m) => match snap.by_major.iter().find(|(x, _)| *x == m) {
                Some((_, l)) => l,
                None => return Pick::NoneHealthy,
            },
        };
        let n = list.len();
        if n == 0 {
            return Pick::NoneHealthy;
        }
        let usable = |u: &Upstream| !tried.contains(&u.addr);
        // First choice: the balancer's; then everything else in order.
        let first = match self.balance {
            Balance::P2c if n >= 2 => {
                let a = random_below(n);
                let mut b = random_below(n - 1);
                if b >= a {
                    b += 1;
                }
                let (ua, ub) = (&list[a], &list[b]);
                match (usable(ua), usable(ub)) {
                    (true, true) => {
                        if ub.outstanding.local() < ua.outstanding.local() {
                            b
                        } else {
                            a
                        }
                    }
                    (true, false) => a,
                    (false, true) => b,
                    (false, false) => a,
                }
            }
            Balance::P2c => 0,
            Balance::RoundRobin => self.rr.fetch_add(1, Relaxed) % n,
        };
        let mut soonest: Option<Duration> = None;
        let mut any_untried = false;
        for k in 0..n {
            let u = &list[(first + k) % n];
            if !usable(u) {
                continue;
            }
            any_untried = true;
            match u.breaker.try_acquire() {
                // Dropping the permit frees it (a half-open probe slot too).
                Ok(_permit) => return Pick::Instance(Arc::clone(u)),
                Err(after) => soonest = Some(soonest.map_or(after, |s| s.min(after))),
            }
        }
        if !any_untried && !tried.is_empty() {
            // Every instance was tried once: a retry may go to any of them again.
            return self.pick_major(&[], major);
        }
        match soonest {
            Some(after) => Pick::AllOpen(after),
            None => Pick::NoneHealthy,
        }
    }
}

/// Keeps `target` in step with a discovery channel until the channel closes.
pub async fn follow(
    target: Arc<RouteUpstreams>,
    mut rx: watch::Receiver<InstanceList>,
    on_change: crate::breaker::OnChange,
) {
    loop {
        let list = rx.borrow_and_update().clone();
        target.update(&list, &on_change);
        if rx.changed().await.is_err() {
            return;
        }
    }
}
