//! The bridge's Prometheus series, on atomics: publishes by mode, rejections
//! by status, and per subscription pushes, acks, retries, dead letters and
//! push latency.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::http_binding::Mode;
use crate::metrics::BUCKETS;

const MODES: [Mode; 3] = [Mode::Structured, Mode::Binary, Mode::Batch];
/// Statuses a publish can be refused with.
const REJECT_STATUSES: [u16; 6] = [400, 401, 413, 415, 500, 503];

/// Counters of `POST /v1/events`.
#[derive(Debug, Default)]
pub struct PublishMetrics {
    published: [AtomicU64; 3],
    rejected: [AtomicU64; 6],
}

impl PublishMetrics {
    /// `n` events accepted by the bus in `mode`.
    pub fn published(&self, mode: Mode, n: u64) {
        let i = MODES.iter().position(|m| *m == mode).unwrap_or(0);
        self.published[i].fetch_add(n, Relaxed);
    }

    /// A publish request refused with `status`.
    pub fn rejected(&self, status: u16) {
        if let Some(i) = REJECT_STATUSES.iter().position(|s| *s == status) {
            self.rejected[i].fetch_add(1, Relaxed);
        }
    }

    /// Events accepted in `mode` so far.
    pub fn published_count(&self, mode: Mode) -> u64 {
        let i = MODES.iter().position(|m| *m == mode).unwrap_or(0);
        self.published[i].load(Relaxed)
    }
}

/// Counters of one push subscription.
#[derive(Debug, Default)]
pub struct SubStats {
    /// HTTP deliveries sent (each attempt that reached an instance).
    pub pushed: AtomicU64,
    /// Deliveries answered 2xx (the event was acked).
    pub acked: AtomicU64,
    /// Failed deliveries that will be retried.
    pub retried: AtomicU64,
    /// Events given up on: rejected (4xx) or out of deliveries.
    pub dead_lettered: AtomicU64,
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl SubStats {
    /// Records one delivery's duration (all failovers included).
    pub fn latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// A JSON summary for the admin API.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "pushed": self.pushed.load(Relaxed),
            "acked": self.acked.load(Relaxed),
            "retried": self.retried.load(Relaxed),
            "dead_lettered": self.dead_lettered.load(Relaxed),
        })
    }
}

/// A per-subscription counter family: name, help, reader.
type Counter = (&'static str, &'static str, fn(&SubStats) -> u64);

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every bridge family (each with HELP and TYPE, also when empty).
pub fn render(publish: &PublishMetrics, subs: &[(String, std::sync::Arc<SubStats>)]) -> String {
    let mut out = String::with_capacity(2048);
    out.push_str("# HELP switchboard_bridge_published_total Events accepted over HTTP and published on the bus, by CloudEvents mode.\n");
    out.push_str("# TYPE switchboard_bridge_published_total counter\n");
    for (i, m) in MODES.iter().enumerate() {
        let _ = writeln!(
            out,
            "switchboard_bridge_published_total{{mode=\"{}\"}} {}",
            m.as_str(),
            publish.published[i].load(Relaxed)
        );
    }
    out.push_str("# HELP switchboard_bridge_publish_rejected_total Publish requests refused, by HTTP status.\n");
    out.push_str("# TYPE switchboard_bridge_publish_rejected_total counter\n");
    for (i, s) in REJECT_STATUSES.iter().enumerate() {
        let _ = writeln!(
            out,
            "switchboard_bridge_publish_rejected_total{{status=\"{s}\"}} {}",
            publish.rejected[i].load(Relaxed)
        );
    }
    out.push_str("# HELP switchboard_bridge_subscriptions Push subscriptions running.\n");
    out.push_str("# TYPE switchboard_bridge_subscriptions gauge\n");
    let _ = writeln!(out, "switchboard_bridge_subscriptions {}", subs.len());
    let counters: [Counter; 4] = [
        ("pushed", "HTTP deliveries sent to subscribers.", |s| {
            s.pushed.load(Relaxed)
        }),
        (
            "acked",
            "Deliveries answered 2xx, acknowledged on the bus.",
            |s| s.acked.load(Relaxed),
        ),
        (
            "retried",
            "Failed deliveries scheduled for redelivery (429, 5xx, timeouts, connection errors).",
            |s| s.retried.load(Relaxed),
        ),
        (
            "dead_lettered",
            "Events sent to the dead-letter topic (4xx, or out of deliveries).",
            |s| s.dead_lettered.load(Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP switchboard_bridge_{name}_total {help}");
        let _ = writeln!(out, "# TYPE switchboard_bridge_{name}_total counter");
        for (sub, st) in subs {
            let _ = writeln!(
                out,
                "switchboard_bridge_{name}_total{{subscription=\"{}\"}} {}",
                escape(sub),
                get(st)
            );
        }
    }
    out.push_str("# HELP switchboard_bridge_push_duration_seconds Time to deliver one event over HTTP, failovers included.\n");
    out.push_str("# TYPE switchboard_bridge_push_duration_seconds histogram\n");
    for (sub, st) in subs {
        let sub = escape(sub);
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += st.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "switchboard_bridge_push_duration_seconds_bucket{{subscription=\"{sub}\",le=\"{b}\"}} {cumulative}"
            );
        }
        let count = st.count.load(Relaxed);
        let _ = writeln!(
            out,
            "switchboard_bridge_push_duration_seconds_bucket{{subscription=\"{sub}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "switchboard_bridge_push_duration_seconds_sum{{subscription=\"{sub}\"}} {}",
            st.sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "switchboard_bridge_push_duration_seconds_count{{subscription=\"{sub}\"}} {count}"
        );
    }
    out
}
