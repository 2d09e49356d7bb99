//! W3C Trace Context (`traceparent`) and request ids: the pure logic the
//! gateway's proxy, services (`switchboard-service`) and the bus's
//! correlation middleware share.
//!
//! Everything works on bytes and returns fixed-size arrays: the gateway
//! calls it once or twice per proxied request and wraps the bytes in a
//! header value without another allocation. Random ids come from a
//! per-thread wyrand generator seeded once from the OS-seeded `RandomState`:
//! a syscall per id (what `Uuid::new_v4` costs) would be a measurable share
//! of a proxied request.
//!
//! ```
//! use switchboard_bus::trace::TraceParent;
//!
//! let incoming = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
//! let next = TraceParent::continue_or_start(Some(incoming));
//! let out = next.to_bytes();
//! assert_eq!(&out[..36], &incoming[..36]); // same trace
//! assert_ne!(&out[36..52], &incoming[36..52]); // a new span for this hop
//! ```

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

/// Longest request id kept from a client, in bytes.
pub const MAX_REQUEST_ID: usize = 128;

/// Length of a version-00 `traceparent`.
pub const TRACEPARENT_LEN: usize = 55;

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x9e37_79b9_7f4a_7c15);
        h.finish() | 1
    });
}

/// A fast, non-cryptographic random `u64` (wyrand, per thread).
#[inline]
pub fn random_u64() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A random `u64` other than zero (W3C ids must not be all zeros).
#[inline]
fn random_nonzero() -> u64 {
    random_u64().max(1)
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

/// `v` as 16 lowercase hex digits, a byte at a time.
#[inline]
pub fn hex_u64(out: &mut [u8; 16], v: u64) {
    for (i, pair) in out.chunks_exact_mut(2).rev().enumerate() {
        pair.copy_from_slice(&HEX2[usize::from((v >> (8 * i)) as u8)]);
    }
}

/// True when `v` is a request id worth keeping: 1 to [`MAX_REQUEST_ID`]
/// visible ASCII characters (`0x21..=0x7e`).
#[inline]
pub fn is_sane_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.iter().all(u8::is_ascii_graphic)
}

/// A fresh id: 32 lowercase hex digits (128 random bits).
#[inline]
pub fn new_id() -> [u8; 32] {
    let mut out = [0u8; 32];
    let (hi, lo) = out.split_at_mut(16);
    hex_u64(hi.try_into().expect("16 bytes"), random_u64());
    hex_u64(lo.try_into().expect("16 bytes"), random_u64());
    out
}

/// A `traceparent`'s fields as lowercase hex digits: what a hop keeps to
/// continue the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: [u8; 32],
    /// 16 lowercase hex digits of the caller's span, not all zero.
    pub parent_id: [u8; 16],
    /// Two lowercase hex digits of flags (`01`: sampled).
    pub flags: [u8; 2],
}

/// Why a `traceparent` was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// Not `version-traceid-parentid-flags` with the right lengths, or not
    /// lowercase hex.
    #[error("malformed traceparent")]
    Malformed,
    /// Version `ff` is forbidden.
    #[error("invalid traceparent version")]
    Version,
    /// A trace id or parent id of all zeros.
    #[error("all-zero trace or parent id")]
    Zero,
}

#[inline]
fn is_lower_hex(s: &[u8]) -> bool {
    s.iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

impl TraceParent {
    /// Parses a `traceparent` per W3C Trace Context level 1: version `00`
    /// is exactly 55 bytes; a later version is read by its first four
    /// fields (what follows them must start with `-`). No whitespace.
    pub fn parse(v: &[u8]) -> Result<TraceParent, TraceParentError> {
        if v.len() < TRACEPARENT_LEN || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
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
        if version == b"00" && v.len() != TRACEPARENT_LEN {
            return Err(TraceParentError::Malformed);
        }
        if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' {
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

    /// A new sampled trace: random trace and span ids.
    pub fn new_root() -> TraceParent {
        let mut tp = TraceParent {
            trace_id: [0; 32],
            parent_id: [0; 16],
            flags: *b"01",
        };
        let (hi, lo) = tp.trace_id.split_at_mut(16);
        hex_u64(hi.try_into().expect("16 bytes"), random_u64());
        hex_u64(lo.try_into().expect("16 bytes"), random_nonzero());
        hex_u64(&mut tp.parent_id, random_nonzero());
        tp
    }

    /// The same trace and flags with `span` as the span id (zero becomes one).
    #[must_use]
    pub fn with_span(&self, span: u64) -> TraceParent {
        let mut child = *self;
        hex_u64(&mut child.parent_id, span.max(1));
        child
    }

    /// The same trace and flags with a new random span id: what a hop sends on.
    #[must_use]
    pub fn child(&self) -> TraceParent {
        self.with_span(random_nonzero())
    }

    /// What a hop sends on for an incoming header: its trace continued with
    /// a new span id, or a new trace when it is missing or invalid.
    pub fn continue_or_start(incoming: Option<&[u8]>) -> TraceParent {
        match incoming.map(TraceParent::parse) {
            Some(Ok(tp)) => tp.child(),
            _ => TraceParent::new_root(),
        }
    }

    /// The header value, version `00` (a later version received is sent on
    /// as `00`, the version this code knows).
    #[inline]
    pub fn to_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        out[3..35].copy_from_slice(&self.trace_id);
        out[36..52].copy_from_slice(&self.parent_id);
        out[53..55].copy_from_slice(&self.flags);
        out
    }

    /// The trace id as text.
    pub fn trace_id_str(&self) -> &str {
        std::str::from_utf8(&self.trace_id).expect("parsed or generated as hex")
    }

    /// The span id as text.
    pub fn parent_id_str(&self) -> &str {
        std::str::from_utf8(&self.parent_id).expect("parsed or generated as hex")
    }
}

/// True for a `traceparent` as events carry it: exactly the 55 bytes of
/// `VV-<32 hex>-<16 hex>-<2 hex>`, lowercase, version not `ff`, ids not all
/// zero.
pub fn is_traceparent(s: &[u8]) -> bool {
    s.len() == TRACEPARENT_LEN && TraceParent::parse(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn request_ids_are_visible_ascii_up_to_128_bytes() {
        assert!(is_sane_request_id(b"abc-123"));
        assert!(is_sane_request_id("a".repeat(128).as_bytes()));
        assert!(!is_sane_request_id("a".repeat(129).as_bytes()));
        assert!(!is_sane_request_id(b""));
        assert!(!is_sane_request_id(b"has space"));
        assert!(!is_sane_request_id(b"tab\there"));
        assert!(!is_sane_request_id("caf\u{e9}".as_bytes()));
        let id = new_id();
        assert!(is_lower_hex(&id));
        assert_ne!(new_id(), id);
    }

    #[test]
    fn traceparents_follow_the_spec() {
        let tp = TraceParent::parse(GOOD).unwrap();
        assert_eq!(&tp.to_bytes()[..], GOOD);
        assert_eq!(tp.trace_id_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id_str(), "00f067aa0ba902b7");
        for (bad, why) in [
            (&b""[..], TraceParentError::Malformed),
            (
                b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                TraceParentError::Zero,
            ),
            (
                b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                TraceParentError::Zero,
            ),
            (
                b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::Version,
            ),
            (
                b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                TraceParentError::Malformed,
            ),
            (
                b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                TraceParentError::Malformed,
            ),
            (
                b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                TraceParentError::Malformed,
            ),
            (
                b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::Malformed,
            ),
        ] {
            assert_eq!(
                TraceParent::parse(bad),
                Err(why),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may append fields; it is sent on as version 00.
        let v1 = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        let tp = TraceParent::parse(v1).unwrap();
        assert_eq!(&tp.to_bytes()[..], GOOD);
        assert!(!is_traceparent(v1), "events carry the 55-byte form only");
        assert!(is_traceparent(GOOD));
        assert!(is_traceparent(&v1[..55]));
    }

    #[test]
    fn children_keep_the_trace_and_roots_are_valid() {
        let parent = TraceParent::parse(GOOD).unwrap();
        let child = TraceParent::continue_or_start(Some(GOOD));
        assert_eq!(
            (child.trace_id, child.flags),
            (parent.trace_id, parent.flags)
        );
        assert_ne!(child.parent_id, parent.parent_id);
        assert_eq!(parent.with_span(0).parent_id_str(), "0000000000000001");
        for incoming in [None, Some(&b"junk"[..])] {
            let root = TraceParent::continue_or_start(incoming);
            assert_eq!(TraceParent::parse(&root.to_bytes()), Ok(root));
            assert_eq!(&root.flags, b"01");
        }
        assert_ne!(TraceParent::new_root(), TraceParent::new_root());
    }

    proptest! {
        #[test]
        fn hex_is_the_value(v in any::<u64>()) {
            let mut out = [0u8; 16];
            hex_u64(&mut out, v);
            let want = format!("{v:016x}");
            prop_assert_eq!(&out[..], want.as_bytes());
        }

        /// Any bytes: a verdict, never a panic; whatever goes on parses.
        #[test]
        fn any_input_yields_a_valid_next_hop(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = TraceParent::parse(&bytes);
            prop_assert_eq!(
                is_sane_request_id(&bytes),
                !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
            );
            let next = TraceParent::continue_or_start(Some(&bytes)).to_bytes();
            prop_assert!(is_traceparent(&next));
        }

        #[test]
        fn valid_traceparents_round_trip(t in "[0-9a-f]{32}", p in "[0-9a-f]{16}", f in "[0-9a-f]{2}") {
            prop_assume!(t.bytes().any(|b| b != b'0') && p.bytes().any(|b| b != b'0'));
            let s = format!("00-{t}-{p}-{f}");
            let tp = TraceParent::parse(s.as_bytes()).unwrap();
            prop_assert_eq!(&tp.to_bytes()[..], s.as_bytes());
            let child = TraceParent::continue_or_start(Some(s.as_bytes())).to_bytes();
            prop_assert_eq!(&child[..36], &s.as_bytes()[..36]);
            prop_assert_eq!(&child[52..], &s.as_bytes()[52..]);
        }
    }
}
