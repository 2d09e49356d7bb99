//! Correlation headers: `x-request-id` and W3C `traceparent`, and the cheap
//! thread-local random numbers they are generated from.
//!
//! Ids come from a per-thread wyrand generator seeded once from the OS-seeded
//! `RandomState`: a syscall per request (what `Uuid::new_v4` costs) would be a
//! measurable share of a proxied request.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

use http::HeaderValue;

/// Longest request id kept from a client.
pub const MAX_REQUEST_ID: usize = 128;

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x9e37_79b9_7f4a_7c15);
        h.finish() | 1
    });
}

/// A fast, non-cryptographic random `u64` (wyrand).
pub fn random_u64() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A random index below `n` (`n > 0`).
pub fn random_below(n: usize) -> usize {
    ((u128::from(random_u64()) * n as u128) >> 64) as usize
}

/// The two lowercase hex digits of every byte value.
static HEX2: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

/// `v` as 16 lowercase hex digits, a byte at a time (ids are made per request).
fn hex_into(out: &mut [u8], v: u64) {
    for (i, pair) in out.chunks_exact_mut(2).rev().enumerate() {
        pair.copy_from_slice(&HEX2[usize::from((v >> (8 * i)) as u8)]);
    }
}

/// True when `v` is a request id worth keeping: 1 to 128 visible ASCII chars.
pub fn is_sane_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A fresh request id: 32 lowercase hex digits (128 random bits).
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    hex_into(&mut buf[..16], random_u64());
    hex_into(&mut buf[16..], random_u64());
    crate::headers::new_value(&buf).unwrap_or(HeaderValue::from_static("0"))
}

/// Returns the client's request id if sane, a new one otherwise.
pub fn request_id(incoming: Option<&HeaderValue>) -> HeaderValue {
    match incoming {
        Some(v) if is_sane_request_id(v.as_bytes()) => v.clone(),
        _ => new_request_id(),
    }
}

/// A parsed `traceparent` (the parts we keep when continuing a trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: [u8; 32],
    /// 16 lowercase hex digits of the caller's span, not all zero.
    pub parent_id: [u8; 16],
    /// Two hex digits of flags.
    pub flags: [u8; 2],
}

fn is_lower_hex(s: &[u8]) -> bool {
    s.iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Why a `traceparent` was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// Not `version-traceid-parentid-flags` with the right lengths.
    #[error("malformed traceparent")]
    Malformed,
    /// Version `ff` is forbidden.
    #[error("invalid traceparent version")]
    Version,
    /// A trace id or parent id of all zeros.
    #[error("all-zero trace or parent id")]
    Zero,
}

impl TraceParent {
    /// Parses a `traceparent` per W3C Trace Context level 1 (future versions
    /// are read by their first four fields).
    pub fn parse(v: &[u8]) -> Result<TraceParent, TraceParentError> {
        if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return Err(TraceParentError::Malformed);
        }
        let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
        if !(is_lower_hex(version)
            && is_lower_hex(trace)
            && is_lower_hex(parent)
            && is_lower_hex(flags))
        {
            return Err(TraceParentError::Malformed);
        }
        if version == b"ff" {
            return Err(TraceParentError::Version);
        }
        if version == b"00" && v.len() != 55 {
            return Err(TraceParentError::Malformed);
        }
        if v.len() > 55 && v[55] != b'-' {
            return Err(TraceParentError::Malformed);
        }
        if trace.iter().all(|&b| b == b'0') || parent.iter().all(|&b| b == b'0') {
            return Err(TraceParentError::Zero);
        }
        let mut tp = TraceParent {
            trace_id: [0; 32],
            parent_id: [0; 16],
            flags: [0; 2],
        };
        tp.trace_id.copy_from_slice(trace);
        tp.parent_id.copy_from_slice(parent);
        tp.flags.copy_from_slice(flags);
        Ok(tp)
    }
}

/// The `traceparent` to send upstream: the client's trace continued with a
/// new span id, or a new sampled trace when the client sent none (or junk).
/// Returns the header and whether the incoming one was continued.
pub fn next_traceparent(incoming: Option<&HeaderValue>) -> (HeaderValue, bool) {
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let parsed = incoming.and_then(|v| TraceParent::parse(v.as_bytes()).ok());
    match &parsed {
        Some(tp) => {
            buf[3..35].copy_from_slice(&tp.trace_id);
            buf[53..55].copy_from_slice(&tp.flags);
        }
        None => {
            hex_into(&mut buf[3..19], random_u64());
            hex_into(&mut buf[19..35], random_u64());
        }
    }
    let mut span = random_u64();
    if span == 0 {
        span = 1;
    }
    hex_into(&mut buf[36..52], span);
    (
        crate::headers::new_value(&buf).unwrap_or(HeaderValue::from_static("")),
        parsed.is_some(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn request_id_kept_or_generated() {
        let v = HeaderValue::from_static("abc-123");
        assert_eq!(request_id(Some(&v)), v);
        let long = HeaderValue::from_str(&"a".repeat(129)).unwrap();
        let g = request_id(Some(&long));
        assert_eq!(g.len(), 32);
        assert_ne!(new_request_id(), new_request_id());
        let spaced = HeaderValue::from_static("has space");
        assert_eq!(request_id(Some(&spaced)).len(), 32);
        assert!(is_sane_request_id("a".repeat(128).as_bytes()));
        assert!(!is_sane_request_id(b""));
    }

    #[test]
    fn traceparent_continued_with_new_span() {
        let v = HeaderValue::from_static(GOOD);
        let (out, continued) = next_traceparent(Some(&v));
        assert!(continued);
        let s = out.to_str().unwrap();
        assert_eq!(&s[..36], &GOOD[..36]);
        assert_ne!(&s[36..52], &GOOD[36..52]);
        assert_eq!(&s[52..], "-01");
        TraceParent::parse(out.as_bytes()).unwrap();
    }

    #[test]
    fn traceparent_started_when_missing_or_invalid() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let v = HeaderValue::from_str(bad).unwrap();
            let (out, continued) = next_traceparent(Some(&v));
            assert!(!continued, "{bad}");
            TraceParent::parse(out.as_bytes()).unwrap();
        }
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert!(TraceParent::parse(future.as_bytes()).is_ok());
        let (out, continued) = next_traceparent(None);
        assert!(!continued);
        assert!(TraceParent::parse(out.as_bytes()).is_ok());
    }

    proptest! {
        #[test]
        fn ids_are_lowercase_hex_of_their_value(v in any::<u64>()) {
            let mut out = [0u8; 16];
            hex_into(&mut out, v);
            let want = format!("{v:016x}");
            prop_assert_eq!(&out[..], want.as_bytes());
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = TraceParent::parse(&bytes);
            let sane = is_sane_request_id(&bytes);
            prop_assert_eq!(sane, !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| (0x21..=0x7e).contains(b)));
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let id = request_id(Some(&v));
                prop_assert!(is_sane_request_id(id.as_bytes()));
                let (tp, _) = next_traceparent(Some(&v));
                prop_assert!(TraceParent::parse(tp.as_bytes()).is_ok());
            }
        }

        #[test]
        fn valid_traceparents_round_trip(t in "[0-9a-f]{32}", p in "[0-9a-f]{16}", f in "[0-9a-f]{2}") {
            prop_assume!(t.bytes().any(|b| b != b'0') && p.bytes().any(|b| b != b'0'));
            let s = format!("00-{t}-{p}-{f}");
            let tp = TraceParent::parse(s.as_bytes()).unwrap();
            prop_assert_eq!(&tp.trace_id[..], t.as_bytes());
            let (out, continued) = next_traceparent(Some(&HeaderValue::from_str(&s).unwrap()));
            prop_assert!(continued);
            prop_assert_eq!(&out.as_bytes()[3..35], t.as_bytes());
        }
    }
}
