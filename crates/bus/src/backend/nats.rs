//! NATS JetStream: a stream per topic (name `SB_{topic}`, subject
//! `sb.{topic}`, file storage), a durable pull consumer per group.
//!
//! - **Publish** waits for the PubAck. Each message carries `Nats-Msg-Id` =
//!   `source|id`, so a publisher that retries after a lost ack does not store
//!   the event twice within the stream's duplicate window (2 minutes).
//! - **Consume**: pull requests for no more messages than the subscription
//!   has room for: a no-wait request for up to the free `max_in_flight`
//!   slots, and when that finds none, a request for one message that waits
//!   up to `block` (a continuous pull stream would keep buffering messages in
//!   the client while handlers run, stranding them until the ack wait when the
//!   subscription stops). The consumer's `ack_wait` is the subscription's;
//!   `max_deliver` is `max_deliveries + 1`, so that the bus sees the delivery
//!   after the last allowed one and dead-letters it itself (JetStream alone
//!   would only drop it with an advisory).
//! - **Retries** are negative acks with the backoff as delay; JetStream
//!   redelivers to any consumer of the group.
//! - **Handing back** at shutdown (fetched, not handled; or a handler's
//!   [`crate::Nack::release`]) is a NAK without delay. JetStream counts it
//!   as a delivery: such an event has one delivery fewer left before it is
//!   dead-lettered.
//! - **Retention**: messages older than `retention` (default 24 h) are
//!   removed by JetStream (`max_age`), acknowledged or not.
//!
//! Topic and group names map onto stream and consumer names by escaping `_`
//! as `__` and `.` as `_D`.
//!
//! URL options: `nats://HOST:PORT?retention=24h&block=500ms`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, message::Acker, stream};
use futures::StreamExt;

use crate::codec;
use crate::driver::{Consumer, Delivery, Malformed};
use crate::{BusError, Capabilities, Event, SubscribeOptions};

pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    backend: "nats",
    durable: true,
    replay_for_new_groups: true,
    ordered_per_topic: true,
    competing_consumers: true,
    redelivery_after_crash: true,
};

fn escape(name: &str) -> String {
    name.replace('_', "__").replace('.', "_D")
}

pub(crate) fn stream_name(topic: &str) -> String {
    format!("SB_{}", escape(topic))
}

pub(crate) fn subject(topic: &str) -> String {
    format!("sb.{topic}")
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn msg_id(event: &Event) -> String {
    match event.extension(crate::deadletter::REPLAY) {
        Some(n) => format!("{}|{}|replay-{n}", event.source(), event.id()),
        None => format!("{}|{}", event.source(), event.id()),
    }
}

struct Settings {
    retention: Duration,
    block: Duration,
}

fn parse_url(url: &str) -> Result<(String, Settings), String> {
    let mut s = Settings {
        retention: Duration::from_secs(24 * 3600),
        block: Duration::from_millis(500),
    };
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dur = || humantime::parse_duration(v).map_err(|e| format!("{k}={v:?}: {e}"));
        match k {
            "retention" => s.retention = dur()?,
            "block" => s.block = dur()?.max(Duration::from_millis(10)),
            _ => return Err(format!("unknown option {k:?} (known: retention, block)")),
        }
    }
    Ok((base.to_owned(), s))
}

pub(crate) struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: Settings,
    /// Topics whose stream exists (created or checked once).
    known: Arc<parking_lot::Mutex<HashSet<String>>>,
}

impl Nats {
    pub(crate) async fn open(url: &str) -> Result<Self, BusError> {
        let (base, settings) = parse_url(url).map_err(|reason| BusError::InvalidUrl {
            url: url.to_owned(),
            reason,
        })?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(base.as_str())
            .await
            .map_err(unavailable)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(5));
        Ok(Nats {
            client,
            js,
            settings,
            known: Arc::default(),
        })
    }

    async fn ensure_stream(&self, topic: &str) -> Result<stream::Stream, BusError> {
        self.js
            .get_or_create_stream(stream::Config {
                name: stream_name(topic),
                subjects: vec![subject(topic)],
                storage: stream::StorageType::File,
                max_age: self.settings.retention,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(unavailable)
    }

    pub(crate) async fn publish(&self, topic: &str, events: &[Event]) -> Result<(), BusError> {
        if !self.known.lock().contains(topic) {
            self.ensure_stream(topic).await?;
            self.known.lock().insert(topic.to_owned());
        }
        let subject = subject(topic);
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let message = jetstream::message::PublishMessage::build()
                .payload(codec::encode(event).into())
                .message_id(msg_id(event));
            acks.push(
                self.js
                    .send_publish(subject.clone(), message)
                    .await
                    .map_err(unavailable)?,
            );
        }
        // Pipelined: all sent, now wait for every PubAck.
        for ack in acks {
            ack.await.map_err(unavailable)?;
        }
        Ok(())
    }

    pub(crate) async fn peek(
        &self,
        topic: &str,
        limit: usize,
    ) -> Result<Vec<Result<Event, String>>, BusError> {
        let stream = self.ensure_stream(topic).await?;
        let info = stream.get_info().await.map_err(unavailable)?;
        let mut out = Vec::new();
        let mut seq = info.state.first_sequence.max(1);
        while out.len() < limit && seq <= info.state.last_sequence {
            if let Ok(msg) = stream.get_raw_message(seq).await {
                out.push(codec::decode(&msg.payload).map_err(|e| e.to_string()));
            }
            seq += 1;
        }
        Ok(out)
    }

    /// The group's durable consumer's `num_pending` (`None`: no such stream or consumer).
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        let Ok(stream) = self.js.get_stream(stream_name(topic)).await else {
            return Ok(None);
        };
        match stream.consumer_info(escape(group)).await {
            Ok(info) => Ok(Some(info.num_pending)),
            Err(_) => Ok(None),
        }
    }

    pub(crate) async fn delete_group(&self, topic: &str, group: &str) -> Result<(), BusError> {
        let stream = self.ensure_stream(topic).await?;
        stream
            .delete_consumer(&escape(group))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(crate) async fn consumer(
        &self,
        topic: &str,
        group: &str,
        opts: &SubscribeOptions,
    ) -> Result<NatsConsumer, BusError> {
        let stream = self.ensure_stream(topic).await?;
        let name = escape(group);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: opts.ack_wait,
            max_deliver: i64::from(opts.max_deliveries) + 1,
            deliver_policy: if opts.start_at_latest {
                jetstream::consumer::DeliverPolicy::New
            } else {
                jetstream::consumer::DeliverPolicy::All
            },
            max_ack_pending: 100_000,
            ..Default::default()
        };
        let consumer = stream
            .get_or_create_consumer::<pull::Config>(&name, config)
            .await
            .map_err(unavailable)?;
        Ok(NatsConsumer {
            consumer,
            nats: Nats {
                client: self.client.clone(),
                js: self.js.clone(),
                settings: Settings {
                    retention: self.settings.retention,
                    block: self.settings.block,
                },
                known: Arc::clone(&self.known),
            },
        })
    }
}

pub(crate) struct NatsConsumer {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    nats: Nats,
}

fn delivery(msg: jetstream::Message) -> Delivery<Acker> {
    let attempt = msg
        .info()
        .map_or(1, |i| u32::try_from(i.delivered).unwrap_or(1).max(1));
    let payload = codec::decode(&msg.payload).map_err(|e| Malformed {
        error: e.to_string(),
        raw: msg.payload.to_vec(),
    });
    let (_, acker) = msg.split();
    Delivery {
        token: acker,
        attempt,
        payload,
    }
}

/// Reads a pull request's messages to its end (all asked for, or the
/// server's end-of-request status).
async fn drain(mut batch: pull::Batch) -> Result<Vec<Delivery<Acker>>, BusError> {
    let mut out = Vec::new();
    while let Some(msg) = batch.next().await {
        match msg {
            Ok(msg) => out.push(delivery(msg)),
            Err(e) if out.is_empty() => return Err(unavailable(e)),
            // What arrived before the error is ours: keep it, or it would
            // wait for the ack wait.
            Err(e) => {
                tracing::debug!(error = %e, "pull request ended early");
                break;
            }
        }
    }
    Ok(out)
}

impl Consumer for NatsConsumer {
    type Token = Acker;
    // A pull request's messages are delivered to this client whether or not
    // it reads them: dropping one midway would strand them until the ack wait.
    const CANCEL_SAFE_FETCH: bool = false;

    /// One pull request for up to `max` messages that answers at once
    /// (`no_wait`); when there are none, one that waits up to `block` for a
    /// single message. The bus never asks for more than it has room for, so
    /// nothing sits unhandled in the client when the subscription stops
    /// (a continuous pull stream would keep pulling while handlers run).
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery<Acker>>, BusError> {
        let block = self.nats.settings.block;
        let now = self
            .consumer
            .fetch()
            .max_messages(max.max(1))
            .messages()
            .await
            .map_err(unavailable)?;
        // The server answers a no-wait request at once; the limit only
        // matters if it never does (the request was lost in a reconnect).
        let out = tokio::time::timeout(block + Duration::from_secs(5), drain(now))
            .await
            .map_err(|_| BusError::Unavailable("no answer to a pull request".into()))??;
        if !out.is_empty() {
            return Ok(out);
        }
        let wait = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(block)
            .messages()
            .await
            .map_err(unavailable)?;
        drain(wait).await
    }

    async fn ack(&self, tokens: &[Acker]) -> Result<(), BusError> {
        for acker in tokens {
            acker.ack().await.map_err(unavailable)?;
        }
        // Acks are plain publishes: make sure they left this process before
        // the settler reports them done (a shutdown may follow at once).
        self.nats.client.flush().await.map_err(unavailable)
    }

    async fn release(&self, tokens: Vec<(Acker, u32)>) -> Result<(), BusError> {
        for (acker, _) in &tokens {
            // JetStream cannot take a delivery back: a NAK without delay makes
            // the message available to the group at once, and counts.
            acker
                .ack_with(AckKind::Nak(None))
                .await
                .map_err(unavailable)?;
        }
        self.nats.client.flush().await.map_err(unavailable)
    }

    async fn retry(&self, token: Acker, _attempt: u32, delay: Duration) -> Result<(), BusError> {
        token
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(unavailable)
    }

    async fn publish_dead_letter(&self, topic: &str, letter: &Event) -> Result<(), BusError> {
        self.nats.publish(topic, std::slice::from_ref(letter)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_unambiguously() {
        assert_eq!(stream_name("order.created"), "SB_order_Dcreated");
        assert_ne!(stream_name("a_Db"), stream_name("a.b"));
        assert_eq!(subject("order.created"), "sb.order.created");
        assert!(parse_url("nats://h:1?retention=1h").is_ok());
        assert!(parse_url("nats://h:1?colour=red").is_err());
    }
}
