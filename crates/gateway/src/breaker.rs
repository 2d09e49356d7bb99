//! Per-instance circuit breakers, from `switchboard-resilience`.
//!
//! Each (route, instance) pair has its own breaker, fed by connect errors,
//! timeouts and 5xx answers. An open breaker ejects the instance from the
//! balancer; its state changes are handed to an [`OnChange`] callback, which
//! the gateway uses to report passive health to the registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_resilience::breaker::{
    Breaker, BreakerConfig, OpenDuration, Outcome, Snapshot, State, Window,
};

use crate::config::RawBreaker;
use crate::upstream::Instance;

/// A breaker state change, for passive health reporting.
#[derive(Debug, Clone)]
pub struct BreakerEvent {
    /// Instance id.
    pub instance: String,
    /// Instance address.
    pub addr: SocketAddr,
    /// The new state.
    pub state: State,
}

/// Called on every breaker state change of a route's instances.
pub type OnChange = Arc<dyn Fn(BreakerEvent) + Send + Sync>;

/// A breaker guarding one instance for one route.
#[derive(Debug)]
pub struct InstanceBreaker {
    inner: Breaker,
}

/// Leave to make one call; report its outcome with [`Permit::record`].
#[derive(Debug)]
pub struct Permit<'a>(switchboard_resilience::breaker::Permit<'a>);

impl Permit<'_> {
    /// Reports whether the call succeeded.
    pub fn record(self, ok: bool) {
        self.0.record(if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        });
    }

    /// Keeps the verdict for later: the response body carries it and settles
    /// it at its end (one reference-count increment, no allocation).
    /// Another breaker than the issuer gets the permit back.
    pub fn into_owned(self, breaker: &InstanceBreaker) -> Result<OwnedPermit, Self> {
        self.0
            .into_owned(&breaker.inner)
            .map(OwnedPermit)
            .map_err(Permit)
    }
}

/// A [`Permit`] whose verdict travels with the response body. Dropping it
/// without a verdict (the client went away) counts for nothing.
#[derive(Debug)]
pub struct OwnedPermit(switchboard_resilience::breaker::OwnedPermit);

impl OwnedPermit {
    /// Reports whether the call succeeded.
    pub fn record(self, ok: bool) {
        self.0.record(if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        });
    }
}

/// The resilience crate's configuration for a route's `breaker = {...}`.
pub fn breaker_config(c: &RawBreaker) -> BreakerConfig {
    BreakerConfig {
        failure_rate: c.failure_rate,
        min_calls: c.min_calls.max(1),
        window: Window::Time(c.window),
        open_duration: OpenDuration::constant(c.open_for),
        ..BreakerConfig::default()
    }
}

impl InstanceBreaker {
    /// A closed breaker for `instance`; `on_change` hears its transitions.
    pub fn new(cfg: &RawBreaker, instance: &Instance, on_change: &OnChange) -> Self {
        let on_change = Arc::clone(on_change);
        let (id, addr) = (instance.id.clone(), instance.addr);
        let listener = move |t: &switchboard_resilience::breaker::Transition| {
            on_change(BreakerEvent {
                instance: id.clone(),
                addr,
                state: t.to,
            });
        };
        let inner = Breaker::with_listener(breaker_config(cfg), listener)
            .or_else(|_| Breaker::new(BreakerConfig::default()))
            .unwrap_or_else(|_| unreachable!("the default breaker config is valid"));
        Self { inner }
    }

    /// Asks leave for a call; when refused, how long until it may be admitted.
    pub fn try_acquire(&self) -> Result<Permit<'_>, Duration> {
        self.inner
            .try_acquire()
            .map(Permit)
            .map_err(|open| open.retry_after)
    }

    /// The state and window counts.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.snapshot()
    }
}
