//! The CloudEvents 1.0 envelope and its builder.
//!
//! An [`Event`] is immutable and cheap to clone (one reference count): the bus
//! hands the same event to every handler of every group without copying it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::value::RawValue;

/// The only CloudEvents spec version this crate reads and writes.
pub const SPEC_VERSION: &str = "1.0";

/// The `datacontenttype` given to events whose data was set from a serializable value.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The name of the W3C trace context extension attribute.
pub const TRACEPARENT: &str = "traceparent";

/// The name of the correlation id extension attribute.
pub const CORRELATION_ID: &str = "correlationid";

/// The payload of an event.
#[derive(Debug, Clone)]
pub enum Data {
    /// A JSON value, kept as its text so that it is parsed only by the handler that wants it.
    Json(Box<RawValue>),
    /// Bytes, carried as `data_base64` in JSON structured mode.
    Binary(Vec<u8>),
}

impl PartialEq for Data {
    /// JSON payloads compare by value, not by their whitespace.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Data::Json(a), Data::Json(b)) => {
                a.get() == b.get()
                    || serde_json::from_str::<serde_json::Value>(a.get()).ok()
                        == serde_json::from_str::<serde_json::Value>(b.get()).ok()
            }
            (Data::Binary(a), Data::Binary(b)) => a == b,
            _ => false,
        }
    }
}

/// A CloudEvents 1.0 event.
///
/// Build one with [`Event::builder`]; read one with the accessors. `source` +
/// `id` identify an event: a consumer that saw the pair before may drop the
/// event (see [`crate::middleware::idempotency`]).
///
/// ```
/// use switchboard_bus::Event;
///
/// let event = Event::builder()
///     .source("/orders")
///     .ty("order.created")
///     .data(&serde_json::json!({"order_id": 42}))
///     .build()
///     .unwrap();
/// assert_eq!(event.ty(), "order.created");
/// let data: serde_json::Value = event.data_as().unwrap();
/// assert_eq!(data["order_id"], 42);
/// ```
#[derive(Clone, PartialEq)]
pub struct Event(Arc<EventInner>);

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EventInner {
    pub(crate) id: String,
    pub(crate) source: String,
    pub(crate) ty: String,
    pub(crate) time: Option<String>,
    pub(crate) datacontenttype: Option<String>,
    pub(crate) dataschema: Option<String>,
    pub(crate) subject: Option<String>,
    pub(crate) data: Option<Data>,
    /// Extension attributes (including `traceparent` and `correlationid`), each a
    /// string, boolean or integer.
    pub(crate) extensions: BTreeMap<String, serde_json::Value>,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("type", &self.0.ty)
            .field("source", &self.0.source)
            .field("id", &self.0.id)
            .field("time", &self.0.time)
            .field("extensions", &self.0.extensions)
            .field("data", &self.0.data)
            .finish()
    }
}

impl Event {
    /// Starts building an event; `source` and `type` are required, `id` defaults
    /// to a fresh UUIDv7 and `time` to now.
    pub fn builder() -> EventBuilder {
        EventBuilder::default()
    }

    pub(crate) fn from_inner(inner: EventInner) -> Self {
        Event(Arc::new(inner))
    }

    pub(crate) fn inner(&self) -> &EventInner {
        &self.0
    }

    /// A builder holding a copy of this event, to derive a changed one.
    pub fn to_builder(&self) -> EventBuilder {
        EventBuilder {
            inner: (*self.0).clone(),
            id_set: true,
            time_set: true,
            error: None,
        }
    }

    /// The `id` attribute.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The `source` attribute (a URI reference).
    pub fn source(&self) -> &str {
        &self.0.source
    }

    /// The `type` attribute; the bus uses it as the topic.
    pub fn ty(&self) -> &str {
        &self.0.ty
    }

    /// The `time` attribute, an RFC 3339 timestamp.
    pub fn time(&self) -> Option<&str> {
        self.0.time.as_deref()
    }

    /// The `datacontenttype` attribute.
    pub fn datacontenttype(&self) -> Option<&str> {
        self.0.datacontenttype.as_deref()
    }

    /// The `dataschema` attribute.
    pub fn dataschema(&self) -> Option<&str> {
        self.0.dataschema.as_deref()
    }

    /// The `subject` attribute.
    pub fn subject(&self) -> Option<&str> {
        self.0.subject.as_deref()
    }

    /// The payload, if any.
    pub fn data(&self) -> Option<&Data> {
        self.0.data.as_ref()
    }

    /// The JSON payload as text, if the payload is JSON.
    pub fn data_json(&self) -> Option<&str> {
        match &self.0.data {
            Some(Data::Json(raw)) => Some(raw.get()),
            _ => None,
        }
    }

    /// Deserializes the JSON payload; a missing payload deserializes as `null`.
    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match &self.0.data {
            Some(Data::Json(raw)) => serde_json::from_str(raw.get()),
            Some(Data::Binary(_)) => Err(serde::de::Error::custom(
                "event data is binary (data_base64), not JSON",
            )),
            None => serde_json::from_str("null"),
        }
    }

    /// The W3C `traceparent` extension.
    pub fn traceparent(&self) -> Option<&str> {
        self.extension_str(TRACEPARENT)
    }

    /// The `correlationid` extension.
    pub fn correlation_id(&self) -> Option<&str> {
        self.extension_str(CORRELATION_ID)
    }

    /// An extension attribute by name.
    pub fn extension(&self, name: &str) -> Option<&serde_json::Value> {
        self.0.extensions.get(name)
    }

    /// An extension attribute by name, if it is a string.
    pub fn extension_str(&self, name: &str) -> Option<&str> {
        self.0.extensions.get(name).and_then(|v| v.as_str())
    }

    /// All extension attributes, by name.
    pub fn extensions(&self) -> &BTreeMap<String, serde_json::Value> {
        &self.0.extensions
    }

    /// The deduplication key: `source` and `id` joined by a unit separator.
    pub fn dedupe_key(&self) -> String {
        format!("{}\u{1f}{}", self.0.source, self.0.id)
    }
}

/// Why an event could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A required attribute was not set.
    #[error("missing required attribute `{0}`")]
    Missing(&'static str),
    /// An attribute has a value CloudEvents forbids.
    #[error("attribute `{attribute}`: {reason}")]
    Invalid {
        /// The attribute's name.
        attribute: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Builds an [`Event`], validating it in [`EventBuilder::build`].
#[derive(Debug, Clone)]
pub struct EventBuilder {
    inner: EventInner,
    id_set: bool,
    time_set: bool,
    error: Option<BuildError>,
}

impl Default for EventBuilder {
    fn default() -> Self {
        EventBuilder {
            inner: EventInner {
                id: String::new(),
                source: String::new(),
                ty: String::new(),
                time: None,
                datacontenttype: None,
                dataschema: None,
                subject: None,
                data: None,
                extensions: BTreeMap::new(),
            },
            id_set: false,
            time_set: false,
            error: None,
        }
    }
}

impl EventBuilder {
    /// Sets `id` (default: a fresh UUIDv7).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.inner.id = id.into();
        self.id_set = true;
        self
    }

    /// Sets `source`, a URI reference naming the producer (required).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.inner.source = source.into();
        self
    }

    /// Sets `type` (required); the bus publishes the event on the topic of that name.
    pub fn ty(mut self, ty: impl Into<String>) -> Self {
        self.inner.ty = ty.into();
        self
    }

    /// Sets `time` to an RFC 3339 timestamp (default: now); `None` leaves it out.
    pub fn time(mut self, time: Option<String>) -> Self {
        self.inner.time = time;
        self.time_set = true;
        self
    }

    /// Sets `subject`.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.inner.subject = Some(subject.into());
        self
    }

    /// Sets `dataschema`.
    pub fn dataschema(mut self, schema: impl Into<String>) -> Self {
        self.inner.dataschema = Some(schema.into());
        self
    }

    /// Sets `datacontenttype` (default for JSON data: `application/json`).
    pub fn datacontenttype(mut self, content_type: impl Into<String>) -> Self {
        self.inner.datacontenttype = Some(content_type.into());
        self
    }

    /// Sets the payload to `value` serialized as JSON.
    pub fn data<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::value::to_raw_value(value) {
            Ok(raw) => self.inner.data = Some(Data::Json(raw)),
            Err(e) => {
                self.error.get_or_insert(BuildError::Invalid {
                    attribute: "data".into(),
                    reason: format!("cannot serialize as JSON: {e}"),
                });
            }
        }
        self
    }

    /// Sets the payload to JSON text, which is checked in [`EventBuilder::build`].
    pub fn data_json_text(mut self, json: impl Into<String>) -> Self {
        match RawValue::from_string(json.into()) {
            Ok(raw) => self.inner.data = Some(Data::Json(raw)),
            Err(e) => {
                self.error.get_or_insert(BuildError::Invalid {
                    attribute: "data".into(),
                    reason: format!("not valid JSON: {e}"),
                });
            }
        }
        self
    }

    /// Sets a binary payload (`data_base64` on the wire).
    pub fn data_binary(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.inner.data = Some(Data::Binary(bytes.into()));
        self
    }

    /// Sets an already built payload.
    pub fn data_raw(mut self, data: Option<Data>) -> Self {
        self.inner.data = data;
        self
    }

    /// Sets the W3C `traceparent` extension (`00-<trace id>-<span id>-<flags>`).
    pub fn traceparent(self, traceparent: impl Into<String>) -> Self {
        self.extension(TRACEPARENT, traceparent.into())
    }

    /// Sets the `correlationid` extension.
    pub fn correlation_id(self, id: impl Into<String>) -> Self {
        self.extension(CORRELATION_ID, id.into())
    }

    /// Sets an extension attribute: a lowercase alphanumeric name and a string,
    /// boolean or integer value.
    pub fn extension(
        mut self,
        name: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.inner.extensions.insert(name.into(), value.into());
        self
    }

    /// Removes an extension attribute.
    pub fn remove_extension(mut self, name: &str) -> Self {
        self.inner.extensions.remove(name);
        self
    }

    /// Validates the attributes and returns the event.
    pub fn build(mut self) -> Result<Event, BuildError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if !self.id_set {
            self.inner.id = uuid::Uuid::now_v7().to_string();
        }
        let generated_time = !self.time_set;
        if generated_time {
            self.inner.time = Some(now_rfc3339());
        }
        if self.inner.datacontenttype.is_none() && matches!(self.inner.data, Some(Data::Json(_))) {
            self.inner.datacontenttype = Some(JSON_CONTENT_TYPE.to_owned());
        }
        validate(&self.inner, !generated_time)?;
        Ok(Event::from_inner(self.inner))
    }
}

/// The current time as an RFC 3339 UTC timestamp with microseconds.
pub fn now_rfc3339() -> String {
    // Every published event gets a timestamp; formatting the date and time
    // costs more than the rest of building an event, so each thread keeps the
    // text of the current second and only writes the microseconds.
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let Ok(since_epoch) = now.duration_since(SystemTime::UNIX_EPOCH) else {
        return humantime::format_rfc3339_micros(now).to_string();
    };
    let (secs, micros) = (since_epoch.as_secs(), since_epoch.subsec_micros());
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != secs {
            // `YYYY-MM-DDTHH:MM:SS.` from humantime's `...SS.ffffffZ`.
            let full = humantime::format_rfc3339_micros(
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            )
            .to_string();
            *prefix = full[..full.len() - 7].to_owned();
            *cached = secs;
        }
        let mut out = String::with_capacity(prefix.len() + 7);
        out.push_str(prefix);
        let digits = [
            micros / 100_000,
            micros / 10_000 % 10,
            micros / 1000 % 10,
            micros / 100 % 10,
            micros / 10 % 10,
            micros % 10,
        ];
        out.extend(digits.map(|d| char::from(b'0' + d as u8)));
        out.push('Z');
        out
    })
}

fn invalid(attribute: &str, reason: impl Into<String>) -> BuildError {
    BuildError::Invalid {
        attribute: attribute.to_owned(),
        reason: reason.into(),
    }
}

/// Checks every rule of CloudEvents 1.0 that an in-memory event can break
/// (`time` only when `check_time`: a timestamp the builder wrote is valid).
pub(crate) fn validate(e: &EventInner, check_time: bool) -> Result<(), BuildError> {
    if e.id.is_empty() {
        return Err(BuildError::Missing("id"));
    }
    if e.source.is_empty() {
        return Err(BuildError::Missing("source"));
    }
    if e.source.chars().any(char::is_whitespace) {
        return Err(invalid(
            "source",
            "a URI reference cannot contain whitespace",
        ));
    }
    if e.ty.is_empty() {
        return Err(BuildError::Missing("type"));
    }
    if check_time
        && let Some(t) = &e.time
        && !is_rfc3339(t)
    {
        return Err(invalid(
            "time",
            format!("{t:?} is not an RFC 3339 timestamp"),
        ));
    }
    for (name, value) in [
        ("datacontenttype", &e.datacontenttype),
        ("dataschema", &e.dataschema),
        ("subject", &e.subject),
    ] {
        if value.as_deref() == Some("") {
            return Err(invalid(name, "must not be empty when present"));
        }
    }
    for (name, value) in &e.extensions {
        validate_extension(name, value)?;
    }
    Ok(())
}

const RESERVED: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "datacontenttype",
    "dataschema",
    "subject",
    "data",
    "data_base64",
];

pub(crate) fn validate_extension(name: &str, value: &serde_json::Value) -> Result<(), BuildError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(invalid(
            name,
            "extension names must be lowercase letters and digits",
        ));
    }
    if RESERVED.contains(&name) {
        return Err(invalid(name, "is a context attribute, not an extension"));
    }
    match value {
        serde_json::Value::String(s) => {
            if name == TRACEPARENT && !is_traceparent(s) {
                return Err(invalid(
                    name,
                    format!("{s:?} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"),
                ));
            }
        }
        serde_json::Value::Bool(_) => {}
        serde_json::Value::Number(n) if n.is_i64() => {}
        other => {
            return Err(invalid(
                name,
                format!("extension values are strings, booleans or integers, not {other}"),
            ));
        }
    }
    Ok(())
}

/// `00-<32 lowercase hex>-<16 lowercase hex>-<2 lowercase hex>`, ids not all
/// zero (any version but `ff` in that form; see [`crate::trace::is_traceparent`]).
pub fn is_traceparent(s: &str) -> bool {
    crate::trace::is_traceparent(s.as_bytes())
}

/// RFC 3339 `date-time`: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let num = |r: std::ops::Range<usize>| -> u32 {
        b[r].iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0'))
    };
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b'T' | b't' | b' ')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let (month, day, hour, min, sec) =
        (num(5..7), num(8..10), num(11..13), num(14..16), num(17..19));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit())
                && (h1 - b'0') * 10 + (h2 - b'0') < 24
                && (m1 - b'0') * 10 + (m2 - b'0') < 60
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached-second timestamp is what humantime would write for now:
    /// RFC 3339, microseconds, UTC, within the second it was taken in.
    #[test]
    fn now_rfc3339_is_a_current_rfc3339_timestamp() {
        for _ in 0..2000 {
            let before = SystemTime::now();
            let t = now_rfc3339();
            let after = SystemTime::now();
            assert!(is_rfc3339(&t), "{t}");
            assert_eq!(t.len(), "2026-01-01T00:00:00.000000Z".len(), "{t}");
            let parsed = humantime::parse_rfc3339(&t).unwrap();
            let floor = |s: SystemTime| {
                s.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_micros()
            };
            assert!(
                floor(before) <= floor(parsed) && floor(parsed) <= floor(after),
                "{t}"
            );
        }
    }

    #[test]
    fn builder_requires_source_and_type() {
        assert_eq!(
            Event::builder().ty("t").build().unwrap_err(),
            BuildError::Missing("source")
        );
        assert_eq!(
            Event::builder().source("/s").build().unwrap_err(),
            BuildError::Missing("type")
        );
        let e = Event::builder().source("/s").ty("t").build().unwrap();
        assert_eq!(e.id().len(), 36);
        assert!(is_rfc3339(e.time().unwrap()), "{:?}", e.time());
        assert!(e.data().is_none());
    }

    #[test]
    fn builder_validates_extensions() {
        let err = Event::builder()
            .source("/s")
            .ty("t")
            .extension("Bad-Name", "x")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");
        let err = Event::builder()
            .source("/s")
            .ty("t")
            .traceparent("nope")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("traceparent"), "{err}");
        let e = Event::builder()
            .source("/s")
            .ty("t")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .correlation_id("c-1")
            .build()
            .unwrap();
        assert_eq!(e.correlation_id(), Some("c-1"));
        assert!(e.traceparent().is_some());
    }

    #[test]
    fn rfc3339_accepts_offsets_and_rejects_garbage() {
        for ok in [
            "2024-01-02T03:04:05Z",
            "2024-01-02T03:04:05.123456Z",
            "2024-01-02T03:04:05+02:00",
            "2024-01-02t03:04:05-11:30",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "",
            "2024-01-02",
            "2024-13-02T03:04:05Z",
            "2024-01-02T03:04:05",
            "2024-01-02T03:04:05.Z",
            "2024-01-02T03:04:05+2:00",
            "2024-01-02T25:04:05Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }

    #[test]
    fn data_round_trips_through_serde() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Order {
            id: u32,
        }
        let e = Event::builder()
            .source("/s")
            .ty("t")
            .data(&Order { id: 7 })
            .build()
            .unwrap();
        assert_eq!(e.datacontenttype(), Some(JSON_CONTENT_TYPE));
        assert_eq!(e.data_as::<Order>().unwrap(), Order { id: 7 });
    }
}
