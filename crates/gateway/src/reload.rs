//! Hot reload: a new configuration becomes a new routing generation (route
//! table + per-route state) swapped in with one atomic store.
//!
//! Requests already running finish on the generation they started with; new
//! requests see the new one; no connection is touched. A route that survives
//! a reload (same prefix, host, methods, service, balancing, breaker and
//! budget settings) keeps its state — breakers, load counters, retry budget —
//! so a reload does not re-admit an ejected instance. An invalid file is
//! rejected with the errors `switchboard check` prints, the old generation
//! keeps serving, and `switchboard_config_reloads_total{result="error"}`
//! counts it.
//!
//! What a reload cannot change: the `[gateway]` table (listeners, workers,
//! header limits, pool, TLS) and `[registry]`; a changed value there is logged
//! as needing a restart and the running value is kept.
//!
//! Triggers: [`Reloader::reload_file`] (used by `POST /v1/reload`), and
//! [`Reloader::watch`] which reloads on `SIGHUP` and when the file's content
//! changes (polled: a `stat` per interval, a read and hash only when the
//! modification time or size moved).

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::BreakerListener;
use crate::breaker::{BreakerEvent, OnChange};
use crate::config::{Config, LoadError, RouteConfig};
use crate::metrics::RouteLabels;
use crate::proxy::{Gateway, RouteState, Routing};
use crate::retry::Budget;
use crate::route::RouteTable;
use crate::upstream::{self, InstanceList, RouteUpstreams};

/// A boxed future returned by [`Discovery::prepare`].
pub type PrepareFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Where a (re)loaded configuration's services get their instances.
pub trait Discovery: Send + Sync {
    /// The instance source of `service`; `None` leaves the service without
    /// instances (its routes answer 503).
    fn source(&self, service: &str) -> Option<watch::Receiver<InstanceList>>;

    /// Runs before `new` replaces `old` (e.g. registers its static
    /// instances); an error rejects the reload.
    fn prepare<'a>(&'a self, old: &'a Config, new: &'a Config) -> PrepareFuture<'a> {
        let _ = (old, new);
        Box::pin(async { Ok(()) })
    }
}

/// A fixed map of sources (what [`GatewayBuilder::sources`](crate::GatewayBuilder::sources) gives).
#[derive(Debug, Default)]
pub struct MapDiscovery(pub HashMap<String, watch::Receiver<InstanceList>>);

impl Discovery for MapDiscovery {
    fn source(&self, service: &str) -> Option<watch::Receiver<InstanceList>> {
        self.0.get(service).cloned()
    }
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// No file to reload from (the gateway was started from a `Config` value).
    #[error("the gateway has no config file to reload from")]
    NoFile,
    /// The file could not be read or is invalid (the same errors as `switchboard check`).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The new config could not be put in place: discovery refused it (a
    /// static instance could not be registered) or a route's policy could
    /// not be built.
    #[error("cannot apply the config: {0}")]
    Apply(String),
}

/// One live route of the current generation.
struct Live {
    config: RouteConfig,
    state: Arc<RouteState>,
    follower: Option<AbortHandle>,
}

struct Current {
    config: Config,
    live: Vec<Live>,
}

/// Builds and swaps routing generations. One per gateway.
pub struct Reloader {
    gw: &'static Gateway,
    discovery: Arc<dyn Discovery>,
    on_breaker: Option<BreakerListener>,
    path: parking_lot::Mutex<Option<PathBuf>>,
    /// Redis connections of rate limits and idempotency stores, shared by
    /// every route and generation that names the same URL.
    redis: parking_lot::Mutex<crate::policy::RedisHandles>,
    // A tokio mutex: a reload awaits discovery while holding it, and reloads
    // must not interleave.
    current: tokio::sync::Mutex<Current>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &*self.path.lock())
            .finish_non_exhaustive()
    }
}

/// A route keeps its state across a reload when everything the state was
/// built from is unchanged.
fn same_state(a: &RouteConfig, b: &RouteConfig) -> bool {
    a.prefix == b.prefix
        && a.host == b.host
        && a.methods == b.methods
        && a.service == b.service
        && a.balance == b.balance
        && a.breaker == b.breaker
        && a.retry.budget_percent == b.retry.budget_percent
        && a.retry.min_per_second == b.retry.min_per_second
        && a.policy == b.policy
}

impl Reloader {
    /// Builds the first generation from `config`, installs it in `gw` and
    /// returns the reloader that owns it. Must run inside a tokio runtime
    /// (discovery followers are spawned on it).
    pub(crate) fn install(
        gw: &'static Gateway,
        config: &Config,
        discovery: Arc<dyn Discovery>,
        on_breaker: Option<BreakerListener>,
    ) -> Result<Arc<Self>, String> {
        let this = Self {
            gw,
            discovery,
            on_breaker,
            path: parking_lot::Mutex::new(None),
            redis: parking_lot::Mutex::new(crate::policy::RedisHandles::default()),
            current: tokio::sync::Mutex::new(Current {
                config: config.clone(),
                live: Vec::new(),
            }),
        };
        let (routing, live, _) = this.build(config, Vec::new()).map_err(|(e, _)| e)?;
        gw.swap_routing(routing);
        this.current
            .try_lock()
            .expect("nobody else holds a fresh reloader")
            .live = live;
        Ok(Arc::new(this))
    }

    /// The file [`reload_file`](Self::reload_file) reads when given none.
    pub fn set_path(&self, path: PathBuf) {
        *self.path.lock() = Some(path);
    }

    /// The configuration currently serving (with the `[gateway]` and
    /// `[registry]` values the process started with).
    pub async fn config(&self) -> Config {
        self.current.lock().await.config.clone()
    }

    /// Reads `path` (or the file set with [`set_path`](Self::set_path)) and
    /// applies it. On error the old configuration keeps serving; the error is
    /// logged and counted.
    pub async fn reload_file(&self, path: Option<&Path>) -> Result<usize, ReloadError> {
        let path = match path {
            Some(p) => p.to_owned(),
            None => self.path.lock().clone().ok_or(ReloadError::NoFile)?,
        };
        match Config::load(&path) {
            Ok(c) => self.apply(c).await,
            Err(e) => {
                self.gw.metrics.reload(false);
                tracing::error!(file = %path.display(), "config reload rejected, the previous config keeps serving:\n{e}");
                Err(e.into())
            }
        }
    }

    /// Swaps in `new` (already validated); returns its number of routes.
    pub async fn apply(&self, mut new: Config) -> Result<usize, ReloadError> {
        let mut cur = self.current.lock().await;
        warn_restart_needed(&cur.config, &new);
        // What needs a restart keeps its running value.
        new.gateway = cur.config.gateway.clone();
        new.registry = cur.config.registry.clone();
        new.upstream_policy = cur.config.upstream_policy.clone();
        new.admin_token = cur.config.admin_token.clone();
        if let Err(e) = self.discovery.prepare(&cur.config, &new).await {
            self.gw.metrics.reload(false);
            tracing::error!(error = %e, "config reload rejected, the previous config keeps serving");
            return Err(ReloadError::Apply(e));
        }
        let old = std::mem::take(&mut cur.live);
        let (routing, live, retired) = match self.build(&new, old) {
            Ok(x) => x,
            Err((e, old)) => {
                cur.live = old;
                self.gw.metrics.reload(false);
                tracing::error!(error = %e, "config reload rejected, the previous config keeps serving");
                return Err(ReloadError::Apply(e));
            }
        };
        self.gw.swap_routing(routing);
        for f in retired {
            f.abort();
        }
        let n = new.routes.len();
        cur.live = live;
        cur.config = new;
        self.gw.metrics.reload(true);
        tracing::info!(routes = n, "config reloaded");
        Ok(n)
    }

    /// Builds a generation for `config`, reusing the state of unchanged
    /// routes from `old`; returns the followers of routes that went away. On
    /// error (a policy could not be built) `old` is handed back untouched.
    #[allow(clippy::type_complexity)]
    fn build(
        &self,
        config: &Config,
        old: Vec<Live>,
    ) -> Result<(Routing, Vec<Live>, Vec<AbortHandle>), (String, Vec<Live>)> {
        // Build every new state first, so a failure leaves nothing running.
        let mut fresh: Vec<Option<Arc<RouteState>>> = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            if old.iter().any(|o| same_state(&o.config, r)) {
                fresh.push(None);
                continue;
            }
            match self.new_state(config, r) {
                Ok(st) => fresh.push(Some(st)),
                Err(e) => return Err((format!("route `{}`: {e}", r.prefix), old)),
            }
        }
        let mut old: Vec<Option<Live>> = old.into_iter().map(Some).collect();
        let mut live = Vec::with_capacity(config.routes.len());
        for (r, fresh) in config.routes.iter().zip(fresh) {
            let reused = old
                .iter_mut()
                .find(|o| o.as_ref().is_some_and(|o| same_state(&o.config, r)))
                .and_then(Option::take);
            let (state, follower) = match (reused, fresh) {
                (Some(o), _) => (o.state, o.follower),
                (None, Some(st)) => {
                    let f = self.follow(r, &st);
                    (st, f)
                }
                // Two identical routes cannot both exist (duplicate prefixes
                // are config errors), but stay correct if they did.
                (None, None) => match self.new_state(config, r) {
                    Ok(st) => {
                        let f = self.follow(r, &st);
                        (st, f)
                    }
                    Err(e) => {
                        let old = old.into_iter().flatten().chain(live).collect();
                        return Err((format!("route `{}`: {e}", r.prefix), old));
                    }
                },
            };
            live.push(Live {
                config: r.clone(),
                state,
                follower,
            });
        }
        let retired = old
            .into_iter()
            .flatten()
            .filter_map(|o| o.follower)
            .collect();
        let routing = Routing {
            table: RouteTable::new(config.routes.clone()),
            states: live.iter().map(|l| Arc::clone(&l.state)).collect(),
        };
        Ok((routing, live, retired))
    }

    fn new_state(&self, config: &Config, r: &RouteConfig) -> Result<Arc<RouteState>, String> {
        let filter = upstream::SnapshotFilter {
            networks: config.upstream_policy.clone(),
            version: r.policy.version.clone(),
        };
        let policy = crate::policy::RoutePolicy::build(r, &mut self.redis.lock())?;
        Ok(Arc::new(RouteState {
            upstreams: Arc::new(RouteUpstreams::with_filter(
                r.balance,
                r.breaker.clone(),
                filter,
            )),
            budget: Budget::new(r.retry.budget_percent, r.retry.min_per_second),
            policy,
            series: self.gw.metrics.series(RouteLabels {
                route: r.prefix.clone(),
                service: r.service.clone(),
            }),
        }))
    }

    /// Starts following `r`'s service into `state` (first snapshot published
    /// before this returns).
    fn follow(&self, r: &RouteConfig, state: &RouteState) -> Option<AbortHandle> {
        let service = r.service.clone();
        let route = r.prefix.clone();
        let gw = self.gw;
        let listener = self.on_breaker.clone();
        let on_change: OnChange = Arc::new(move |ev: BreakerEvent| {
            tracing::info!(service = %service, instance = %ev.instance, address = %ev.addr, state = ev.state.as_str(), "breaker state changed");
            gw.transitions.record(&route, &service, &ev);
            if let Some(l) = &listener {
                l(&service, ev);
            }
        });
        match self.discovery.source(&r.service) {
            Some(rx) => {
                state.upstreams.update(&rx.borrow(), &on_change);
                let task = tokio::spawn(upstream::follow(
                    Arc::clone(&state.upstreams),
                    rx,
                    on_change,
                ));
                Some(task.abort_handle())
            }
            None => {
                tracing::warn!(service = %r.service, "no instance source for service");
                None
            }
        }
    }

    /// Reloads on `SIGHUP` and whenever the file's content changes (checked
    /// every `poll`), until `stop` resolves. The file's current state and the
    /// signal handler are taken when this is called, not when the returned
    /// future first runs, so no change made after the call is missed.
    pub fn watch(
        self: Arc<Self>,
        path: PathBuf,
        poll: Duration,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.set_path(path.clone());
        let seen_stat = stat(&path);
        let seen_hash = content_hash(&path);
        #[cfg(unix)]
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        #[cfg(not(unix))]
        let hup: Option<()> = None;
        self.watch_loop(path, poll, stop, seen_stat, seen_hash, hup)
    }

    async fn watch_loop(
        self: Arc<Self>,
        path: PathBuf,
        poll: Duration,
        stop: impl Future<Output = ()>,
        mut seen_stat: Option<(SystemTime, u64)>,
        mut seen_hash: Option<u64>,
        #[cfg(unix)] mut hup: Option<tokio::signal::unix::Signal>,
        #[cfg(not(unix))] _hup: Option<()>,
    ) {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                () = &mut stop => return,
                () = hangup => {
                    tracing::info!(file = %path.display(), "SIGHUP: reloading the config");
                    seen_stat = stat(&path);
                    seen_hash = content_hash(&path);
                    let _ = self.reload_file(Some(&path)).await;
                }
                _ = tick.tick() => {
                    let mut now = stat(&path);
                    if now == seen_stat {
                        continue;
                    }
                    // A file written in place (truncate, then write) can be
                    // caught half-written, and an empty file is a valid
                    // config: wait until the file holds still.
                    loop {
                        tokio::time::sleep(SETTLE).await;
                        let again = stat(&path);
                        if again == now {
                            break;
                        }
                        now = again;
                    }
                    {
                        seen_stat = now;
                        let hash = content_hash(&path);
                        if hash != seen_hash {
                            seen_hash = hash;
                            tracing::info!(file = %path.display(), "config file changed: reloading");
                            let _ = self.reload_file(Some(&path)).await;
                        }
                    }
                }
            }
        }
    }
}

/// How long a changed file must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(100);

/// Modification time and size: one `stat` per poll while nothing changes.
fn stat(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// A hash of the content, so a `touch` (or an editor rewriting the same
/// bytes) does not reload.
fn content_hash(path: &Path) -> Option<u64> {
    std::fs::read(path).ok().map(|b| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        b.hash(&mut h);
        h.finish()
    })
}

/// Logs every `[gateway]` / `[registry]` value that changed: those need a
/// restart (listeners are bound, workers spawned, pools sized at start).
fn warn_restart_needed(old: &Config, new: &Config) {
    let (a, b) = (&old.gateway, &new.gateway);
    let mut changed: Vec<&str> = Vec::new();
    macro_rules! cmp {
        ($($f:ident),*) => {$(
            if a.$f != b.$f {
                changed.push(concat!("gateway.", stringify!($f)));
            }
        )*};
    }
    cmp!(
        listen,
        admin,
        workers,
        header_read_timeout,
        max_header_bytes,
        max_headers,
        drain_timeout,
        lingering_time,
        lingering_timeout,
        access_log,
        pool_idle_timeout,
        pool_max_idle,
        admin_token,
        upstream_allow,
        upstream_deny,
        tls
    );
    if old.registry.store != new.registry.store {
        changed.push("registry.store");
    }
    if old.registry.token != new.registry.token {
        changed.push("registry.token");
    }
    for key in changed {
        tracing::warn!(
            key,
            "changed in the config file, but needs a restart to take effect; the running value is kept"
        );
    }
}
