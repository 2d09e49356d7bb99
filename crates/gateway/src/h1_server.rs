//! HTTP/1.1 from clients: the gateway's own server connection.
//!
//! Why by hand: hyper's server connection parses every request into its own
//! buffers through a general state machine, sets a header-read timer per
//! request, and encodes each response through a second one; for a proxy
//! whose requests are mostly a head and a small body that was over 5,000
//! instructions per request, a fifth of the gateway's work (measured with
//! `bench/gateway-callgrind.sh`). Here one task per connection reads a head
//! with `httparse` (the parser hyper uses), hands the request to
//! [`Gateway::handle`], and writes the response head and body into one
//! buffer, flushed when the body has nothing more ready. Pipelined requests
//! wait in the read buffer and are answered in order.
//!
//! Framing (RFC 9112 §6): a request body is delimited by `Content-Length` or
//! by `Transfer-Encoding: chunked` (the only transfer coding accepted), never
//! by the connection's end. A head with both, with differing or malformed
//! lengths, with another transfer coding or with `Transfer-Encoding` in
//! HTTP/1.0 gets 400 and the connection is closed: its framing cannot be
//! trusted. A request body is read by whoever polls it (the proxy, or
//! hyper's client for a streamed upload); the connection is reused only if
//! that body was read to its end, and otherwise closed after the response.
//! An unfinished upload keeps the connection while the response goes out
//! (an upstream may answer before it has read the whole body).
//!
//! Limits: a head must arrive within `header_read_timeout` of the previous
//! response (or of the accept), which also closes idle keep-alive
//! connections; one timer per connection, re-armed only when it fires early.
//! A head over `max_header_bytes` or with more than `max_headers` fields gets
//! 431. On shutdown an idle connection is closed at once and a busy one after
//! its response (`Connection: close`).
//!
//! Closing (RFC 9112 §9.6): a connection closed after a response that left
//! request bytes unread (a body not read to its end, a refused head, bytes
//! behind a `Connection: close` request) lingers: its write half is shut
//! down, then what the client still sends is read and discarded until the
//! client closes, within bounds ([`linger`]). Closing at once would make
//! the kernel answer those bytes with a reset, which can destroy the
//! response before the client reads it.
//!
//! Responses: `Content-Length` when the body's size is known, otherwise
//! chunked (HTTP/1.1) or delimited by the close (HTTP/1.0); none for `HEAD`,
//! 1xx, 204 and 304. Each carries a `Date` unless it has one. A response
//! whose body breaks off ends in a reset rather than a clean close, so that
//! no client takes it for complete.
//!
//! An HTTP/1.1 `Upgrade` request (WebSocket) carries a [`ClientUpgrade`];
//! when its response is `101 Switching Protocols` the connection is handed
//! to it, with any bytes the client sent after the head.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

use crate::body::{BoxError, ClientBody, ResBody};
use crate::correlation;
use crate::h1::{
    BadChunk, Decoder, Framing, RawFields, Step, has_token, last_token_is, parse_length,
};
use crate::headers::is_hop_by_hop;
use crate::problem::{self, Problem};
use crate::proxy::{ConnInfo, Gateway};

pub mod linger;

/// The most header fields `gateway.max_headers` may allow (the parser's
/// slots live on the stack).
pub const MAX_HEADERS_LIMIT: usize = 256;
/// Bytes reserved in the read buffer before each read.
const READ_CHUNK: usize = 8 * 1024;
/// Body bytes at most this long are copied behind the head; longer ones are
/// written from their own buffer.
const COPY_BODY: usize = 16 * 1024;
/// The write buffer is flushed when it grows past this.
const FLUSH_AT: usize = 64 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What a client may send, from `[gateway]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must arrive within this.
    pub header_read_timeout: Duration,
    /// Most header fields in a head.
    pub max_headers: usize,
    /// Largest head, in bytes.
    pub max_header_bytes: usize,
    /// Bounds of a lingering close.
    pub linger: linger::Linger,
}

/// A client connection's byte stream: plain TCP or TLS.
pub enum ClientIo {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP (ALPN `http/1.1` or none).
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for ClientIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientIo::Tcp(_) => "ClientIo::Tcp",
            ClientIo::Tls(_) => "ClientIo::Tls",
        })
    }
}

impl ClientIo {
    /// Makes the coming close a reset: a response that broke off must not
    /// look complete, and one delimited by the close would (RFC 9112 §8).
    fn reset(&self) {
        let tcp = match self {
            ClientIo::Tcp(s) => s,
            ClientIo::Tls(s) => s.get_ref().0,
        };
        let _ = tcp.set_zero_linger();
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A parsed request head and what the connection must know about it.
#[derive(Debug)]
struct Parsed {
    parts: http::request::Parts,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
}

/// Why a head was refused before routing: the status and the detail.
#[derive(Debug)]
struct Refused(Problem, String);

fn bad(detail: impl Into<String>) -> Refused {
    Refused(Problem::BadRequest, detail.into())
}

/// The request head at the start of `rd`, if it holds a complete one; its
/// bytes are split off `rd` (the header values share them).
/// `spans` is scratch space kept by the connection (names and value spans).
fn parse_request(
    rd: &mut BytesMut,
    limits: &Limits,
    spans: &mut Vec<(HeaderName, usize, usize)>,
) -> Result<Option<Parsed>, Refused> {
    spans.clear();
    // Uninitialised slots: the array is not zeroed per request.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_LIMIT];
    let max = limits.max_headers.min(MAX_HEADERS_LIMIT);
    let mut req = httparse::Request::new(&mut []);
    let n = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        rd,
        &mut slots[..max],
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if rd.len() > limits.max_header_bytes {
                return Err(too_large(limits));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refused(
                Problem::HeaderFieldsTooLarge,
                format!("the request head has more than {max} header fields"),
            ));
        }
        Err(e) => return Err(bad(format!("the request head is malformed: {e}"))),
    };
    if n > limits.max_header_bytes {
        return Err(too_large(limits));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("the request method is not a valid token"))?;
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let base = rd.as_ptr() as usize;
    let target = req.path.unwrap_or("");
    let target = (target.as_ptr() as usize - base, target.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut te = false;
    // `close` in any `Connection` field wins over `keep-alive` in another.
    let mut close = false;
    let mut keep_alive = version == Version::HTTP_11;
    let mut expect_continue = false;
    let mut upgrade_header = false;
    let mut connection_upgrade = false;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| bad(format!("the header name `{}` is not a valid token", h.name)))?;
        let v = h.value;
        if name == header::CONTENT_LENGTH {
            let n = parse_length(v)
                .ok_or_else(|| bad("Content-Length is not a single non-negative decimal number"))?;
            match length {
                Some(l) if l != n => return Err(bad("two different Content-Length values")),
                // An identical duplicate: one field goes on (RFC 9110 §8.6),
                // whoever forwards the map.
                Some(_) => continue,
                None => length = Some(n),
            }
        } else if name == header::TRANSFER_ENCODING {
            te = true;
            // Only `chunked` is understood; it must be the only (and so the
            // last) coding, whatever the number of fields.
            chunked = !chunked && last_token_is(v, b"chunked") && !v.contains(&b',');
            if !chunked {
                return Err(bad(
                    "Transfer-Encoding other than a single `chunked` is not supported",
                ));
            }
        } else if name == header::CONNECTION {
            close |= has_token(v, b"close");
            keep_alive |= has_token(v, b"keep-alive");
            connection_upgrade |= has_token(v, b"upgrade");
        } else if name == header::EXPECT {
            expect_continue = v.eq_ignore_ascii_case(b"100-continue");
        } else if name == header::UPGRADE {
            upgrade_header = true;
        }
        let vs = v.as_ptr() as usize - base;
        spans.push((name, vs, vs + v.len()));
    }
    if te && length.is_some() {
        return Err(bad("conflicting Content-Length and Transfer-Encoding"));
    }
    if te && version == Version::HTTP_10 {
        return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
    }
    let head = rd.split_to(n).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1))
        .map_err(|e| bad(format!("the request target is invalid: {e}")))?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, vs, ve) in spans.drain(..) {
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| bad(format!("the value of header `{name}` is invalid")))?;
        headers.append(name, value);
    }
    let framing = match length {
        _ if chunked => Framing::Chunked,
        Some(0) | None => Framing::Empty,
        Some(n) => Framing::Length(n),
    };
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed {
        parts,
        framing,
        keep_alive: keep_alive && !close,
        // Both ignored in HTTP/1.0 (RFC 9110 §10.1.1 and §7.8).
        expect_continue: expect_continue && version == Version::HTTP_11,
        upgrade: upgrade_header && connection_upgrade && version == Version::HTTP_11,
    }))
}

fn too_large(limits: &Limits) -> Refused {
    Refused(
        Problem::HeaderFieldsTooLarge,
        format!("the request head exceeds {} bytes", limits.max_header_bytes),
    )
}

/// The connection while a request body holds it: whoever polls the body
/// reads from it. The connection task takes it back after the response.
struct Lent {
    io: Option<ClientIo>,
    rd: BytesMut,
    decoder: Decoder,
    /// Bytes of `100 Continue` still to write before the first read.
    continue_left: usize,
}

/// A request body read from the client's connection by whoever polls it.
pub struct RequestBody {
    lent: Arc<Mutex<Lent>>,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestBody")
    }
}

/// A client's request body broke off or was malformed.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// The client closed the connection before the body's end.
    #[error("the client closed the connection before the end of the body")]
    Truncated,
    /// Reading failed.
    #[error("reading the client's body failed: {0}")]
    Io(#[from] io::Error),
    /// Bad chunked framing.
    #[error("the client's chunked body is malformed")]
    BadChunk,
    /// The response was already sent and the connection closed.
    #[error("the request body is no longer readable: the response was sent")]
    Gone,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let mut guard = self.lent.lock().unwrap_or_else(PoisonError::into_inner);
        let l = &mut *guard;
        loop {
            match l.decoder.step(&mut l.rd) {
                Err(BadChunk) => return Poll::Ready(Some(Err(RequestBodyError::BadChunk))),
                Ok(Step::Done) => return Poll::Ready(None),
                Ok(Step::Data(d)) => {
                    l.continue_left = 0;
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Step::Trailers(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Ok(Step::Need(want)) => {
                    let Some(io) = l.io.as_mut() else {
                        return Poll::Ready(Some(Err(RequestBodyError::Gone)));
                    };
                    // `Expect: 100-continue`: the client waits for this
                    // before it sends the body.
                    while l.continue_left > 0 {
                        let from = CONTINUE.len() - l.continue_left;
                        match Pin::new(&mut *io).poll_write(cx, &CONTINUE[from..]) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Ok(n)) if n > 0 => l.continue_left -= n,
                            Poll::Ready(Ok(_)) => {
                                return Poll::Ready(Some(Err(RequestBodyError::Truncated)));
                            }
                            Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                        }
                        if l.continue_left == 0 {
                            // TLS buffers records until flushed.
                            if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
                                return Poll::Ready(Some(Err(e.into())));
                            }
                        }
                    }
                    l.rd.reserve((want.min(64 * 1024) as usize).max(READ_CHUNK));
                    match tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut l.rd) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                        Poll::Ready(Ok(0)) => {
                            if !l.decoder.at_eof() {
                                return Poll::Ready(Some(Err(RequestBodyError::Truncated)));
                            }
                        }
                        Poll::Ready(Ok(_)) => {}
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let l = self.lent.lock().unwrap_or_else(PoisonError::into_inner);
        l.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        let l = self.lent.lock().unwrap_or_else(PoisonError::into_inner);
        l.decoder.size_hint()
    }
}

/// The client's side of an upgrade, in the request's extensions (which
/// need `Clone`, hence the shared slot).
#[derive(Debug, Clone)]
pub struct ClientUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl ClientUpgrade {
    /// The connection, once the `101` response has been written; `None` if
    /// the response was another (or the connection broke first).
    pub async fn connection(self) -> Option<Upgraded> {
        let rx = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        rx.await.ok()
    }
}

/// An upgraded client connection: the bytes the client sent after its head
/// come first.
#[derive(Debug)]
pub struct Upgraded {
    io: ClientIo,
    early: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What ended the wait for a request head.
enum Wake {
    Read(io::Result<usize>),
    Timer,
    Shutdown,
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Serves one client connection until it closes, fails, idles past the
/// header timeout, or shutdown is asked for.
pub async fn serve(
    gw: &'static Gateway,
    io: ClientIo,
    peer: SocketAddr,
    info: Arc<ConnInfo>,
    shutdown: watch::Receiver<bool>,
    limits: Limits,
) {
    let stopping = shutdown.clone();
    let mut stop = Box::pin(async move {
        let mut rx = shutdown;
        let _ = rx.wait_for(|v| *v).await;
    });
    let mut timer = Box::pin(tokio::time::sleep(limits.header_read_timeout));
    // The timer keeps the task's waker from its first poll after each
    // (re)arming; until it fires, `is_elapsed` is all that needs asking (a
    // poll per wait cost ~400 instructions a request).
    let mut timer_polled = false;
    let mut io = Some(io);
    let mut rd = BytesMut::new();
    let mut wr: Vec<u8> = Vec::new();
    let mut spans = Vec::new();
    loop {
        let Some(conn) = io.as_mut() else { return };
        // 1. The head.
        let deadline = after(limits.header_read_timeout);
        let parsed = loop {
            if !rd.is_empty() {
                match parse_request(&mut rd, &limits, &mut spans) {
                    Ok(Some(p)) => break p,
                    Ok(None) => {}
                    Err(Refused(p, detail)) => {
                        let id = correlation::request_id(None);
                        let res = problem::response(p, &detail, &id, None);
                        let _ = write_response(conn, &mut wr, res, Asked::default(), true).await;
                        // The rest of what was refused may still be coming.
                        // A lingering connection keeps no buffer.
                        drop((std::mem::take(&mut rd), std::mem::take(&mut wr)));
                        let ended = Box::pin(linger::close(conn, stopping, limits.linger)).await;
                        gw.metrics.lingered(ended);
                        return;
                    }
                }
            }
            // Empty lines before a request line are allowed (RFC 9112
            // §2.2; some clients send one after a body): still idle.
            let idle = rd.iter().all(|&b| b == b'\r' || b == b'\n');
            rd.reserve(READ_CHUNK);
            let wake = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) =
                    tokio_util::io::poll_read_buf(Pin::new(&mut *conn), cx, &mut rd)
                {
                    return Poll::Ready(Wake::Read(r));
                }
                let fired = if timer_polled {
                    timer.is_elapsed()
                } else {
                    timer_polled = true;
                    timer.as_mut().poll(cx).is_ready()
                };
                if fired {
                    return Poll::Ready(Wake::Timer);
                }
                if idle && stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Shutdown);
                }
                Poll::Pending
            })
            .await;
            match wake {
                Wake::Read(Ok(0) | Err(_)) | Wake::Shutdown => return,
                Wake::Read(Ok(_)) => {}
                Wake::Timer => {
                    // Armed for an earlier head: re-arm, or cut off.
                    if tokio::time::Instant::now() >= deadline {
                        return;
                    }
                    timer.as_mut().reset(deadline);
                    timer_polled = false;
                }
            }
        };

        // 2. The request, its body lent to whoever reads it.
        let Parsed {
            parts,
            framing,
            keep_alive,
            expect_continue,
            upgrade,
        } = parsed;
        let asked = Asked {
            head: parts.method == Method::HEAD,
            http10: parts.version == Version::HTTP_10,
        };
        let mut close = !keep_alive;
        let mut lent = None;
        let body = if framing == Framing::Empty {
            ClientBody::Empty
        } else {
            let l = Arc::new(Mutex::new(Lent {
                io: io.take(),
                rd: std::mem::take(&mut rd),
                decoder: Decoder::new(framing),
                continue_left: if expect_continue { CONTINUE.len() } else { 0 },
            }));
            lent = Some(Arc::clone(&l));
            ClientBody::H1(RequestBody { lent: l })
        };
        let mut req = Request::from_parts(parts, body);
        let mut upgrade_tx = None;
        if upgrade {
            let (tx, rx) = oneshot::channel();
            req.extensions_mut()
                .insert(ClientUpgrade(Arc::new(Mutex::new(Some(rx)))));
            upgrade_tx = Some(tx);
        }
        let res = gw.handle(req, peer, &info).await;

        // 3. The connection back if the body was read to its end (what
        // follows it is the next request). Otherwise the body keeps it while
        // the response goes out, since an upstream may answer before the
        // upload ends and still read the rest; the connection then closes
        // after the response.
        if let Some(l) = &lent {
            let mut g = l.lock().unwrap_or_else(PoisonError::into_inner);
            if g.decoder.is_done() {
                io = g.io.take();
                rd = std::mem::take(&mut g.rd);
                drop(g);
                lent = None;
            } else {
                close = true;
            }
        }

        // 4. The response.
        let switching = res.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade_tx.is_some();
        // A switched connection is handed over, never closed here: its
        // `101` keeps `Connection: upgrade`.
        let close = !switching && (close || *stopping.borrow());
        let written = match (&lent, io.as_mut()) {
            (Some(l), _) => write_response(&mut LentIo(l), &mut wr, res, asked, close).await,
            (None, Some(conn)) => write_response(conn, &mut wr, res, asked, close).await,
            (None, None) => return,
        };
        let mut unread = false;
        if let Some(l) = lent {
            let mut g = l.lock().unwrap_or_else(PoisonError::into_inner);
            io = g.io.take();
            rd = std::mem::take(&mut g.rd);
            unread = !g.decoder.is_done();
        }
        let Some(conn) = io.as_mut() else { return };
        let Ok(close) = written else {
            conn.reset();
            return;
        };
        if switching {
            if let (Some(tx), Some(io)) = (upgrade_tx, io.take()) {
                let _ = tx.send(Upgraded {
                    io,
                    early: rd.split().freeze(),
                });
            }
            return;
        }
        if close {
            if unread || !rd.is_empty() {
                drop((std::mem::take(&mut rd), std::mem::take(&mut wr)));
                let ended = Box::pin(linger::close(conn, stopping, limits.linger)).await;
                gw.metrics.lingered(ended);
            } else {
                let _ = conn.shutdown().await;
            }
            return;
        }
    }
}

/// `d` from now; the config takes any duration, and one past what the
/// clock can add (`Instant + Duration` panics) means about 30 years.
fn after(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// Polls a response body once without waiting.
fn poll_now(b: &mut ResBody) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    Pin::new(b).poll_frame(&mut Context::from_waker(Waker::noop()))
}

/// The client connection while a request body still holds it: the response
/// is written under the lock the body reads under (both run on this worker
/// thread, so the lock is never contended).
struct LentIo<'a>(&'a Mutex<Lent>);

impl LentIo<'_> {
    fn with<T>(
        &self,
        f: impl FnOnce(Pin<&mut ClientIo>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let mut l = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match l.io.as_mut() {
            Some(io) => f(Pin::new(io)),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for LentIo<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|io| io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_shutdown(cx))
    }
}

async fn flush<W: AsyncWrite + Unpin>(io: &mut W, wr: &mut Vec<u8>) -> io::Result<()> {
    if !wr.is_empty() {
        io.write_all(wr).await?;
        wr.clear();
    }
    io.flush().await
}

/// What the request implies for its response.
#[derive(Debug, Clone, Copy, Default)]
struct Asked {
    /// A `HEAD` request: the response has no body.
    head: bool,
    /// An HTTP/1.0 client: no chunked coding, keep-alive only when asked.
    http10: bool,
}

/// Writes a response; returns whether the connection must close after it
/// (`close` as given, or because the response needs it), or an error when
/// it broke off and the connection cannot continue.
async fn write_response<W: AsyncWrite + Unpin>(
    io: &mut W,
    wr: &mut Vec<u8>,
    res: Response<ResBody>,
    asked: Asked,
    mut close: bool,
) -> Result<bool, BoxError> {
    let (parts, mut body) = res.into_parts();
    let raw = body.take_raw_fields();
    let status = parts.status;
    let no_body = asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let out = if no_body {
        Out::None
    } else if let Some(n) = body.size_hint().exact() {
        Out::Length(n)
    } else if !asked.http10 {
        Out::Chunked
    } else {
        Out::Close
    };
    if parts
        .headers
        .get(header::CONNECTION)
        .is_some_and(|v| has_token(v.as_bytes(), b"close"))
    {
        close = true;
    }
    close |= out == Out::Close;
    let keep_length = asked.head || status == StatusCode::NOT_MODIFIED;
    encode_head(
        wr,
        &parts,
        raw.as_deref(),
        out,
        keep_length,
        close,
        asked.http10,
    );
    let r = write_body(io, wr, &mut body, out).await;
    drop(body);
    r.map(|()| close)
}

/// The response head: the map's fields, then the upstream's unparsed ones
/// (those the map does not replace, without hop-by-hop fields), a `Date`
/// if neither had one, then the framing this connection uses.
fn encode_head(
    wr: &mut Vec<u8>,
    parts: &http::response::Parts,
    raw: Option<&RawFields>,
    out: Out,
    keep_length: bool,
    close: bool,
    http10: bool,
) {
    wr.clear();
    wr.extend_from_slice(b"HTTP/1.1 ");
    wr.extend_from_slice(parts.status.as_str().as_bytes());
    wr.push(b' ');
    wr.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    wr.extend_from_slice(b"\r\n");
    let mut dated = parts.headers.contains_key(header::DATE);
    for (name, value) in &parts.headers {
        if (*name == header::CONTENT_LENGTH && !keep_length)
            || *name == header::TRANSFER_ENCODING
            || (*name == header::CONNECTION && close)
        {
            continue;
        }
        field(wr, name.as_str().as_bytes(), value.as_bytes());
    }
    for (name, value) in raw.iter().flat_map(|r| r.iter()) {
        if (!keep_length && name.eq_ignore_ascii_case(b"content-length"))
            || is_hop_by_hop(name)
            || parts
                .headers
                .keys()
                .any(|k| name.eq_ignore_ascii_case(k.as_str().as_bytes()))
        {
            continue;
        }
        dated |= name.eq_ignore_ascii_case(b"date");
        field(wr, name, value);
    }
    if !dated {
        date_field(wr);
    }
    match out {
        Out::Length(n) => {
            wr.extend_from_slice(b"content-length: ");
            wr.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            wr.extend_from_slice(b"\r\n");
        }
        Out::Chunked => wr.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Out::None | Out::Close => {}
    }
    if close {
        wr.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        wr.extend_from_slice(b"connection: keep-alive\r\n");
    }
    wr.extend_from_slice(b"\r\n");
}

/// Writes the body after the head already in `wr`, flushing whenever the
/// body has nothing ready (so a response read in one piece upstream leaves
/// in one write).
async fn write_body<W: AsyncWrite + Unpin>(
    io: &mut W,
    wr: &mut Vec<u8>,
    body: &mut ResBody,
    out: Out,
) -> Result<(), BoxError> {
    if out == Out::None {
        return Ok(flush(io, wr).await?);
    }
    let mut sent: u64 = 0;
    let mut trailers_sent = false;
    loop {
        let frame = match poll_now(body) {
            Poll::Ready(f) => f,
            Poll::Pending => {
                flush(io, wr).await?;
                std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
            }
        };
        let frame = match frame {
            None => break,
            Some(Err(e)) => {
                // What arrived before the failure reaches the client; the
                // connection then closes, leaving the body incomplete.
                let _ = flush(io, wr).await;
                return Err(e);
            }
            Some(Ok(f)) => f,
        };
        match frame.into_data() {
            Ok(d) => {
                sent += d.len() as u64;
                if let Out::Length(n) = out
                    && sent > n
                {
                    return Err("the response body is longer than its length".into());
                }
                if out == Out::Chunked {
                    if d.is_empty() {
                        continue;
                    }
                    let mut hex = [0u8; 16];
                    wr.extend_from_slice(hex_len(d.len(), &mut hex));
                    wr.extend_from_slice(b"\r\n");
                }
                if d.len() > COPY_BODY {
                    flush(io, wr).await?;
                    io.write_all(&d).await?;
                } else {
                    wr.extend_from_slice(&d);
                }
                if out == Out::Chunked {
                    wr.extend_from_slice(b"\r\n");
                }
            }
            Err(frame) => {
                if let (Ok(t), Out::Chunked) = (frame.into_trailers(), out) {
                    wr.extend_from_slice(b"0\r\n");
                    for (name, value) in &t {
                        field(wr, name.as_str().as_bytes(), value.as_bytes());
                    }
                    wr.extend_from_slice(b"\r\n");
                    trailers_sent = true;
                }
            }
        }
        if wr.len() >= FLUSH_AT {
            flush(io, wr).await?;
        }
    }
    if out == Out::Chunked && !trailers_sent {
        wr.extend_from_slice(b"0\r\n\r\n");
    }
    if let Out::Length(n) = out
        && sent != n
    {
        let _ = flush(io, wr).await;
        return Err("the response body is shorter than its length".into());
    }
    Ok(flush(io, wr).await?)
}

/// `date: ...` for now (RFC 9110 §6.6.1: the gateway's own responses need
/// one, and so do forwarded ones that came without). Formatted at most once
/// a second per thread, as hyper's server did.
fn date_field(wr: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, date)| {
        if *at != secs {
            *at = secs;
            *date = httpdate::fmt_http_date(now);
        }
        field(wr, b"date", date.as_bytes());
    });
}

fn field(wr: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    wr.extend_from_slice(name);
    wr.extend_from_slice(b": ");
    wr.extend_from_slice(value);
    wr.extend_from_slice(b"\r\n");
}

fn hex_len(n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(1),
            max_headers: 8,
            max_header_bytes: 1024,
            linger: linger::Linger::DEFAULT,
        }
    }

    fn parse(raw: &[u8]) -> Result<Option<Parsed>, Refused> {
        parse_request(&mut BytesMut::from(raw), &limits(), &mut Vec::new())
    }

    #[test]
    fn heads_parse_with_their_framing() {
        let p = parse(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.parts.method, Method::GET);
        assert_eq!(p.parts.uri, "/a?b=1");
        assert_eq!(p.parts.headers["x-a"], "1");
        assert_eq!(p.framing, Framing::Empty);
        assert!(p.keep_alive && !p.upgrade && !p.expect_continue);
        let p = parse(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.framing, Framing::Length(5));
        assert!(p.expect_continue);
        let p =
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(p.framing, Framing::Chunked);
        assert!(!p.keep_alive);
        let p = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.parts.version, Version::HTTP_10);
        assert!(p.keep_alive);
        let p = parse(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.upgrade);
        let p = parse(b"GET /ws HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!p.upgrade, "ignored in HTTP/1.0");
        let p = parse(b"GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!p.keep_alive, "close wins");
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn ambiguous_framing_and_oversized_heads_are_refused() {
        let status = |raw: &[u8]| match parse(raw) {
            Err(Refused(p, _)) => p.status().as_u16(),
            Ok(_) => 0,
        };
        for raw in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX A: b\r\n\r\n",
        ] {
            assert_eq!(status(raw), 400, "{}", String::from_utf8_lossy(raw));
        }
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(9));
        assert_eq!(status(many.as_bytes()), 431);
        let big = format!("GET / HTTP/1.1\r\nA: {}\r\n", "b".repeat(2000));
        assert_eq!(status(big.as_bytes()), 431, "a partial head over the limit");
    }

    #[test]
    fn hex_lengths() {
        let mut b = [0u8; 16];
        assert_eq!(hex_len(0, &mut b), b"0");
        assert_eq!(hex_len(255, &mut b), b"ff");
        assert_eq!(hex_len(0x10000, &mut b), b"10000");
    }

    proptest! {
        /// Any bytes: a head, a wait for more, or a refusal; never a panic.
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&b);
        }

        /// A valid head split anywhere parses the same once whole.
        #[test]
        fn heads_parse_whole_or_wait(split in 0usize..60) {
            let raw = b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok";
            let split = split.min(raw.len());
            let mut rd = BytesMut::from(&raw[..split]);
            let mut spans = Vec::new();
            let first = parse_request(&mut rd, &limits(), &mut spans).unwrap();
            if split < raw.len() - 2 {
                prop_assert!(first.is_none());
                rd.extend_from_slice(&raw[split..]);
                let p = parse_request(&mut rd, &limits(), &mut spans).unwrap().unwrap();
                prop_assert_eq!(p.framing, Framing::Length(2));
                prop_assert_eq!(&rd[..], b"ok");
            }
        }
    }
}
