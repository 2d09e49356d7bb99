//! [`Bus`]: one handle over whichever backend the URL names.

use std::sync::Arc;

use crate::backend::{self, Backend};
use crate::middleware::correlation;
use crate::middleware::metrics::Metrics;
use crate::stats::{BusStats, StatsSnapshot};
use crate::{Event, Handler, SubscribeOptions, Subscription};

/// Why a bus operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The URL is malformed or names an unknown scheme.
    #[error("invalid bus url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A topic or group name the backends cannot all represent.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// `topic` or `group`.
        what: &'static str,
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The backend could not be reached or did not answer in time; retrying may succeed.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend answered with an error.
    #[error("backend error: {0}")]
    Backend(String),
    /// The backend cannot do this at all (see [`Capabilities`]).
    #[error("not supported by the {backend} backend: {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// The operation.
        what: &'static str,
    },
}

impl BusError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BusError::Unavailable(_))
    }
}

/// What a backend promises. Every backend delivers at least once to a live
/// subscriber and redelivers failed events; these flags are the differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// The backend's name (`memory`, `redis`, `nats`, `redis+pubsub`).
    pub backend: &'static str,
    /// Accepted events survive a broker restart (and a subscriber that was down
    /// gets them when it comes back).
    pub durable: bool,
    /// A group created after events were published receives the retained ones.
    pub replay_for_new_groups: bool,
    /// A group whose only consumer has `max_in_flight(1)` sees a topic's events
    /// in publish order (until a handler fails: redeliveries come later).
    pub ordered_per_topic: bool,
    /// Consumers in one group share the work; otherwise each subscription gets every event.
    pub competing_consumers: bool,
    /// A delivery not acked within the ack wait (the consumer died) goes to
    /// another consumer of the group.
    pub redelivery_after_crash: bool,
}

/// An event bus over one backend, chosen by URL; cheap to clone.
///
/// ```
/// use switchboard_bus::{Bus, Event, HandlerError, SubscribeOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::open("memory://doc-example").await?;
/// let sub = bus
///     .subscribe("order.created", "billing", |event: Event| async move {
///         println!("bill order {}", event.data_json().unwrap_or("null"));
///         Ok::<_, HandlerError>(())
///     }, SubscribeOptions::default())
///     .await?;
/// bus.publish(
///     Event::builder()
///         .source("/orders")
///         .ty("order.created")
///         .data(&serde_json::json!({"id": 1}))
///         .build()?,
/// )
/// .await?;
/// sub.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    metrics: Arc<Metrics>,
    stats: Arc<BusStats>,
    url: String,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("url", &self.inner.url).finish()
    }
}

impl Bus {
    /// Opens the backend named by `url`:
    ///
    /// - `memory://` or `memory://NAME`: in-process; buses opened with the same
    ///   name in one process share topics.
    /// - `redis://HOST:PORT`: Redis Streams.
    /// - `redis+pubsub://HOST:PORT`: Redis Pub/Sub with the plain envelope (not durable).
    /// - `nats://HOST:PORT`: NATS JetStream.
    pub async fn open(url: &str) -> Result<Bus, BusError> {
        let backend = backend::open(url).await?;
        Ok(Bus {
            inner: Arc::new(Inner {
                backend,
                metrics: Arc::new(Metrics::default()),
                stats: Arc::new(BusStats::default()),
                url: url.to_owned(),
            }),
        })
    }

    /// The URL this bus was opened with.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// What the backend promises.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.backend.capabilities()
    }

    /// Counters for this bus (publishes and the deliveries of its subscriptions).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Per-topic and per-group statistics and the tap of recent events
    /// ([`crate::stats`]).
    pub fn stats(&self) -> &Arc<BusStats> {
        &self.inner.stats
    }

    /// Events retained on `topic` and not yet delivered to `group`, where the
    /// backend can tell (`None`: Redis before 7, Redis Pub/Sub, unknown group).
    pub async fn lag(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        backend::validate_name("topic", topic)?;
        backend::validate_name("group", group)?;
        self.inner.backend.lag(topic, group).await
    }

    /// [`BusStats::snapshot`] with each group's [`lag`](Self::lag) filled in
    /// (left `None` where the backend cannot tell or does not answer).
    pub async fn stats_snapshot(&self) -> StatsSnapshot {
        let mut snap = self.inner.stats.snapshot();
        for g in &mut snap.groups {
            g.lag = self.lag(&g.topic, &g.group).await.ok().flatten();
        }
        snap
    }

    /// Publishes `event` on the topic named by its `type`, returning once the
    /// backend has accepted it (durably, where the backend is durable).
    ///
    /// The current [`correlation`] context fills in `traceparent` and
    /// `correlationid` when the event has none.
    pub async fn publish(&self, event: Event) -> Result<(), BusError> {
        let event = correlation::apply(event);
        let topic = event.ty().to_owned();
        self.publish_to(&topic, std::slice::from_ref(&event)).await
    }

    /// Publishes events on the topics named by their types, pipelined: one
    /// round trip per topic instead of one per event. Returns once all were accepted.
    pub async fn publish_batch(&self, events: Vec<Event>) -> Result<(), BusError> {
        let events: Vec<Event> = events.into_iter().map(correlation::apply).collect();
        let mut start = 0;
        while start < events.len() {
            let ty = events[start].ty();
            let end = start
                + events[start..]
                    .iter()
                    .position(|e| e.ty() != ty)
                    .unwrap_or(events.len() - start);
            self.publish_to(ty, &events[start..end]).await?;
            start = end;
        }
        Ok(())
    }

    /// Publishes events on an explicit topic (dead-letter replays use this).
    pub async fn publish_to(&self, topic: &str, events: &[Event]) -> Result<(), BusError> {
        backend::validate_name("topic", topic)?;
        if events.is_empty() {
            return Ok(());
        }
        self.inner.backend.publish(topic, events).await?;
        self.inner.metrics.published(events.len() as u64);
        self.inner.stats.published(topic, events);
        Ok(())
    }

    /// Subscribes `handler` to `topic` as a member of `group`: subscriptions in
    /// one group share the topic's events, each group gets every event.
    pub async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        handler: impl Handler,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        backend::validate_name("topic", topic)?;
        backend::validate_name("group", group)?;
        backend::validate_name("topic", &options.dead_letter_topic)?;
        self.inner
            .backend
            .subscribe(
                topic,
                group,
                Arc::new(handler),
                options,
                Arc::clone(&self.inner.metrics),
                self.inner.stats.group(topic, group),
            )
            .await
    }

    /// Deletes a consumer group and its position (its subscriptions should be
    /// shut down first). An abandoned group would otherwise hold back trimming
    /// on Redis forever.
    pub async fn delete_group(&self, topic: &str, group: &str) -> Result<(), BusError> {
        backend::validate_name("topic", topic)?;
        backend::validate_name("group", group)?;
        self.inner.backend.delete_group(topic, group).await
    }

    /// Reads up to `limit` retained events of `topic` from the oldest, without
    /// consuming them (entries that do not decode are returned as errors).
    pub async fn peek(
        &self,
        topic: &str,
        limit: usize,
    ) -> Result<Vec<Result<Event, String>>, BusError> {
        backend::validate_name("topic", topic)?;
        self.inner.backend.peek(topic, limit).await
    }
}
