//! CloudEvents 1.0 JSON structured mode: `codec::decode`.
//!
//! Invariants: no panic; an error names the attribute (or the syntax position);
//! a decoded event survives `encode` then `decode` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_bus::DecodeError;
use switchboard_bus::codec::{decode, encode};

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Err(e) => check_error(&e, data),
        Ok(event) => {
            let bytes = encode(&event);
            let again = decode(&bytes).unwrap_or_else(|e| {
                panic!(
                    "encoded event does not decode: {e}\n{}",
                    String::from_utf8_lossy(&bytes)
                )
            });
            assert_eq!(again, event, "{}", String::from_utf8_lossy(&bytes));
        }
    }
});

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
