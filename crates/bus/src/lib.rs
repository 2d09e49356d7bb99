//! An event bus for microservices: CloudEvents published and consumed through
//! one [`Bus`] API over an in-memory log, Redis Streams, NATS JetStream or
//! Redis Pub/Sub, with consumer groups, redelivery, dead letters and
//! idempotent consumers.
//!
//! ```
//! use switchboard_bus::{Bus, Event, HandlerError, SubscribeOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::open("memory://").await?; // or redis://127.0.0.1:6379, nats://127.0.0.1:4222
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let sub = bus
//!     .subscribe("payment.completed", "orders", move |event: Event| {
//!         let tx = tx.clone();
//!         async move {
//!             tx.send(event.id().to_owned())?; // an Err here means: redeliver later
//!             Ok::<_, HandlerError>(())
//!         }
//!     }, SubscribeOptions::default())
//!     .await?;
//! let event = Event::builder()
//!     .source("/payments")
//!     .ty("payment.completed")
//!     .data(&serde_json::json!({"order_id": "o-1"}))
//!     .build()?;
//! bus.publish(event.clone()).await?; // returns once the backend accepted it
//! assert_eq!(rx.recv().await.as_deref(), Some(event.id()));
//! sub.shutdown().await; // finishes and acks in-flight handlers
//! # Ok(())
//! # }
//! ```
//!
//! # Delivery contract
//! - A topic is an event `type`. Subscriptions in one group compete for its
//!   events; every group receives every event.
//! - At least once: a handler's `Ok` acks; an `Err` or a panic redelivers after
//!   [`RetryBackoff`]; a delivery not acked within the ack wait (a crashed
//!   consumer) goes to another consumer of the group. After `max_deliveries`
//!   the event is published to the dead-letter topic with the reason, attempt
//!   count and last error ([`deadletter`]). A handler that returns a
//!   permanent [`Nack`] dead-letters the event at once (reason `rejected`); a
//!   [`Nack::retry_after`] delays the redelivery at least that long. Entries that do not decode are
//!   dead-lettered at once. Handlers should be idempotent, or wrapped in
//!   [`middleware::idempotency`].
//! - Graceful shutdown ([`Subscription::shutdown`]) stops fetching, lets
//!   handlers that already started finish and acks those that succeed. Whatever
//!   else the subscription had taken goes back to the group at once, for its
//!   next consumer, instead of waiting out the ack wait: deliveries fetched but
//!   not started, those whose handler refused with [`Nack::release`], and (on
//!   Redis) failed events still waiting for their backoff, which keep it. The
//!   bus never fetches more than `max_in_flight` deliveries ahead of its
//!   handlers, so that is all there is. A handed-back event keeps its delivery
//!   count, except on NATS JetStream, where the NAK that hands it back counts as
//!   a delivery. Dropping a [`Subscription`] instead is a crash: its deliveries
//!   come back after the ack wait. What goes back is counted, by reason:
//!   `released` by its handler, `held` (never run) by the consumer
//!   (`switchboard_bus_handed_back_total{reason}` in [`middleware::metrics`],
//!   and per topic and group in [`stats`]).
//! - Per-backend differences are [`Capabilities`]:
//!
//! | backend | URL | durable | new group replays | competing consumers | ordered per topic |
//! |---|---|---|---|---|---|
//! | memory | `memory://[NAME]` | no (process lifetime) | yes | yes | yes |
//! | Redis Streams | `redis://HOST:PORT` | yes (as the server's AOF/RDB) | yes (retention) | yes | yes |
//! | NATS JetStream | `nats://HOST:PORT` | yes (file storage) | yes (`max_age`) | yes | yes |
//! | Redis Pub/Sub | `redis+pubsub://HOST:PORT` | **no**: fire-and-forget | no | no (every subscription gets every event) | yes |
//!
//! Redis Pub/Sub speaks the plain `{id, timestamp, name, data, version}`
//! envelope, so it interoperates with simple Node.js buses; it retries failed
//! handlers in-process but loses events nobody was subscribed to, and those in
//! flight when a process dies.
//!
//! # Layout
//! - [`event`]: the CloudEvents envelope, builder and validation.
//! - [`codec`]: JSON structured mode and the plain `{id, timestamp, name, data, version}` envelope.
//! - [`bus`]: [`Bus`], opened from a URL; publish, subscribe, peek.
//! - [`subscribe`]: [`Handler`], [`SubscribeOptions`], [`Subscription`].
//! - `driver`: the consumer loop every backend shares (fetch, run, settle).
//! - [`deadletter`]: dead-letter attributes, reading and replaying them.
//! - `backend`: one module per backend.
//! - [`middleware`]: idempotent consumer, correlation propagation, metrics.
//! - [`stats`]: per-topic and per-group counters, consumer lag, recent events (dashboards).
//! - [`trace`]: W3C `traceparent` parsing, child spans, request-id checks and
//!   fast ids, on bytes; shared with the gateway and services.

pub mod backoff;
pub mod bus;
pub mod codec;
pub mod deadletter;
pub mod event;
pub mod middleware;
pub mod stats;
pub mod subscribe;
pub mod trace;

mod backend;
mod driver;

pub use backoff::RetryBackoff;
pub use bus::{Bus, BusError, Capabilities};
pub use codec::DecodeError;
pub use event::{BuildError, Data, Event, EventBuilder};
pub use subscribe::{
    DeliveryInfo, Handler, HandlerError, Nack, SubscribeOptions, Subscription, current_delivery,
};
