//! Idempotent consumer (inbox): an event whose `source`+`id` was handled
//! successfully before is acknowledged without running the handler again.
//!
//! The key is claimed with a short lease before the handler runs, marked done
//! with a long TTL when it succeeds, and released when it fails, so a failed
//! event is retried and two concurrent deliveries of one event never both run:
//! the second finds the claim and asks for a redelivery later.
//!
//! ```
//! use std::sync::Arc;
//! use switchboard_bus::middleware::idempotency::{Idempotent, MemoryInbox};
//! use switchboard_bus::{Event, HandlerError};
//!
//! let inbox = Arc::new(MemoryInbox::new(100_000, std::time::Duration::from_secs(3600)));
//! let handler = Idempotent::new(
//!     |_event: Event| async { Ok::<_, HandlerError>(()) },
//!     inbox,
//! );
//! # let _ = handler;
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::{Event, Handler, HandlerError};

/// What [`InboxStore::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key was free and is now claimed by the caller.
    Claimed,
    /// The event was handled successfully before.
    Done,
    /// Another delivery of the event is being handled right now.
    InProgress,
}

/// An inbox store failed (e.g. Redis unreachable); the delivery is retried.
#[derive(Debug, thiserror::Error)]
#[error("inbox store: {0}")]
pub struct StoreError(pub String);

/// Where handled keys are remembered.
pub trait InboxStore: Send + Sync + 'static {
    /// Claims `key` for `lease` unless it is claimed or done.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;
    /// Marks `key` done for `ttl`.
    fn complete<'a>(&'a self, key: &'a str, ttl: Duration)
    -> BoxFuture<'a, Result<(), StoreError>>;
    /// Releases a claim after a failure.
    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The handler wrapper; see the module docs.
pub struct Idempotent<H, S> {
    inner: Arc<H>,
    store: Arc<S>,
    ttl: Duration,
    lease: Duration,
}

impl<H, S> Idempotent<H, S> {
    /// Wraps `inner`; done keys are kept 24 h, claims last 60 s.
    pub fn new(inner: H, store: Arc<S>) -> Self {
        Idempotent {
            inner: Arc::new(inner),
            store,
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(60),
        }
    }

    /// Sets how long a handled key is remembered.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets how long a claim protects a running handler (longer than its run time).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
}

/// The handler found another delivery of the same event in progress.
#[derive(Debug, thiserror::Error)]
#[error("event {0} is being handled by another delivery")]
pub struct InProgress(String);

impl<H: Handler, S: InboxStore> Handler for Idempotent<H, S> {
    fn handle(&self, event: Event) -> BoxFuture<'static, Result<(), HandlerError>> {
        let inner = Arc::clone(&self.inner);
        let store = Arc::clone(&self.store);
        let (ttl, lease) = (self.ttl, self.lease);
        Box::pin(async move {
            let key = event.dedupe_key();
            match store.claim(&key, lease).await? {
                Claim::Done => return Ok(()),
                Claim::InProgress => return Err(InProgress(key).into()),
                Claim::Claimed => {}
            }
            match inner.handle(event).await {
                Ok(()) => {
                    store.complete(&key, ttl).await?;
                    Ok(())
                }
                Err(e) => {
                    let _ = store.release(&key).await;
                    Err(e)
                }
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Claimed,
    Done,
}

/// An in-process inbox: at most `capacity` keys (oldest evicted first), each
/// forgotten after its TTL.
#[derive(Debug)]
pub struct MemoryInbox {
    capacity: usize,
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    keys: HashMap<String, (State, Instant)>,
    order: VecDeque<String>,
}

impl MemoryInbox {
    /// An inbox for at most `capacity` keys; `_default_ttl` documents intent,
    /// each key's TTL comes from the [`Idempotent`] wrapper.
    pub fn new(capacity: usize, _default_ttl: Duration) -> Self {
        MemoryInbox {
            capacity: capacity.max(1),
            inner: Mutex::new(MemoryInner::default()),
        }
    }

    /// Keys currently remembered (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.inner.lock().keys.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set(&self, key: &str, state: State, ttl: Duration) {
        let mut g = self.inner.lock();
        let expires = Instant::now() + ttl;
        if g.keys.insert(key.to_owned(), (state, expires)).is_none() {
            g.order.push_back(key.to_owned());
        }
        while g.keys.len() > self.capacity {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            g.keys.remove(&old);
        }
    }
}

impl InboxStore for MemoryInbox {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let now = Instant::now();
        let found = self.inner.lock().keys.get(key).copied();
        let claim = match found {
            Some((State::Done, exp)) if exp > now => Claim::Done,
            Some((State::Claimed, exp)) if exp > now => Claim::InProgress,
            _ => {
                self.set(key, State::Claimed, lease);
                Claim::Claimed
            }
        };
        Box::pin(async move { Ok(claim) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.set(key, State::Done, ttl);
        Box::pin(async { Ok(()) })
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut g = self.inner.lock();
        if matches!(g.keys.get(key), Some((State::Claimed, _))) {
            g.keys.remove(key);
            // Its slot in `order` is dropped lazily by eviction.
        }
        Box::pin(async { Ok(()) })
    }
}

/// A Redis inbox: `SET key claimed NX PX lease`, then `SET key done PX ttl`.
/// Keys are `PREFIX` + `source` + `\x1f` + `id`.
#[derive(Clone)]
pub struct RedisInbox {
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisInbox")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn store_err(e: &redis::RedisError) -> StoreError {
    StoreError(e.to_string())
}

impl RedisInbox {
    /// Connects to `url` (`redis://HOST:PORT`); keys get the prefix `inbox:{prefix}:`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| store_err(&e))?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(|e| store_err(&e))?;
        Ok(RedisInbox {
            conn,
            prefix: format!("inbox:{prefix}:"),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl InboxStore for RedisInbox {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let k = self.key(key);
            let set: Option<String> = redis::cmd("SET")
                .arg(&k)
                .arg("claimed")
                .arg("NX")
                .arg("PX")
                .arg(millis(lease))
                .query_async(&mut conn)
                .await
                .map_err(|e| store_err(&e))?;
            if set.is_some() {
                return Ok(Claim::Claimed);
            }
            let state: Option<String> = redis::cmd("GET")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .map_err(|e| store_err(&e))?;
            Ok(match state.as_deref() {
                Some("done") => Claim::Done,
                Some(_) => Claim::InProgress,
                // Expired in between: try again next delivery.
                None => Claim::InProgress,
            })
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("SET")
                .arg(self.key(key))
                .arg("done")
                .arg("PX")
                .arg(millis(ttl))
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| store_err(&e))
        })
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            // Delete only our claim, never a `done` mark.
            redis::Script::new(
                "if redis.call('GET', KEYS[1]) == 'claimed' then return redis.call('DEL', KEYS[1]) end return 0",
            )
            .key(self.key(key))
            .invoke_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(|e| store_err(&e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn event(id: &str) -> Event {
        Event::builder()
            .source("/t")
            .ty("t")
            .id(id)
            .build()
            .unwrap()
    }

    async fn exercise<S: InboxStore>(store: Arc<S>) {
        let runs = Arc::new(AtomicU32::new(0));
        let fail_first = Arc::new(AtomicU32::new(1));
        let (r, f) = (runs.clone(), fail_first.clone());
        let h = Idempotent::new(
            move |_e: Event| {
                let (r, f) = (r.clone(), f.clone());
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    if f.swap(0, Ordering::SeqCst) == 1 {
                        return Err::<(), HandlerError>("first run fails".into());
                    }
                    Ok(())
                }
            },
            store,
        );
        assert!(
            h.handle(event("a")).await.is_err(),
            "failure passes through"
        );
        h.handle(event("a")).await.unwrap();
        h.handle(event("a")).await.unwrap();
        h.handle(event("b")).await.unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "a: fail + success, then skipped; b once"
        );
    }

    #[tokio::test]
    async fn memory_inbox_runs_each_event_once() {
        exercise(Arc::new(MemoryInbox::new(100, Duration::from_secs(60)))).await;
    }

    #[tokio::test(start_paused = true)]
    async fn memory_inbox_is_bounded_and_expires() {
        let inbox = MemoryInbox::new(2, Duration::from_secs(60));
        for k in ["a", "b", "c"] {
            assert_eq!(
                inbox.claim(k, Duration::from_secs(1)).await.unwrap(),
                Claim::Claimed
            );
            inbox.complete(k, Duration::from_secs(10)).await.unwrap();
        }
        assert_eq!(inbox.len(), 2);
        assert_eq!(
            inbox.claim("a", Duration::from_secs(1)).await.unwrap(),
            Claim::Claimed,
            "evicted"
        );
        assert_eq!(
            inbox.claim("c", Duration::from_secs(1)).await.unwrap(),
            Claim::Done
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(
            inbox.claim("c", Duration::from_secs(1)).await.unwrap(),
            Claim::Claimed,
            "expired"
        );
        assert_eq!(
            inbox.claim("c", Duration::from_secs(1)).await.unwrap(),
            Claim::InProgress
        );
    }

    #[tokio::test]
    async fn redis_inbox_runs_each_event_once() {
        let Some(redis) =
            switchboard_testkit::RedisServer::start(switchboard_testkit::Persistence::None)
        else {
            return;
        };
        let store = Arc::new(RedisInbox::connect(&redis.url(), "test").await.unwrap());
        exercise(store.clone()).await;
        assert_eq!(
            store.claim("x", Duration::from_secs(5)).await.unwrap(),
            Claim::Claimed
        );
        assert_eq!(
            store.claim("x", Duration::from_secs(5)).await.unwrap(),
            Claim::InProgress
        );
        store.release("x").await.unwrap();
        assert_eq!(
            store.claim("x", Duration::from_secs(5)).await.unwrap(),
            Claim::Claimed
        );
    }
}
