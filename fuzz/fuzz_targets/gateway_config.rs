//! The gateway's TOML config: parse + validate a file's text.
//!
//! Invariants: no panic; a rejected file yields at least one error, each with a
//! key, a message and a position inside the file; an accepted file resolves to
//! a config whose routes obey the rules `resolve` promises.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use switchboard_gateway::Config;

fuzz_target!(|data: &[u8]| {
    // `Config::load` reads the file as UTF-8; other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(Path::new("fuzz.toml"), text) {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "rejected without an error");
            let lines = text.lines().count().max(1) + 1;
            for e in &errors.0 {
                assert!(!e.key.is_empty(), "error without a key: {e:?}");
                assert!(!e.message.is_empty(), "error without a message: {e:?}");
                assert!(e.line >= 1 && e.line <= lines, "line out of file: {e:?}");
                assert!(e.column >= 1, "column 0: {e:?}");
            }
            assert!(!errors.to_string().is_empty());
        }
        Ok(config) => {
            for r in &config.routes {
                assert!(r.prefix.starts_with('/'), "prefix {:?}", r.prefix);
                assert!(!r.timeout.is_zero());
                assert!(r.attempt_timeout <= r.timeout);
                assert!(r.retry_buffer_bytes <= r.max_body_bytes);
                assert!(config.services.iter().any(|s| s.name == r.service));
            }
        }
    }
});
