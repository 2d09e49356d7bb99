//! What a subscriber provides and gets back: [`Handler`], [`SubscribeOptions`], [`Subscription`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Event;
use crate::backoff::RetryBackoff;

/// The error a handler returns to ask for redelivery.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Handles one event: `Ok` acknowledges it, `Err` (or a panic) asks for a
/// redelivery after a backoff, up to [`SubscribeOptions::max_deliveries`].
///
/// Any `Fn(Event) -> impl Future<Output = Result<(), E>>` is a handler:
///
/// ```
/// # use switchboard_bus::{Event, Handler, HandlerError};
/// let handler = |event: Event| async move {
///     let order: serde_json::Value = event.data_as()?;
///     println!("order {}", order["id"]);
///     Ok::<_, HandlerError>(())
/// };
/// # fn check(_: impl Handler) {}
/// # check(handler);
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery of `event`.
    fn handle(&self, event: Event) -> BoxFuture<'static, Result<(), HandlerError>>;
}

impl<F, Fut, E> Handler for F
where
    F: Fn(Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<HandlerError>,
{
    fn handle(&self, event: Event) -> BoxFuture<'static, Result<(), HandlerError>> {
        let fut = self(event);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

impl Handler for Arc<dyn Handler> {
    fn handle(&self, event: Event) -> BoxFuture<'static, Result<(), HandlerError>> {
        (**self).handle(event)
    }
}

/// A handler error that says how to settle the delivery, for handlers that
/// know more than "failed": a permanent rejection goes to the dead-letter
/// topic at once (reason `rejected`), a retry can ask for at least some delay
/// (an HTTP `Retry-After`), and a handler that will not handle the event
/// because its process is stopping can hand it back ([`Nack::release`]).
/// Return it boxed as the handler's error; any other error is an ordinary
/// failure (redelivered after the backoff).
///
/// ```
/// # use switchboard_bus::{Event, HandlerError, Nack};
/// let handler = |event: Event| async move {
///     if event.data_json().is_none() {
///         return Err(Nack::permanent("no JSON payload").into());
///     }
///     Ok::<_, HandlerError>(())
/// };
/// # fn check(_: impl switchboard_bus::Handler) {}
/// # check(handler);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Nack {
    message: String,
    permanent: bool,
    retry_after: Option<Duration>,
    release: bool,
}

impl Nack {
    /// Never retry: dead-letter the event now, with `message` as its error.
    pub fn permanent(message: impl Into<String>) -> Self {
        Nack {
            message: message.into(),
            permanent: true,
            retry_after: None,
            release: false,
        }
    }

    /// Redeliver no sooner than `after` (or the backoff, if that is longer).
    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Nack {
            message: message.into(),
            permanent: false,
            retry_after: Some(after),
            release: false,
        }
    }

    /// Not handled because this process is stopping: when the subscription
    /// is shutting down ([`Subscription::stop`] or [`Subscription::shutdown`]
    /// was called), the event goes back to its group at once, with no backoff
    /// and without counting as a delivery (except on NATS JetStream, where
    /// the NAK that hands it back counts as one); the group's next consumer
    /// gets it. While the subscription is not stopping, this is an ordinary
    /// failure (redelivered after the backoff), so a handler that refuses
    /// every event cannot make it spin.
    pub fn release(message: impl Into<String>) -> Self {
        Nack {
            message: message.into(),
            permanent: false,
            retry_after: None,
            release: true,
        }
    }

    /// Whether the event is dead-lettered without further deliveries.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The least delay before the redelivery, if any.
    pub fn get_retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether the event is handed back if the subscription is stopping ([`Nack::release`]).
    pub fn is_release(&self) -> bool {
        self.release
    }
}

/// Which delivery of its event the current handler call is: `attempt` counts
/// from 1, `max_deliveries` is the subscription's limit (so `attempt ==
/// max_deliveries` is the last chance before the dead-letter topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// 1 for the first delivery of the event to its group.
    pub attempt: u32,
    /// The subscription's `max_deliveries`.
    pub max_deliveries: u32,
}

tokio::task_local! {
    pub(crate) static DELIVERY: DeliveryInfo;
}

/// The delivery the current handler runs for; `None` outside a handler
/// (read it in the handler's async body, not before its first `.await` point's
/// enclosing future was created).
pub fn current_delivery() -> Option<DeliveryInfo> {
    DELIVERY.try_with(|d| *d).ok()
}

/// The dead-letter topic used unless [`SubscribeOptions::dead_letter_topic`] says otherwise.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "deadletter";

/// How a subscription consumes: concurrency, acknowledgement deadline,
/// redelivery and dead-lettering.
///
/// | option | default | meaning |
/// |---|---|---|
/// | `max_in_flight` | 64 | deliveries fetched but not yet settled (handled and acked) |
/// | `ack_wait` | 30 s | a delivery not settled by then is given to another consumer of the group |
/// | `max_deliveries` | 5 | handler runs per event; then it is dead-lettered |
/// | `backoff` | 100 ms doubling to 10 s, jittered | delay before a failed event is redelivered |
/// | `dead_letter_topic` | `deadletter` | where dead letters go |
/// | `consumer_name` | random | this consumer's name inside the group (Redis, for its pending list) |
/// | `start_at_latest` | false | a group created by this subscription skips retained events |
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub(crate) max_in_flight: usize,
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliveries: u32,
    pub(crate) backoff: RetryBackoff,
    pub(crate) dead_letter_topic: String,
    pub(crate) consumer_name: Option<String>,
    pub(crate) start_at_latest: bool,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            max_in_flight: 64,
            ack_wait: Duration::from_secs(30),
            max_deliveries: 5,
            backoff: RetryBackoff::default(),
            dead_letter_topic: DEFAULT_DEAD_LETTER_TOPIC.to_owned(),
            consumer_name: None,
            start_at_latest: false,
        }
    }
}

impl SubscribeOptions {
    /// Sets how many deliveries may be in flight (at least 1).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Sets how long a delivery may stay unacknowledged before the group
    /// redelivers it (at least 10 ms).
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait.max(Duration::from_millis(10));
        self
    }

    /// Sets how many times the handler may see an event before it is
    /// dead-lettered (at least 1).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// Sets the redelivery backoff.
    pub fn backoff(mut self, backoff: RetryBackoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the dead-letter topic.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = topic.into();
        self
    }

    /// Sets this consumer's name within its group (default: random); Redis
    /// shows it in `XINFO CONSUMERS` and keeps a pending list per name.
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = Some(name.into());
        self
    }

    /// When this subscription creates its group, start it after the events
    /// already retained instead of at the oldest (default: oldest). An
    /// existing group keeps its position either way.
    pub fn start_at_latest(mut self, latest: bool) -> Self {
        self.start_at_latest = latest;
        self
    }

    /// The configured maximum of deliveries in flight.
    pub fn get_max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// The configured ack wait.
    pub fn get_ack_wait(&self) -> Duration {
        self.ack_wait
    }

    /// The configured maximum number of deliveries.
    pub fn get_max_deliveries(&self) -> u32 {
        self.max_deliveries
    }
}

/// A running subscription. [`Subscription::shutdown`] stops it gracefully;
/// dropping it aborts it like a crash (in-flight deliveries are not acked and
/// come back to the group after the ack wait).
#[derive(Debug)]
pub struct Subscription {
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) stop: CancellationToken,
    pub(crate) tasks: Vec<JoinHandle<()>>,
}

impl Subscription {
    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Stops fetching, lets handlers that already started finish, settles
    /// (acks) them, hands back to the group what was fetched but not started
    /// and what handlers refused with [`Nack::release`] (and, on Redis,
    /// failed events still waiting for their backoff), and returns once all of
    /// that is done. Nothing is acked without its handler's `Ok`, and the
    /// group's next consumer need not wait for the ack wait.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }

    /// Begins [`Subscription::shutdown`] without waiting for it: from now on
    /// nothing new is fetched, and a handler that returns [`Nack::release`]
    /// hands its event back. Call it before letting the last handler you want
    /// finish, so that no further event is fetched in the meantime.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Whether the subscription's tasks have all ended.
    pub fn is_finished(&self) -> bool {
        self.tasks.iter().all(JoinHandle::is_finished)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
