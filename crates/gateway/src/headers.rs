//! Header hygiene at the proxy boundary: hop-by-hop removal (RFC 9110 §7.6.1)
//! and the `x-forwarded-*` set.

use std::io::Write as _;
use std::net::IpAddr;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C `tracestate` (dropped when the incoming `traceparent` was invalid).
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `idempotency-key`: makes a non-idempotent request safe to retry.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Size of the per-thread slab that generated header values are cut from.
const SLAB: usize = 8 * 1024;

thread_local! {
    static VALUES: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// A header value with these bytes (`None` if they are not a valid value).
///
/// `HeaderValue::from_bytes` allocates a buffer per value, and cloning such a
/// value (the retry copy of the headers, the echo to the client) allocates
/// again to share it. The values the gateway generates per request (request
/// id, `traceparent`, `x-forwarded-for`) are instead cut from a per-thread
/// slab: one allocation per ~100 values, and a clone is a reference-count
/// increment. A slab lives until the last value cut from it is dropped.
pub fn new_value(bytes: &[u8]) -> Option<HeaderValue> {
    VALUES.with(|slab| {
        let mut slab = slab.borrow_mut();
        if slab.capacity() - slab.len() < bytes.len() {
            *slab = BytesMut::with_capacity(SLAB.max(bytes.len()));
        }
        slab.extend_from_slice(bytes);
        HeaderValue::from_maybe_shared(slab.split().freeze()).ok()
    })
}

/// The hop-by-hop headers (RFC 9110 §7.6.1 and the legacy `keep-alive` /
/// `proxy-connection`); `Connection` first.
fn hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &header::CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::TE,
        &header::TRAILER,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
    ]
}

/// Removes hop-by-hop headers and every header named in `Connection`.
///
/// One pass over the names finds which hop-by-hop headers are present; only
/// those are removed (each `remove` hashes), so the common cases cost one
/// scan (none present) or one scan and one removal (an upstream's
/// `Connection: keep-alive`), with no allocation.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let hop = hop_by_hop();
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop.iter().position(|h| *h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Names listed in Connection go too (RFC 9110 §7.6.1). Hop-by-hop
        // tokens (`keep-alive`) are removed below when present, and a
        // listed name is looked up without allocating, so the usual
        // `keep-alive` / `close` allocate nothing.
        let mut listed: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim) {
                if token.is_empty()
                    || hop.iter().any(|h| token.eq_ignore_ascii_case(h.as_str()))
                    || !headers.contains_key(token)
                {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                    listed.push(n);
                }
            }
        }
        for name in listed {
            headers.remove(name);
        }
    }
    for (i, name) in hop.into_iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Appends the client address to `x-forwarded-for` and sets
/// `x-forwarded-proto` and `x-forwarded-host` (from the client's Host).
pub fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, host: Option<HeaderValue>) {
    let mut buf = [0u8; 64];
    let n = match client {
        // The common case without core::fmt.
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + (octet / 10) % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            n
        }
        IpAddr::V6(_) => {
            let mut cur = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cur, "{client}");
            cur.position() as usize
        }
    };
    let ip = &buf[..n];
    let value = match headers.get(&X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip);
            new_value(&v)
        }
        None => new_value(ip),
    };
    if let Some(v) = value {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST.clone(), h);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));

        // The usual upstream response: only `Connection: keep-alive`.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_LENGTH));

        // A header literally named `close`, listed; several Connection lines;
        // names listed but absent; hop-by-hop without Connection.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close, x-a"));
        h.append(header::CONNECTION, HeaderValue::from_static(" X-B ,,"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("1"));
        h.insert("x-c", HeaderValue::from_static("1"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-c"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-c"]
        );

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["host"]
        );
    }

    #[test]
    fn slab_values() {
        let mut seen = Vec::new();
        // Enough values to fill several slabs; each keeps its own bytes.
        for i in 0..2000 {
            let text = format!("value-{i}");
            let v = new_value(text.as_bytes()).unwrap();
            assert_eq!(v.as_bytes(), text.as_bytes());
            seen.push((text, v.clone()));
        }
        for (text, v) in &seen {
            assert_eq!(v.as_bytes(), text.as_bytes());
        }
        let big = vec![b'a'; 3 * SLAB];
        assert_eq!(new_value(&big).unwrap().len(), big.len());
        assert!(new_value(b"bad\nvalue").is_none());
        assert_eq!(new_value(b"after").unwrap(), "after");
    }

    #[test]
    fn forwarded_appends() {
        let mut h = HeaderMap::new();
        set_forwarded(
            &mut h,
            "10.0.0.1".parse().unwrap(),
            Some(HeaderValue::from_static("a.example")),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1");
        set_forwarded(&mut h, "::1".parse().unwrap(), None);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, ::1");
        for ip in ["0.0.0.0", "255.255.255.255", "192.168.10.9", "100.20.3.0"] {
            let mut h = HeaderMap::new();
            set_forwarded(&mut h, ip.parse().unwrap(), None);
            assert_eq!(h[&X_FORWARDED_FOR], ip);
        }
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }
}
