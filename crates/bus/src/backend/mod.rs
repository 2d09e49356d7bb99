//! Backends, one module each, chosen by URL scheme.
//!
//! Each backend implements publishing, peeking and [`crate::driver::Consumer`];
//! the consumer loop (concurrency, redelivery decisions, dead letters, acks)
//! is shared.

use std::sync::Arc;

use crate::middleware::metrics::Metrics;
use crate::stats::GroupCounters;
use crate::{BusError, Capabilities, Event, Handler, SubscribeOptions, Subscription};

pub(crate) mod memory;
pub(crate) mod nats;
pub(crate) mod redis_pubsub;
pub(crate) mod redis_streams;

pub(crate) enum Backend {
    Memory(memory::Memory),
    Redis(redis_streams::RedisStreams),
    Nats(Box<nats::Nats>),
    PubSub(redis_pubsub::RedisPubSub),
}

/// Opens the backend named by the URL's scheme. An error names the URL
/// without its userinfo (`redis://:PASSWORD@host` shows as `redis://***@host`).
pub(crate) async fn open(url: &str) -> Result<Backend, BusError> {
    open_inner(url).await.map_err(|e| match e {
        BusError::InvalidUrl { url, reason } => BusError::InvalidUrl {
            url: redact_url(&url),
            reason,
        },
        other => other,
    })
}

pub(crate) use switchboard_resilience::redact::redact_url;

async fn open_inner(url: &str) -> Result<Backend, BusError> {
    let invalid = |reason: &str| BusError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid("expected SCHEME://..."));
    };
    match scheme {
        "memory" => Ok(Backend::Memory(
            memory::Memory::open(rest).map_err(|r| invalid(&r))?,
        )),
        "redis" | "rediss" => Ok(Backend::Redis(
            redis_streams::RedisStreams::open(url).await?,
        )),
        "redis+pubsub" => Ok(Backend::PubSub(redis_pubsub::RedisPubSub::open(url).await?)),
        "nats" | "tls" => Ok(Backend::Nats(Box::new(nats::Nats::open(url).await?))),
        _ => Err(invalid(
            "unknown scheme (expected memory://, redis://, redis+pubsub:// or nats://)",
        )),
    }
}

/// Names every backend can represent: ASCII letters, digits, `_`, `-` and
/// `.`-separated non-empty parts, at most 200 bytes.
pub(crate) fn validate_name(what: &'static str, name: &str) -> Result<(), BusError> {
    let err = |reason| {
        Err(BusError::InvalidName {
            what,
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 200 {
        return err("must be 1 to 200 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return err("only ASCII letters, digits, '_', '-' and '.' are allowed");
    }
    if name.split('.').any(str::is_empty) {
        return err("'.' separates non-empty parts");
    }
    Ok(())
}

impl Backend {
    pub(crate) fn capabilities(&self) -> Capabilities {
        match self {
            Backend::Memory(_) => memory::CAPABILITIES,
            Backend::Redis(_) => redis_streams::CAPABILITIES,
            Backend::Nats(_) => nats::CAPABILITIES,
            Backend::PubSub(_) => redis_pubsub::CAPABILITIES,
        }
    }

    pub(crate) async fn publish(&self, topic: &str, events: &[Event]) -> Result<(), BusError> {
        match self {
            Backend::Memory(b) => {
                b.publish(topic, events);
                Ok(())
            }
            Backend::Redis(b) => b.publish(topic, events).await,
            Backend::Nats(b) => b.publish(topic, events).await,
            Backend::PubSub(b) => b.publish(topic, events).await,
        }
    }

    pub(crate) async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        handler: Arc<dyn Handler>,
        opts: SubscribeOptions,
        metrics: Arc<Metrics>,
        group_stats: Arc<GroupCounters>,
    ) -> Result<Subscription, BusError> {
        match self {
            Backend::Memory(b) => {
                let consumer = b.consumer(topic, group, &opts);
                Ok(crate::driver::spawn(
                    consumer,
                    topic,
                    group,
                    handler,
                    opts,
                    metrics,
                    group_stats,
                ))
            }
            Backend::Redis(b) => {
                let consumer = b.consumer(topic, group, &opts).await?;
                Ok(crate::driver::spawn(
                    consumer,
                    topic,
                    group,
                    handler,
                    opts,
                    metrics,
                    group_stats,
                ))
            }
            Backend::Nats(b) => {
                let consumer = b.consumer(topic, group, &opts).await?;
                Ok(crate::driver::spawn(
                    consumer,
                    topic,
                    group,
                    handler,
                    opts,
                    metrics,
                    group_stats,
                ))
            }
            Backend::PubSub(b) => {
                let consumer = b.consumer(topic, group, &opts).await?;
                Ok(crate::driver::spawn(
                    consumer,
                    topic,
                    group,
                    handler,
                    opts,
                    metrics,
                    group_stats,
                ))
            }
        }
    }

    pub(crate) async fn delete_group(&self, topic: &str, group: &str) -> Result<(), BusError> {
        match self {
            Backend::Memory(b) => {
                b.delete_group(topic, group);
                Ok(())
            }
            Backend::Redis(b) => b.delete_group(topic, group).await,
            Backend::Nats(b) => b.delete_group(topic, group).await,
            // Pub/Sub keeps no group state.
            Backend::PubSub(_) => Ok(()),
        }
    }

    /// Events not yet delivered to `group`, where the backend can tell.
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<Option<u64>, BusError> {
        match self {
            Backend::Memory(b) => Ok(b.lag(topic, group)),
            Backend::Redis(b) => b.lag(topic, group).await,
            Backend::Nats(b) => b.lag(topic, group).await,
            Backend::PubSub(_) => Ok(None),
        }
    }

    pub(crate) async fn peek(
        &self,
        topic: &str,
        limit: usize,
    ) -> Result<Vec<Result<Event, String>>, BusError> {
        match self {
            Backend::Memory(b) => Ok(b.peek(topic, limit).into_iter().map(Ok).collect()),
            Backend::Redis(b) => b.peek(topic, limit).await,
            Backend::Nats(b) => b.peek(topic, limit).await,
            Backend::PubSub(_) => Err(BusError::Unsupported {
                backend: "redis+pubsub",
                what: "reading retained events (Pub/Sub retains nothing)",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["orders", "order.created", "a_b-c.d9"] {
            assert!(validate_name("topic", ok).is_ok(), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a b", "a*", "a>b", "ü"] {
            assert!(validate_name("topic", bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod redact_tests {
    use crate::{Bus, BusError};

    #[tokio::test]
    async fn open_errors_never_show_a_password() {
        for url in [
            "redis://:pw-secret-1@127.0.0.1:6379?retention=forever",
            "bogus://user:pw-secret-1@host",
            "redis+pubsub://user:pw-secret-1@[::1",
        ] {
            let err = Bus::open(url).await.expect_err(url);
            assert!(matches!(err, BusError::InvalidUrl { .. }), "{err}");
            assert!(!err.to_string().contains("pw-secret-1"), "{err}");
            assert!(!format!("{err:?}").contains("pw-secret-1"), "{err:?}");
        }
    }
}
