//! Listeners and workers.
//!
//! The proxy runs like nginx: N worker threads, each with its own
//! single-threaded tokio runtime and its own `SO_REUSEPORT` listener on the
//! same address. A connection lives on one thread for its whole life, so its
//! requests, its pooled upstream connections and its metric shard never cross
//! threads. Shutdown: stop accepting, ask every connection to finish its
//! current request and close, wait up to the drain deadline.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::GatewaySettings;
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
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        // The upstream's Date is forwarded; skipping our own saves a clock
        // read per response.
        .auto_date_header(false)
        // Small responses: one flattened write beats a two-buffer writev.
        .writev(false)
        .header_read_timeout(settings.header_read_timeout)
        .max_headers(settings.max_headers)
        .max_header_size(settings.max_header_bytes)
        .max_buf_size(settings.max_header_bytes.max(8192) + 8192);
    let builder = Arc::new(builder);
    let tracker = TaskTracker::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(15));
    // Access-log records are batched per worker; push out stragglers.
    let mut log_flush = tokio::time::interval(Duration::from_millis(50));
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
                        tracker.spawn(serve_tls(gw, tls.clone(), Arc::clone(&builder), stream, peer, shutdown.clone(), settings.header_read_timeout, settings.max_header_bytes));
                    } else {
                        let info = Arc::new(ConnInfo::default());
                        tracker.spawn(serve_conn(gw, Arc::clone(&builder), stream, peer, info, shutdown.clone()));
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = sweep.tick() => pool::sweep(&gw.pool),
            _ = log_flush.tick() => gw.access.flush_local(),
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
                _ = log_flush.tick() => gw.access.flush_local(),
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

/// Completes the TLS handshake (within the header read timeout), then
/// serves HTTP/2 or HTTP/1.1 as ALPN chose.
async fn serve_tls(
    gw: &'static Gateway,
    acceptor: tokio_rustls::TlsAcceptor,
    builder: Arc<http1::Builder>,
    stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    handshake_timeout: Duration,
    max_header_bytes: usize,
) {
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
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
    let info = Arc::new(ConnInfo {
        tls: true,
        ..ConnInfo::default()
    });
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return serve_conn(gw, builder, tls, peer, info, shutdown).await;
    }
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(20)));
    let svc = service_fn(move |req| {
        let info = Arc::clone(&info);
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

async fn serve_conn<S>(
    gw: &'static Gateway,
    builder: Arc<http1::Builder>,
    stream: S,
    peer: SocketAddr,
    info: Arc<ConnInfo>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(SniffStream {
        inner: stream,
        info: Arc::clone(&info),
        scan: HeadScan::default(),
    });
    let svc = service_fn(move |req| {
        let info = Arc::clone(&info);
        async move { Ok::<_, Infallible>(gw.handle(req, peer, &info).await) }
    });
    let conn = builder.serve_connection(io, svc).with_upgrades();
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

/// Where the scan of a request head stands.
#[derive(Debug, Default)]
struct HeadScan {
    /// Between a response and the end of the next request head.
    reading_body: bool,
    te: bool,
    cl: bool,
    /// The previous chunk ended with `\n` (a line starts at the next byte).
    at_line_start: bool,
}

impl HeadScan {
    /// Scans freshly read bytes; returns true when a finished head carried
    /// both `Transfer-Encoding` and `Content-Length`.
    fn scan(&mut self, bytes: &[u8]) -> bool {
        if self.reading_body {
            return false;
        }
        let mut i = 0;
        let mut line_start = self.at_line_start;
        while i < bytes.len() {
            if line_start {
                let rest = &bytes[i..];
                if rest.starts_with(b"\r\n") || rest.starts_with(b"\n") {
                    // End of the head.
                    let conflict = self.te && self.cl;
                    *self = HeadScan {
                        reading_body: true,
                        ..HeadScan::default()
                    };
                    return conflict;
                }
                if starts_with_ci(rest, b"transfer-encoding:") {
                    self.te = true;
                } else if starts_with_ci(rest, b"content-length:") {
                    self.cl = true;
                }
            }
            match bytes[i..].iter().position(|&b| b == b'\n') {
                Some(p) => {
                    i += p + 1;
                    line_start = true;
                }
                None => {
                    line_start = false;
                    break;
                }
            }
        }
        self.at_line_start = line_start;
        false
    }
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The client socket, watching request heads for ambiguous framing.
///
/// hyper resolves `Content-Length` + `Transfer-Encoding` by dropping the
/// length (safe, never forwarded), but we must answer such a request with 400,
/// and hyper gives no sign of it. The scan is best effort by design (a head
/// split mid-name across reads or a pipelined second head is not seen); the
/// hyper normalisation stays the backstop.
struct SniffStream<S> {
    inner: S,
    info: Arc<ConnInfo>,
    scan: HeadScan,
}

impl<S: AsyncRead + Unpin> AsyncRead for SniffStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && this.scan.scan(&buf.filled()[before..])
        {
            this.info.framing_conflict.store(true, Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SniffStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // A response is going out: the next bytes read start a new head.
        self.scan = HeadScan {
            at_line_start: false,
            ..HeadScan::default()
        };
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.scan = HeadScan::default();
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScan;

    #[test]
    fn head_scan_finds_conflicts() {
        let mut s = HeadScan::default();
        assert!(s.scan(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ));
        let mut s = HeadScan::default();
        assert!(!s.scan(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        let mut s = HeadScan::default();
        assert!(!s.scan(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n"));
        assert!(s.scan(b"content-length: 5\r\n\r\n"));
        // Body bytes are not scanned until the next response is written.
        assert!(!s.scan(b"\ncontent-length: 1\ntransfer-encoding: x\n\n"));
    }
}
