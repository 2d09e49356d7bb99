//! A service registry: which instances of which service are alive, watched
//! through lock-free snapshots.
//!
//! ```
//! use std::time::Duration;
//! use switchboard_registry::{CheckSpec, Registration, Registry, RegistryOptions, Status};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::open("memory://", RegistryOptions::default()).await?;
//! let mut users = registry.watch("user-service");
//!
//! registry
//!     .register("user-service", "u1", Registration::new("127.0.0.1", 4001)
//!         .check(CheckSpec::ttl(Duration::from_secs(10))))
//!     .await?;
//!
//! let view = users.load(); // lock-free: an Arc of an immutable snapshot
//! assert_eq!(view.passing.len(), 1);
//! assert_eq!(view.passing[0].socket_addr(), Some("127.0.0.1:4001".parse()?));
//! assert_eq!(view.instances[0].status, Status::Passing);
//! # let _ = users.changed(); // resolves on the next change
//! registry.heartbeat("user-service", "u1").await?;
//! registry.deregister("user-service", "u1").await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`model`]: [`Registration`] (the JSON body), [`CheckSpec`], [`Instance`], [`Status`], [`ServiceView`].
//! - [`validate`]: service names, ids, bodies, and the address [`NetworkPolicy`]; errors name the field.
//! - [`health`]: the threshold state machine ([`HealthState`]) that turns check results into a status.
//! - [`probe`]: HTTP/TCP checks behind the [`Prober`] trait (scriptable in tests).
//! - [`registry`]: [`Registry`], its checker tasks and per-service snapshots.
//! - `store::redis`: the `redis://` store (shared view, check leases, resync).
//! - [`watch`]: [`ServiceWatch`], snapshot + change stream.
//! - [`http`]: the HTTP API of `DESIGN.md` (axum router, blocking queries, OpenAPI), and `serve`.
//! - [`client`]: [`RegistryClient`] (register, heartbeat, deregister on shutdown) and
//!   [`RemoteDiscovery`] (watch a remote registry over blocking queries).
//!
//! # API at a glance
//! - [`Registry::open`]`(store_url, `[`RegistryOptions`]`)`: `memory://` or `redis://HOST:PORT`;
//!   `Clone` (an `Arc` inside); background tasks stop with the last clone or [`Registry::shutdown`].
//! - [`Registry::register`]`(service, id, `[`Registration`]`)`, [`Registry::heartbeat`],
//!   [`Registry::deregister`], [`Registry::services`] (summaries), [`Registry::snapshot`],
//!   [`Registry::heartbeats`] (when each TTL instance last heartbeat here).
//! - [`Registry::watch`]`(service) -> `[`ServiceWatch`]: [`ServiceWatch::load`] /
//!   [`ServiceWatch::peek`] read the current `Arc<`[`ServiceView`]`>` lock-free;
//!   [`ServiceWatch::changed`] waits for the next change; [`Registry::view`] looks a
//!   service up by name (slower: a hash lookup; hold a watch on hot paths).
//! - [`Registry::report`]`(service, id, `[`PassiveOutcome`]`)`: passive health from callers;
//!   a success while nothing failed is lock-free.
//! - [`http::router`]`(registry, `[`http::HttpOptions`]`)` for an admin listener,
//!   [`http::openapi`] to merge into a larger document, [`http::metrics_text`],
//!   [`http::bind`] + [`http::serve`] for the standalone server.
//! - [`RegistryClient`] / [`Membership`] for services joining a remote registry;
//!   [`Discovery`] is implemented by [`Registry`] and [`RemoteDiscovery`].
//!
//! # Semantics
//! - **Status.** `passing`, `warning` (HTTP 429) or `critical`. An instance with an
//!   HTTP or TCP check starts `critical` and becomes `passing` on its first
//!   passing check; after that, `healthy_threshold` / `unhealthy_threshold`
//!   consecutive results are needed to flip. A TTL instance starts `passing`
//!   (registering counts as the first heartbeat) and turns `critical` the moment
//!   its TTL runs out. An instance without a check is `passing`.
//! - **Routable** = [`ServiceView::passing`]: status `passing` only, like Consul's
//!   `?passing=true`; `warning` instances are left out so they shed load
//!   ([`ServiceView::routable`] falls back to them when nothing is passing).
//! - **Passive health.** [`Registry::report`] with `passive_failures` failures in a row
//!   marks the instance `critical` for `passive_ejection` and runs its active check
//!   at once; a passing check ends the suspicion early. Suspicion is local to the
//!   process that observed the failures.
//! - **Deregistration.** With `deregister_critical_after`, an instance critical for
//!   that long is removed.
//! - **Index.** Each change of a service gets a new index from a per-process
//!   counter; blocking queries compare against it (use one registry server per client).
//! - **Stores.** `memory://` keeps everything in-process. `redis://HOST:PORT` shares
//!   one view among processes; see the `store::redis` module docs for keys,
//!   leases (each active check runs in one process; takeover within two
//!   intervals), TTL expiry (one deadline scan per process, not a task per
//!   instance) and resynchronisation.
//!
//! # Defaults
//! | setting | default |
//! |---|---|
//! | check `interval` | 10s (min 50ms) |
//! | check `timeout` | 2s; a longer one is cut to the interval |
//! | duration syntax | a whole number and one unit: `500ms`, `2s`, `5m`, `1h` (max 24h) |
//! | `healthy_threshold` / `unhealthy_threshold` | 2 / 3 |
//! | `deregister_critical_after` | never |
//! | passive failures / ejection | 3 / 10s |
//! | Redis full resync | every 5s, and on every reconnect |
//! | allowed networks | everything but `169.254.0.0/16`, `fe80::/10` and the unspecified address (refused with 403) |
//! | HTTP body limit | 64 KiB |

pub mod client;
pub mod health;
pub mod http;
pub mod model;
pub mod probe;
pub mod registry;
mod store;
pub mod validate;
pub mod watch;

pub use client::{Membership, RegistryClient, RemoteDiscovery};
pub use health::{CheckResult, HealthState};
pub use model::{
    CheckKind, CheckSpec, Instance, PassiveOutcome, Registration, ServiceSummary, ServiceView,
    Status,
};
pub use probe::{NetProber, Probe, ProbeTarget, Prober};
pub use registry::{Registry, RegistryError, RegistryOptions};
pub use store::redact_url;
pub use validate::{NetworkPolicy, ValidationError};
pub use watch::ServiceWatch;

/// Where a caller finds the instances of a service: the same interface whether
/// the registry is in-process ([`Registry`] with `memory://`), shared through
/// Redis ([`Registry`] with `redis://`), or remote over HTTP ([`RemoteDiscovery`]).
pub trait Discovery: Send + Sync + 'static {
    /// Watches a service: [`ServiceWatch::load`] is lock-free.
    fn watch(&self, service: &str) -> ServiceWatch;

    /// Reports what a caller saw when using an instance (passive health).
    /// Sources that cannot use it ignore it.
    fn report(&self, service: &str, id: &str, outcome: PassiveOutcome) {
        let _ = (service, id, outcome);
    }
}

impl Discovery for Registry {
    fn watch(&self, service: &str) -> ServiceWatch {
        Registry::watch(self, service)
    }

    fn report(&self, service: &str, id: &str, outcome: PassiveOutcome) {
        Registry::report(self, service, id, outcome);
    }
}
