//! Redis Pub/Sub with the plain envelope: fire-and-forget, wire-compatible
//! with simple Node.js buses that `PUBLISH eventName JSON.stringify(event)`.
//!
//! What it does **not** promise (its [`Capabilities`] say so): events published
//! while no subscriber is connected are lost, nothing survives a restart, a
//! new group sees nothing earlier, and there are no competing consumers:
//! every subscription receives every event, whatever its group. A delivery
//! in progress when the process dies is lost.
//!
//! What it keeps: a handler's `Err` or panic is retried in-process with the
//! backoff, and after `max_deliveries` the event is published on the
//! dead-letter channel, with the dead-letter attributes as extra fields.
//! Messages that do not decode as the plain envelope are dead-lettered too.
//! Publishing returns once Redis accepted the `PUBLISH`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use super::redis_streams::redis_error;
use crate::codec;
use crate::driver::{Consumer, Delivery, Malformed};
use crate::{BusError, Capabilities, Event, SubscribeOptions};

pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    backend: "redis+pubsub",
    durable: false,
    replay_for_new_groups: false,
    ordered_per_topic: true,
    competing_consumers: false,
    redelivery_after_crash: false,
};

pub(crate) struct RedisPubSub {
    client: redis::Client,
    conn: ConnectionManager,
}

impl RedisPubSub {
    pub(crate) async fn open(url: &str) -> Result<Self, BusError> {
        let redis_url = format!("redis://{}", url.trim_start_matches("redis+pubsub://"));
        let client = redis::Client::open(redis_url.as_str()).map_err(|e| BusError::InvalidUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| redis_error(&e))?;
        Ok(RedisPubSub { client, conn })
    }

    pub(crate) async fn publish(&self, topic: &str, events: &[Event]) -> Result<(), BusError> {
        publish(&self.conn, topic, events).await
    }

    pub(crate) async fn consumer(
        &self,
        topic: &str,
        _group: &str,
        _opts: &SubscribeOptions,
    ) -> Result<PubSubConsumer, BusError> {
        let consumer = PubSubConsumer {
            client: self.client.clone(),
            conn: self.conn.clone(),
            channel: topic.to_owned(),
            stream: tokio::sync::Mutex::new(None),
            next_token: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        };
        // Subscribe now, so that events published after `subscribe` returns are received.
        consumer.connect().await?;
        Ok(consumer)
    }
}

async fn publish(
    conn: &ConnectionManager,
    channel: &str,
    events: &[Event],
) -> Result<(), BusError> {
    let mut conn = conn.clone();
    let mut pipe = redis::pipe();
    for event in events {
        pipe.cmd("PUBLISH")
            .arg(channel)
            .arg(codec::encode_plain(event))
            .ignore();
    }
    let () = pipe
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_error(&e))?;
    Ok(())
}

#[derive(Default)]
struct State {
    /// Events in flight or waiting for a retry, by token, with deliveries so far.
    held: HashMap<u64, (Event, u32)>,
    retries: BinaryHeap<Reverse<(Instant, u64)>>,
}

pub(crate) struct PubSubConsumer {
    client: redis::Client,
    conn: ConnectionManager,
    channel: String,
    stream: tokio::sync::Mutex<Option<redis::aio::PubSubStream>>,
    next_token: AtomicU64,
    state: Mutex<State>,
}

impl PubSubConsumer {
    async fn connect(&self) -> Result<(), BusError> {
        let mut pubsub = self
            .client
            .get_async_pubsub()
            .await
            .map_err(|e| redis_error(&e))?;
        pubsub
            .subscribe(&self.channel)
            .await
            .map_err(|e| redis_error(&e))?;
        *self.stream.lock().await = Some(pubsub.into_on_message());
        Ok(())
    }

    fn hold(&self, payload: Result<Event, Malformed>) -> Delivery<u64> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        if let Ok(event) = &payload {
            self.state.lock().held.insert(token, (event.clone(), 1));
        }
        Delivery {
            token,
            attempt: 1,
            payload,
        }
    }

    fn due_retries(&self, max: usize) -> (Vec<Delivery<u64>>, Option<Instant>) {
        let now = Instant::now();
        let mut st = self.state.lock();
        let mut out = Vec::new();
        while out.len() < max
            && let Some(Reverse((at, _))) = st.retries.peek()
            && *at <= now
        {
            let Some(Reverse((_, token))) = st.retries.pop() else {
                break;
            };
            if let Some((event, attempts)) = st.held.get_mut(&token) {
                *attempts += 1;
                out.push(Delivery {
                    token,
                    attempt: *attempts,
                    payload: Ok(event.clone()),
                });
            }
        }
        let next = st.retries.peek().map(|Reverse((at, _))| *at);
        (out, next)
    }
}

fn decode(msg: &redis::Msg) -> Result<Event, Malformed> {
    let raw = msg.get_payload_bytes();
    codec::decode_plain(raw).map_err(|e| Malformed {
        error: e.to_string(),
        raw: raw.to_vec(),
    })
}

impl Consumer for PubSubConsumer {
    type Token = u64;
    // `next` on the message stream loses nothing when dropped.
    const CANCEL_SAFE_FETCH: bool = true;

    async fn fetch(&self, max: usize) -> Result<Vec<Delivery<u64>>, BusError> {
        let (mut out, next_retry) = self.due_retries(max);
        if !out.is_empty() {
            return Ok(out);
        }
        let mut guard = self.stream.lock().await;
        if guard.is_none() {
            drop(guard);
            self.connect().await?;
            guard = self.stream.lock().await;
        }
        let Some(stream) = guard.as_mut() else {
            return Ok(out);
        };
        let wait = next_retry.map_or(Duration::from_secs(1), |at| {
            at.saturating_duration_since(Instant::now())
        });
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => return Ok(out),
            Ok(None) => {
                // Connection lost; messages published until we resubscribe are lost.
                *guard = None;
                return Err(BusError::Unavailable("pub/sub connection closed".into()));
            }
            Ok(Some(msg)) => out.push(self.hold(decode(&msg))),
        }
        while out.len() < max {
            match stream.next().now_or_never() {
                Some(Some(msg)) => out.push(self.hold(decode(&msg))),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn ack(&self, tokens: &[u64]) -> Result<(), BusError> {
        let mut st = self.state.lock();
        for t in tokens {
            st.held.remove(t);
        }
        Ok(())
    }

    async fn release(&self, tokens: Vec<(u64, u32)>) -> Result<(), BusError> {
        // Pub/Sub keeps nothing for another subscriber to take: a handed-back
        // event is lost, like any event in flight when a subscriber stops.
        tracing::debug!(
            n = tokens.len(),
            "redis+pubsub: dropping events handed back at shutdown"
        );
        let tokens: Vec<u64> = tokens.into_iter().map(|(t, _)| t).collect();
        self.ack(&tokens).await
    }

    async fn retry(&self, token: u64, _attempt: u32, delay: Duration) -> Result<(), BusError> {
        self.state
            .lock()
            .retries
            .push(Reverse((Instant::now() + delay, token)));
        Ok(())
    }

    async fn publish_dead_letter(&self, topic: &str, letter: &Event) -> Result<(), BusError> {
        publish(&self.conn, topic, std::slice::from_ref(letter)).await
    }
}
