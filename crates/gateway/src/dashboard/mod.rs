//! The live dashboard on the admin listener: `GET /dashboard` serves one
//! self-contained page (HTML, CSS and JS embedded in the binary, no CDN, no
//! build step) that follows `GET /v1/stream`, a Server-Sent Events stream of
//! one JSON frame per second, and searches `GET /v1/search?q=ID`.
//!
//! # How it works
//! - A sampler task ([`sampler`]) wakes once a second and reads what the
//!   gateway already keeps: per-route counters and latency histograms
//!   ([`crate::metrics`]), every breaker's snapshot ([`crate::breaker`]), the
//!   instance lists (and, when given, the registry's versions, last checks
//!   and TTL heartbeats: an instance's "last check" is the later of its last
//!   active check and its last heartbeat), the access-log ring
//!   ([`crate::access_log::AccessRing`], filled by the log thread) and, when
//!   given, the bus's statistics
//!   ([`switchboard_bus::stats`]). It turns counter deltas into rates and
//!   histogram deltas into p50/p99, keeps the last five minutes of every
//!   series ([`sampler::History`]), and, only while someone watches,
//!   serialises one frame and broadcasts it.
//! - Each SSE client gets the history once, then the frames. The broadcast
//!   channel is bounded: a client that cannot keep up skips frames instead of
//!   making the gateway buffer for it.
//! - Nothing here runs on the request path.
//!
//! # Security
//! When an admin token is configured (`gateway.admin_token`, else
//! `registry.token`), `/v1/stream` and `/v1/search` need
//! `Authorization: Bearer TOKEN` (compared in constant time); the page asks for the token and sends it
//! with `fetch` (the browser's `EventSource` cannot set headers, so the page
//! reads the stream with `fetch` rather than putting the token in a URL).
//! URLs shown on the page lose their userinfo and credential-like query
//! values ([`redact_url`]); no token is ever part of a frame.
//!
//! # Layout
//! - `mod.rs`: [`Dashboard`], what it is given ([`Sources`]), the routes.
//! - [`sampler`]: sampling, rates and quantiles, the bounded history.
//! - `stream`: the SSE and search handlers and the token check.
//! - `assets/`: `index.html`, `app.css`, `app.js`.

pub mod sampler;
mod stream;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::breaker::BreakerEvent;
use crate::proxy::Gateway;
pub(crate) use stream::QUERY_PATTERN;
pub use switchboard_resilience::redact::redact_url;

/// How many seconds of history the dashboard keeps and draws.
pub const HISTORY_SECONDS: usize = 300;
/// Frames a slow SSE client may fall behind before it skips some.
const CHANNEL_FRAMES: usize = 8;
/// Breaker transitions kept (the newest).
const TRANSITIONS_KEPT: usize = 512;

/// What the dashboard shows besides the gateway's own state; the embedding
/// program (the CLI, the demo) hands these over through
/// [`crate::GatewayBuilder::dashboard_bus`] and
/// [`crate::GatewayBuilder::dashboard_registry`].
#[derive(Clone, Default)]
pub struct Sources {
    /// The registry: versions, last checks, services without a route.
    pub registry: Option<switchboard_registry::Registry>,
    /// The bus: events per topic, groups, lag, the latest events.
    pub bus: Option<switchboard_bus::Bus>,
    /// The registry store URL (shown without credentials).
    pub store: Option<String>,
    /// When set, the stream and search need `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("registry", &self.registry.is_some())
            .field("bus", &self.bus.as_ref().map(|b| redact_url(b.url())))
            .field("store", &self.store.as_deref().map(redact_url))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// One breaker state change, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    /// When, in milliseconds since the Unix epoch.
    pub t: u64,
    /// The route's prefix.
    pub route: String,
    /// The route's service.
    pub service: String,
    /// The instance id.
    pub instance: String,
    /// The new state (`closed`, `open`, `half_open`, ...).
    pub to: &'static str,
}

/// Breaker transitions heard from the breakers' listeners (rare events, so a
/// lock is fine here); the gateway keeps one, fed by every route's breakers.
#[derive(Debug, Default)]
pub struct Transitions {
    list: Mutex<VecDeque<Transition>>,
}

impl Transitions {
    /// Records `ev` on `route` of `service`.
    pub fn record(&self, route: &str, service: &str, ev: &BreakerEvent) {
        let mut l = self.list.lock();
        if l.len() >= TRANSITIONS_KEPT {
            l.pop_front();
        }
        l.push_back(Transition {
            t: now_ms(),
            route: route.to_owned(),
            service: service.to_owned(),
            instance: ev.instance.clone(),
            to: ev.state.as_str(),
        });
    }

    /// Transitions at or after `since_ms`, oldest first.
    pub fn since(&self, since_ms: u64) -> Vec<Transition> {
        self.list
            .lock()
            .iter()
            .filter(|t| t.t >= since_ms)
            .cloned()
            .collect()
    }
}

/// The dashboard of one gateway: its sampler's history and the broadcast of
/// frames to SSE clients. Cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

struct Inner {
    gw: &'static Gateway,
    sources: Sources,
    state: Mutex<sampler::Sampler>,
    /// The newest frame, already framed as an SSE event.
    latest: Mutex<Option<Bytes>>,
    tx: broadcast::Sender<Bytes>,
    /// Cancelled at shutdown: ends every stream, so the admin server can drain.
    stop: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("sources", &self.inner.sources)
            .finish_non_exhaustive()
    }
}

impl Dashboard {
    /// A dashboard over `gw`. Sampling starts with [`Dashboard::spawn_sampler`].
    pub fn new(gw: &'static Gateway, sources: Sources) -> Self {
        if let Some(bus) = &sources.bus {
            bus.stats().tap(true);
        }
        let (tx, _) = broadcast::channel(CHANNEL_FRAMES);
        Self {
            inner: Arc::new(Inner {
                gw,
                sources,
                state: Mutex::new(sampler::Sampler::new(HISTORY_SECONDS)),
                latest: Mutex::new(None),
                tx,
                stop: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    /// The admin routes: `/dashboard` (and its assets), `/v1/stream`, `/v1/search`.
    pub fn router(&self) -> axum::Router {
        stream::router(self.clone())
    }

    /// Takes one sample now: updates the history and, when an SSE client is
    /// connected, broadcasts the frame. Returns the frame.
    pub async fn tick(&self) -> sampler::Frame {
        let bus = match &self.inner.sources.bus {
            // A slow backend must not stall the frames: lag is best effort.
            Some(bus) => Some(
                match tokio::time::timeout(Duration::from_millis(500), bus.stats_snapshot()).await {
                    Ok(s) => s,
                    Err(_) => bus.stats().snapshot(),
                },
            ),
            None => None,
        };
        let input = sampler::Input {
            gw: self.inner.gw,
            registry: self.inner.sources.registry.as_ref(),
            bus,
            bus_url: self.inner.sources.bus.as_ref().map(|b| redact_url(b.url())),
            store_url: self.inner.sources.store.as_deref().map(redact_url),
            transitions: &self.inner.gw.transitions,
            token_required: self.inner.sources.token.is_some(),
        };
        let frame = self.inner.state.lock().sample(&input, now_ms());
        if self.inner.tx.receiver_count() > 0 {
            let bytes = sse_event("sample", &frame);
            *self.inner.latest.lock() = Some(bytes.clone());
            // No receiver between the check and here is fine: nothing is lost.
            let _ = self.inner.tx.send(bytes);
        } else {
            *self.inner.latest.lock() = None;
        }
        frame
    }

    /// Samples once a second until `shutdown` turns true.
    pub fn spawn_sampler(
        &self,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = every.tick() => false,
                    // Shutdown, or the sender is gone: stop either way.
                    _ = shutdown.wait_for(|v| *v) => true,
                };
                if stopping {
                    this.inner.stop.cancel();
                    return;
                }
                this.tick().await;
            }
        })
    }

    fn history_event(&self) -> Bytes {
        let h = self.inner.state.lock().history_json();
        sse_event("history", &h)
    }

    /// Ends every open stream now (also done when the sampler stops).
    pub fn close_streams(&self) {
        self.inner.stop.cancel();
    }

    fn subscribe(&self) -> (Bytes, Option<Bytes>, broadcast::Receiver<Bytes>) {
        let rx = self.inner.tx.subscribe();
        (self.history_event(), self.inner.latest.lock().clone(), rx)
    }
}

/// One SSE event: `event: NAME`, one `data:` line of JSON, a blank line.
fn sse_event(name: &str, value: &impl Serialize) -> Bytes {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // serde_json never writes a raw newline, so the data stays on one line.
    if serde_json::to_writer(&mut out, value).is_err() {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
