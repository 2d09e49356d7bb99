//! The CloudEvents HTTP protocol binding 1.0: structured mode
//! (`application/cloudevents+json`), binary mode (`ce-*` headers, the body is
//! the data, `Content-Type` is `datacontenttype`) and batch mode
//! (`application/cloudevents-batch+json`), read into and written from the
//! bus's [`Event`]. The JSON of structured and batch mode is the bus's own
//! codec ([`switchboard_bus::codec`]); this module only adds the HTTP framing.
//!
//! Binary-mode header values are percent-encoded as the binding requires
//! (space, `"`, `%` and everything outside printable ASCII), with the
//! `percent-encoding` crate rather than by hand.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode, utf8_percent_encode};
use switchboard_bus::codec::{self, DecodeError};
use switchboard_bus::event::SPEC_VERSION;
use switchboard_bus::{BuildError, Data, Event};

/// The structured-mode media type.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// The batch-mode media type.
pub const BATCH: &str = "application/cloudevents-batch+json";

const CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
const CE_ID: HeaderName = HeaderName::from_static("ce-id");
const CE_SOURCE: HeaderName = HeaderName::from_static("ce-source");
const CE_TYPE: HeaderName = HeaderName::from_static("ce-type");
const CE_TIME: HeaderName = HeaderName::from_static("ce-time");
const CE_SUBJECT: HeaderName = HeaderName::from_static("ce-subject");
const CE_DATASCHEMA: HeaderName = HeaderName::from_static("ce-dataschema");

/// Characters a binary-mode header value must percent-encode (besides
/// non-ASCII, which is always encoded).
const HEADER_ENCODE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// How a request carried its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One event as a JSON document.
    Structured,
    /// One event: attributes in `ce-*` headers, data in the body.
    Binary,
    /// A JSON array of structured events.
    Batch,
}

impl Mode {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Structured => "structured",
            Mode::Binary => "binary",
            Mode::Batch => "batch",
        }
    }
}

/// Which HTTP answer a [`BindingError`] calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: a missing or bad attribute, or a body that does not parse.
    BadRequest,
    /// 415: neither a CloudEvents media type nor `ce-*` headers.
    UnsupportedMediaType,
}

/// Why a request does not carry valid CloudEvents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct BindingError {
    /// 400 or 415.
    pub kind: ErrorKind,
    /// The attribute at fault, when one is.
    pub attribute: Option<String>,
    /// The event's position in a batch.
    pub index: Option<usize>,
    /// What is wrong, naming the attribute (and batch index).
    pub detail: String,
}

impl BindingError {
    fn bad(attribute: Option<&str>, detail: String) -> Self {
        BindingError {
            kind: ErrorKind::BadRequest,
            attribute: attribute.map(str::to_owned),
            index: None,
            detail,
        }
    }

    fn missing(attribute: &str, mode: &str) -> Self {
        Self::bad(
            Some(attribute),
            format!("{mode}: missing required attribute `{attribute}`"),
        )
    }

    fn from_build(e: BuildError, mode: &str) -> Self {
        match e {
            BuildError::Missing(a) => Self::missing(a, mode),
            BuildError::Invalid { attribute, reason } => Self::bad(
                Some(&attribute),
                format!("{mode}: attribute `{attribute}`: {reason}"),
            ),
        }
    }

    fn from_decode(e: &DecodeError) -> Self {
        let attribute = match e {
            DecodeError::Syntax { .. } => None,
            DecodeError::Missing { attribute, .. }
            | DecodeError::Invalid { attribute, .. }
            | DecodeError::Duplicate { attribute, .. } => Some(attribute.as_str()),
        };
        Self::bad(attribute, e.to_string())
    }

    fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self.detail = format!("events[{index}]: {}", self.detail);
        self
    }
}

/// The media type of a `Content-Type` value: lowercase, without parameters.
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let t = v.split(';').next().unwrap_or("").trim();
    (!t.is_empty()).then(|| t.to_ascii_lowercase())
}

/// Whether a media type carries JSON (`application/json`, `text/json`, `*/*+json`).
pub fn is_json(media: &str) -> bool {
    let m = media
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    m == "application/json" || m == "text/json" || m.ends_with("+json")
}

/// Reads the events of a publish request in whichever mode it uses.
pub fn parse(headers: &HeaderMap, body: &Bytes) -> Result<(Mode, Vec<Event>), BindingError> {
    match media_type(headers).as_deref() {
        Some(STRUCTURED) => Ok((Mode::Structured, vec![parse_structured(body)?])),
        Some(BATCH) => Ok((Mode::Batch, parse_batch(body)?)),
        _ if headers.keys().any(|k| k.as_str().starts_with("ce-")) => {
            Ok((Mode::Binary, vec![parse_binary(headers, body)?]))
        }
        other => Err(BindingError {
            kind: ErrorKind::UnsupportedMediaType,
            attribute: None,
            index: None,
            detail: format!(
                "content type {} is not a CloudEvent: send {STRUCTURED}, {BATCH}, \
                 or binary mode (ce-specversion, ce-id, ce-source, ce-type headers)",
                other.map_or_else(|| "(none)".to_owned(), |t| format!("`{t}`"))
            ),
        }),
    }
}

/// Structured mode: the body is one event in JSON.
pub fn parse_structured(body: &[u8]) -> Result<Event, BindingError> {
    codec::decode(body).map_err(|e| BindingError::from_decode(&e))
}

/// Batch mode: the body is a JSON array of structured events.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Event>, BindingError> {
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body)
        .map_err(|e| BindingError::bad(None, format!("batch: not a JSON array of events: {e}")))?;
    items
        .iter()
        .enumerate()
        .map(|(i, raw)| parse_structured(raw.get().as_bytes()).map_err(|e| e.at(i)))
        .collect()
}

fn header_text(attribute: &str, value: &HeaderValue) -> Result<String, BindingError> {
    percent_decode(value.as_bytes())
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| {
            BindingError::bad(
                Some(attribute),
                format!("binary mode: header `ce-{attribute}` is not UTF-8 after percent-decoding"),
            )
        })
}

/// Binary mode: attributes from `ce-*` headers (percent-decoded), data from
/// the body, `datacontenttype` from `Content-Type`. A JSON content type makes
/// the data JSON (checked); any other makes it bytes.
pub fn parse_binary(headers: &HeaderMap, body: &Bytes) -> Result<Event, BindingError> {
    const MODE: &str = "binary mode";
    let mut b = Event::builder();
    let (mut spec, mut id, mut time, mut ce_content_type) = (None, false, false, None);
    let mut seen: Vec<&str> = Vec::new();
    for name in headers.keys() {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(BindingError::bad(
                Some(attr),
                format!("{MODE}: header `ce-{attr}` appears more than once"),
            ));
        };
        if seen.contains(&attr) {
            continue;
        }
        seen.push(attr);
        let v = header_text(attr, value)?;
        b = match attr {
            "specversion" => {
                spec = Some(v);
                b
            }
            "id" => {
                id = true;
                b.id(v)
            }
            "source" => b.source(v),
            "type" => b.ty(v),
            "time" => {
                time = true;
                b.time(Some(v))
            }
            "subject" => b.subject(v),
            "dataschema" => b.dataschema(v),
            "datacontenttype" => {
                ce_content_type = Some(v);
                b
            }
            "data" | "data_base64" => {
                return Err(BindingError::bad(
                    Some(attr),
                    format!("{MODE}: `{attr}` is the body, not a `ce-{attr}` header"),
                ));
            }
            ext => b.extension(ext, v),
        };
    }
    match spec.as_deref() {
        None => return Err(BindingError::missing("specversion", MODE)),
        Some(SPEC_VERSION) => {}
        Some(other) => {
            return Err(BindingError::bad(
                Some("specversion"),
                format!(
                    "{MODE}: attribute `specversion`: unsupported version {other:?} (expected \"1.0\")"
                ),
            ));
        }
    }
    if !id {
        return Err(BindingError::missing("id", MODE));
    }
    if !time {
        // Binary mode without `ce-time`: keep the event as sent.
        b = b.time(None);
    }
    let content_type = match headers.get(CONTENT_TYPE) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    BindingError::bad(
                        Some("datacontenttype"),
                        format!("{MODE}: attribute `datacontenttype`: the Content-Type header is not visible ASCII"),
                    )
                })?
                .to_owned(),
        ),
        None => ce_content_type,
    };
    if let Some(ct) = &content_type {
        b = b.datacontenttype(ct.clone());
    }
    if !body.is_empty() {
        b = match &content_type {
            Some(ct) if is_json(ct) => match String::from_utf8(body.to_vec()) {
                Ok(text) => b.data_json_text(text),
                Err(_) => {
                    return Err(BindingError::bad(
                        Some("data"),
                        format!(
                            "{MODE}: attribute `data`: content type `{ct}` but the body is not UTF-8"
                        ),
                    ));
                }
            },
            _ => b.data_binary(body.to_vec()),
        };
    }
    b.build().map_err(|e| BindingError::from_build(e, MODE))
}

/// A header value in binary mode: percent-encoded where the binding requires.
pub fn encode_header_value(text: &str) -> HeaderValue {
    // Most values need no encoding: copy them once instead of twice.
    if text
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'%')
        && let Ok(v) = HeaderValue::from_str(text)
    {
        return v;
    }
    let encoded = utf8_percent_encode(text, HEADER_ENCODE).to_string();
    // Percent-encoding leaves only visible ASCII, always a valid header value.
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// An extension value as header text (binary mode carries every type as a string).
fn extension_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Renders `event` in binary mode: `ce-*` headers, `Content-Type` and the body.
/// JSON data is sent as its JSON text, except that a JSON string under a
/// non-JSON content type (`text/plain` data from structured mode) is sent as
/// the string itself; binary data is sent as its bytes.
pub fn render_binary(event: &Event, headers: &mut HeaderMap) -> Bytes {
    // The standard attributes' header names are constants; only extensions
    // need theirs built.
    headers.insert(CE_SPECVERSION, HeaderValue::from_static(SPEC_VERSION));
    headers.insert(CE_ID, encode_header_value(event.id()));
    headers.insert(CE_SOURCE, encode_header_value(event.source()));
    headers.insert(CE_TYPE, encode_header_value(event.ty()));
    if let Some(t) = event.time() {
        headers.insert(CE_TIME, encode_header_value(t));
    }
    if let Some(s) = event.subject() {
        headers.insert(CE_SUBJECT, encode_header_value(s));
    }
    if let Some(s) = event.dataschema() {
        headers.insert(CE_DATASCHEMA, encode_header_value(s));
    }
    for (name, value) in event.extensions() {
        if let Ok(n) = HeaderName::from_bytes(format!("ce-{name}").as_bytes()) {
            headers.insert(n, encode_header_value(&extension_text(value)));
        }
    }
    let content_type = event
        .datacontenttype()
        .map(str::to_owned)
        .or_else(|| matches!(event.data(), Some(Data::Json(_))).then(|| "application/json".into()));
    if let Some(ct) = &content_type {
        let v = HeaderValue::from_str(ct)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
        headers.insert(CONTENT_TYPE, v);
    }
    match event.data() {
        None => Bytes::new(),
        Some(Data::Binary(b)) => Bytes::copy_from_slice(b),
        Some(Data::Json(raw)) => {
            let json_type = content_type.as_deref().is_none_or(is_json);
            if !json_type && let Ok(s) = serde_json::from_str::<String>(raw.get()) {
                Bytes::from(s)
            } else {
                Bytes::copy_from_slice(raw.get().as_bytes())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const MIN: [(&str, &str); 4] = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "/s"),
        ("ce-type", "t.x"),
    ];

    #[test]
    fn binary_mode_reads_attributes_and_data() {
        let mut pairs = MIN.to_vec();
        pairs.push(("content-type", "application/json; charset=utf-8"));
        pairs.push(("ce-correlationid", "c%201"));
        pairs.push(("ce-subject", "caf%C3%A9"));
        let e = parse_binary(&headers(&pairs), &Bytes::from_static(b"{\"a\":1}")).unwrap();
        assert_eq!((e.id(), e.source(), e.ty()), ("1", "/s", "t.x"));
        assert_eq!(e.correlation_id(), Some("c 1"));
        assert_eq!(e.subject(), Some("café"));
        assert_eq!(e.time(), None, "no ce-time: none added");
        assert_eq!(e.data_as::<serde_json::Value>().unwrap()["a"], 1);
        let e = parse_binary(
            &headers(&[MIN.as_slice(), &[("content-type", "text/plain")]].concat()),
            &Bytes::from_static(b"hi"),
        )
        .unwrap();
        assert_eq!(e.data(), Some(&Data::Binary(b"hi".to_vec())));
    }

    #[test]
    fn binary_mode_names_what_is_wrong() {
        let err = |pairs: &[(&str, &str)], body: &'static [u8]| {
            parse_binary(&headers(pairs), &Bytes::from_static(body)).unwrap_err()
        };
        for missing in ["specversion", "id", "source", "type"] {
            let pairs: Vec<_> = MIN
                .iter()
                .copied()
                .filter(|(k, _)| *k != format!("ce-{missing}"))
                .collect();
            let e = err(&pairs, b"");
            assert_eq!(e.attribute.as_deref(), Some(missing), "{e}");
            assert!(e.detail.contains(&format!("`{missing}`")), "{e}");
        }
        let mut bad = MIN.to_vec();
        bad[0] = ("ce-specversion", "0.3");
        assert_eq!(err(&bad, b"").attribute.as_deref(), Some("specversion"));
        let with = |extra: (&'static str, &'static str)| {
            let mut p = MIN.to_vec();
            p.push(extra);
            p
        };
        let e = err(&with(("ce-traceparent", "nope")), b"");
        assert_eq!(e.attribute.as_deref(), Some("traceparent"));
        let e = err(&with(("ce-time", "yesterday")), b"");
        assert_eq!(e.attribute.as_deref(), Some("time"));
        let e = err(&with(("content-type", "application/json")), b"{nope");
        assert_eq!(e.attribute.as_deref(), Some("data"));
        let e = err(&with(("ce-bad-name", "x")), b"");
        assert_eq!(e.attribute.as_deref(), Some("bad-name"));
        let e = err(&with(("ce-id", "2")), b"");
        assert!(e.detail.contains("more than once"), "{e}");
    }

    #[test]
    fn modes_and_unsupported_media_types() {
        let s = Bytes::from_static(br#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#);
        let h = headers(&[(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )]);
        assert_eq!(parse(&h, &s).unwrap().0, Mode::Structured);
        let batch = Bytes::from(format!(
            "[{}, {}]",
            std::str::from_utf8(&s).unwrap(),
            std::str::from_utf8(&s).unwrap()
        ));
        let h = headers(&[("content-type", BATCH)]);
        assert_eq!(parse(&h, &batch).unwrap().1.len(), 2);
        let bad_batch = Bytes::from_static(br#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},{"specversion":"1.0","id":"2","type":"t"}]"#);
        let e = parse(&h, &bad_batch).unwrap_err();
        assert_eq!((e.index, e.attribute.as_deref()), (Some(1), Some("source")));
        assert!(e.detail.starts_with("events[1]: "), "{e}");
        let e = parse(&headers(&[("content-type", "application/json")]), &s).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedMediaType);
        let e = parse(&HeaderMap::new(), &s).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedMediaType);
    }

    #[test]
    fn render_sends_text_data_as_text() {
        let e = Event::builder()
            .source("/s")
            .ty("t")
            .datacontenttype("text/plain")
            .data("hello world")
            .build()
            .unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(&render_binary(&e, &mut h)[..], b"hello world");
        assert_eq!(h[CONTENT_TYPE], "text/plain");
    }

    fn text() -> impl Strategy<Value = String> {
        "\\PC{1,24}"
    }

    proptest! {
        /// Whatever `ce-*` headers and body arrive, the parser returns an event
        /// or an error naming an attribute; it never panics.
        #[test]
        fn binary_parser_is_total(
            pairs in proptest::collection::vec(("[a-z0-9-]{0,12}", proptest::collection::vec(32u8..255, 0..40)), 0..8),
            keep_min in any::<bool>(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            json in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            if keep_min {
                for (k, v) in MIN { h.insert(HeaderName::from_static(k), HeaderValue::from_static(v)); }
            }
            for (k, v) in &pairs {
                let (Ok(n), Ok(v)) = (HeaderName::from_bytes(format!("ce-{k}").as_bytes()), HeaderValue::from_bytes(v)) else { continue };
                h.append(n, v);
            }
            if json { h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json")); }
            match parse_binary(&h, &Bytes::from(body)) {
                Ok(e) => prop_assert!(!e.id().is_empty() && !e.source().is_empty() && !e.ty().is_empty()),
                Err(e) => prop_assert!(!e.detail.is_empty()),
            }
        }

        /// Rendering in binary mode and parsing back gives the same event,
        /// for any text in any attribute (percent-encoding round-trips).
        #[test]
        fn binary_render_parse_round_trips(
            id in text(), source in "[!-~]{1,20}", ty in "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}",
            subject in proptest::option::of(text()),
            ext in proptest::collection::btree_map("[a-z][a-z0-9]{0,8}", text(), 0..4),
            data in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..64)),
            json in proptest::option::of(any::<i64>()),
        ) {
            let mut b = Event::builder().id(id).source(source).ty(ty);
            if let Some(s) = subject { b = b.subject(s); }
            for (k, v) in ext {
                if matches!(k.as_str(), "traceparent" | "specversion" | "id" | "source" | "type" | "time" | "subject" | "dataschema" | "datacontenttype" | "data") { continue; }
                b = b.extension(k, v);
            }
            b = match (json, data) {
                (Some(n), _) => b.data(&serde_json::json!({"n": n})),
                (None, Some(d)) => b.datacontenttype("application/octet-stream").data_binary(d),
                (None, None) => b,
            };
            let e = b.build().unwrap();
            let mut h = HeaderMap::new();
            let body = render_binary(&e, &mut h);
            let back = parse_binary(&h, &body).unwrap();
            prop_assert_eq!(back, e);
        }
    }
}
