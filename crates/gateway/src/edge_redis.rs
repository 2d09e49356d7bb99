//! A lazily connected Redis handle shared by the rate-limit and idempotency
//! stores, bounded in time so a slow or absent Redis never stalls a request
//! for long.
//!
//! The connection is made on first use (from whichever worker runtime asks
//! first), not at startup: a gateway whose Redis is down still starts, and its
//! policies degrade as documented (rate limits fail open, idempotency is
//! skipped). After a failed connect, no new attempt is made for
//! [`RECONNECT_AFTER`], so an outage costs each request one atomic load
//! instead of a connect timeout.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

/// How long one Redis operation of the request path may take.
pub const OP_TIMEOUT: Duration = Duration::from_millis(100);
/// How long after a failed connect before the next attempt.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Prefix of every key the gateway writes.
pub const KEY_PREFIX: &str = "switchboard:gw:";

/// One Redis server, connected on first use.
pub struct RedisHandle {
    url: String,
    client: redis::Client,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    epoch: Instant,
    /// Milliseconds since `epoch` before which no connect is attempted.
    retry_at: AtomicU64,
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHandle")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// A Redis operation failed or timed out.
#[derive(Debug, thiserror::Error)]
#[error("redis {url}: {reason}")]
pub struct RedisUnavailable {
    /// The server.
    pub url: String,
    /// What happened.
    pub reason: String,
}

impl RedisHandle {
    /// A handle for `url` (`redis://HOST:PORT[/DB]`); only the URL is checked here.
    /// Errors and logs name the URL without its password.
    pub fn new(url: &str) -> Result<Self, String> {
        let shown = switchboard_resilience::redact::redact_url(url);
        let client = redis::Client::open(url).map_err(|e| format!("`{shown}`: {e}"))?;
        Ok(Self {
            url: shown,
            client,
            conn: tokio::sync::OnceCell::new(),
            epoch: Instant::now(),
            retry_at: AtomicU64::new(0),
        })
    }

    /// The URL, without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn unavailable(&self, reason: impl Into<String>) -> RedisUnavailable {
        RedisUnavailable {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The connection (a cheap clone of a multiplexed one).
    pub async fn conn(&self) -> Result<ConnectionManager, RedisUnavailable> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        if self.now_ms() < self.retry_at.load(Relaxed) {
            return Err(self.unavailable("not connected (waiting before the next attempt)"));
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT * 5))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let made = self
            .conn
            .get_or_try_init(|| async {
                match tokio::time::timeout(
                    OP_TIMEOUT * 5,
                    self.client.get_connection_manager_with_config(config),
                )
                .await
                {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(self.unavailable(e.to_string())),
                    Err(_) => Err(self.unavailable("connect timed out")),
                }
            })
            .await;
        match made {
            Ok(c) => Ok(c.clone()),
            Err(e) => {
                let next =
                    self.now_ms() + u64::try_from(RECONNECT_AFTER.as_millis()).unwrap_or(1000);
                self.retry_at.store(next, Relaxed);
                Err(e)
            }
        }
    }

    /// Runs `f` on the connection within [`OP_TIMEOUT`].
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, RedisUnavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        match tokio::time::timeout(OP_TIMEOUT, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(e.to_string())),
            Err(_) => Err(self.unavailable("operation timed out")),
        }
    }
}

/// Logs a store failure at most once per `every` per counter (the counter
/// itself is exported as a metric, so nothing is lost).
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: AtomicU64,
}

impl LogLimiter {
    /// True when a line may be logged now.
    pub fn allow(&self, epoch: Instant, every: Duration) -> bool {
        let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last.load(Relaxed);
        let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}
