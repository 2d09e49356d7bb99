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

/// A hop-by-hop field name, in any case.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    hop_by_hop()
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
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

/// What the gateway adds to a forwarded request (phase 4): `traceparent`
/// (continuing the client's trace or starting one), `x-request-id`,
/// `x-forwarded-for` (the client's address appended), `x-forwarded-proto`
/// and `x-forwarded-host` (the client's `Host`). Computed once per request
/// (a retry sends the same), then either inserted into the header map, for
/// hyper's client ([`Forwarding::apply`]), or written straight into the
/// request head by the gateway's own HTTP/1.1 client, which then skips the
/// client's own fields of those names ([`Forwarding::replaces`]): five map
/// inserts fewer per request.
#[derive(Debug, Clone)]
pub struct Forwarding {
    traceparent: HeaderValue,
    /// The client's `tracestate` goes with its trace; dropped when the
    /// `traceparent` was missing or invalid.
    keep_tracestate: bool,
    request_id: HeaderValue,
    /// The client's `x-forwarded-for`, if any (the client's address follows).
    xff_prev: Option<HeaderValue>,
    ip: [u8; 48],
    ip_len: u8,
    https: bool,
    host: Option<HeaderValue>,
}

impl Forwarding {
    /// From the client's request headers (hop-by-hop fields already gone).
    pub fn new(headers: &HeaderMap, request_id: &HeaderValue, client: IpAddr, https: bool) -> Self {
        let (traceparent, keep_tracestate) =
            crate::correlation::next_traceparent(headers.get(&TRACEPARENT));
        let mut ip = [0u8; 48];
        let ip_len = format_ip(client, &mut ip);
        Self {
            traceparent,
            keep_tracestate,
            request_id: request_id.clone(),
            xff_prev: headers.get(&X_FORWARDED_FOR).cloned(),
            ip,
            ip_len: ip_len as u8,
            https,
            host: headers.get(header::HOST).cloned(),
        }
    }

    fn ip(&self) -> &[u8] {
        &self.ip[..usize::from(self.ip_len)]
    }

    fn proto(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    /// Puts the fields into `headers`, replacing the client's.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT.clone(), self.traceparent.clone());
        if !self.keep_tracestate {
            headers.remove(&TRACESTATE);
        }
        headers.insert(X_REQUEST_ID.clone(), self.request_id.clone());
        let xff = match &self.xff_prev {
            Some(prev) => {
                let mut v = Vec::with_capacity(prev.len() + 2 + self.ip().len());
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
                v.extend_from_slice(self.ip());
                new_value(&v)
            }
            None => new_value(self.ip()),
        };
        if let Some(v) = xff {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(self.proto()),
        );
        match &self.host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST.clone(), h.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }

    /// The client's field `name` is replaced by one of these (and so is not
    /// copied upstream).
    pub fn replaces(&self, name: &HeaderName) -> bool {
        *name == TRACEPARENT
            || *name == X_REQUEST_ID
            || *name == X_FORWARDED_FOR
            || *name == X_FORWARDED_PROTO
            || *name == X_FORWARDED_HOST
            || (!self.keep_tracestate && *name == TRACESTATE)
    }

    /// Writes the fields as header lines (`name: value\r\n`).
    pub fn write_to(&self, w: &mut Vec<u8>) {
        w.extend_from_slice(b"traceparent: ");
        w.extend_from_slice(self.traceparent.as_bytes());
        w.extend_from_slice(b"\r\nx-request-id: ");
        w.extend_from_slice(self.request_id.as_bytes());
        w.extend_from_slice(b"\r\nx-forwarded-for: ");
        if let Some(prev) = &self.xff_prev {
            w.extend_from_slice(prev.as_bytes());
            w.extend_from_slice(b", ");
        }
        w.extend_from_slice(self.ip());
        w.extend_from_slice(b"\r\nx-forwarded-proto: ");
        w.extend_from_slice(self.proto().as_bytes());
        w.extend_from_slice(b"\r\n");
        if let Some(h) = &self.host {
            w.extend_from_slice(b"x-forwarded-host: ");
            w.extend_from_slice(h.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
    }
}

/// Writes `ip` into `buf` (IPv4 without `core::fmt`, the common case);
/// returns the length.
/// `addr` as `SocketAddr`'s `Display` writes it, without `core::fmt` for
/// IPv4 (the access log writes one per request).
pub(crate) fn format_socket_addr(addr: std::net::SocketAddr, buf: &mut [u8; 64]) -> &str {
    let n = match addr {
        std::net::SocketAddr::V4(a) => {
            let mut ip = [0u8; 48];
            let n = format_ip(IpAddr::V4(*a.ip()), &mut ip);
            buf[..n].copy_from_slice(&ip[..n]);
            buf[n] = b':';
            let mut digits = itoa::Buffer::new();
            let port = digits.format(a.port()).as_bytes();
            buf[n + 1..n + 1 + port.len()].copy_from_slice(port);
            n + 1 + port.len()
        }
        std::net::SocketAddr::V6(_) => {
            let mut cur = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cur, "{addr}");
            cur.position() as usize
        }
    };
    std::str::from_utf8(&buf[..n]).unwrap_or("")
}

fn format_ip(ip: IpAddr, buf: &mut [u8; 48]) -> usize {
    match ip {
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
            let _ = write!(cur, "{ip}");
            cur.position() as usize
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

    fn set_forwarded(h: &mut HeaderMap, ip: &str, host: Option<&'static str>) {
        match host {
            Some(v) => h.insert(header::HOST, HeaderValue::from_static(v)),
            None => h.remove(header::HOST),
        };
        let id = HeaderValue::from_static("rid");
        Forwarding::new(h, &id, ip.parse().unwrap(), false).apply(h);
    }

    #[test]
    fn forwarded_appends() {
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, "10.0.0.1", Some("a.example"));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1");
        assert_eq!(h[&X_FORWARDED_HOST], "a.example");
        set_forwarded(&mut h, "::1", None);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, ::1");
        for ip in ["0.0.0.0", "255.255.255.255", "192.168.10.9", "100.20.3.0"] {
            let mut h = HeaderMap::new();
            set_forwarded(&mut h, ip, None);
            assert_eq!(h[&X_FORWARDED_FOR], ip);
        }
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_REQUEST_ID], "rid");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }

    /// The map and the wire carry the same fields: applying to a map and
    /// writing the remaining client fields plus `write_to` give the same set.
    #[test]
    fn written_fields_equal_applied_fields() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("client-chosen"));
        h.insert(&TRACESTATE, HeaderValue::from_static("a=b"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let id = HeaderValue::from_static("rid-1");
        let f = Forwarding::new(&h, &id, "10.1.2.3".parse().unwrap(), true);
        let mut applied = h.clone();
        f.apply(&mut applied);
        let mut wire = Vec::new();
        for (n, v) in &h {
            if !f.replaces(n) {
                wire.extend_from_slice(n.as_str().as_bytes());
                wire.extend_from_slice(b": ");
                wire.extend_from_slice(v.as_bytes());
                wire.extend_from_slice(b"\r\n");
            }
        }
        f.write_to(&mut wire);
        let mut from_wire: Vec<(String, String)> = String::from_utf8(wire)
            .unwrap()
            .lines()
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_owned(), v.to_owned())
            })
            .collect();
        let mut from_map: Vec<(String, String)> = applied
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect();
        from_wire.sort();
        from_map.sort();
        assert_eq!(from_wire, from_map);
        assert!(from_map.contains(&("x-forwarded-for".into(), "1.2.3.4, 10.1.2.3".into())));
        assert!(from_map.contains(&("x-forwarded-proto".into(), "https".into())));
        assert!(
            !from_map.iter().any(|(n, _)| n == "tracestate"),
            "no valid traceparent: tracestate dropped"
        );
    }

    proptest::proptest! {
        /// The access log's address text is `SocketAddr`'s own.
        #[test]
        fn socket_addrs_format_as_display(a in proptest::prelude::any::<std::net::SocketAddr>()) {
            let mut buf = [0u8; 64];
            proptest::prop_assert_eq!(format_socket_addr(a, &mut buf), a.to_string());
        }
    }
}
