//! HTTP/1.1 to upstreams, driven inside the request's own task.
//!
//! Why by hand: hyper's `client::conn::http1` runs every connection in a
//! task of its own and passes each request to it through a channel and the
//! response back through a oneshot. For a proxy that is two extra task
//! wake-ups and about 2,500 instructions per request before a byte moves
//! (measured with `bench/gateway-callgrind.sh`), plus a copy of the header
//! map whenever a retry may still need it. What the gateway sends on this
//! path is simple: a request whose body is already in memory (none, or at
//! most the route's `retry_buffer_bytes`). So a request is one buffer
//! written from borrowed parts (nothing copied for a retry), the response
//! head is parsed with `httparse` (the parser hyper itself uses) into an
//! `http::HeaderMap` whose values share one buffer, and the body is read by
//! whoever polls it: hyper's server connection, in the same task.
//!
//! Bodies the gateway streams upstream (larger than the retry buffer) must
//! be written while the upstream may already answer; they, upgrades
//! (WebSocket) and h2c stay on hyper's client ([`crate::pool::connect_hyper`]).
//!
//! Framing follows RFC 9112 §6.3: no body for `HEAD`, 1xx, 204 and 304;
//! `Transfer-Encoding` ending in `chunked` wins over `Content-Length` (which
//! is then dropped, and the connection is not reused); differing or invalid
//! `Content-Length` values are an error, never a guess; anything else is read
//! until the upstream closes. A connection goes back to the pool only when
//! its response was read to the end, the upstream did not ask to close, and
//! no stray byte followed the response.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::headers::Forwarding;
use crate::pool::{self, ConnectError, PoolConfig};

/// Most header lines in a response head (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line or trailer section accepted.
const MAX_CHUNK_META: usize = 16 * 1024;
/// Bytes reserved in the read buffer before each read.
const READ_CHUNK: usize = 8 * 1024;
/// A body at most this long is copied behind the head (one write).
const COPY_BODY: usize = 16 * 1024;

/// An HTTP/1.1 connection to an upstream. Boxed once, when it is opened: it
/// moves in and out of the pool and through each response body, 8 bytes
/// at a time instead of 160.
#[derive(Debug)]
pub struct H1Conn(Box<ConnState>);

#[derive(Debug)]
struct ConnState {
    io: TcpStream,
    rd: BytesMut,
    wr: Vec<u8>,
    /// Field spans of the head being parsed (kept to reuse its allocation).
    spans: Vec<Span>,
    addr: SocketAddr,
    /// Served a request before (may have been closed by the upstream while idle).
    reused: bool,
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// Nothing reached the upstream (the write failed before its first byte).
    NotSent,
    /// The request was sent, or partly sent, then the connection broke
    /// before a response head arrived.
    Reset,
    /// The upstream answered with something that is not a valid HTTP/1.1
    /// response head.
    Malformed,
}

impl H1Conn {
    /// Opens a connection (with `TCP_NODELAY`).
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ConnectError> {
        let io = pool::tcp_connect(addr, timeout).await?;
        Ok(Self(Box::new(ConnState {
            io,
            rd: BytesMut::new(),
            wr: Vec::new(),
            spans: Vec::new(),
            addr,
            reused: false,
        })))
    }

    /// The upstream's address.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// The connection served a request before this one.
    pub fn is_reused(&self) -> bool {
        self.0.reused
    }

    /// Still usable for a request: the upstream has neither closed it nor
    /// sent anything while it was idle. Costs no system call unless the
    /// runtime saw the socket become readable.
    pub fn is_usable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.0.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut b = [0u8; 1];
                matches!(self.0.io.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends a request and reads the response head. `headers` must already
    /// be free of hop-by-hop fields; `Host`, `Content-Length`,
    /// `Transfer-Encoding` and `Expect` in it are ignored (the host and the
    /// framing are written from `host` and `body`).
    pub async fn request(&mut self, req: &Outgoing<'_>) -> Result<Head, SendError> {
        self.encode(req);
        let body = req.body.filter(|b| b.len() > COPY_BODY);
        let mut sent = 0;
        let wr = std::mem::take(&mut self.0.wr);
        let r = write_all(&mut self.0.io, &wr, &mut sent).await;
        self.0.wr = wr;
        r?;
        if let Some(b) = body {
            write_all(&mut self.0.io, b, &mut sent).await?;
        }
        self.0.reused = true;
        let head_request = req.method == Method::HEAD;
        loop {
            if !self.0.rd.is_empty()
                && let Some(head) = parse_head(
                    &mut self.0.rd,
                    head_request,
                    req.raw_fields,
                    &mut self.0.spans,
                )?
            {
                return Ok(head);
            }
            if self.0.rd.len() >= MAX_HEAD {
                return Err(SendError::Malformed);
            }
            self.0.rd.reserve(READ_CHUNK);
            let c = &mut *self.0;
            match tokio::io::AsyncReadExt::read_buf(&mut c.io, &mut c.rd).await {
                Ok(0) | Err(_) => return Err(SendError::Reset),
                Ok(_) => {}
            }
        }
    }

    fn encode(&mut self, req: &Outgoing<'_>) {
        let w = &mut self.0.wr;
        w.clear();
        w.extend_from_slice(req.method.as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(req.target.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        w.extend_from_slice(req.host.as_bytes());
        w.extend_from_slice(b"\r\n");
        for (name, value) in req.headers {
            if name == header::HOST
                || name == header::CONTENT_LENGTH
                || name == header::TRANSFER_ENCODING
                || name == header::EXPECT
                || req.forwarding.is_some_and(|f| f.replaces(name))
            {
                continue;
            }
            w.extend_from_slice(name.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        if let Some(f) = req.forwarding {
            f.write_to(w);
        }
        let len = req.body.map_or(0, Bytes::len);
        if len > 0 || req.declares_body || sends_body(req.method) {
            w.extend_from_slice(b"content-length: ");
            w.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        w.extend_from_slice(b"\r\n");
        if let Some(b) = req.body.filter(|b| b.len() <= COPY_BODY) {
            w.extend_from_slice(b);
        }
    }
}

/// Why [`exchange`] got no response head.
#[derive(Debug)]
pub enum Failed {
    /// No connection could be opened: nothing was sent.
    Connect(ConnectError),
    /// No response head before the deadline.
    Timeout,
    /// The request failed on the connection (see [`SendError`]).
    Send(SendError),
}

/// Sends `req` to `addr` over `idle` (a pooled connection) or a new one, and
/// reads the response head, all before `deadline`. A pooled connection the
/// upstream closed while idle (the keep-alive race), found before a byte was
/// written, is replaced by a fresh one: nothing was sent. The proxy and the
/// bridge's pushes both send through here.
pub async fn exchange(
    idle: Option<H1Conn>,
    addr: SocketAddr,
    connect_timeout: Duration,
    req: &Outgoing<'_>,
    deadline: tokio::time::Instant,
) -> Result<(H1Conn, Head), Failed> {
    // Connecting is boxed, like every cold path of the proxy's request
    // future: its size is what each keep-alive client connection holds.
    let connect = || {
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, H1Conn::connect(addr, connect_timeout)).await {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(Failed::Connect(e)),
                Err(_) => Err(Failed::Connect(ConnectError::Timeout(addr))),
            }
        })
    };
    let mut conn = match idle {
        Some(c) => c,
        None => connect().await?,
    };
    match tokio::time::timeout_at(deadline, conn.request(req)).await {
        Err(_) => Err(Failed::Timeout),
        Ok(Ok(head)) => Ok((conn, head)),
        Ok(Err(SendError::NotSent)) if conn.is_reused() => {
            let mut fresh = connect().await?;
            match Box::pin(tokio::time::timeout_at(deadline, fresh.request(req))).await {
                Err(_) => Err(Failed::Timeout),
                Ok(Ok(head)) => Ok((fresh, head)),
                Ok(Err(e)) => Err(Failed::Send(e)),
            }
        }
        Ok(Err(e)) => Err(Failed::Send(e)),
    }
}

/// Methods whose requests carry a body (`Content-Length: 0` when empty, as
/// hyper's client does).
fn sends_body(m: &Method) -> bool {
    *m == Method::POST || *m == Method::PUT || *m == Method::PATCH
}

async fn write_all(io: &mut TcpStream, buf: &[u8], sent: &mut usize) -> Result<(), SendError> {
    let mut off = 0;
    while off < buf.len() {
        match io.write(&buf[off..]).await {
            Ok(n) if n > 0 => {
                off += n;
                *sent += n;
            }
            _ => {
                return Err(if *sent == 0 {
                    SendError::NotSent
                } else {
                    SendError::Reset
                });
            }
        }
    }
    Ok(())
}

/// What one request sends, borrowed from the proxy's request parts.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Method.
    pub method: &'a Method,
    /// Origin-form target (path and query).
    pub target: &'a str,
    /// `Host` for this upstream.
    pub host: &'a HeaderValue,
    /// The other header fields.
    pub headers: &'a HeaderMap,
    /// Fields the gateway adds, written after `headers` minus the fields
    /// they replace.
    pub forwarding: Option<&'a Forwarding>,
    /// The buffered body, if any.
    pub body: Option<&'a Bytes>,
    /// The client declared a body (a `Content-Length`, maybe 0).
    pub declares_body: bool,
    /// Leave the response's fields unparsed ([`RawFields`]): only when
    /// nothing will read them before they are written to an HTTP/1.1 client.
    pub raw_fields: bool,
}

/// A response head.
#[derive(Debug)]
pub struct Head {
    /// Status, version and header fields (hop-by-hop `Connection: close` /
    /// `keep-alive`, `Keep-Alive` and `Transfer-Encoding` already left out);
    /// no fields when they are in `raw`.
    pub parts: http::response::Parts,
    /// The fields, left unparsed when [`Outgoing::raw_fields`] asked for it
    /// (boxed: the body that carries them is moved around whole).
    pub raw: Option<Box<RawFields>>,
    /// How its body is delimited.
    pub framing: Framing,
    /// The connection may serve another request after this response.
    pub keep_alive: bool,
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the upstream closes the connection (never reused).
    Eof,
}

/// The response head, if `rd` holds a complete one (interim 1xx responses
/// are skipped). On success the head's bytes are split off `rd`, whose rest
/// is the start of the body. With `raw`, the fields stay in the head's bytes
/// ([`RawFields`]) unless `Connection` names fields to remove.
fn parse_head(
    rd: &mut BytesMut,
    head_request: bool,
    raw: bool,
    spans: &mut Vec<Span>,
) -> Result<Option<Head>, SendError> {
    loop {
        spans.clear();
        // Uninitialised slots: a 100-header array is not zeroed per response.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let n = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, rd, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(SendError::Malformed),
        };
        let code = res.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| SendError::Malformed)?;
        if status.is_informational() {
            // 100 Continue, 103 Early Hints: not forwarded. 101 was not
            // asked for on this path (upgrades go through hyper).
            if code == 101 {
                return Err(SendError::Malformed);
            }
            rd.advance(n);
            continue;
        }
        let version = if res.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let mut framing = None;
        let mut length: Option<u64> = None;
        let mut keep_alive = version == Version::HTTP_11;
        let mut raw = raw;
        // Spans now, names and values once the head is split off (the
        // values share its buffer).
        let base = rd.as_ptr() as usize;
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        for h in res.headers.iter() {
            let name = h.name.as_bytes();
            let value = h.value;
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_length(value).ok_or(SendError::Malformed)?;
                if length.is_some_and(|l| l != n) {
                    return Err(SendError::Malformed);
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // The last coding decides (RFC 9112 §6.3): chunked or not.
                framing = Some(last_token_is(value, b"chunked"));
                continue;
            } else if name.eq_ignore_ascii_case(b"connection") {
                if has_token(value, b"close") {
                    keep_alive = false;
                } else if has_token(value, b"keep-alive") {
                    keep_alive = true;
                }
                if only_tokens(value, &[b"close", b"keep-alive"]) {
                    // The usual value: nothing for the hop-by-hop filter to do.
                    continue;
                }
                // It names fields to remove: the map's filter does that.
                raw = false;
            } else if name.eq_ignore_ascii_case(b"keep-alive") {
                continue;
            }
            let (ns, vs) = (at(name), at(value));
            spans.push(Span {
                name: (ns, ns + name.len() as u32),
                value: (vs, vs + value.len() as u32),
            });
        }
        if framing.is_some() && length.is_some() {
            // Both: chunked (or read-until-close) wins; the length must not
            // reach the client, and the connection is not trusted again.
            spans.retain(|s| {
                !rd[s.name.0 as usize..s.name.1 as usize].eq_ignore_ascii_case(b"content-length")
            });
            if framing == Some(true) {
                keep_alive = false;
            }
        }
        let head = rd.split_to(n).freeze();
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        let fields = if raw && spans.len() <= MAX_RAW_FIELDS {
            let mut r = Box::new(RawFields {
                head,
                spans: [Span::EMPTY; MAX_RAW_FIELDS],
                len: spans.len(),
            });
            r.spans[..spans.len()].copy_from_slice(spans);
            Some(r)
        } else {
            let mut headers = HeaderMap::with_capacity(spans.len());
            for s in spans.drain(..) {
                let name = HeaderName::from_bytes(&head[s.name.0 as usize..s.name.1 as usize])
                    .map_err(|_| SendError::Malformed)?;
                let value = HeaderValue::from_maybe_shared(
                    head.slice(s.value.0 as usize..s.value.1 as usize),
                )
                .map_err(|_| SendError::Malformed)?;
                headers.append(name, value);
            }
            parts.headers = headers;
            None
        };
        let framing = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else {
            match (framing, length) {
                (Some(true), _) => Framing::Chunked,
                (Some(false), _) => Framing::Eof,
                (None, Some(0)) => Framing::Empty,
                (None, Some(n)) => Framing::Length(n),
                (None, None) => Framing::Eof,
            }
        };
        return Ok(Some(Head {
            parts,
            raw: fields,
            framing,
            keep_alive: keep_alive && framing != Framing::Eof,
        }));
    }
}

/// Where one header field is in a response head's bytes.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

impl Span {
    const EMPTY: Span = Span {
        name: (0, 0),
        value: (0, 0),
    };
}

/// Most fields a response may have for them to stay unparsed (more go into
/// a map): they live in one allocation with the head's handle.
const MAX_RAW_FIELDS: usize = 32;

/// A response's header fields as the upstream sent them, for a response
/// that goes straight to an HTTP/1.1 client: the head's bytes and where
/// each field is in them. Building an `http::HeaderMap` (a name lookup, a
/// hash and an insert per field) was about 3,000 instructions per response
/// that nobody read. `Connection`, `Keep-Alive` and `Transfer-Encoding` are
/// already left out, and so is `Content-Length` when the body is chunked.
#[derive(Debug)]
pub struct RawFields {
    head: Bytes,
    spans: [Span; MAX_RAW_FIELDS],
    len: usize,
}

impl RawFields {
    /// Each field's name and value, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans[..self.len].iter().map(|s| {
            (
                &self.head[s.name.0 as usize..s.name.1 as usize],
                &self.head[s.value.0 as usize..s.value.1 as usize],
            )
        })
    }
}

pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

pub(crate) fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

pub(crate) fn has_token(v: &[u8], t: &[u8]) -> bool {
    tokens(v).any(|x| x.eq_ignore_ascii_case(t))
}

fn only_tokens(v: &[u8], allowed: &[&[u8]]) -> bool {
    tokens(v).all(|x| allowed.iter().any(|a| x.eq_ignore_ascii_case(a)))
}

pub(crate) fn last_token_is(v: &[u8], t: &[u8]) -> bool {
    tokens(v).last().is_some_and(|x| x.eq_ignore_ascii_case(t))
}

/// A response body read from an [`H1Conn`] by whoever polls it. At its clean
/// end the connection goes back to this worker's pool (or to its owner's, see
/// [`H1Body::with_home`]); dropped earlier, the
/// connection is closed.
#[derive(Debug)]
pub struct H1Body {
    conn: Option<H1Conn>,
    /// An error found by a read, reported on the next poll: see `fail`
    /// (boxed: rare, and the body is moved around whole).
    failed: Option<Box<BodyError>>,
    decoder: Decoder,
    keep_alive: bool,
    home: pool::Home,
    since: Instant,
    /// The response's fields, when left unparsed.
    raw: Option<Box<RawFields>>,
}

/// Where the reading of a body stands: the framing state machine of
/// RFC 9112 §6 and §7.1, shared by the client's response bodies
/// ([`H1Body`]) and the server's request bodies
/// ([`crate::h1_server::RequestBody`]). It only looks at the bytes it is
/// given; each side does its own reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoder {
    /// This many bytes left.
    Length(u64),
    /// Until the peer closes.
    Eof,
    /// Expecting a chunk-size line.
    ChunkSize,
    /// This many bytes of the current chunk left.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    /// Read to the end.
    Done,
}

/// What [`Decoder::step`] found in the buffer.
#[derive(Debug)]
pub(crate) enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section (the body has ended).
    Trailers(HeaderMap),
    /// The body has ended.
    Done,
    /// More bytes are needed first: at least this many would be useful.
    Need(u64),
}

/// Malformed chunked framing (a bad size line, a missing CRLF, or a size
/// line or trailer section over 16 KiB).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BadChunk;

impl Decoder {
    /// The state at the start of a body framed as `framing`.
    pub(crate) fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::ChunkSize,
            Framing::Eof => Decoder::Eof,
        }
    }

    /// Takes the next frame out of `rd` (leaving whatever follows the body
    /// there), or says that more bytes must be read first.
    pub(crate) fn step(&mut self, rd: &mut BytesMut) -> Result<Step, BadChunk> {
        loop {
            match *self {
                Decoder::Done => return Ok(Step::Done),
                Decoder::Length(rem) if !rd.is_empty() => {
                    let data = take(rd, rem);
                    let rem = rem - data.len() as u64;
                    *self = if rem == 0 {
                        Decoder::Done
                    } else {
                        Decoder::Length(rem)
                    };
                    return Ok(Step::Data(data));
                }
                Decoder::ChunkData(rem) if !rd.is_empty() => {
                    let data = take(rd, rem);
                    let rem = rem - data.len() as u64;
                    *self = if rem == 0 {
                        Decoder::ChunkEnd
                    } else {
                        Decoder::ChunkData(rem)
                    };
                    return Ok(Step::Data(data));
                }
                Decoder::Eof if !rd.is_empty() => return Ok(Step::Data(rd.split().freeze())),
                Decoder::Length(rem) | Decoder::ChunkData(rem) => return Ok(Step::Need(rem)),
                Decoder::Eof => return Ok(Step::Need(READ_CHUNK as u64)),
                Decoder::ChunkSize => match find(rd, b"\r\n") {
                    Some(i) => {
                        let size = chunk_size(&rd[..i]).ok_or(BadChunk)?;
                        rd.advance(i + 2);
                        *self = if size == 0 {
                            Decoder::Trailers
                        } else {
                            Decoder::ChunkData(size)
                        };
                    }
                    None if rd.len() > MAX_CHUNK_META => return Err(BadChunk),
                    None => return Ok(Step::Need(0)),
                },
                Decoder::ChunkEnd => {
                    if rd.len() < 2 {
                        return Ok(Step::Need(0));
                    }
                    if &rd[..2] != b"\r\n" {
                        return Err(BadChunk);
                    }
                    rd.advance(2);
                    *self = Decoder::ChunkSize;
                }
                Decoder::Trailers => {
                    if rd.starts_with(b"\r\n") {
                        rd.advance(2);
                        *self = Decoder::Done;
                        continue;
                    }
                    match find(rd, b"\r\n\r\n") {
                        Some(i) => {
                            let map = trailers(&rd[..i + 4]).ok_or(BadChunk)?;
                            rd.advance(i + 4);
                            *self = Decoder::Done;
                            return Ok(Step::Trailers(map));
                        }
                        None if rd.len() > MAX_CHUNK_META => return Err(BadChunk),
                        None => return Ok(Step::Need(0)),
                    }
                }
            }
        }
    }

    /// The peer closed the connection: true when that ends the body (it is
    /// read until close), false when the body is truncated.
    pub(crate) fn at_eof(&mut self) -> bool {
        match self {
            Decoder::Eof | Decoder::Done => {
                *self = Decoder::Done;
                true
            }
            _ => false,
        }
    }

    /// The body has been read to its end.
    pub(crate) fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// The bytes still to come, when known.
    pub(crate) fn size_hint(&self) -> SizeHint {
        match self {
            Decoder::Length(n) => SizeHint::with_exact(*n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Up to `max` buffered bytes.
fn take(rd: &mut BytesMut, max: u64) -> Bytes {
    let k = max.min(rd.len() as u64) as usize;
    rd.split_to(k).freeze()
}

/// The upstream's body broke off or was malformed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection closed before the body's end.
    #[error("the upstream closed the connection before the end of the body")]
    Truncated,
    /// Reading failed.
    #[error("reading the upstream's body failed: {0}")]
    Io(#[from] io::Error),
    /// Bad chunked framing.
    #[error("the upstream's chunked body is malformed")]
    BadChunk,
}

impl H1Body {
    /// The body of the response `head` just read from `conn`. `since` (a
    /// recent instant) stamps the connection when it goes back to the pool.
    pub fn new(conn: H1Conn, head: &Head, pool: PoolConfig, since: Instant) -> Self {
        Self::with_home(conn, head, pool::Home::Worker(pool), since)
    }

    /// [`new`](Self::new), with the connection going back to `home` at the
    /// body's end.
    pub fn with_home(conn: H1Conn, head: &Head, home: pool::Home, since: Instant) -> Self {
        let mut body = Self {
            conn: Some(conn),
            failed: None,
            decoder: Decoder::new(head.framing),
            keep_alive: head.keep_alive,
            home,
            since,
            raw: None,
        };
        if body.decoder.is_done() {
            body.release();
        }
        body
    }

    /// Carries the response's unparsed fields to whoever writes the head.
    pub fn with_raw_fields(mut self, raw: Option<Box<RawFields>>) -> Self {
        self.raw = raw;
        self
    }

    /// The response's unparsed fields, if they were left so.
    pub fn take_raw_fields(&mut self) -> Option<Box<RawFields>> {
        self.raw.take()
    }

    /// At the body's end: back to the pool if the connection can serve again.
    fn release(&mut self) {
        if let Some(c) = self.conn.take()
            && self.keep_alive
            && c.0.rd.is_empty()
        {
            match &self.home {
                pool::Home::Worker(cfg) => pool::put_idle(c.0.addr, c, cfg, self.since),
                pool::Home::Owned(owner) => owner.put(c.0.addr, c, self.since),
            }
        }
    }

    /// The connection failed mid-body. The error is reported on the next
    /// poll, not this one: the bytes already handed out (and the response
    /// head) are then flushed to the client before the server aborts the
    /// response, as when the body was read by another task.
    fn fail(
        &mut self,
        e: BodyError,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.conn = None;
        self.failed = Some(Box::new(e));
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Reads more into the connection's buffer: the number of bytes read (0 at
/// the upstream's close).
fn poll_fill(conn: &mut H1Conn, cx: &mut Context<'_>, want: u64) -> Poll<io::Result<usize>> {
    let want = (want.min(64 * 1024) as usize).max(READ_CHUNK);
    conn.0.rd.reserve(want);
    let c = &mut *conn.0;
    tokio_util::io::poll_read_buf(Pin::new(&mut c.io), cx, &mut c.rd)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A chunk-size line without its CRLF: hex digits, then optional
/// extensions (ignored).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let end = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let digits = &line[..end];
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let mut n = 0u64;
    for &d in digits {
        n = n * 16 + u64::from((d as char).to_digit(16)?);
    }
    Some(n)
}

/// Trailer fields (the bytes up to and including the empty line).
fn trailers(block: &[u8]) -> Option<HeaderMap> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(block, &mut hs)
    else {
        return None;
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        map.append(
            HeaderName::from_bytes(f.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(f.value).ok()?,
        );
    }
    Some(map)
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(*e)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let want = match this.decoder.step(&mut conn.0.rd) {
                Err(BadChunk) => return Poll::Ready(Some(Err(BodyError::BadChunk))),
                Ok(Step::Done) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Step::Data(data)) => {
                    if this.decoder.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Trailers(map)) => {
                    this.release();
                    return Poll::Ready(Some(Ok(Frame::trailers(map))));
                }
                Ok(Step::Need(want)) => want,
            };
            match poll_fill(conn, cx, want) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(BodyError::Io(e), cx),
                Poll::Ready(Ok(0)) => {
                    if this.decoder.at_eof() {
                        this.keep_alive = false;
                        continue;
                    }
                    return this.fail(BodyError::Truncated, cx);
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use proptest::prelude::*;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpListener;

    fn head(raw: &str, head_request: bool) -> Result<Option<Head>, SendError> {
        let mut rd = BytesMut::from(raw.as_bytes());
        parse_head(&mut rd, head_request, false, &mut Vec::new())
    }

    fn framing(raw: &str) -> (Framing, bool) {
        let h = head(raw, false).unwrap().unwrap();
        (h.framing, h.keep_alive)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            (Framing::Chunked, true)
        );
        // Both: chunked wins, and the connection is not trusted again.
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(!h.parts.headers.contains_key(header::CONTENT_LENGTH));
        // A coding that is not chunked last: read to the close.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n"),
            (Framing::Eof, false)
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), (Framing::Eof, false));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\n\r\n"),
            (Framing::Empty, true)
        );
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(h.parts.headers[header::CONTENT_LENGTH], "7");
        // Keep-alive: HTTP/1.1 unless `close`; HTTP/1.0 only with `keep-alive`.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n"),
            (Framing::Length(1), true)
        );
        // The same length twice is one length.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\n"),
            (Framing::Length(3), true)
        );
    }

    #[test]
    fn bad_heads_are_errors_never_guesses() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1,2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 20 Short\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "SMTP ready\r\n\r\n",
        ] {
            assert_eq!(
                head(raw, false).unwrap_err(),
                SendError::Malformed,
                "{raw:?}"
            );
        }
        assert!(
            head("HTTP/1.1 200 OK\r\ncontent-len", false)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn interim_responses_are_skipped_and_the_rest_stays_buffered() {
        let mut rd = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\nx-a: b\r\n\r\nhi"[..],
        );
        let h = parse_head(&mut rd, false, false, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(h.parts.status, StatusCode::CREATED);
        assert_eq!(h.parts.headers["x-a"], "b");
        assert!(!h.parts.headers.contains_key("link"));
        assert_eq!(&rd[..], b"hi");
    }

    #[test]
    fn raw_fields_are_the_mapped_fields_unparsed() {
        let raw = |s: &str| {
            let mut rd = BytesMut::from(s.as_bytes());
            parse_head(&mut rd, false, true, &mut Vec::new())
                .unwrap()
                .unwrap()
        };
        let fields = |h: &Head| -> Vec<(String, String)> {
            h.raw
                .as_ref()
                .unwrap()
                .iter()
                .map(|(n, v)| {
                    (
                        String::from_utf8_lossy(n).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect()
        };
        let h = raw(
            "HTTP/1.1 200 OK\r\nServer: up\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok",
        );
        assert!(h.parts.headers.is_empty());
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.keep_alive);
        let want = [
            ("Server", "up"),
            ("Content-Length", "2"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ];
        assert_eq!(
            fields(&h),
            want.map(|(n, v)| (n.to_string(), v.to_string()))
        );
        // Chunked wins over a length, which is then left out.
        let h = raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked);
        assert_eq!(fields(&h), [("X-A".to_string(), "b".to_string())]);
        // `Connection` naming a field: the map (and its filter) instead.
        let h = raw(
            "HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(h.raw.is_none());
        assert_eq!(h.parts.headers["x-secret"], "1");
    }

    #[test]
    fn hop_by_hop_connection_values_are_left_out_unless_they_name_fields() {
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.parts.headers.len(), 1, "{:?}", h.parts.headers);
        assert_eq!(h.parts.headers[header::CONTENT_LENGTH], "0");
        // A listed field name stays visible to the hop-by-hop filter.
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: x-secret\r\nx-secret: 1\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.parts.headers["connection"], "x-secret");
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"FF;name=value"), Some(255));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"-1"), None);
        assert_eq!(chunk_size(b"0x10"), None);
        assert_eq!(chunk_size(b"1000000000000000"), None);
    }

    static UP: HeaderValue = HeaderValue::from_static("up");
    static NO_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

    /// `GET /x` to host `up`, no body.
    fn get_x() -> Outgoing<'static> {
        Outgoing {
            method: &Method::GET,
            target: "/x",
            host: &UP,
            headers: &NO_HEADERS,
            forwarding: None,
            body: None,
            declares_body: false,
            raw_fields: false,
        }
    }

    fn pool_cfg() -> PoolConfig {
        PoolConfig {
            idle_timeout: Duration::from_secs(60),
            max_idle: 4,
        }
    }

    /// A response served by a one-shot upstream, read through `H1Conn` and
    /// `H1Body`, its bytes written in pieces of `split` bytes.
    async fn exchange(
        response: Vec<u8>,
        split: usize,
    ) -> (Head, Result<(Bytes, Option<HeaderMap>), String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = vec![0u8; 4096];
            let _ = s.read(&mut req).await.unwrap();
            for piece in response.chunks(split.max(1)) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut conn = H1Conn::connect(addr, Duration::from_secs(5)).await.unwrap();
        let h = conn.request(&get_x()).await.unwrap();
        let cfg = pool_cfg();
        let body = H1Body::new(conn, &h, cfg, Instant::now());
        let got = body
            .collect()
            .await
            .map(|c| {
                let t = c.trailers().cloned();
                (c.to_bytes(), t)
            })
            .map_err(|e| e.to_string());
        server.await.unwrap();
        (h, got)
    }

    fn chunked(payload: &[u8], sizes: &[usize], trailer: bool) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let mut rest = payload;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            out.extend_from_slice(format!("{n:x};ext=1\r\n").as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        out.extend_from_slice(b"0\r\n");
        if trailer {
            out.extend_from_slice(b"grpc-status: 0\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    #[tokio::test]
    async fn bodies_arrive_whole_or_fail_loudly() {
        let (_, got) = exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
            3,
        )
        .await;
        assert_eq!(got.unwrap().0, "hello");
        let (_, got) = exchange(chunked(b"hello world", &[4], true), 5).await;
        let (b, t) = got.unwrap();
        assert_eq!(b, "hello world");
        assert_eq!(t.unwrap()["grpc-status"], "0");
        let (_, got) = exchange(b"HTTP/1.1 200 OK\r\n\r\nuntil close".to_vec(), 4).await;
        assert_eq!(got.unwrap().0, "until close");
        // Cut short: an error, not a shorter body.
        let (_, got) = exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort".to_vec(),
            64,
        )
        .await;
        assert!(got.unwrap_err().contains("before the end"));
        let (_, got) = exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n".to_vec(),
            64,
        )
        .await;
        assert!(got.unwrap_err().contains("malformed"));
        let (_, got) = exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            64,
        )
        .await;
        assert!(got.unwrap_err().contains("malformed"));
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_is_pooled_once_and_a_closed_one_is_not_usable() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for _ in 0..2 {
                let n = s.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"GET /x HTTP/1.1\r\nhost: up\r\n"));
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            let _ = close_rx.await;
            drop(s);
        });
        let cfg = pool_cfg();
        let out = get_x();
        let mut conn = H1Conn::connect(addr, Duration::from_secs(5)).await.unwrap();
        for _ in 0..2 {
            let h = conn.request(&out).await.unwrap();
            let body = H1Body::new(conn, &h, cfg, Instant::now());
            assert_eq!(body.collect().await.unwrap().to_bytes(), "ok");
            conn = pool::take_idle(addr, &cfg, Instant::now()).expect("pooled after its body");
            assert!(conn.is_reused());
            assert!(pool::take_idle(addr, &cfg, Instant::now()).is_none());
        }
        close_tx.send(()).unwrap();
        server.await.unwrap();
        // The runtime learns of the close; the connection is then refused.
        let deadline = Instant::now() + Duration::from_secs(5);
        while conn.is_usable() {
            assert!(Instant::now() < deadline, "close never seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Writing to it now fails or its answer never comes: never a response.
        assert!(conn.request(&out).await.is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// Any chunking of any payload, delivered in any piece size, reads
        /// back as the payload.
        #[test]
        fn chunked_bodies_read_back_whole(
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
            sizes in proptest::collection::vec(1usize..700, 1..6),
            split in 1usize..300,
            trailer in any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (_, got) = rt.block_on(exchange(chunked(&payload, &sizes, trailer), split));
            let (b, t) = got.unwrap();
            prop_assert_eq!(&b[..], &payload[..]);
            prop_assert_eq!(t.is_some(), trailer);
        }
    }
}
