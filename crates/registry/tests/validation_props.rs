//! Property tests of the registration body validation: never a panic, always a
//! clear error that names the field.

use proptest::prelude::*;
use serde_json::{Value, json};
use switchboard_registry::{NetworkPolicy, Registration};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,20}".prop_map(Value::String),
        prop_oneof![
            Just("127.0.0.1"),
            Just("::1"),
            Just("/health"),
            Just("2s"),
            Just("1.2.3"),
            Just("169.254.0.1"),
            Just("0.0.0.0"),
            Just("host.example"),
            Just("999ms")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("address".to_owned()),
                    Just("port".to_owned()),
                    Just("version".to_owned()),
                    Just("tags".to_owned()),
                    Just("metadata".to_owned()),
                    Just("check".to_owned()),
                    Just("http".to_owned()),
                    Just("tcp".to_owned()),
                    Just("ttl".to_owned()),
                    Just("interval".to_owned()),
                    Just("timeout".to_owned()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: [&str; 6] = ["address", "port", "version", "tags", "metadata", "check"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any JSON: either a registration that round-trips, or an error naming a field.
    #[test]
    fn any_json_is_accepted_or_explained(body in arb_json()) {
        match Registration::from_json(&body) {
            Ok(reg) => {
                prop_assert_eq!(Registration::from_json(&reg.to_json()), Ok(reg.clone()));
                prop_assert!(reg.port >= 1);
                let _ = NetworkPolicy::default().check(&reg.address);
            }
            Err(e) => {
                prop_assert!(!e.field.is_empty());
                prop_assert!(!e.message.is_empty());
                prop_assert!(e.to_string().contains(&e.field));
            }
        }
    }

    /// Replacing one field of a valid body with anything yields success or an error about that field.
    #[test]
    fn a_bad_field_is_the_one_named(which in 0usize..6, value in arb_json()) {
        let mut body = json!({"address": "127.0.0.1", "port": 4001, "version": "1.0.0",
            "tags": ["a"], "metadata": {"k": "v"}, "check": {"tcp": true}});
        let field = FIELDS[which];
        body[field] = value;
        if let Err(e) = Registration::from_json(&body) {
            prop_assert!(e.field == field || e.field.starts_with(&format!("{field}.")) || e.field.starts_with(&format!("{field}[")),
                "changed {} but error names {}", field, e.field);
        }
    }

    /// Arbitrary address strings never panic the network policy.
    #[test]
    fn addresses_never_panic(addr in ".{0,80}") {
        if let Err(e) = NetworkPolicy::default().check(&addr) {
            prop_assert_eq!(e.field, "address");
        }
    }

    /// Raw bytes through the JSON layer: parse errors or validation errors, never a panic.
    #[test]
    fn raw_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let _ = Registration::from_json(&v);
        }
    }
}

/// The same bodies through the HTTP router: only 200, a 400 problem naming a
/// field, or 403 for an address the network policy refuses; never a 500.
#[test]
fn http_answers_every_body_with_200_or_400() {
    use switchboard_registry::http::{HttpOptions, router};
    use switchboard_registry::{Registry, RegistryOptions};
    use tower::ServiceExt as _;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(async {
        let registry = Registry::open("memory://", RegistryOptions::default())
            .await
            .unwrap();
        router(registry, HttpOptions::default())
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    runner
        .run(
            &(arb_json(), "[a-z0-9-]{1,8}|[A-Z_.%]{1,4}"),
            |(body, name)| {
                let req = axum::http::Request::put(format!("/v1/services/{name}/instances/i1"))
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(body.to_string()))
                    .unwrap();
                let resp = rt.block_on(app.clone().oneshot(req)).unwrap();
                let status = resp.status().as_u16();
                prop_assert!(matches!(status, 200 | 400 | 403), "status {}", status);
                if status != 200 {
                    let bytes = rt
                        .block_on(http_body_util::BodyExt::collect(resp.into_body()))
                        .unwrap()
                        .to_bytes();
                    let problem: Value = serde_json::from_slice(&bytes).unwrap();
                    prop_assert!(problem["field"].as_str().is_some_and(|f| !f.is_empty()));
                    prop_assert_eq!(&problem["status"], &json!(status));
                    if status == 403 {
                        prop_assert_eq!(&problem["field"], &json!("address"));
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}
