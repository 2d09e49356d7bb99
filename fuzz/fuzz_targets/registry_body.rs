//! The instance registration body of `PUT /v1/services/{service}/instances/{id}`:
//! JSON, then `Registration::from_json`, then the default network policy.
//!
//! Invariants: no panic; an error names a field and says what is wrong; an
//! accepted body survives `to_json` then `from_json` unchanged, and the serde
//! path agrees with `from_json`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_registry::{NetworkPolicy, Registration, ValidationError};

fuzz_target!(|data: &[u8]| {
    // The HTTP handler answers 400 for bodies that are not JSON at all.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let parsed = Registration::from_json(&value);
    let via_serde = serde_json::from_value::<Registration>(value);
    assert_eq!(
        parsed.is_ok(),
        via_serde.is_ok(),
        "{parsed:?} vs {via_serde:?}"
    );
    match parsed {
        Err(e) => check_error(&e),
        Ok(reg) => {
            assert_eq!(via_serde.ok().as_ref(), Some(&reg));
            let again = Registration::from_json(&reg.to_json())
                .unwrap_or_else(|e| panic!("to_json of {reg:?} is rejected: {e}"));
            assert_eq!(again, reg);
            if let Err(e) = NetworkPolicy::default().check(&reg.address) {
                check_error(&e);
            }
        }
    }
});

fn check_error(e: &ValidationError) {
    assert!(!e.field.is_empty(), "{e:?}");
    assert!(!e.message.is_empty(), "{e:?}");
}
