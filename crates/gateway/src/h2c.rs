//! Upstream HTTP/2 over cleartext (prior knowledge), for services and routes
//! with `protocol = "h2c"` (gRPC needs it).
//!
//! Unlike HTTP/1.1 there is no pool of connections: each worker thread keeps
//! one multiplexed connection per instance, and every request of that worker
//! to that instance opens a stream on it. A connection that closed (GOAWAY,
//! reset) is replaced on the next request.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::ReqBody;
use crate::pool::ConnectError;

/// A handle to a shared upstream HTTP/2 connection (cheap to clone).
pub type Sender = SendRequest<ReqBody>;

/// One slot per instance: the connection, behind an async mutex so that
/// requests arriving while it is being opened wait for it instead of each
/// opening their own.
type Slot = Arc<tokio::sync::Mutex<Option<Sender>>>;

thread_local! {
    static CONNS: RefCell<HashMap<SocketAddr, Slot>> = RefCell::new(HashMap::new());
}

fn slot(addr: SocketAddr) -> Slot {
    CONNS.with(|m| Arc::clone(m.borrow_mut().entry(addr).or_default()))
}

/// This worker's connection to `addr`, opened if there is none (or it closed).
pub async fn sender(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let slot = slot(addr);
    let mut conn = slot.lock().await;
    if let Some(s) = conn.as_ref()
        && !s.is_closed()
    {
        return Ok(s.clone());
    }
    let s = connect(addr, timeout).await?;
    *conn = Some(s.clone());
    Ok(s)
}

/// Forgets `addr`'s connection (after it failed a request).
pub async fn forget(addr: SocketAddr) {
    *slot(addr).lock().await = None;
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = crate::pool::tcp_connect(addr, timeout).await?;
    let handshake = Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .handshake(TokioIo::new(stream));
    let (sender, driver) = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            return Err(ConnectError::Io {
                addr,
                source: std::io::Error::other(e),
            });
        }
        Err(_) => return Err(ConnectError::Timeout(addr)),
    };
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(upstream = %addr, error = %e, "upstream h2 connection ended");
        }
    });
    Ok(sender)
}
