//! Wire formats: CloudEvents JSON structured mode and the plain envelope.
//!
//! - [`encode`] / [`decode`]: CloudEvents 1.0 JSON structured mode, what every
//!   durable backend stores.
//! - [`encode_plain`] / [`decode_plain`]: the `{id, timestamp, name, data, version}`
//!   envelope that simple Node.js event buses publish over Redis Pub/Sub
//!   (`name` is `type`, `timestamp` is `time`). Events we write in it also carry
//!   `source`, `traceparent` and `correlationid`, which such readers ignore.
//!
//! Decoders never panic: bad input gives a [`DecodeError`] that names the
//! attribute, or the line and column of a syntax error.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::event::{BuildError, Data, Event, EventInner, SPEC_VERSION, validate};

/// The `source` given to events decoded from the plain envelope, which has none.
pub const PLAIN_SOURCE: &str = "/plain";

/// Why bytes could not be decoded into an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a JSON object; the message names line and column.
    #[error("{format}: not a JSON object: {message}")]
    Syntax {
        /// Which format was expected (`cloudevents` or `plain envelope`).
        format: &'static str,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A required attribute is absent (or null).
    #[error("{format}: missing required attribute `{attribute}`")]
    Missing {
        /// Which format was expected.
        format: &'static str,
        /// The attribute's name.
        attribute: String,
    },
    /// An attribute is present with a value the format forbids.
    #[error("{format}: attribute `{attribute}`: {reason}")]
    Invalid {
        /// Which format was expected.
        format: &'static str,
        /// The attribute's name.
        attribute: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same attribute appears twice.
    #[error("{format}: attribute `{attribute}` appears twice")]
    Duplicate {
        /// Which format was expected.
        format: &'static str,
        /// The attribute's name.
        attribute: String,
    },
}

const CE: &str = "cloudevents";
const PLAIN: &str = "plain envelope";

impl DecodeError {
    fn from_build(format: &'static str, e: BuildError) -> Self {
        match e {
            BuildError::Missing(a) => DecodeError::Missing {
                format,
                attribute: a.to_owned(),
            },
            BuildError::Invalid { attribute, reason } => DecodeError::Invalid {
                format,
                attribute,
                reason,
            },
        }
    }
}

// ---------------------------------------------------------------------------
// CloudEvents JSON structured mode

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.inner();
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("specversion", SPEC_VERSION)?;
        m.serialize_entry("id", &e.id)?;
        m.serialize_entry("source", &e.source)?;
        m.serialize_entry("type", &e.ty)?;
        if let Some(t) = &e.time {
            m.serialize_entry("time", t)?;
        }
        if let Some(v) = &e.datacontenttype {
            m.serialize_entry("datacontenttype", v)?;
        }
        if let Some(v) = &e.dataschema {
            m.serialize_entry("dataschema", v)?;
        }
        if let Some(v) = &e.subject {
            m.serialize_entry("subject", v)?;
        }
        for (k, v) in &e.extensions {
            m.serialize_entry(k, v)?;
        }
        match &e.data {
            Some(Data::Json(raw)) => m.serialize_entry("data", raw)?,
            Some(Data::Binary(b)) => m.serialize_entry("data_base64", &base64_encode(b))?,
            None => {}
        }
        m.end()
    }
}

/// Encodes an event in CloudEvents JSON structured mode.
pub fn encode(event: &Event) -> Vec<u8> {
    // Serializing strings and raw JSON into a Vec cannot fail.
    serde_json::to_vec(event).unwrap_or_default()
}

/// Appends an event in CloudEvents JSON structured mode to `out` (publishers
/// reuse one buffer for a batch).
pub(crate) fn encode_into(event: &Event, out: &mut Vec<u8>) {
    // Serializing strings and raw JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, event);
}

/// A JSON object's members in order, each value left unparsed; names are
/// borrowed from the input unless they contain escapes.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// A member name, borrowed where the input allows (serde's own `Cow<str>`
/// always copies).
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<Name<'de>, &'de RawValue>()? {
                    out.push((k.0, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_members<'a>(format: &'static str, bytes: &'a [u8]) -> Result<Members<'a>, DecodeError> {
    let members: Members<'a> = serde_json::from_slice(bytes).map_err(|e| DecodeError::Syntax {
        format,
        message: e.to_string(),
    })?;
    let duplicate = if members.0.len() <= 16 {
        // An event has a dozen members: comparing pairs beats hashing.
        members
            .0
            .iter()
            .enumerate()
            .find(|(i, (k, _))| members.0[..*i].iter().any(|(seen, _)| seen == k))
            .map(|(_, (k, _))| k)
    } else {
        let mut seen = std::collections::HashSet::with_capacity(members.0.len());
        members
            .0
            .iter()
            .map(|(k, _)| k)
            .find(|&k| !seen.insert(k.as_ref()))
    };
    if let Some(k) = duplicate {
        return Err(DecodeError::Duplicate {
            format,
            attribute: k.to_string(),
        });
    }
    Ok(members)
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// Reads an optional string attribute (`null` counts as absent).
fn opt_string(
    format: &'static str,
    name: &str,
    raw: &RawValue,
) -> Result<Option<String>, DecodeError> {
    if is_null(raw) {
        return Ok(None);
    }
    // A valid JSON string without a backslash has no escapes: its text is the value.
    let text = raw.get();
    if text.len() >= 2 && text.starts_with('"') && text.ends_with('"') && !text.contains('\\') {
        return Ok(Some(text[1..text.len() - 1].to_owned()));
    }
    serde_json::from_str::<String>(text)
        .map(Some)
        .map_err(|_| DecodeError::Invalid {
            format,
            attribute: name.to_owned(),
            reason: format!("expected a string, found {}", preview(raw.get())),
        })
}

/// A short, single-line excerpt of a JSON value for error messages.
fn preview(text: &str) -> String {
    let mut s: String = text.chars().take(40).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s.replace('\n', " ")
}

/// Decodes CloudEvents 1.0 JSON structured mode.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let members = parse_members(CE, bytes)?;
    let mut e = empty_inner();
    let mut spec = None;
    let mut data_seen = false;
    for (name, raw) in members.0 {
        match name.as_ref() {
            "specversion" => spec = opt_string(CE, &name, raw)?,
            "id" => e.id = opt_string(CE, &name, raw)?.unwrap_or_default(),
            "source" => e.source = opt_string(CE, &name, raw)?.unwrap_or_default(),
            "type" => e.ty = opt_string(CE, &name, raw)?.unwrap_or_default(),
            "time" => e.time = opt_string(CE, &name, raw)?,
            "datacontenttype" => e.datacontenttype = opt_string(CE, &name, raw)?,
            "dataschema" => e.dataschema = opt_string(CE, &name, raw)?,
            "subject" => e.subject = opt_string(CE, &name, raw)?,
            "data" | "data_base64" => {
                if is_null(raw) {
                    continue;
                }
                if data_seen {
                    return Err(DecodeError::Invalid {
                        format: CE,
                        attribute: name.into_owned(),
                        reason: "`data` and `data_base64` are mutually exclusive".into(),
                    });
                }
                data_seen = true;
                e.data = Some(if name == "data" {
                    Data::Json(raw.to_owned())
                } else {
                    let text = opt_string(CE, &name, raw)?.unwrap_or_default();
                    Data::Binary(base64_decode(&text).map_err(|reason| DecodeError::Invalid {
                        format: CE,
                        attribute: name.into_owned(),
                        reason,
                    })?)
                });
            }
            _ => {
                if is_null(raw) {
                    continue;
                }
                let value: serde_json::Value =
                    serde_json::from_str(raw.get()).map_err(|err| DecodeError::Invalid {
                        format: CE,
                        attribute: name.to_string(),
                        reason: err.to_string(),
                    })?;
                e.extensions.insert(name.into_owned(), value);
            }
        }
    }
    match spec.as_deref() {
        None => {
            return Err(DecodeError::Missing {
                format: CE,
                attribute: "specversion".into(),
            });
        }
        Some(SPEC_VERSION) => {}
        Some(other) => {
            return Err(DecodeError::Invalid {
                format: CE,
                attribute: "specversion".into(),
                reason: format!("unsupported version {other:?} (expected \"1.0\")"),
            });
        }
    }
    validate(&e, true).map_err(|err| DecodeError::from_build(CE, err))?;
    Ok(Event::from_inner(e))
}

fn empty_inner() -> EventInner {
    EventInner {
        id: String::new(),
        source: String::new(),
        ty: String::new(),
        time: None,
        datacontenttype: None,
        dataschema: None,
        subject: None,
        data: None,
        extensions: BTreeMap::new(),
    }
}

// ---------------------------------------------------------------------------
// Plain envelope {id, timestamp, name, data, version}

/// Encodes an event as the plain envelope `{id, timestamp, name, data, version}`
/// (plus `source`, `traceparent` and `correlationid` when set).
pub fn encode_plain(event: &Event) -> Vec<u8> {
    struct Plain<'a>(&'a Event);
    impl Serialize for Plain<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let e = self.0;
            let mut m = s.serialize_map(None)?;
            m.serialize_entry("id", e.id())?;
            let now;
            let time = match e.time() {
                Some(t) => t,
                None => {
                    now = crate::event::now_rfc3339();
                    &now
                }
            };
            m.serialize_entry("timestamp", time)?;
            m.serialize_entry("name", e.ty())?;
            match e.data() {
                Some(Data::Json(raw)) => m.serialize_entry("data", raw)?,
                Some(Data::Binary(b)) => m.serialize_entry("data", &base64_encode(b))?,
                None => m.serialize_entry("data", &())?,
            }
            let version = e.extension("version").cloned();
            m.serialize_entry("version", &version.unwrap_or_else(|| "1.0".into()))?;
            if e.source() != PLAIN_SOURCE {
                m.serialize_entry("source", e.source())?;
            }
            for (k, v) in e.extensions() {
                if k != "version" {
                    m.serialize_entry(k, v)?;
                }
            }
            m.end()
        }
    }
    serde_json::to_vec(&Plain(event)).unwrap_or_default()
}

/// Decodes the plain envelope; `source` defaults to [`PLAIN_SOURCE`] and
/// `version` becomes an extension attribute.
pub fn decode_plain(bytes: &[u8]) -> Result<Event, DecodeError> {
    let members = parse_members(PLAIN, bytes)?;
    let mut e = empty_inner();
    e.source = PLAIN_SOURCE.to_owned();
    for (name, raw) in members.0 {
        match name.as_ref() {
            "id" => {
                // Some buses use numeric ids; keep their text.
                e.id = if raw.get().starts_with('"') {
                    opt_string(PLAIN, &name, raw)?.unwrap_or_default()
                } else if raw.get().bytes().all(|b| b.is_ascii_digit()) {
                    raw.get().to_owned()
                } else {
                    return Err(DecodeError::Invalid {
                        format: PLAIN,
                        attribute: name.into_owned(),
                        reason: format!("expected a string, found {}", preview(raw.get())),
                    });
                };
            }
            "timestamp" => e.time = opt_string(PLAIN, &name, raw)?,
            "name" => e.ty = opt_string(PLAIN, &name, raw)?.unwrap_or_default(),
            "source" => {
                e.source = opt_string(PLAIN, &name, raw)?.unwrap_or_else(|| PLAIN_SOURCE.into());
            }
            "data" => {
                if !is_null(raw) {
                    e.data = Some(Data::Json(raw.to_owned()));
                    e.datacontenttype = Some(crate::event::JSON_CONTENT_TYPE.to_owned());
                }
            }
            _ => {
                if is_null(raw) {
                    continue;
                }
                let value: serde_json::Value =
                    serde_json::from_str(raw.get()).map_err(|err| DecodeError::Invalid {
                        format: PLAIN,
                        attribute: name.to_string(),
                        reason: err.to_string(),
                    })?;
                // Foreign extras that are not valid CloudEvents extensions are dropped
                // rather than failing the whole event.
                if crate::event::validate_extension(&name, &value).is_ok() {
                    e.extensions.insert(name.into_owned(), value);
                }
            }
        }
    }
    if e.id.is_empty() {
        return Err(DecodeError::Missing {
            format: PLAIN,
            attribute: "id".into(),
        });
    }
    if e.ty.is_empty() {
        return Err(DecodeError::Missing {
            format: PLAIN,
            attribute: "name".into(),
        });
    }
    if let Some(t) = &e.time
        && !crate::event::is_rfc3339(t)
    {
        return Err(DecodeError::Invalid {
            format: PLAIN,
            attribute: "timestamp".into(),
            reason: format!("{t:?} is not an RFC 3339 timestamp"),
        });
    }
    validate(&e, true).map_err(|err| DecodeError::from_build(PLAIN, err))?;
    Ok(Event::from_inner(e))
}

// ---------------------------------------------------------------------------
// base64 (standard alphabet, padded), for `data_base64`

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let b = text.as_bytes();
    if !b.len().is_multiple_of(4) {
        return Err(format!("base64 length {} is not a multiple of 4", b.len()));
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (ci, chunk) in b.chunks(4).enumerate() {
        let last = ci == b.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err(format!("misplaced padding at offset {}", ci * 4));
        }
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' if i >= 4 - pad => 0,
                _ => return Err(format!("invalid base64 character at offset {}", ci * 4 + i)),
            };
            n = (n << 6) | u32::from(v);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Event {
        Event::builder()
            .source("/orders")
            .ty("order.created")
            .subject("42")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .correlation_id("req-1")
            .data(&serde_json::json!({"order_id": 42, "items": [1, 2]}))
            .build()
            .unwrap()
    }

    #[test]
    fn cloudevents_round_trip() {
        let e = sample();
        let bytes = encode(&e);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with(r#"{"specversion":"1.0","id":"#), "{text}");
        assert_eq!(decode(&bytes).unwrap(), e);
    }

    #[test]
    fn binary_data_uses_data_base64() {
        let e = Event::builder()
            .source("/s")
            .ty("t")
            .data_binary(vec![0u8, 1, 2, 250, 255])
            .build()
            .unwrap();
        let bytes = encode(&e);
        assert!(
            std::str::from_utf8(&bytes)
                .unwrap()
                .contains("\"data_base64\":\"AAEC+v8=\"")
        );
        assert_eq!(decode(&bytes).unwrap(), e);
    }

    #[test]
    fn decode_names_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("", "line 1 column 0"),
            ("[1]", "not a JSON object"),
            (r#"{"id":"1","source":"/s","type":"t"}"#, "`specversion`"),
            (
                r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
                "unsupported version",
            ),
            (
                r#"{"specversion":"1.0","source":"/s","type":"t"}"#,
                "missing required attribute `id`",
            ),
            (
                r#"{"specversion":"1.0","id":1,"source":"/s","type":"t"}"#,
                "attribute `id`: expected a string",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}"#,
                "attribute `time`",
            ),
            (
                r#"{"specversion":"1.0","id":"1","id":"2","source":"/s","type":"t"}"#,
                "`id` appears twice",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Ext":"x"}"#,
                "attribute `Ext`",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
                "mutually exclusive",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"A$=="}"#,
                "offset 1",
            ),
        ];
        for (input, want) in cases {
            let err = decode(input.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{input}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn plain_envelope_from_node_bus() {
        let text = r#"{"id":"1700000000000-abc123def","timestamp":"2024-01-02T03:04:05.678Z","name":"payment.completed","data":{"orderId":"o1","paymentId":"p1"},"version":"1.0"}"#;
        let e = decode_plain(text.as_bytes()).unwrap();
        assert_eq!(e.ty(), "payment.completed");
        assert_eq!(e.id(), "1700000000000-abc123def");
        assert_eq!(e.time(), Some("2024-01-02T03:04:05.678Z"));
        assert_eq!(e.source(), PLAIN_SOURCE);
        assert_eq!(e.extension_str("version"), Some("1.0"));
        let back: serde_json::Value = serde_json::from_slice(&encode_plain(&e)).unwrap();
        let orig: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn plain_envelope_round_trips_our_events() {
        let e = sample();
        let back = decode_plain(&encode_plain(&e)).unwrap();
        assert_eq!(back.id(), e.id());
        assert_eq!(back.source(), e.source());
        assert_eq!(back.ty(), e.ty());
        assert_eq!(back.traceparent(), e.traceparent());
        assert_eq!(back.correlation_id(), e.correlation_id());
        assert_eq!(back.data(), e.data());
    }

    #[test]
    fn plain_decode_names_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("{", "plain envelope: not a JSON object"),
            (r#"{"timestamp":"2024-01-02T03:04:05Z","name":"x"}"#, "`id`"),
            (r#"{"id":"1","data":{}}"#, "`name`"),
            (
                r#"{"id":"1","name":"x","timestamp":"noon"}"#,
                "attribute `timestamp`",
            ),
            (r#"{"id":{"a":1},"name":"x"}"#, "attribute `id`"),
        ];
        for (input, want) in cases {
            let err = decode_plain(input.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{input}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn base64_round_trip_edges() {
        for len in 0..10 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        }
        assert!(base64_decode("abc").is_err());
        assert!(base64_decode("a=bc").is_err());
        assert!(base64_decode("ab==ab==").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decoders_never_panic_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let _ = decode_plain(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_mutated_events(cut in 0usize..400, byte in any::<u8>(), at in 0usize..400) {
            for mut bytes in [encode(&sample()), encode_plain(&sample())] {
                if at < bytes.len() { bytes[at] = byte; }
                bytes.truncate(cut.max(1));
                match decode(&bytes) {
                    Ok(e) => prop_assert!(!e.id().is_empty() && !e.ty().is_empty()),
                    Err(err) => prop_assert!(!err.to_string().is_empty()),
                }
                if let Err(err) = decode_plain(&bytes) {
                    prop_assert!(err.to_string().starts_with("plain envelope:"));
                }
            }
        }

        #[test]
        fn any_valid_event_round_trips(
            id in "[a-zA-Z0-9-]{1,20}",
            ty in "[a-z.]{1,20}",
            data in proptest::collection::vec(any::<u8>(), 0..64),
            ext in "[a-z0-9]{1,10}",
            val in ".{0,20}",
            json in any::<bool>(),
        ) {
            let b = Event::builder().id(id).source("/p").ty(ty);
            let b = if json { b.data(&String::from_utf8_lossy(&data)) } else { b.data_binary(data) };
            let b = b.extension(format!("x{ext}"), val);
            let e = b.build().unwrap();
            prop_assert_eq!(decode(&encode(&e)).unwrap(), e);
        }

        /// String attributes with quotes, backslashes, control characters
        /// and non-ASCII text take the escaped path and still round-trip.
        #[test]
        fn strings_needing_escapes_round_trip(subject in "\\PC{1,20}", id in "[\"\\\\a-z\u{1}\u{e9}]{1,12}") {
            let e = Event::builder().id(id).source("/p").ty("t").subject(subject).build().unwrap();
            prop_assert_eq!(decode(&encode(&e)).unwrap(), e);
        }
    }

    #[test]
    fn escaped_member_names_are_read_and_deduplicated() {
        let e =
            decode(br#"{"specversion":"1.0","\u0069d":"a\"b","source":"/s","type":"t"}"#).unwrap();
        assert_eq!(e.id(), "a\"b");
        let dup =
            decode(br#"{"specversion":"1.0","id":"a","\u0069d":"b","source":"/s","type":"t"}"#);
        assert!(
            matches!(&dup, Err(DecodeError::Duplicate { attribute, .. }) if attribute == "id"),
            "{dup:?}"
        );
    }
}
