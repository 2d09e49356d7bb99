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
}

impl AttemptOutcome {
    const ALL: [AttemptOutcome; 5] = [
        AttemptOutcome::Ok,
        AttemptOutcome::ServerError,
        AttemptOutcome::ConnectError,
        AttemptOutcome::Timeout,
        AttemptOutcome::Reset,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::ServerError => "server_error",
            AttemptOutcome::ConnectError => "connect_error",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Reset => "reset",
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
    attempts: [AtomicU64; 5],
    retries: AtomicU64,
    budget_exhausted: AtomicU64,
}

/// Labels of one route's series.
#[derive(Debug, Clone)]
pub struct RouteLabels {
    /// The route's prefix.
    pub route: String,
    /// The route's service.
    pub service: String,
}

/// All request-path metrics of a gateway.
pub struct Metrics {
    labels: Vec<RouteLabels>,
    /// `[shard][route]`; index `routes.len()` is the "no route" slot.
    shards: Vec<Box<[RouteShard]>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("routes", &self.labels.len())
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

impl Metrics {
    /// One slot per route, plus one for requests that matched no route.
    pub fn new(labels: Vec<RouteLabels>) -> Self {
        let n = labels.len() + 1;
        let shards = (0..SHARDS)
            .map(|_| (0..n).map(|_| RouteShard::default()).collect())
            .collect();
        Self { labels, shards }
    }

    fn slot(&self, route: Option<usize>) -> &RouteShard {
        let i = route.unwrap_or(self.labels.len()).min(self.labels.len());
        &self.shards[shard()][i]
    }

    /// Records a finished request.
    pub fn request(&self, route: Option<usize>, status: u16, elapsed: Duration) {
        let s = self.slot(route);
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
    pub fn attempt(&self, route: usize, outcome: AttemptOutcome) {
        let i = AttemptOutcome::ALL
            .iter()
            .position(|&o| o == outcome)
            .unwrap_or(0);
        self.slot(Some(route)).attempts[i].fetch_add(1, Relaxed);
    }

    /// Records a retry.
    pub fn retry(&self, route: usize) {
        self.slot(Some(route)).retries.fetch_add(1, Relaxed);
    }

    /// Records a retry refused by the budget.
    pub fn budget_exhausted(&self, route: usize) {
        self.slot(Some(route))
            .budget_exhausted
            .fetch_add(1, Relaxed);
    }

    fn sum(&self, i: usize, f: impl Fn(&RouteShard) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| f(&s[i]).load(Relaxed)).sum()
    }

    /// Appends the request-path series in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let n = self.labels.len();
        let label = |i: usize| -> String {
            if i == n {
                "route=\"\",service=\"\"".to_owned()
            } else {
                format!(
                    "route=\"{}\",service=\"{}\"",
                    escape(&self.labels[i].route),
                    escape(&self.labels[i].service)
                )
            }
        };
        out.push_str("# HELP switchboard_gateway_requests_total Requests answered, by route, service and status class.\n");
        out.push_str("# TYPE switchboard_gateway_requests_total counter\n");
        for i in 0..=n {
            for c in 0..5 {
                let v = self.sum(i, |s| &s.status[c]);
                let _ = writeln!(
                    out,
                    "switchboard_gateway_requests_total{{{},status_class=\"{}xx\"}} {v}",
                    label(i),
                    c + 1
                );
            }
        }
        out.push_str("# HELP switchboard_gateway_request_duration_seconds Time from request head to response end.\n");
        out.push_str("# TYPE switchboard_gateway_request_duration_seconds histogram\n");
        for i in 0..=n {
            let l = label(i);
            let mut cum = 0;
            for (b, le) in BUCKETS.iter().enumerate() {
                cum += self.sum(i, |s| &s.buckets[b]);
                let _ = writeln!(
                    out,
                    "switchboard_gateway_request_duration_seconds_bucket{{{l},le=\"{le}\"}} {cum}"
                );
            }
            let count = self.sum(i, |s| &s.count);
            let sum = self.sum(i, |s| &s.sum_us) as f64 / 1e6;
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
            "# HELP switchboard_gateway_upstream_attempts_total Upstream attempts by outcome.\n",
        );
        out.push_str("# TYPE switchboard_gateway_upstream_attempts_total counter\n");
        for i in 0..n {
            for (k, o) in AttemptOutcome::ALL.iter().enumerate() {
                let v = self.sum(i, |s| &s.attempts[k]);
                let _ = writeln!(
                    out,
                    "switchboard_gateway_upstream_attempts_total{{{},outcome=\"{}\"}} {v}",
                    label(i),
                    o.as_str()
                );
            }
        }
        out.push_str("# HELP switchboard_gateway_retries_total Retries sent.\n");
        out.push_str("# TYPE switchboard_gateway_retries_total counter\n");
        for i in 0..n {
            let v = self.sum(i, |s| &s.retries);
            let _ = writeln!(out, "switchboard_gateway_retries_total{{{}}} {v}", label(i));
        }
        out.push_str("# HELP switchboard_gateway_retry_budget_exhausted_total Retries refused by the retry budget.\n");
        out.push_str("# TYPE switchboard_gateway_retry_budget_exhausted_total counter\n");
        for i in 0..n {
            let v = self.sum(i, |s| &s.budget_exhausted);
            let _ = writeln!(
                out,
                "switchboard_gateway_retry_budget_exhausted_total{{{}}} {v}",
                label(i)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_renders() {
        let m = Metrics::new(vec![RouteLabels {
            route: "/users".into(),
            service: "user-service".into(),
        }]);
        m.request(Some(0), 200, Duration::from_micros(700));
        m.request(Some(0), 503, Duration::from_secs(20));
        m.request(None, 404, Duration::from_micros(10));
        m.attempt(0, AttemptOutcome::ConnectError);
        m.retry(0);
        let mut s = String::new();
        m.render(&mut s);
        assert!(s.contains("switchboard_gateway_requests_total{route=\"/users\",service=\"user-service\",status_class=\"2xx\"} 1"));
        assert!(s.contains(
            "switchboard_gateway_requests_total{route=\"\",service=\"\",status_class=\"4xx\"} 1"
        ));
        assert!(s.contains("route=\"/users\",service=\"user-service\",le=\"0.001\"} 1"));
        assert!(s.contains("route=\"/users\",service=\"user-service\",le=\"+Inf\"} 2"));
        assert!(s.contains("outcome=\"connect_error\"} 1"));
        assert!(s.contains(
            "switchboard_gateway_retries_total{route=\"/users\",service=\"user-service\"} 1"
        ));
    }
}
