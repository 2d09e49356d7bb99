//! Bus counters on atomics, with a snapshot and a Prometheus text rendering.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the handler latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// What a [`crate::Bus`] counted since it was opened (shared by its clones).
#[derive(Debug, Default)]
pub struct Metrics {
    published: AtomicU64,
    delivered: AtomicU64,
    acked: AtomicU64,
    redelivered: AtomicU64,
    dead_lettered: AtomicU64,
    handler_errors: AtomicU64,
    released: AtomicU64,
    held: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Events accepted by the backend.
    pub published: u64,
    /// Deliveries handed to this bus's subscriptions (redeliveries included).
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries that were not the first for their event.
    pub redelivered: u64,
    /// Events sent to a dead-letter topic.
    pub dead_lettered: u64,
    /// Handler runs that returned an error or panicked.
    pub handler_errors: u64,
    /// Deliveries handed back to their group because their handler refused
    /// them with [`crate::Nack::release`] while the subscription stopped.
    pub released: u64,
    /// Deliveries handed back to their group, never run, when the
    /// subscription stopped: fetched after it began stopping, or (Redis)
    /// failed and still waiting for their backoff.
    pub held: u64,
    /// Cumulative handler latency histogram: count per bucket of [`LATENCY_BUCKETS`].
    pub latency_buckets: Vec<u64>,
    /// Handler runs measured.
    pub latency_count: u64,
    /// Sum of handler latencies in nanoseconds.
    pub latency_sum_ns: u64,
}

impl Metrics {
    pub(crate) fn published(&self, n: u64) {
        self.published.fetch_add(n, Relaxed);
    }
    pub(crate) fn delivered(&self, n: u64, redelivered: u64) {
        self.delivered.fetch_add(n, Relaxed);
        if redelivered > 0 {
            self.redelivered.fetch_add(redelivered, Relaxed);
        }
    }
    pub(crate) fn acked(&self, n: u64) {
        self.acked.fetch_add(n, Relaxed);
    }
    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Relaxed);
    }
    pub(crate) fn handler_error(&self) {
        self.handler_errors.fetch_add(1, Relaxed);
    }
    pub(crate) fn handed_back(&self, released: u64, held: u64) {
        self.released.fetch_add(released, Relaxed);
        self.held.fetch_add(held, Relaxed);
    }
    pub(crate) fn handler_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut cumulative = 0;
        MetricsSnapshot {
            published: self.published.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            acked: self.acked.load(Relaxed),
            redelivered: self.redelivered.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            handler_errors: self.handler_errors.load(Relaxed),
            released: self.released.load(Relaxed),
            held: self.held.load(Relaxed),
            latency_buckets: self
                .latency_buckets
                .iter()
                .map(|b| {
                    cumulative += b.load(Relaxed);
                    cumulative
                })
                .collect(),
            latency_count: self.latency_count.load(Relaxed),
            latency_sum_ns: self.latency_sum_ns.load(Relaxed),
        }
    }

    /// Renders the counters in the Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        self.snapshot().render_prometheus()
    }
}

impl MetricsSnapshot {
    /// Renders the snapshot in the Prometheus text exposition format
    /// (metric names prefixed `switchboard_bus_`).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(2048);
        for (name, help, value) in [
            (
                "published",
                "Events accepted by the backend.",
                self.published,
            ),
            (
                "delivered",
                "Deliveries handed to handlers, redeliveries included.",
                self.delivered,
            ),
            ("acked", "Deliveries acknowledged.", self.acked),
            (
                "redelivered",
                "Deliveries that were not the first for their event.",
                self.redelivered,
            ),
            (
                "dead_lettered",
                "Events sent to a dead-letter topic.",
                self.dead_lettered,
            ),
            (
                "handler_errors",
                "Handler runs that failed or panicked.",
                self.handler_errors,
            ),
        ] {
            let _ = writeln!(out, "# HELP switchboard_bus_{name}_total {help}");
            let _ = writeln!(out, "# TYPE switchboard_bus_{name}_total counter");
            let _ = writeln!(out, "switchboard_bus_{name}_total {value}");
        }
        let c = "switchboard_bus_handed_back_total";
        let _ = writeln!(
            out,
            "# HELP {c} Deliveries handed back to their group unhandled when a subscription stopped, by reason (released by the handler, held by the consumer)."
        );
        let _ = writeln!(out, "# TYPE {c} counter");
        let _ = writeln!(out, "{c}{{reason=\"released\"}} {}", self.released);
        let _ = writeln!(out, "{c}{{reason=\"held\"}} {}", self.held);
        let h = "switchboard_bus_handler_duration_seconds";
        let _ = writeln!(out, "# HELP {h} Handler run time.");
        let _ = writeln!(out, "# TYPE {h} histogram");
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(out, "{h}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{h}_bucket{{le=\"+Inf\"}} {}", self.latency_count);
        let _ = writeln!(out, "{h}_sum {}", self.latency_sum_ns as f64 / 1e9);
        let _ = writeln!(out, "{h}_count {}", self.latency_count);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_rendered() {
        let m = Metrics::default();
        m.published(3);
        m.handler_latency(Duration::from_micros(50));
        m.handler_latency(Duration::from_millis(3));
        m.handler_latency(Duration::from_secs(60));
        m.handed_back(2, 1);
        let s = m.snapshot();
        assert_eq!(s.published, 3);
        assert_eq!(s.latency_buckets[0], 1);
        assert_eq!(s.latency_buckets[4], 2);
        assert_eq!(*s.latency_buckets.last().unwrap(), 2);
        assert_eq!(s.latency_count, 3);
        let text = m.render_prometheus();
        assert!(
            text.contains("switchboard_bus_published_total 3\n"),
            "{text}"
        );
        assert!(text.contains("switchboard_bus_handler_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("switchboard_bus_handler_duration_seconds_count 3\n"));
        assert_eq!((s.released, s.held), (2, 1));
        assert!(text.contains("switchboard_bus_handed_back_total{reason=\"released\"} 2\n"));
        assert!(text.contains("switchboard_bus_handed_back_total{reason=\"held\"} 1\n"));
    }
}
