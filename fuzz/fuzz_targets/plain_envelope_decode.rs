//! The plain envelope `{id, timestamp, name, data, version}`: `codec::decode_plain`.
//!
//! Invariants: no panic; an error names the attribute (or the syntax position);
//! a decoded event survives `encode_plain` then `decode_plain` unchanged, but
//! for the `timestamp` and `version` the encoder fills in when absent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_bus::codec::{decode_plain, encode_plain};
use switchboard_bus::{DecodeError, Event};

fuzz_target!(|data: &[u8]| {
    match decode_plain(data) {
        Err(e) => check_error(&e, data),
        Ok(event) => {
            // The envelope always carries `timestamp` and `version`: an event
            // without them gets now and "1.0" when encoded; nothing else may change.
            let again = round_trip(&event);
            let mut expected = event.to_builder().time(again.time().map(str::to_owned));
            if event.extension("version").is_none() {
                expected = expected.extension("version", "1.0");
            }
            assert_eq!(again, expected.build().expect("a decoded event is valid"));
            if event.time().is_some() {
                assert_eq!(again.time(), event.time());
            }
            assert_eq!(round_trip(&again), again);
        }
    }
});

fn round_trip(event: &Event) -> Event {
    let bytes = encode_plain(event);
    decode_plain(&bytes).unwrap_or_else(|e| {
        panic!(
            "encoded event does not decode: {e}\n{}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// An error names an attribute; it may be the empty name only when the input
/// itself has an empty key (the message then shows it as ``).
fn check_error(e: &DecodeError, input: &[u8]) {
    let empty_key = input.windows(2).any(|w| w == b"\"\"");
    match e {
        DecodeError::Syntax { message, .. } => assert!(!message.is_empty(), "{e:?}"),
        DecodeError::Missing { attribute, .. } | DecodeError::Duplicate { attribute, .. } => {
            assert!(!attribute.is_empty() || empty_key, "{e:?}");
        }
        DecodeError::Invalid {
            attribute, reason, ..
        } => {
            assert!(!attribute.is_empty() || empty_key, "{e:?}");
            assert!(!reason.is_empty(), "{e:?}");
        }
    }
    assert!(!e.to_string().is_empty());
}
