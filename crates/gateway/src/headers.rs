//! Header hygiene at the proxy boundary: hop-by-hop removal (RFC 9110 §7.6.1)
//! and the `x-forwarded-*` set.

use std::io::Write as _;
use std::net::IpAddr;

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

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes hop-by-hop headers and every header named in `Connection`.
///
/// The common case (none present) is one pass over the names with no hashing.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Names listed in Connection go too (RFC 9110 §7.6.1).
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        KEEP_ALIVE.clone(),
        PROXY_CONNECTION.clone(),
    ] {
        headers.remove(name);
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
            HeaderValue::from_bytes(&v)
        }
        None => HeaderValue::from_bytes(ip),
    };
    if let Ok(v) = value {
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
