//! Prometheus metrics on atomics.
//!
//! Counters are sharded per worker thread (cache-line padded) so the two
//! workers never write the same line; a scrape sums the shards. Label sets are
//! fixed at startup (one slot per route), so recording is an index and a
//! relaxed `fetch_add`, with no map lookup, lock or allocation.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// Histogram bucket upper bounds, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];
/// Number of per-thread shards of counters.
pub const SHARDS: usize = 4;

/// Outcome of one upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A response below 500 (or a 5xx that is passed through as the answer).
    Ok,
    /// A 5xx response.
    ServerError,
    /// Connecting failed or timed out; nothing was sent.
    ConnectError,
    /// The attempt timed out after sending.
    Timeout,
    /// The connection broke after sending.
    Reset,
    /// The head arrived (below 500) but the body then failed: the upstream
    /// reset or truncated it mid-way. Recorded when the body ends, as is
    /// `Ok` for a streamed body (a client that leaves first leaves it `Ok`).
    BodyError,
}

impl AttemptOutcome {
    const ALL: [AttemptOutcome; 6] = [
        AttemptOutcome::Ok,
        AttemptOutcome::ServerError,
        AttemptOutcome::ConnectError,
        AttemptOutcome::Timeout,
        AttemptOutcome::Reset,
        AttemptOutcome::BodyError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::ServerError => "server_error",
            AttemptOutcome::ConnectError => "connect_error",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Reset => "reset",
            AttemptOutcome::BodyError => "body_error",
        }
    }
}

#[derive(Default)]
#[repr(align(128))]
struct RouteShard {
    /// Requests by status class: 1xx..5xx at 0..5.
    status: [AtomicU64; 5],
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_us: AtomicU64,
    attempts: [AtomicU64; 6],
    retries: AtomicU64,
    budget_exhausted: AtomicU64,
}

/// Labels of one route's series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLabels {
    /// The route's prefix.
    pub route: String,
    /// The route's service.
    pub service: String,
}

/// One route's request counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteTotals {
    /// Requests by status class, 1xx..5xx.
    pub status: [u64; 5],
    /// Requests per latency bucket of [`BUCKETS`] (not cumulative).
    pub buckets: [u64; 14],
    /// Requests measured.
    pub count: u64,
}

/// One route's counters, sharded per worker thread.
///
/// A series lives as long as the process (see [`Metrics::series`]): requests
/// hold a plain `&'static` to it, so recording touches no reference count,
/// and a reload that keeps a route's labels keeps counting into the same one.
pub struct RouteSeries {
    /// The labels this series is rendered with.
    pub labels: RouteLabels,
    shards: [RouteShard; SHARDS],
}

impl std::fmt::Debug for RouteSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSeries")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl RouteSeries {
    fn new(labels: RouteLabels) -> Self {
        Self {
            labels,
            shards: Default::default(),
        }
    }

    fn local(&self) -> &RouteShard {
        &self.shards[shard()]
    }

    fn sum(&self, f: impl Fn(&RouteShard) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| f(s).load(Relaxed)).sum()
    }

    /// The counters summed over the shards (read by the dashboard's sampler).
    pub fn totals(&self) -> RouteTotals {
        let mut t = RouteTotals::default();
        for (c, v) in t.status.iter_mut().enumerate() {
            *v = self.sum(|s| &s.status[c]);
        }
        for (b, v) in t.buckets.iter_mut().enumerate() {
            *v = self.sum(|s| &s.buckets[b]);
        }
        t.count = self.sum(|s| &s.count);
        t
    }
}

/// All request-path metrics of a gateway.
pub struct Metrics {
    /// Every route series ever configured, in order of first use.
    series: parking_lot::Mutex<Vec<&'static RouteSeries>>,
    /// Requests that matched no route.
    no_route: RouteSeries,
    /// Config reloads: `[ok, error]`.
    reloads: [AtomicU64; 2],
    /// Upgraded (WebSocket) connections: `[opened, closed]`.
    upgrades: [AtomicU64; 2],
    /// Lingering closes by how they ended, in [`LINGER_ENDINGS`] order.
    lingers: [AtomicU64; 6],
}

/// The `ended` labels of `switchboard_gateway_lingering_closes_total`.
const LINGER_ENDINGS: [&str; 6] = [
    "client_closed",
    "idle",
    "time",
    "bytes",
    "shutdown",
    "failed",
];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("routes", &self.series.lock().len())
            .finish()
    }
}

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

/// This thread's shard: threads get 0, 1, 2, ... in order of first use,
/// so the gateway's workers each have their own.
pub fn shard() -> usize {
    SHARD.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_SHARD.fetch_add(1, Relaxed) % SHARDS;
        s.set(v);
        v
    })
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// No route series yet (add them with [`Metrics::series`]).
    pub fn new() -> Self {
        Self {
            series: parking_lot::Mutex::new(Vec::new()),
            no_route: RouteSeries::new(RouteLabels {
                route: String::new(),
                service: String::new(),
            }),
            reloads: Default::default(),
            upgrades: Default::default(),
            lingers: Default::default(),
        }
    }

    /// The series for `labels`, created on first use. Series are never freed
    /// (deliberately leaked): their number is bounded by the distinct
    /// (route, service) pairs configured over the process's life, and in
    /// exchange the request path holds them without a reference count.
    pub fn series(&self, labels: RouteLabels) -> &'static RouteSeries {
        let mut all = self.series.lock();
        if let Some(s) = all.iter().find(|s| s.labels == labels) {
            return s;
        }
        let s: &'static RouteSeries = Box::leak(Box::new(RouteSeries::new(labels)));
        all.push(s);
        s
    }

    /// Counts a config reload attempt.
    pub fn reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].fetch_add(1, Relaxed);
    }

    /// An upgraded connection started splicing.
    pub fn upgrade_opened(&self) {
        self.upgrades[0].fetch_add(1, Relaxed);
    }

    /// An upgraded connection closed.
    pub fn upgrade_closed(&self) {
        self.upgrades[1].fetch_add(1, Relaxed);
    }

    /// A lingering close ended (RFC 9112 §9.6); `Off` is not counted.
    pub fn lingered(&self, ended: crate::h1_server::linger::Ended) {
        use crate::h1_server::linger::Ended;
        let i = match ended {
            Ended::Eof => 0,
            Ended::Idle => 1,
            Ended::Time => 2,
            Ended::Bytes => 3,
            Ended::Shutdown => 4,
            Ended::Failed => 5,
            Ended::Off => return,
        };
        self.lingers[i].fetch_add(1, Relaxed);
    }

    /// Reloads counted so far: `(ok, error)`.
    pub fn reloads(&self) -> (u64, u64) {
        (self.reloads[0].load(Relaxed), self.reloads[1].load(Relaxed))
    }

    /// Records a finished request (`None`: it matched no route).
    pub fn request(&self, route: Option<&RouteSeries>, status: u16, elapsed: Duration) {
        let s = route.unwrap_or(&self.no_route).local();
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        s.status[class].fetch_add(1, Relaxed);
        let us = elapsed.as_micros() as u64;
        if let Some(b) = BUCKETS_US.iter().position(|&b| us <= b) {
            s.buckets[b].fetch_add(1, Relaxed);
        }
        s.count.fetch_add(1, Relaxed);
        s.sum_us.fetch_add(us, Relaxed);
    }

    /// Records an upstream attempt.
    pub fn attempt(&self, route: &RouteSeries, outcome: AttemptOutcome) {
        let i = AttemptOutcome::ALL
            .iter()
            .position(|&o| o == outcome)
            .unwrap_or(0);
        route.local().attempts[i].fetch_add(1, Relaxed);
    }

    /// Records a retry.
    pub fn retry(&self, route: &RouteSeries) {
        route.local().retries.fetch_add(1, Relaxed);
    }

    /// Records a retry refused by the budget.
    pub fn budget_exhausted(&self, route: &RouteSeries) {
        route.local().budget_exhausted.fetch_add(1, Relaxed);
    }

    /// Appends the request-path series in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let routes: Vec<&'static RouteSeries> = self.series.lock().clone();
        let label = |s: &RouteSeries| -> String {
            format!(
                "route=\"{}\",service=\"{}\"",
                escape(&s.labels.route),
                escape(&s.labels.service)
            )
        };
        let with_none = || {
            routes
                .iter()
                .copied()
                .chain(std::iter::once(&self.no_route))
        };
        out.push_str("# HELP switchboard_gateway_requests_total Requests answered, by route, service and the status class sent (a body that broke later is outcome=\"body_error\" in switchboard_gateway_upstream_attempts_total).\n");
        out.push_str("# TYPE switchboard_gateway_requests_total counter\n");
        for s in with_none() {
            for c in 0..5 {
                let v = s.sum(|x| &x.status[c]);
                let _ = writeln!(
                    out,
                    "switchboard_gateway_requests_total{{{},status_class=\"{}xx\"}} {v}",
                    label(s),
                    c + 1
                );
            }
        }
        out.push_str("# HELP switchboard_gateway_request_duration_seconds Time from request head to response end.\n");
        out.push_str("# TYPE switchboard_gateway_request_duration_seconds histogram\n");
        for s in with_none() {
            let l = label(s);
            let mut cum = 0;
            for (b, le) in BUCKETS.iter().enumerate() {
                cum += s.sum(|x| &x.buckets[b]);
                let _ = writeln!(
                    out,
                    "switchboard_gateway_request_duration_seconds_bucket{{{l},le=\"{le}\"}} {cum}"
                );
            }
            let count = s.sum(|x| &x.count);
            let sum = s.sum(|x| &x.sum_us) as f64 / 1e6;
            let _ = writeln!(
                out,
                "switchboard_gateway_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "switchboard_gateway_request_duration_seconds_sum{{{l}}} {sum}"
            );
            let _ = writeln!(
                out,
                "switchboard_gateway_request_duration_seconds_count{{{l}}} {count}"
            );
        }
        out.push_str(
            "# HELP switchboard_gateway_upstream_attempts_total Upstream attempts by outcome (a streamed body's is known at its end).\n",
        );
        out.push_str("# TYPE switchboard_gateway_upstream_attempts_total counter\n");
        for s in &routes {
            for (k, o) in AttemptOutcome::ALL.iter().enumerate() {
                let v = s.sum(|x| &x.attempts[k]);
                let _ = writeln!(
                    out,
                    "switchboard_gateway_upstream_attempts_total{{{},outcome=\"{}\"}} {v}",
                    label(s),
                    o.as_str()
                );
            }
        }
        out.push_str("# HELP switchboard_gateway_retries_total Retries sent.\n");
        out.push_str("# TYPE switchboard_gateway_retries_total counter\n");
        for s in &routes {
            let v = s.sum(|x| &x.retries);
            let _ = writeln!(out, "switchboard_gateway_retries_total{{{}}} {v}", label(s));
        }
        out.push_str("# HELP switchboard_gateway_retry_budget_exhausted_total Retries refused by the retry budget.\n");
        out.push_str("# TYPE switchboard_gateway_retry_budget_exhausted_total counter\n");
        for s in &routes {
            let v = s.sum(|x| &x.budget_exhausted);
            let _ = writeln!(
                out,
                "switchboard_gateway_retry_budget_exhausted_total{{{}}} {v}",
                label(s)
            );
        }
        let opened = self.upgrades[0].load(Relaxed);
        let closed = self.upgrades[1].load(Relaxed);
        out.push_str("# HELP switchboard_gateway_upgrades_total Connections upgraded (WebSocket) and spliced to an upstream.\n");
        out.push_str("# TYPE switchboard_gateway_upgrades_total counter\n");
        let _ = writeln!(out, "switchboard_gateway_upgrades_total {opened}");
        out.push_str(
            "# HELP switchboard_gateway_upgraded_connections Upgraded connections open now.\n",
        );
        out.push_str("# TYPE switchboard_gateway_upgraded_connections gauge\n");
        let _ = writeln!(
            out,
            "switchboard_gateway_upgraded_connections {}",
            opened.saturating_sub(closed)
        );
        out.push_str("# HELP switchboard_gateway_lingering_closes_total Connections closed after reading and discarding what the client still sent (RFC 9112 9.6), by how the lingering ended.\n");
        out.push_str("# TYPE switchboard_gateway_lingering_closes_total counter\n");
        for (ended, n) in LINGER_ENDINGS.iter().zip(&self.lingers) {
            let _ = writeln!(
                out,
                "switchboard_gateway_lingering_closes_total{{ended=\"{ended}\"}} {}",
                n.load(Relaxed)
            );
        }
        let (ok, error) = self.reloads();
        out.push_str("# HELP switchboard_config_reloads_total Configuration reloads, by result.\n");
        out.push_str("# TYPE switchboard_config_reloads_total counter\n");
        let _ = writeln!(
            out,
            "switchboard_config_reloads_total{{result=\"ok\"}} {ok}"
        );
        let _ = writeln!(
            out,
            "switchboard_config_reloads_total{{result=\"error\"}} {error}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_renders() {
        let m = Metrics::new();
        let r = m.series(RouteLabels {
            route: "/users".into(),
            service: "user-service".into(),
        });
        m.request(Some(r), 200, Duration::from_micros(700));
        m.request(Some(r), 503, Duration::from_secs(20));
        m.request(None, 404, Duration::from_micros(10));
        m.attempt(r, AttemptOutcome::ConnectError);
        m.attempt(r, AttemptOutcome::BodyError);
        m.retry(r);
        m.reload(false);
        let mut s = String::new();
        m.render(&mut s);
        assert!(s.contains("switchboard_gateway_requests_total{route=\"/users\",service=\"user-service\",status_class=\"2xx\"} 1"));
        assert!(s.contains(
            "switchboard_gateway_requests_total{route=\"\",service=\"\",status_class=\"4xx\"} 1"
        ));
        assert!(s.contains("route=\"/users\",service=\"user-service\",le=\"0.001\"} 1"));
        assert!(s.contains("route=\"/users\",service=\"user-service\",le=\"+Inf\"} 2"));
        assert!(s.contains("outcome=\"connect_error\"} 1"));
        assert!(s.contains("outcome=\"body_error\"} 1"));
        assert!(s.contains(
            "switchboard_gateway_retries_total{route=\"/users\",service=\"user-service\"} 1"
        ));
        assert!(s.contains("switchboard_config_reloads_total{result=\"error\"} 1"));
        // The same labels give the same series (a reload keeps counting).
        let again = m.series(RouteLabels {
            route: "/users".into(),
            service: "user-service".into(),
        });
        assert!(std::ptr::eq(r, again));
    }
}
