//! Correlation headers: `x-request-id` and W3C `traceparent` as header
//! values, over the byte-level logic in [`switchboard_bus::trace`] (shared
//! with services and the bus), and the cheap thread-local random numbers
//! the balancer and retries draw from.
//!
//! Nothing here allocates but the header value itself: the shared core
//! parses bytes and returns fixed-size arrays.

use http::HeaderValue;
use switchboard_bus::trace;

pub use switchboard_bus::trace::{
    MAX_REQUEST_ID, TraceParent, TraceParentError, is_sane_request_id, random_u64,
};

/// A random index below `n` (`n > 0`).
pub fn random_below(n: usize) -> usize {
    ((u128::from(random_u64()) * n as u128) >> 64) as usize
}

/// A fresh request id: 32 lowercase hex digits (128 random bits).
pub fn new_request_id() -> HeaderValue {
    crate::headers::new_value(&trace::new_id()).unwrap_or(HeaderValue::from_static("0"))
}

/// Returns the client's request id if sane, a new one otherwise.
pub fn request_id(incoming: Option<&HeaderValue>) -> HeaderValue {
    match incoming {
        Some(v) if is_sane_request_id(v.as_bytes()) => v.clone(),
        _ => new_request_id(),
    }
}

/// The `traceparent` to send upstream: the client's trace continued with a
/// new span id, or a new sampled trace when the client sent none (or junk).
/// Returns the header and whether the incoming one was continued.
pub fn next_traceparent(incoming: Option<&HeaderValue>) -> (HeaderValue, bool) {
    let parsed = incoming.and_then(|v| TraceParent::parse(v.as_bytes()).ok());
    let next = match &parsed {
        Some(tp) => tp.child(),
        None => TraceParent::new_root(),
    };
    (
        crate::headers::new_value(&next.to_bytes()).unwrap_or(HeaderValue::from_static("")),
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
