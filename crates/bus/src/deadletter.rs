//! Dead letters: events a group gave up on, with why.
//!
//! A dead letter is the original event (same `source`, `id`, `type`, data)
//! published on the dead-letter topic with these extension attributes:
//!
//! | attribute | meaning |
//! |---|---|
//! | `deadletterreason` | `max-deliveries` or `decode-error` |
//! | `deadletterattempts` | deliveries made before giving up |
//! | `deadlettererror` | the last handler error (or the decode error) |
//! | `deadlettertopic` | the topic the event came from |
//! | `deadlettergroup` | the consumer group that gave up |
//!
//! An entry that could not be decoded becomes an event of type
//! [`MALFORMED_TYPE`] whose data is the raw entry (JSON text when it is valid
//! UTF-8, base64 otherwise).

use crate::driver::Malformed;
use crate::{BuildError, Event};

/// The `type` of a dead letter made from an undecodable entry.
pub const MALFORMED_TYPE: &str = "switchboard.malformed";

/// The `source` of dead letters made from undecodable entries.
pub const MALFORMED_SOURCE: &str = "/switchboard/bus";

const REASON: &str = "deadletterreason";
const ATTEMPTS: &str = "deadletterattempts";
const ERROR: &str = "deadlettererror";
const TOPIC: &str = "deadlettertopic";
const GROUP: &str = "deadlettergroup";

/// The extension a replayed event carries: how many times it was replayed.
/// Backends with publisher dedupe (NATS `Nats-Msg-Id`) include it in the
/// dedupe key, so a replay is not mistaken for a duplicate of the original.
pub const REPLAY: &str = "replay";

/// Why an event was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The handler failed (or nobody acked) `max_deliveries` times.
    MaxDeliveries,
    /// The entry on the stream was not a valid event.
    DecodeError,
    /// The handler rejected it permanently ([`crate::Nack::permanent`]).
    Rejected,
}

impl Reason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MaxDeliveries => "max-deliveries",
            Reason::DecodeError => "decode-error",
            Reason::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "max-deliveries" => Some(Reason::MaxDeliveries),
            "decode-error" => Some(Reason::DecodeError),
            "rejected" => Some(Reason::Rejected),
            _ => None,
        }
    }
}

/// A dead letter read back from the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Why it was dead-lettered.
    pub reason: Reason,
    /// Deliveries made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// The topic it came from.
    pub topic: String,
    /// The group that gave up.
    pub group: String,
    /// The dead letter event as stored.
    pub letter: Event,
}

impl DeadLetter {
    /// Reads the dead-letter attributes of `event`, or `None` if it has none.
    pub fn from_event(event: &Event) -> Option<Self> {
        Some(DeadLetter {
            reason: Reason::parse(event.extension_str(REASON)?)?,
            attempts: event
                .extension(ATTEMPTS)
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            error: event.extension_str(ERROR).unwrap_or_default().to_owned(),
            topic: event.extension_str(TOPIC)?.to_owned(),
            group: event.extension_str(GROUP).unwrap_or_default().to_owned(),
            letter: event.clone(),
        })
    }

    /// The original event without the dead-letter attributes, to publish again;
    /// `None` for undecodable entries, which cannot be replayed.
    pub fn original(&self) -> Option<Result<Event, BuildError>> {
        if self.reason == Reason::DecodeError {
            return None;
        }
        Some(
            self.letter
                .to_builder()
                .remove_extension(REASON)
                .remove_extension(ATTEMPTS)
                .remove_extension(ERROR)
                .remove_extension(TOPIC)
                .remove_extension(GROUP)
                .build(),
        )
    }
}

impl DeadLetter {
    /// The event to publish to replay this dead letter: the original with
    /// [`REPLAY`] counting replays. `None` for undecodable entries.
    pub fn replay_event(&self) -> Option<Result<Event, BuildError>> {
        let original = match self.original()? {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        let n = original
            .extension(REPLAY)
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        Some(original.to_builder().extension(REPLAY, n + 1).build())
    }
}

/// The dead letter for `event`.
pub(crate) fn letter(
    event: &Event,
    topic: &str,
    group: &str,
    reason: Reason,
    attempts: u32,
    error: &str,
) -> Event {
    let built = event
        .to_builder()
        .extension(REASON, reason.as_str())
        .extension(ATTEMPTS, attempts)
        .extension(ERROR, error)
        .extension(TOPIC, topic)
        .extension(GROUP, group)
        .build();
    // The original was valid and the added extensions are well-formed.
    built.unwrap_or_else(|_| event.clone())
}

/// The dead letter for an undecodable entry.
pub(crate) fn malformed(topic: &str, group: &str, attempts: u32, bad: &Malformed) -> Event {
    let b = Event::builder()
        .source(MALFORMED_SOURCE)
        .ty(MALFORMED_TYPE)
        .extension(REASON, Reason::DecodeError.as_str())
        .extension(ATTEMPTS, attempts)
        .extension(ERROR, bad.error.as_str())
        .extension(TOPIC, topic)
        .extension(GROUP, group);
    let b = match std::str::from_utf8(&bad.raw) {
        Ok(text) => b.data(text),
        Err(_) => b.data_binary(bad.raw.clone()),
    };
    b.build().unwrap_or_else(|e| {
        // Only reachable if the names above were invalid; keep the error visible.
        Event::builder()
            .source(MALFORMED_SOURCE)
            .ty(MALFORMED_TYPE)
            .extension(ERROR, e.to_string())
            .build()
            .unwrap_or_else(|_| unreachable!("a minimal event is valid"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letter_round_trips_to_original() {
        let e = Event::builder()
            .source("/s")
            .ty("t")
            .correlation_id("c")
            .data(&1)
            .build()
            .unwrap();
        let l = letter(&e, "t", "g", Reason::MaxDeliveries, 3, "boom");
        let d = DeadLetter::from_event(&l).unwrap();
        assert_eq!(
            (d.reason, d.attempts, d.error.as_str()),
            (Reason::MaxDeliveries, 3, "boom")
        );
        assert_eq!((d.topic.as_str(), d.group.as_str()), ("t", "g"));
        assert_eq!(d.original().unwrap().unwrap(), e);
        let replay = d.replay_event().unwrap().unwrap();
        assert_eq!(replay.extension(REPLAY), Some(&serde_json::json!(1)));
        assert_eq!(replay.id(), e.id());
        assert!(DeadLetter::from_event(&e).is_none());
    }

    #[test]
    fn malformed_keeps_raw_bytes() {
        let bad = Malformed {
            error: "not json".into(),
            raw: b"{oops".to_vec(),
        };
        let l = malformed("t", "g", 1, &bad);
        let d = DeadLetter::from_event(&l).unwrap();
        assert_eq!(d.reason, Reason::DecodeError);
        assert_eq!(l.data_as::<String>().unwrap(), "{oops");
        assert!(d.original().is_none());
    }
}
