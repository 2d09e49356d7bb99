//! Body types of the proxy: what a client sends ([`ClientBody`]), what goes
//! upstream ([`ReqBody`]) and what goes back to the client ([`ResBody`]).
//! All are enums, not boxed trait objects, so a proxied request allocates no
//! body wrapper.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::proxy::Finish;

/// Errors of our bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body was larger than the route allows.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// One frame of an inner body, its error boxed: what each variant of the
/// body enums below does.
fn poll_boxed<B>(b: &mut B, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    Pin::new(b)
        .poll_frame(cx)
        .map_err(|e| Box::new(e) as BoxError)
}

/// The size of `prefix` bytes followed by a body of size `rest`.
fn prefixed_hint(prefix: Option<&Bytes>, rest: SizeHint) -> SizeHint {
    let p = prefix.map_or(0, |b| b.len() as u64);
    let mut out = SizeHint::new();
    out.set_lower(rest.lower() + p);
    if let Some(u) = rest.upper() {
        out.set_upper(u + p);
    }
    out
}

/// A client's request body: from the gateway's HTTP/1.1 server or from
/// hyper's HTTP/2 server (TLS with ALPN `h2`).
#[derive(Debug)]
pub enum ClientBody {
    /// No body.
    Empty,
    /// Read from an HTTP/1.1 connection by whoever polls it.
    H1(crate::h1_server::RequestBody),
    /// An HTTP/2 stream's body.
    H2(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::H1(b) => poll_boxed(b, cx),
            ClientBody::H2(b) => poll_boxed(b, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

/// A request body sent upstream.
#[derive(Debug)]
pub enum ReqBody {
    /// No body.
    Empty,
    /// A fully buffered body: can be replayed on retry.
    Full(Option<Bytes>),
    /// A body too large to buffer: streamed once, never retried.
    Stream(Box<Streamed>),
}

/// The state of a streamed request body.
#[derive(Debug)]
pub struct Streamed {
    /// Bytes read while deciding whether to buffer, sent first.
    pub prefix: Option<Bytes>,
    /// The rest of the client's body.
    pub rest: ClientBody,
    /// Bytes seen so far.
    pub seen: u64,
    /// The route's body limit.
    pub limit: u64,
    /// Set when the limit was exceeded (the proxy then answers 413).
    pub too_large: Arc<AtomicBool>,
}

impl ReqBody {
    /// A replayable copy, if this body can be replayed.
    pub fn try_clone(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Empty => Some(ReqBody::Empty),
            ReqBody::Full(b) => Some(ReqBody::Full(b.clone())),
            ReqBody::Stream(_) => None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream(s) => {
                if let Some(p) = s.prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                match Pin::new(&mut s.rest).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            s.seen += d.len() as u64;
                            if s.seen > s.limit {
                                s.too_large.store(true, Ordering::Relaxed);
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge(s.limit)))));
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(b) => b.is_none(),
            ReqBody::Stream(s) => s.prefix.is_none() && s.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqBody::Stream(s) => prefixed_hint(s.prefix.as_ref(), s.rest.size_hint()),
        }
    }
}

/// A response body sent to the client: the upstream's, streamed, or one the
/// gateway made. Dropping it completes the request's bookkeeping (pool
/// return, metrics, access log) through its `Finish`, which also settles
/// the upstream's breaker and passive health: success at a clean end, failure
/// on an upstream body error.
#[derive(Debug)]
pub struct ResBody {
    inner: Inner,
    finish: Option<Finish>,
    complete: bool,
}

/// An upstream's response body: read by the gateway's own HTTP/1.1 client
/// ([`crate::h1`]) or by hyper's (h2c, streamed request bodies).
#[derive(Debug)]
pub enum UpBody {
    /// From [`crate::h1`].
    H1(crate::h1::H1Body),
    /// From hyper's client.
    Hyper(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::H1(b) => poll_boxed(b, cx),
            UpBody::Hyper(b) => poll_boxed(b, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::H1(b) => b.is_end_stream(),
            UpBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::H1(b) => b.size_hint(),
            UpBody::Hyper(b) => b.size_hint(),
        }
    }
}

impl UpBody {
    /// The response's unparsed fields, if the client left them so.
    pub(crate) fn take_raw_fields(&mut self) -> Option<Box<crate::h1::RawFields>> {
        match self {
            UpBody::H1(b) => b.take_raw_fields(),
            UpBody::Hyper(_) => None,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Full(Option<Bytes>),
    Upstream(UpBody),
    /// An upstream body whose start was read by the gateway (idempotency
    /// keeps a copy of it) and is sent first. Boxed: rare, and every
    /// response is moved a few times on its way out.
    Prefixed(Box<Prefixed>),
}

#[derive(Debug)]
struct Prefixed {
    prefix: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    rest: UpBody,
}

impl ResBody {
    /// A body made by the gateway.
    pub fn full(b: Bytes) -> Self {
        Self {
            inner: Inner::Full(Some(b)),
            finish: None,
            complete: false,
        }
    }

    /// The upstream's body, streamed.
    pub fn upstream(b: UpBody) -> Self {
        Self {
            inner: Inner::Upstream(b),
            finish: None,
            complete: false,
        }
    }

    /// True when the body comes from the upstream (not made by the gateway).
    pub(crate) fn is_upstream(&self) -> bool {
        !matches!(self.inner, Inner::Full(_))
    }

    /// Reads the upstream body up to `limit` bytes. Returns the bytes read and
    /// whether that was the whole body; either way the bytes are sent to the
    /// client first, then the rest (and any trailers) as usual.
    pub(crate) async fn read_prefix(&mut self, limit: usize) -> Result<(Bytes, bool), BoxError> {
        use http_body_util::BodyExt as _;
        let Inner::Upstream(_) = &self.inner else {
            return Ok((Bytes::new(), false));
        };
        let mut buf = bytes::BytesMut::new();
        let mut trailers = None;
        let mut whole = true;
        while let Inner::Upstream(b) = &mut self.inner {
            if b.is_end_stream() {
                break;
            }
            match b.frame().await {
                None => break,
                Some(Err(e)) => {
                    self.upstream_failed();
                    return Err(e);
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => {
                        buf.extend_from_slice(&d);
                        if buf.len() > limit {
                            whole = false;
                            break;
                        }
                    }
                    Err(f) => {
                        trailers = f.into_trailers().ok();
                        whole = false;
                        break;
                    }
                },
            }
        }
        let bytes = buf.freeze();
        let old = std::mem::replace(&mut self.inner, Inner::Full(None));
        if let Inner::Upstream(rest) = old {
            self.inner = Inner::Prefixed(Box::new(Prefixed {
                prefix: (!bytes.is_empty()).then(|| bytes.clone()),
                trailers,
                rest,
            }));
        }
        Ok((bytes, whole))
    }

    /// The upstream response's unparsed fields (see [`crate::h1::RawFields`]),
    /// to be written after the map's.
    pub(crate) fn take_raw_fields(&mut self) -> Option<Box<crate::h1::RawFields>> {
        match &mut self.inner {
            Inner::Upstream(b) => b.take_raw_fields(),
            _ => None,
        }
    }

    /// The upstream's body failed: its instance is charged with a failure.
    fn upstream_failed(&mut self) {
        if let Some(f) = &mut self.finish {
            f.upstream_body_failed();
        }
    }

    /// Attaches the request's bookkeeping, run when the body ends or drops.
    pub(crate) fn set_finish(&mut self, finish: Finish) {
        if self.is_end_stream() {
            self.complete = true;
        }
        self.finish = Some(finish);
    }
}

impl From<Bytes> for ResBody {
    fn from(b: Bytes) -> Self {
        ResBody::full(b)
    }
}

impl Drop for ResBody {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f.done(self.complete);
        }
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = match &mut this.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx),
            Inner::Prefixed(p) => {
                let Prefixed {
                    prefix,
                    trailers,
                    rest,
                } = &mut **p;
                if let Some(p) = prefix.take() {
                    Poll::Ready(Some(Ok(Frame::data(p))))
                } else if let Some(t) = trailers.take() {
                    Poll::Ready(Some(Ok(Frame::trailers(t))))
                } else {
                    Pin::new(rest).poll_frame(cx)
                }
            }
        };
        match &r {
            Poll::Ready(Some(Err(_))) => this.upstream_failed(),
            Poll::Ready(None) => this.complete = true,
            _ if this.is_end_stream() => this.complete = true,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Prefixed(p) => {
                p.prefix.is_none() && p.trailers.is_none() && p.rest.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream(b) => b.size_hint(),
            Inner::Prefixed(pre) => prefixed_hint(pre.prefix.as_ref(), pre.rest.size_hint()),
        }
    }
}
#[cfg(test)]
mod tests {
    use std::mem::size_of;

    /// A response moves by value from the attempt loop to the server's
    /// writer, five or six times: rare parts are boxed to keep those copies
    /// small (they were 648 bytes each).
    #[test]
    fn responses_stay_small_to_move() {
        let res = size_of::<http::Response<super::ResBody>>();
        assert!(res <= 384, "Response<ResBody> is {res} bytes");
        let up = size_of::<super::UpBody>();
        assert!(up <= 96, "UpBody is {up} bytes");
        assert_eq!(size_of::<crate::h1::H1Conn>(), size_of::<usize>());
    }
}
