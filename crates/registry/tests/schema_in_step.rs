//! The OpenAPI document states exactly what the validator accepts: for each
//! string field of a registration (and the path segments), a value matches
//! the document's schema (pattern, lengths, `anyOf`/`allOf`) if and only if
//! the validator accepts it. Values come from the schema's own patterns
//! (which must all be accepted) and from mutations of them and random text
//! (which must agree both ways). Counts and numbers are checked at their edges.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use proptest::prelude::*;
use regex::Regex;
use serde_json::{Value, json};
use switchboard_registry::{Registration, http, validate};

static DOC: LazyLock<Value> = LazyLock::new(http::openapi);

fn doc() -> &'static Value {
    &DOC
}

/// Compiled once: the version and IPv6 patterns are long.
fn regex(p: &str) -> Regex {
    static CACHE: LazyLock<Mutex<HashMap<String, Regex>>> = LazyLock::new(Default::default);
    let mut cache = CACHE.lock().unwrap();
    cache
        .entry(p.to_owned())
        .or_insert_with(|| Regex::new(p).unwrap_or_else(|e| panic!("pattern {p}: {e}")))
        .clone()
}

fn registration_prop(name: &str) -> Value {
    doc()["components"]["schemas"]["Registration"]["properties"][name].clone()
}

fn check_prop(name: &str) -> Value {
    doc()["components"]["schemas"]["Check"]["properties"][name].clone()
}

/// Whether the string `v` satisfies `schema` (the keywords our document uses
/// for strings: pattern, minLength, maxLength in characters, anyOf, allOf).
fn schema_ok(schema: &Value, v: &str) -> bool {
    if let Some(p) = schema["pattern"].as_str()
        && !regex(p).is_match(v)
    {
        return false;
    }
    let chars = v.chars().count() as u64;
    if schema["minLength"].as_u64().is_some_and(|m| chars < m)
        || schema["maxLength"].as_u64().is_some_and(|m| chars > m)
    {
        return false;
    }
    if let Some(any) = schema["anyOf"].as_array()
        && !any.iter().any(|s| schema_ok(s, v))
    {
        return false;
    }
    if let Some(all) = schema["allOf"].as_array()
        && !all.iter().all(|s| schema_ok(s, v))
    {
        return false;
    }
    true
}

fn accepts(body: &Value) -> bool {
    Registration::from_json(body).is_ok()
}

/// The fields under test: (name, schema, body with the value).
type Field = (&'static str, Value, fn(&str) -> Value);

fn fields() -> &'static [Field] {
    static FIELDS: LazyLock<Vec<Field>> = LazyLock::new(all_fields);
    &FIELDS
}

fn all_fields() -> Vec<Field> {
    let reg = registration_prop;
    vec![
        (
            "tags[]",
            reg("tags")["items"].clone(),
            |v| json!({"address": "127.0.0.1", "port": 80, "tags": [v]}),
        ),
        (
            "metadata key",
            reg("metadata")["propertyNames"].clone(),
            |v| json!({"address": "127.0.0.1", "port": 80, "metadata": {v: "x"}}),
        ),
        (
            "metadata value",
            reg("metadata")["additionalProperties"].clone(),
            |v| json!({"address": "127.0.0.1", "port": 80, "metadata": {"k": v}}),
        ),
        (
            "version",
            reg("version"),
            |v| json!({"address": "127.0.0.1", "port": 80, "version": v}),
        ),
        (
            "address",
            reg("address"),
            |v| json!({"address": v, "port": 80}),
        ),
        (
            "check.http",
            check_prop("http"),
            |v| json!({"address": "a", "port": 80, "check": {"http": v}}),
        ),
        (
            "check.ttl",
            check_prop("ttl"),
            |v| json!({"address": "a", "port": 80, "check": {"ttl": v}}),
        ),
        (
            "check.interval",
            check_prop("interval"),
            |v| json!({"address": "a", "port": 80, "check": {"tcp": true, "interval": v}}),
        ),
        (
            "check.timeout",
            check_prop("timeout"),
            |v| json!({"address": "a", "port": 80, "check": {"tcp": true, "interval": "24h", "timeout": v}}),
        ),
        (
            "check.deregister_critical_after",
            check_prop("deregister_critical_after"),
            |v| json!({"address": "a", "port": 80, "check": {"tcp": true, "deregister_critical_after": v}}),
        ),
    ]
}

/// Generators for a field: its patterns without anchors (proptest reads
/// regex syntax; only fully anchored patterns describe whole values).
fn generators(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = schema["pattern"].as_str()
        && let Some(inner) = p.strip_prefix('^').and_then(|p| p.strip_suffix('$'))
    {
        out.push(inner.to_owned());
    }
    for key in ["anyOf", "allOf"] {
        for s in schema[key].as_array().into_iter().flatten() {
            out.extend(generators(s));
        }
    }
    out
}

fn from_schema(schema: &Value) -> BoxedStrategy<String> {
    let gens: Vec<BoxedStrategy<String>> = generators(schema)
        .into_iter()
        .map(|p| {
            proptest::string::string_regex(&p)
                .unwrap_or_else(|e| panic!("{p}: {e}"))
                .boxed()
        })
        .collect();
    assert!(!gens.is_empty(), "no pattern in {schema}");
    proptest::strategy::Union::new(gens).boxed()
}

thread_local! {
    /// One generator per field, built once (string_regex compiles its pattern).
    static GENERATORS: Vec<BoxedStrategy<String>> =
        fields().iter().map(|(_, schema, _)| from_schema(schema)).collect();
}

fn generate(idx: usize, runner: &mut proptest::test_runner::TestRunner) -> String {
    GENERATORS.with(|g| g[idx].new_tree(runner).unwrap().current())
}

/// A value near `base`: a character inserted, removed or replaced.
fn mutate(base: &str, op: u8, at: usize, c: char) -> String {
    let mut chars: Vec<char> = base.chars().collect();
    let i = if chars.is_empty() {
        0
    } else {
        at % (chars.len() + 1)
    };
    match op % 3 {
        0 => chars.insert(i, c),
        1 if i < chars.len() => {
            chars.remove(i);
        }
        _ if i < chars.len() => chars[i] = c,
        _ => chars.push(c),
    }
    chars.into_iter().collect()
}

fn interesting_char() -> impl Strategy<Value = char> {
    prop_oneof![
        prop::sample::select(vec![
            '0', '9', 'a', 'Z', '-', '.', ':', '/', '_', '+', ' ', '\t', '\n', '\u{7f}', '\u{85}',
            '\u{9f}', '\u{a0}', 'é', '#', '"', '<', '>', '`', '%', '?', '@', 'm', 's', 'h',
        ]),
        any::<char>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_value_the_schema_generates_is_accepted(idx in 0usize..10, seed in any::<u64>()) {
        let idx = idx % fields().len();
        let (name, schema, body) = &fields()[idx];
        let mut runner = proptest::test_runner::TestRunner::new_with_rng(
            ProptestConfig::default(),
            proptest::test_runner::TestRng::from_seed(
                proptest::test_runner::RngAlgorithm::ChaCha,
                &{
                    let mut s = [0u8; 32];
                    s[..8].copy_from_slice(&seed.to_le_bytes());
                    s
                },
            ),
        );
        let v = generate(idx, &mut runner);
        // A pattern under `allOf` (a hostname's last label) or a length limit
        // may still rule the generated value out.
        prop_assume!(schema_ok(schema, &v));
        prop_assert!(accepts(&body(&v)), "{name}: {v:?} matches the schema but is rejected");
    }

    #[test]
    fn schema_and_validator_agree_near_valid_values(
        idx in 0usize..10,
        seed in any::<u64>(),
        op in any::<u8>(),
        at in any::<usize>(),
        c in interesting_char(),
    ) {
        let idx = idx % fields().len();
        let (name, schema, body) = &fields()[idx];
        let mut runner = proptest::test_runner::TestRunner::new_with_rng(
            ProptestConfig::default(),
            proptest::test_runner::TestRng::from_seed(
                proptest::test_runner::RngAlgorithm::ChaCha,
                &{
                    let mut s = [0u8; 32];
                    s[..8].copy_from_slice(&seed.to_le_bytes());
                    s
                },
            ),
        );
        let base = generate(idx, &mut runner);
        let v = mutate(&base, op, at, c);
        prop_assert_eq!(
            schema_ok(schema, &v),
            accepts(&body(&v)),
            "{}: {:?} (schema {})", name, v, schema
        );
    }

    #[test]
    fn schema_and_validator_agree_on_random_text(idx in 0usize..10, v in "[0-9a-zA-Z.:/_+ -]{0,12}|\\PC{0,8}") {
        let (name, schema, body) = &fields()[idx % fields().len()];
        prop_assert_eq!(schema_ok(schema, &v), accepts(&body(&v)), "{}: {:?}", name, v);
    }

    #[test]
    fn path_segments_agree(v in "[a-zA-Z0-9._:/ -]{0,3}|[a-z0-9-]{60,66}|[A-Za-z0-9._:-]{126,130}|\\PC{0,4}") {
        let params = doc()["paths"]["/v1/services/{service}/instances/{id}"]["put"]["parameters"].clone();
        let service = &params[0]["schema"];
        let id = &params[1]["schema"];
        prop_assert_eq!(schema_ok(service, &v), validate::service_name(&v).is_ok(), "service {:?}", v);
        prop_assert_eq!(schema_ok(id, &v), validate::instance_id(&v).is_ok(), "id {:?}", v);
    }
}

#[test]
fn edge_values_both_ways() {
    let base = || json!({"address": "127.0.0.1", "port": 80});
    let with = |k: &str, v: Value| {
        let mut b = base();
        b[k] = v;
        b
    };
    let tags = registration_prop("tags");
    let max_tags = tags["maxItems"].as_u64().unwrap() as usize;
    assert!(accepts(&with("tags", json!(vec!["t"; max_tags]))));
    assert!(!accepts(&with("tags", json!(vec!["t"; max_tags + 1]))));
    assert!(
        accepts(&with("tags", Value::Null)),
        "the schema allows null"
    );
    assert!(tags["type"].as_array().unwrap().contains(&json!("null")));
    let long = "é".repeat(tags["items"]["maxLength"].as_u64().unwrap() as usize);
    assert!(
        accepts(&with("tags", json!([long]))),
        "maxLength counts characters"
    );

    let metadata = registration_prop("metadata");
    let max_meta = metadata["maxProperties"].as_u64().unwrap() as usize;
    let entries = |n: usize| -> Value {
        Value::Object((0..n).map(|i| (format!("k{i}"), json!("v"))).collect())
    };
    assert!(accepts(&with("metadata", entries(max_meta))));
    assert!(!accepts(&with("metadata", entries(max_meta + 1))));
    assert!(accepts(&with("metadata", Value::Null)));

    let port = registration_prop("port");
    let (lo, hi) = (
        port["minimum"].as_u64().unwrap(),
        port["maximum"].as_u64().unwrap(),
    );
    for (p, ok) in [(lo - 1, false), (lo, true), (hi, true), (hi + 1, false)] {
        assert_eq!(accepts(&with("port", json!(p))), ok, "port {p}");
    }
    // JSON Schema's integers include 80.0.
    assert!(accepts(&with("port", json!(80.0))));
    assert!(!accepts(&with("port", json!(80.5))));
    for name in ["healthy_threshold", "unhealthy_threshold"] {
        let s = check_prop(name);
        let (lo, hi) = (
            s["minimum"].as_u64().unwrap(),
            s["maximum"].as_u64().unwrap(),
        );
        for (t, ok) in [(lo - 1, false), (lo, true), (hi, true), (hi + 1, false)] {
            let body = with("check", json!({"tcp": true, name: t}));
            assert_eq!(accepts(&body), ok, "{name} {t}");
        }
        assert!(accepts(&with("check", json!({"tcp": true, name: null}))));
    }
    // Exactly one of http, tcp, ttl; null counts as absent.
    for (check, ok) in [
        (json!({"http": "/h", "tcp": null, "ttl": null}), true),
        (json!({"tcp": true}), true),
        (json!({"tcp": false}), false),
        (json!({"ttl": "1s", "http": "/h"}), false),
        (json!({}), false),
        (json!({"tcp": true, "other": 1}), false),
        (
            json!({"http": "/h", "interval": "1s", "timeout": "5s"}),
            true,
        ),
    ] {
        assert_eq!(accepts(&with("check", check.clone())), ok, "{check}");
    }
    // Duration edges: each bound in each unit.
    for (field, v, ok) in [
        ("interval", "50ms", true),
        ("interval", "49ms", false),
        ("interval", "24h", true),
        ("interval", "1440m", true),
        ("interval", "86400001ms", false),
        ("interval", "25h", false),
        ("interval", "0s", false),
        ("interval", "1m 30s", false),
        ("interval", "010s", false),
        ("timeout", "1ms", true),
        ("timeout", "0ms", false),
    ] {
        let s = check_prop(field);
        let body = with("check", json!({"tcp": true, field: v}));
        assert_eq!(accepts(&body), ok, "{field} {v}");
        assert_eq!(schema_ok(&s, v), ok, "{field} {v} against {}", s["pattern"]);
    }
}
