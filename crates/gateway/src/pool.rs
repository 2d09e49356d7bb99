//! Upstream HTTP/1.1 connections, pooled per worker thread, or per owner.
//!
//! Each worker thread keeps its own idle list per upstream address in a
//! thread-local map, so checking a connection out or in takes no lock and
//! touches no shared cache line: right for the proxy, whose requests stay on
//! the worker that accepted them. A task that moves between workers (the
//! bridge's push consumer) keeps an [`OwnedPool`] instead, or one worker's
//! list drains while another's overflows. A connection goes back to its pool
//! only once its response body has been read to the end (see
//! [`crate::h1::H1Body`]), so every pooled connection is idle.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::ReqBody;
use crate::h1::H1Conn;

/// A pooled connection to an upstream.
pub type Conn = H1Conn;

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One upstream's idle connections, most recently used last: the one list
/// both the worker pools and [`OwnedPool`] keep per address.
#[derive(Default)]
struct IdleList(VecDeque<Idle>);

impl IdleList {
    /// The most recently used connection that is still usable and not older
    /// than the idle timeout; the unusable ones met on the way are dropped.
    fn take(&mut self, cfg: &PoolConfig, now: Instant) -> Option<Conn> {
        while let Some(i) = self.0.pop_back() {
            if i.conn.is_usable() && now.saturating_duration_since(i.since) <= cfg.idle_timeout {
                return Some(i.conn);
            }
        }
        None
    }

    /// Keeps `conn` unless `max_idle` are kept already; the oldest ones
    /// past the idle timeout go first.
    fn put(&mut self, conn: Conn, cfg: &PoolConfig, since: Instant) {
        while self
            .0
            .front()
            .is_some_and(|i| since.saturating_duration_since(i.since) > cfg.idle_timeout)
        {
            self.0.pop_front();
        }
        if self.0.len() < cfg.max_idle {
            self.0.push_back(Idle { conn, since });
        }
    }
}

/// FxHash-style hasher for socket addresses (not attacker-chosen).
#[derive(Default)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(n)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(n)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type Map = HashMap<SocketAddr, IdleList, BuildHasherDefault<AddrHasher>>;

thread_local! {
    static IDLE: RefCell<Map> = RefCell::new(Map::default());
}

/// Why no connection could be had. Nothing was sent in either case.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect or the HTTP handshake failed.
    #[error("connect to {addr} failed: {source}")]
    Io {
        /// The upstream.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
}

/// Pool settings.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Idle connections older than this are closed instead of reused.
    pub idle_timeout: Duration,
    /// Most idle connections kept per address and worker.
    pub max_idle: usize,
}

/// Takes an idle connection to `addr`, if one is usable. `now` is the
/// request's start (saves a clock read per request).
pub fn take_idle(addr: SocketAddr, cfg: &PoolConfig, now: Instant) -> Option<Conn> {
    IDLE.with(|m| m.borrow_mut().get_mut(&addr)?.take(cfg, now))
}

/// Returns a connection whose last response was read to the end; `since`
/// is a recent instant (the request's start will do).
pub fn put_idle(addr: SocketAddr, conn: Conn, cfg: &PoolConfig, since: Instant) {
    IDLE.with(|m| {
        m.borrow_mut()
            .entry(addr)
            .or_default()
            .put(conn, cfg, since);
    });
}

/// Drops this worker's expired and closed idle connections (run periodically).
pub fn sweep(cfg: &PoolConfig) {
    IDLE.with(|m| {
        let mut m = m.borrow_mut();
        m.retain(|_, list| {
            list.0
                .retain(|i| i.conn.is_usable() && i.since.elapsed() <= cfg.idle_timeout);
            !list.0.is_empty()
        });
    });
}

/// Idle connections owned by their user rather than by the worker thread.
///
/// For a user that runs on one task: the bridge's push deliveries of one
/// subscription all run on its consumer's task, which tokio moves between
/// worker threads as it is woken. With the per-thread lists above, deliveries
/// check connections out on one worker and back in on the other, so one
/// list drains (and connections are opened) while the other overflows past
/// `max_idle` (and connections are closed): `switchboard bench bridge` opened
/// a connection for about every third push on 2 workers, none on 1. The
/// lock is only ever taken by that one task, so it is uncontended.
pub struct OwnedPool {
    cfg: PoolConfig,
    idle: parking_lot::Mutex<Map>,
}

impl std::fmt::Debug for OwnedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedPool")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl OwnedPool {
    /// An empty pool with these settings.
    pub fn new(cfg: PoolConfig) -> Self {
        Self {
            cfg,
            idle: parking_lot::Mutex::default(),
        }
    }

    /// Takes the most recently used usable idle connection to `addr`.
    pub fn take(&self, addr: SocketAddr, now: Instant) -> Option<Conn> {
        self.idle.lock().get_mut(&addr)?.take(&self.cfg, now)
    }

    /// Returns a connection whose last response was read to the end, and
    /// drops the oldest idle ones that expired meanwhile.
    pub fn put(&self, addr: SocketAddr, conn: Conn, since: Instant) {
        self.idle
            .lock()
            .entry(addr)
            .or_default()
            .put(conn, &self.cfg, since);
    }
}

/// Where a connection goes back to when its response body ends.
#[derive(Debug, Clone)]
pub enum Home {
    /// The current worker thread's pool, with these settings.
    Worker(PoolConfig),
    /// A pool of its user's own.
    Owned(std::sync::Arc<OwnedPool>),
}

/// A TCP connection to an upstream within `timeout`, with `TCP_NODELAY`
/// (every upstream client of the gateway opens its sockets here).
pub async fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
        Err(_) => return Err(ConnectError::Timeout(addr)),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens a connection driven by hyper's client in a task of its own, for
/// what [`crate::h1`] does not do: request bodies streamed while the
/// upstream may already answer, and (`upgrades`) HTTP/1.1 upgrades, whose
/// driver hands the socket over on `101 Switching Protocols`. Never pooled.
pub async fn connect_hyper(
    addr: SocketAddr,
    timeout: Duration,
    upgrades: bool,
) -> Result<SendRequest<ReqBody>, ConnectError> {
    let stream = tcp_connect(addr, timeout).await?;
    let (conn, driver) = Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Io {
            addr,
            source: std::io::Error::other(e),
        })?;
    tokio::spawn(async move {
        let r = if upgrades {
            driver.with_upgrades().await
        } else {
            driver.await
        };
        if let Err(e) = r {
            tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
        }
    });
    Ok(conn)
}
