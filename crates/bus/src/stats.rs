//! Live statistics of a [`crate::Bus`] for dashboards: events published per
//! topic, deliveries per consumer group, consumer lag, and a bounded ring of
//! the latest events.
//!
//! The cost on the event path is kept to an atomic increment: per-group
//! counters are allocated when a subscription starts and the consumer loop
//! only bumps them; per-topic publish counts and the ring of recent events are
//! recorded only while the tap is on ([`BusStats::tap`]), and otherwise cost
//! one relaxed load per publish.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_bus::{Bus, Event};
//! let bus = Bus::open("memory://stats-doc").await?;
//! bus.stats().tap(true);
//! bus.publish(Event::builder().source("/doc").ty("order.created").build()?).await?;
//! let snap = bus.stats_snapshot().await;
//! assert_eq!(snap.topics[0].published, 1);
//! assert_eq!(snap.recent[0].ty, "order.created");
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::Event;

/// How many recent events the ring keeps.
pub const RECENT_CAPACITY: usize = 1024;

/// Counters of one consumer group on one topic (shared by the group's
/// subscriptions in this process).
#[derive(Debug)]
pub struct GroupCounters {
    topic: String,
    group: String,
    delivered: AtomicU64,
    acked: AtomicU64,
    redelivered: AtomicU64,
    dead_lettered: AtomicU64,
    released: AtomicU64,
    held: AtomicU64,
}

impl GroupCounters {
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
    pub(crate) fn handed_back(&self, released: u64, held: u64) {
        self.released.fetch_add(released, Relaxed);
        self.held.fetch_add(held, Relaxed);
    }
}

/// One event seen by the tap.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecentEvent {
    /// When it was published, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The topic it was published on (its type, or a dead-letter replay's topic).
    pub topic: String,
    /// The CloudEvents `type`.
    #[serde(rename = "type")]
    pub ty: String,
    /// The CloudEvents `id`.
    pub id: String,
    /// The CloudEvents `source`.
    pub source: String,
    /// The `correlationid` extension, when present.
    pub correlation_id: Option<String>,
}

impl RecentEvent {
    /// Whether `needle` equals the id or the correlation id, or is part of one
    /// (case-insensitive, at least 3 characters for a partial match).
    pub fn matches(&self, needle: &str) -> bool {
        let needle = needle.trim();
        if needle.is_empty() {
            return false;
        }
        let hit = |s: &str| {
            s.eq_ignore_ascii_case(needle)
                || (needle.len() >= 3
                    && s.to_ascii_lowercase()
                        .contains(&needle.to_ascii_lowercase()))
        };
        hit(&self.id) || self.correlation_id.as_deref().is_some_and(hit)
    }
}

/// Publish count of one topic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicStats {
    /// The topic.
    pub topic: String,
    /// Events published on it while the tap was on.
    pub published: u64,
}

/// Counters and lag of one consumer group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupStats {
    /// The topic consumed.
    pub topic: String,
    /// The group.
    pub group: String,
    /// Deliveries to this process's subscriptions (redeliveries included).
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries that were not the first for their event.
    pub redelivered: u64,
    /// Events sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Deliveries handed back to the group because their handler refused
    /// them with [`crate::Nack::release`] while the subscription stopped.
    pub released: u64,
    /// Deliveries handed back to the group, never run, when a subscription
    /// stopped: fetched after it began stopping, or (Redis) failed and still
    /// waiting for their backoff.
    pub held: u64,
    /// Events retained but not yet delivered to the group, where the backend
    /// can tell (Redis 7 `XINFO GROUPS` lag, JetStream `num_pending`, the
    /// memory log); `None` otherwise.
    pub lag: Option<u64>,
}

/// A copy of the statistics at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Per topic, by name.
    pub topics: Vec<TopicStats>,
    /// Per (topic, group), by topic then group.
    pub groups: Vec<GroupStats>,
    /// The latest events, newest first (at most [`RECENT_CAPACITY`]).
    pub recent: Vec<RecentEvent>,
}

/// The statistics of one bus (shared by its clones).
#[derive(Debug, Default)]
pub struct BusStats {
    tap: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    topics: BTreeMap<String, u64>,
    groups: BTreeMap<(String, String), Arc<GroupCounters>>,
    recent: VecDeque<RecentEvent>,
}

impl BusStats {
    /// Turns recording of per-topic counts and recent events on or off.
    pub fn tap(&self, on: bool) {
        self.tap.store(on, Relaxed);
    }

    /// Whether the tap is on.
    pub fn is_tapped(&self) -> bool {
        self.tap.load(Relaxed)
    }

    /// The counters of `group` on `topic`, created on first use.
    pub(crate) fn group(&self, topic: &str, group: &str) -> Arc<GroupCounters> {
        let mut inner = self.inner.lock();
        Arc::clone(
            inner
                .groups
                .entry((topic.to_owned(), group.to_owned()))
                .or_insert_with(|| {
                    Arc::new(GroupCounters {
                        topic: topic.to_owned(),
                        group: group.to_owned(),
                        delivered: AtomicU64::new(0),
                        acked: AtomicU64::new(0),
                        redelivered: AtomicU64::new(0),
                        dead_lettered: AtomicU64::new(0),
                        released: AtomicU64::new(0),
                        held: AtomicU64::new(0),
                    })
                }),
        )
    }

    /// Records events accepted by the backend on `topic` (when tapped).
    pub(crate) fn published(&self, topic: &str, events: &[Event]) {
        if !self.is_tapped() {
            return;
        }
        let time_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut inner = self.inner.lock();
        match inner.topics.get_mut(topic) {
            Some(n) => *n += events.len() as u64,
            None => {
                inner.topics.insert(topic.to_owned(), events.len() as u64);
            }
        }
        // Only the newest RECENT_CAPACITY of a large batch can stay.
        let skip = events.len().saturating_sub(RECENT_CAPACITY);
        for e in &events[skip..] {
            if inner.recent.len() == RECENT_CAPACITY {
                inner.recent.pop_front();
            }
            inner.recent.push_back(RecentEvent {
                time_ms,
                topic: topic.to_owned(),
                ty: e.ty().to_owned(),
                id: e.id().to_owned(),
                source: e.source().to_owned(),
                correlation_id: e.correlation_id().map(str::to_owned),
            });
        }
    }

    /// The counters, without lag (see [`crate::Bus::stats_snapshot`] for lag).
    pub fn snapshot(&self) -> StatsSnapshot {
        let inner = self.inner.lock();
        StatsSnapshot {
            topics: inner
                .topics
                .iter()
                .map(|(topic, &published)| TopicStats {
                    topic: topic.clone(),
                    published,
                })
                .collect(),
            groups: inner
                .groups
                .values()
                .map(|g| GroupStats {
                    topic: g.topic.clone(),
                    group: g.group.clone(),
                    delivered: g.delivered.load(Relaxed),
                    acked: g.acked.load(Relaxed),
                    redelivered: g.redelivered.load(Relaxed),
                    dead_lettered: g.dead_lettered.load(Relaxed),
                    released: g.released.load(Relaxed),
                    held: g.held.load(Relaxed),
                    lag: None,
                })
                .collect(),
            recent: inner.recent.iter().rev().cloned().collect(),
        }
    }

    /// Recent events whose id or correlation id matches `needle` (see
    /// [`RecentEvent::matches`]), newest first, at most `limit`.
    pub fn find(&self, needle: &str, limit: usize) -> Vec<RecentEvent> {
        let inner = self.inner.lock();
        inner
            .recent
            .iter()
            .rev()
            .filter(|e| e.matches(needle))
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(ty: &str, correlation: Option<&str>) -> Event {
        let mut b = Event::builder().source("/t").ty(ty);
        if let Some(c) = correlation {
            b = b.correlation_id(c);
        }
        b.build().unwrap()
    }

    #[test]
    fn untapped_records_nothing_but_groups_count() {
        let s = BusStats::default();
        s.published("a", &[event("a", None)]);
        let g = s.group("a", "g");
        g.delivered(3, 1);
        g.acked(2);
        g.dead_lettered();
        g.handed_back(2, 1);
        assert!(Arc::ptr_eq(&g, &s.group("a", "g")));
        let snap = s.snapshot();
        assert!(snap.topics.is_empty() && snap.recent.is_empty());
        assert_eq!(
            snap.groups,
            vec![GroupStats {
                topic: "a".into(),
                group: "g".into(),
                delivered: 3,
                acked: 2,
                redelivered: 1,
                dead_lettered: 1,
                released: 2,
                held: 1,
                lag: None
            }]
        );
    }

    #[test]
    fn ring_is_bounded_newest_first_and_searchable() {
        let s = BusStats::default();
        s.tap(true);
        for i in 0..RECENT_CAPACITY + 10 {
            let c = format!("corr-{i}");
            s.published("t", &[event("t", Some(&c))]);
        }
        let snap = s.snapshot();
        assert_eq!(snap.topics[0].published, (RECENT_CAPACITY + 10) as u64);
        assert_eq!(snap.recent.len(), RECENT_CAPACITY);
        let last = format!("corr-{}", RECENT_CAPACITY + 9);
        assert_eq!(
            snap.recent[0].correlation_id.as_deref(),
            Some(last.as_str())
        );
        assert_eq!(s.find(&last, 5).len(), 1);
        assert!(
            s.find("corr-0", 5).is_empty(),
            "the oldest fell out of the ring"
        );
        let id = snap.recent[3].id.clone();
        assert_eq!(s.find(&id.to_uppercase(), 5)[0].id, id);
    }

    proptest! {
        #[test]
        fn matches_never_panics_and_finds_exact_ids(id in "[a-zA-Z0-9-]{1,40}", needle in "\\PC{0,40}") {
            let e = RecentEvent {
                time_ms: 0, topic: "t".into(), ty: "t".into(), id: id.clone(),
                source: "/s".into(), correlation_id: Some(needle.clone()),
            };
            prop_assert!(e.matches(&id));
            let _ = e.matches(&needle);
        }
    }
}
