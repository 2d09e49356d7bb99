//! Listeners and workers.
//!
//! The proxy runs like nginx: N worker threads, each with its own
//! single-threaded tokio runtime and its own `SO_REUSEPORT` listener on the
//! same address. A connection lives on one thread for its whole life, so its
//! requests, its pooled upstream connections and its metric shard never cross
//! threads. HTTP/1.1 connections are served by [`crate::h1_server`], HTTP/2
//! (TLS with ALPN `h2`) by hyper. Shutdown: stop accepting, ask every
//! connection to finish its current request and close, wait up to the drain
//! deadline.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::body::ClientBody;
use crate::config::GatewaySettings;
use crate::h1_server::{self, ClientIo, Limits};
use crate::pool;
use crate::proxy::{ConnInfo, Gateway};

/// Binds `n` listeners on `addr` with `SO_REUSEPORT` (port 0 picks one port
/// for all of them).
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        #[cfg(unix)]
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        let l: std::net::TcpListener = s.into();
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Spawns one worker thread per listener. Each returns when `shutdown` flips
/// to true and its connections have drained (or the drain deadline passed).
pub fn spawn_workers(
    gw: &'static Gateway,
    listeners: Vec<std::net::TcpListener>,
    settings: &GatewaySettings,
    shutdown: &watch::Receiver<bool>,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let settings = settings.clone();
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name(format!("gateway-worker-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a worker runtime");
                            return;
                        }
                    };
                    rt.block_on(worker(gw, l, settings, shutdown));
                })
        })
        .collect()
}

async fn worker(
    gw: &'static Gateway,
    listener: std::net::TcpListener,
    settings: GatewaySettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the listener");
            return;
        }
    };
    let limits = Limits {
        header_read_timeout: settings.header_read_timeout,
        max_headers: settings.max_headers,
        max_header_bytes: settings.max_header_bytes,
        linger: h1_server::linger::Linger {
            time: settings.lingering_time,
            timeout: settings.lingering_timeout,
            ..h1_server::linger::Linger::DEFAULT
        },
    };
    let tracker = TaskTracker::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(15));
    // Access-log records are batched per worker; push out stragglers.
    let stragglers = log_stragglers(gw);
    tokio::pin!(stragglers);
    loop {
        tokio::select! {
            biased;
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(tls) = &gw.tls {
                        tracker.spawn(serve_tls(gw, tls.clone(), stream, peer, shutdown.clone(), limits));
                    } else {
                        let info = Arc::new(ConnInfo::default());
                        tracker.spawn(h1_server::serve(gw, ClientIo::Tcp(stream), peer, info, shutdown.clone(), limits));
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = sweep.tick() => pool::sweep(&gw.pool),
            () = &mut stragglers => {
                gw.access.flush_local();
                stragglers.set(log_stragglers(gw));
            }
        }
    }
    drop(listener);
    tracker.close();
    gw.upgrades.close();
    let drained = async {
        let all = async { tokio::join!(tracker.wait(), gw.upgrades.wait()) };
        tokio::pin!(all);
        loop {
            tokio::select! {
                _ = &mut all => break,
                () = &mut stragglers => {
                    gw.access.flush_local();
                    stragglers.set(log_stragglers(gw));
                }
            }
        }
    };
    let timed_out = tokio::time::timeout(settings.drain_timeout, drained)
        .await
        .is_err();
    gw.access.flush_local();
    if timed_out {
        tracing::warn!(
            connections = tracker.len(),
            "drain deadline passed; closing remaining connections"
        );
    }
}

/// Resolves 50 ms after this worker logged a record into an empty batch:
/// time to send the partial batch. While the worker logs nothing, no timer
/// runs, so an idle worker does not wake.
async fn log_stragglers(gw: &'static Gateway) {
    gw.access.pending().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Completes the TLS handshake (within the header read timeout), then
/// serves HTTP/2 or HTTP/1.1 as ALPN chose.
async fn serve_tls(
    gw: &'static Gateway,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
) {
    let handshake = acceptor.accept(stream);
    let tls = match tokio::time::timeout(limits.header_read_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let info = Arc::new(ConnInfo { tls: true });
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        let io = ClientIo::Tls(Box::new(tls));
        return h1_server::serve(gw, io, peer, info, shutdown, limits).await;
    }
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(20)));
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let info = Arc::clone(&info);
        let req = req.map(ClientBody::H2);
        async move { Ok::<_, Infallible>(gw.handle(req, peer, &info).await) }
    });
    let conn = h2.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        }
        () = async { let _ = shutdown.wait_for(|v| *v).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
