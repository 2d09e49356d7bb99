//! Strict validation of names, ids and registration bodies.
//!
//! Every error names the field (`port`, `check.interval`, `tags[2]`) so the
//! HTTP API can answer 400 with a precise problem document.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;

use crate::model::{CheckKind, CheckSpec, Registration};

/// A rejected input: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct ValidationError {
    /// The offending field, as a JSON path (`check.interval`) or a path segment (`service`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Most tags an instance may carry.
pub const MAX_TAGS: usize = 64;
/// Most metadata entries an instance may carry.
pub const MAX_METADATA: usize = 64;
/// Longest tag, metadata key, instance id or hostname (bytes).
pub const MAX_SHORT: usize = 128;
/// Longest metadata value or HTTP check path (bytes).
pub const MAX_LONG: usize = 1024;

/// Which addresses instances may register with.
///
/// An IP address must be inside one of `allowed` and outside every `denied`
/// network and must not be the unspecified address (`0.0.0.0`, `::`).
/// Hostnames are checked for syntax only (they are resolved when checked and
/// when routed to), unless `allow_hostnames` is false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Networks addresses must fall inside. Default: everything.
    pub allowed: Vec<IpNet>,
    /// Networks that are refused even inside `allowed`. Default: link-local
    /// `169.254.0.0/16` (cloud metadata endpoints live there) and its IPv6 twin `fe80::/10`.
    pub denied: Vec<IpNet>,
    /// Whether hostnames are accepted at all. Default: true.
    pub allow_hostnames: bool,
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        NetworkPolicy {
            allowed: vec![
                "0.0.0.0/0".parse().expect("valid net"),
                "::/0".parse().expect("valid net"),
            ],
            denied: vec![
                "169.254.0.0/16".parse().expect("valid net"),
                "fe80::/10".parse().expect("valid net"),
            ],
            allow_hostnames: true,
        }
    }
}

impl NetworkPolicy {
    /// Checks `address` (the `address` field of a registration).
    pub fn check(&self, address: &str) -> Result<(), ValidationError> {
        let err = |m: String| Err(ValidationError::new("address", m));
        if let Ok(ip) = address.parse::<IpAddr>() {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 @ IpAddr::V4(_) => v4,
            };
            if ip.is_unspecified() {
                return err(format!("{address} is the unspecified address"));
            }
            if let Some(net) = self.denied.iter().find(|n| n.contains(&ip)) {
                return err(format!("{address} is inside the denied network {net}"));
            }
            if !self.allowed.iter().any(|n| n.contains(&ip)) {
                return err(format!("{address} is outside the allowed networks"));
            }
            return Ok(());
        }
        if !self.allow_hostnames {
            return err("must be an IP address (hostnames are not allowed)".into());
        }
        check_hostname(address).map_err(|m| ValidationError::new("address", m))
    }
}

fn check_hostname(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("must not be empty".into());
    }
    if host.len() > 253 {
        return Err("hostname longer than 253 characters".into());
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{host:?} is neither an IP address nor a valid hostname"
            ));
        }
    }
    if host
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("{host:?} is not a valid IP address"));
    }
    Ok(())
}

/// Service names: `[a-z0-9-]{1,63}`.
pub fn service_name(name: &str) -> Result<(), ValidationError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "service",
            "must match [a-z0-9-]{1,63}",
        ))
    }
}

/// Instance ids: `[A-Za-z0-9._:-]{1,128}`.
pub fn instance_id(id: &str) -> Result<(), ValidationError> {
    let ok = (1..=MAX_SHORT).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "id",
            "must match [A-Za-z0-9._:-]{1,128}",
        ))
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn expected(field: &str, what: &str, got: &Value) -> ValidationError {
    ValidationError::new(field, format!("expected {what}, got {}", type_name(got)))
}

/// No control characters (Unicode `Cc`: U+0000-U+001F, U+007F-U+009F), the
/// class [`PRINTABLE`] names in the OpenAPI patterns.
/// An integer as JSON Schema counts one: `80` or `80.0` (not `80.5`).
fn whole(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f))
            .map(|f| f as u64)
    })
}

fn printable(s: &str) -> bool {
    s.chars().all(|c| !c.is_control())
}

/// The schema side of each rule below: the OpenAPI document
/// ([`crate::http::openapi`]) is built from these, and
/// `tests/schema_in_step.rs` checks both ways that a value matches the
/// pattern exactly when the validator accepts it. Patterns use only what
/// ECMA-262, Python's `re` and Rust's `regex` read alike.
pub mod patterns {
    /// A character that is not a control character.
    pub const PRINTABLE: &str = "[^\\u0000-\\u001f\\u007f-\\u009f]";
    /// A service name (path segment).
    pub const SERVICE: &str = "^[a-z0-9-]{1,63}$";
    /// An instance id (path segment).
    pub const INSTANCE_ID: &str = "^[A-Za-z0-9._:-]{1,128}$";
    /// A metadata key.
    pub const METADATA_KEY: &str = "^[A-Za-z0-9._/-]{1,128}$";
    /// An HTTP check path: `/`, then visible ASCII other than `"`, `#`, `<`,
    /// `>` and the backquote, at most 1024 in all.
    pub const HTTP_PATH: &str = "^/[!$-;=?-_a-~]{0,1023}$";
    /// A tag: 1-128 printable characters.
    pub fn tag() -> String {
        format!("^{PRINTABLE}{{1,128}}$")
    }
    /// A metadata value: at most 1024 printable characters.
    pub fn metadata_value() -> String {
        format!("^{PRINTABLE}{{0,1024}}$")
    }
    /// A semantic version as the `semver` crate reads it (numbers fit in u64).
    pub fn version() -> String {
        let n = format!("(?:{})", super::range_regex(0, u64::MAX));
        let pre = "(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)";
        let build = "[0-9A-Za-z-]+";
        format!("^{n}\\.{n}\\.{n}(?:-{pre}(?:\\.{pre})*)?(?:\\+{build}(?:\\.{build})*)?$")
    }
    /// An IPv4 address as Rust reads it (no leading zeros).
    pub const IPV4: &str = "^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$";
    /// An IPv6 address in RFC 4291 text form (an IPv4 address may end it).
    pub fn ipv6() -> String {
        let h = "[0-9A-Fa-f]{1,4}";
        let v4 = &IPV4[1..IPV4.len() - 1];
        // The last 32 bits: two groups or a dotted IPv4 address.
        let ls32 = format!("(?:{h}:{h}|{v4})");
        let alts = [
            format!("(?:{h}:){{6}}{ls32}"),
            format!("::(?:{h}:){{5}}{ls32}"),
            format!("(?:{h})?::(?:{h}:){{4}}{ls32}"),
            format!("(?:(?:{h}:){{0,1}}{h})?::(?:{h}:){{3}}{ls32}"),
            format!("(?:(?:{h}:){{0,2}}{h})?::(?:{h}:){{2}}{ls32}"),
            format!("(?:(?:{h}:){{0,3}}{h})?::{h}:{ls32}"),
            format!("(?:(?:{h}:){{0,4}}{h})?::{ls32}"),
            format!("(?:(?:{h}:){{0,5}}{h})?::{h}"),
            format!("(?:(?:{h}:){{0,6}}{h})?::"),
        ];
        format!("^(?:{})$", alts.join("|"))
    }
    /// A hostname's syntax: dot-separated labels of letters, digits and
    /// inner hyphens, 1-63 each, an optional final dot. The length (at most
    /// 253) and [`HOSTNAME_LAST_LABEL`] are separate keywords.
    pub const HOSTNAME: &str = "^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.?$";
    /// The last label is not all digits (`1.2.3.999` is a bad IP address,
    /// not a hostname).
    pub const HOSTNAME_LAST_LABEL: &str = "[A-Za-z-][0-9]*\\.?$";
    /// A duration of `NUMBER` and one unit of `ms`, `s`, `m`, `h`, between
    /// `min` and `max` (whole milliseconds).
    pub fn duration(min: std::time::Duration, max: std::time::Duration) -> String {
        let (lo, hi) = (super::whole_ms(min), super::whole_ms(max));
        let mut alts = Vec::new();
        for (unit, ms) in super::UNITS {
            let (a, b) = (lo.div_ceil(ms), hi / ms);
            if a <= b {
                alts.push(format!("(?:{}){unit}", super::range_regex(a, b)));
            }
        }
        format!("^(?:{})$", alts.join("|"))
    }
}

/// Duration units, longest name first for parsing (`ms` before `m`).
const UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

fn whole_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A regular expression matching the decimal numbers `lo..=hi` written
/// without leading zeros. Hand-written: no crate turns a range into a regex
/// for JSON Schema, and the OpenAPI patterns must state numeric bounds.
pub(crate) fn range_regex(lo: u64, hi: u64) -> String {
    fn same_len(a: &[u8], b: &[u8], out: &mut Vec<String>, prefix: &str) {
        let class = |x: u8, y: u8| {
            if x == y {
                (x as char).to_string()
            } else {
                format!("[{}-{}]", x as char, y as char)
            }
        };
        let Some((&a0, a_rest)) = a.split_first() else {
            out.push(prefix.to_owned());
            return;
        };
        let (&b0, b_rest) = b.split_first().expect("same length");
        let n = a_rest.len();
        let any = if n == 0 {
            String::new()
        } else {
            format!("[0-9]{{{n}}}")
        };
        if a0 == b0 {
            return same_len(a_rest, b_rest, out, &format!("{prefix}{}", a0 as char));
        }
        let low_full = a_rest.iter().all(|&c| c == b'0');
        let high_full = b_rest.iter().all(|&c| c == b'9');
        let first = if low_full { a0 } else { a0 + 1 };
        let last = if high_full { b0 } else { b0 - 1 };
        if !low_full {
            let nines = vec![b'9'; n];
            same_len(a_rest, &nines, out, &format!("{prefix}{}", a0 as char));
        }
        if first <= last {
            out.push(format!("{prefix}{}{any}", class(first, last)));
        }
        if !high_full {
            let zeros = vec![b'0'; n];
            same_len(&zeros, b_rest, out, &format!("{prefix}{}", b0 as char));
        }
    }
    let mut out = Vec::new();
    let (dl, dh) = (lo.to_string().len(), hi.to_string().len());
    for d in dl..=dh {
        let floor = if d == 1 { 0 } else { 10u64.pow(d as u32 - 1) };
        let ceil = if d >= 20 {
            u64::MAX
        } else {
            10u64.pow(d as u32) - 1
        };
        let (a, b) = (lo.max(floor), hi.min(ceil));
        if a <= b {
            same_len(
                a.to_string().as_bytes(),
                b.to_string().as_bytes(),
                &mut out,
                "",
            );
        }
    }
    out.join("|")
}

/// Parses `NUMBER UNIT` (see [`patterns::duration`]) into milliseconds;
/// `None` when it is not that shape or overflows.
fn parse_ms(s: &str) -> Option<u64> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    if num.is_empty() || (num.len() > 1 && num.starts_with('0')) {
        return None;
    }
    let factor = UNITS.iter().find(|(u, _)| *u == unit)?.1;
    num.parse::<u64>()
        .ok()?
        .checked_mul(factor)
        .or(Some(u64::MAX))
}

/// Formats `d` the way [`parse_ms`] reads it: the largest unit that divides
/// it exactly (sub-millisecond parts are dropped).
pub(crate) fn fmt_ms(d: Duration) -> String {
    let ms = whole_ms(d);
    for (unit, f) in UNITS.iter().rev() {
        if ms > 0 && ms.is_multiple_of(*f) {
            return format!("{}{unit}", ms / f);
        }
    }
    "0ms".into()
}

/// Parses a registration body (before the network policy).
pub(crate) fn parse_registration(value: &Value) -> Result<Registration, ValidationError> {
    let Value::Object(map) = value else {
        return Err(expected("body", "a JSON object", value));
    };
    const KNOWN: [&str; 6] = ["address", "port", "version", "tags", "metadata", "check"];
    if let Some(k) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        // An empty key would leave the error naming no field at all.
        return Err(ValidationError::new(
            if k.is_empty() { "\"\"" } else { k.as_str() },
            format!("unknown field (expected one of {})", KNOWN.join(", ")),
        ));
    }
    let address = match map.get("address") {
        None | Some(Value::Null) => return Err(ValidationError::new("address", "is required")),
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(expected("address", "a string", v)),
    };
    if address.is_empty() {
        return Err(ValidationError::new("address", "must not be empty"));
    }
    // Syntax here (400); which addresses are allowed is the policy's (403).
    if address.parse::<IpAddr>().is_err() {
        check_hostname(&address).map_err(|m| ValidationError::new("address", m))?;
    }
    let port = match map.get("port") {
        None | Some(Value::Null) => return Err(ValidationError::new("port", "is required")),
        Some(Value::Number(n)) => match whole(n) {
            Some(p @ 1..=65535) => u16::try_from(p).expect("in range"),
            _ => {
                return Err(ValidationError::new(
                    "port",
                    format!("must be an integer 1-65535, got {n}"),
                ));
            }
        },
        Some(v) => return Err(expected("port", "an integer 1-65535", v)),
    };
    let version = match map.get("version") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(semver::Version::parse(s).map_err(|e| {
            ValidationError::new("version", format!("not a semantic version: {e}"))
        })?),
        Some(v) => return Err(expected("version", "a semantic version string", v)),
    };
    let tags = match map.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_TAGS {
                return Err(ValidationError::new(
                    "tags",
                    format!("at most {MAX_TAGS} tags"),
                ));
            }
            let mut tags = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let field = format!("tags[{i}]");
                let Value::String(s) = item else {
                    return Err(expected(&field, "a string", item));
                };
                if s.is_empty() || s.chars().count() > MAX_SHORT || !printable(s) {
                    return Err(ValidationError::new(
                        field,
                        format!("must be 1-{MAX_SHORT} printable characters"),
                    ));
                }
                tags.push(s.clone());
            }
            tags
        }
        Some(v) => return Err(expected("tags", "an array of strings", v)),
    };
    let metadata = match map.get("metadata") {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(m)) => {
            if m.len() > MAX_METADATA {
                return Err(ValidationError::new(
                    "metadata",
                    format!("at most {MAX_METADATA} entries"),
                ));
            }
            let mut out = std::collections::BTreeMap::new();
            for (k, v) in m {
                let field = format!("metadata.{k}");
                let key_ok = (1..=MAX_SHORT).contains(&k.len())
                    && k.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/')
                    });
                if !key_ok {
                    return Err(ValidationError::new(
                        "metadata",
                        format!("key {k:?} must match [A-Za-z0-9._/-]{{1,{MAX_SHORT}}}"),
                    ));
                }
                let Value::String(s) = v else {
                    return Err(expected(&field, "a string", v));
                };
                if s.chars().count() > MAX_LONG || !printable(s) {
                    return Err(ValidationError::new(
                        field,
                        format!("must be at most {MAX_LONG} printable characters"),
                    ));
                }
                out.insert(k.clone(), s.clone());
            }
            out
        }
        Some(v) => return Err(expected("metadata", "an object of strings", v)),
    };
    let check = match map.get("check") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_check(v, "check")?),
    };
    Ok(Registration {
        address,
        port,
        version,
        tags,
        metadata,
        check,
    })
}

/// Parses a duration string (`500ms`, `2s`, `5m`, `1h`) within `min..=max`.
pub(crate) fn duration_in(
    s: &str,
    field: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, ValidationError> {
    let ms = parse_ms(s).ok_or_else(|| {
        ValidationError::new(
            field,
            "not a duration: a whole number and one unit of ms, s, m, h (\"500ms\", \"2s\")",
        )
    })?;
    bounded(Duration::from_millis(ms), field, min, max)
}

fn parse_duration(
    value: &Value,
    field: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, ValidationError> {
    let Value::String(s) = value else {
        return Err(expected(field, "a duration string like \"2s\"", value));
    };
    duration_in(s, field, min, max)
}

fn bounded(
    d: Duration,
    field: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, ValidationError> {
    if d < min || d > max {
        return Err(ValidationError::new(
            field,
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(d)
}

fn parse_threshold(
    value: Option<&Value>,
    field: &str,
    default: u32,
) -> Result<u32, ValidationError> {
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => match whole(n) {
            Some(t @ 1..=100) => Ok(u32::try_from(t).expect("in range")),
            _ => Err(ValidationError::new(field, "must be an integer 1-100")),
        },
        Some(v) => Err(expected(field, "an integer 1-100", v)),
    }
}

/// Shortest allowed check interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// Shortest allowed TTL or deregistration delay.
pub const MIN_TTL: Duration = Duration::from_millis(100);
/// Shortest allowed check timeout.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// Longest allowed check interval, TTL or deregistration delay.
pub const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// Parses a `check` object; `prefix` is its JSON path.
pub(crate) fn parse_check(value: &Value, prefix: &str) -> Result<CheckSpec, ValidationError> {
    let Value::Object(map) = value else {
        return Err(expected(prefix, "an object", value));
    };
    let f = |name: &str| format!("{prefix}.{name}");
    const KNOWN: [&str; 8] = [
        "http",
        "tcp",
        "ttl",
        "interval",
        "timeout",
        "healthy_threshold",
        "unhealthy_threshold",
        "deregister_critical_after",
    ];
    if let Some(k) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ValidationError::new(
            f(k),
            format!("unknown field (expected one of {})", KNOWN.join(", ")),
        ));
    }
    let present = |k: &str| map.get(k).is_some_and(|v| !v.is_null());
    let kinds = ["http", "tcp", "ttl"].iter().filter(|k| present(k)).count();
    if kinds != 1 {
        return Err(ValidationError::new(
            prefix,
            "must have exactly one of http, tcp, ttl",
        ));
    }
    let kind = if let Some(v) = map.get("http").filter(|v| !v.is_null()) {
        let Value::String(path) = v else {
            return Err(expected(&f("http"), "a path string like \"/health\"", v));
        };
        // Visible ASCII that `http::uri::PathAndQuery` takes in a path and a
        // query alike: not `"`, `#` (a fragment), `<`, `>` or the backquote.
        let ok = path.starts_with('/')
            && path.len() <= MAX_LONG
            && path
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'#' | b'<' | b'>' | b'`'));
        if !ok || path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(ValidationError::new(
                f("http"),
                format!(
                    "must be a path starting with / of at most {MAX_LONG} visible ASCII characters other than \" # < > `"
                ),
            ));
        }
        CheckKind::Http { path: path.clone() }
    } else if let Some(v) = map.get("tcp").filter(|v| !v.is_null()) {
        if v != &Value::Bool(true) {
            return Err(expected(&f("tcp"), "true", v));
        }
        CheckKind::Tcp
    } else {
        let ttl = parse_duration(&map["ttl"], &f("ttl"), MIN_TTL, MAX_PERIOD)?;
        CheckKind::Ttl { ttl }
    };
    let interval = match map.get("interval").filter(|v| !v.is_null()) {
        Some(v) => parse_duration(v, &f("interval"), MIN_INTERVAL, MAX_PERIOD)?,
        None => CheckSpec::DEFAULT_INTERVAL,
    };
    let timeout = match map.get("timeout").filter(|v| !v.is_null()) {
        // A timeout longer than the interval is cut to it (a schema cannot
        // compare two fields, and a probe cannot outlast its period anyway).
        Some(v) => parse_duration(v, &f("timeout"), MIN_TIMEOUT, MAX_PERIOD)?.min(interval),
        None => CheckSpec::DEFAULT_TIMEOUT.min(interval),
    };
    let healthy_threshold = parse_threshold(
        map.get("healthy_threshold"),
        &f("healthy_threshold"),
        CheckSpec::DEFAULT_HEALTHY_THRESHOLD,
    )?;
    let unhealthy_threshold = parse_threshold(
        map.get("unhealthy_threshold"),
        &f("unhealthy_threshold"),
        CheckSpec::DEFAULT_UNHEALTHY_THRESHOLD,
    )?;
    let deregister_critical_after = match map
        .get("deregister_critical_after")
        .filter(|v| !v.is_null())
    {
        Some(v) => Some(parse_duration(
            v,
            &f("deregister_critical_after"),
            MIN_TTL,
            MAX_PERIOD,
        )?),
        None => None,
    };
    Ok(CheckSpec {
        kind,
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
        deregister_critical_after,
    })
}

/// Validates a registration made in-process (the same rules as the JSON body).
/// The network policy is checked apart, by the caller ([`NetworkPolicy::check`]).
pub(crate) fn registration(reg: &Registration) -> Result<(), ValidationError> {
    // Round-trip through the JSON form so in-process and HTTP registrations obey one rule set.
    parse_registration(&reg.to_json())?;
    if reg.port == 0 {
        return Err(ValidationError::new(
            "port",
            "must be an integer 1-65535, got 0",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names() {
        assert!(service_name("user-service").is_ok());
        assert!(service_name("").is_err());
        assert!(service_name("User").is_err());
        assert!(service_name(&"a".repeat(64)).is_err());
        assert!(instance_id("i-1.a:b_c").is_ok());
        assert!(instance_id("a/b").is_err());
    }

    #[test]
    fn addresses() {
        let p = NetworkPolicy::default();
        assert!(p.check("127.0.0.1").is_ok());
        assert!(p.check("::1").is_ok());
        assert!(p.check("users.internal").is_ok());
        assert_eq!(p.check("169.254.169.254").unwrap_err().field, "address");
        assert!(p.check("0.0.0.0").is_err());
        assert!(p.check("::").is_err());
        assert!(p.check("::ffff:169.254.1.1").is_err());
        assert!(p.check("fe80::1").is_err());
        assert!(p.check("1.2.3.999").is_err());
        assert!(p.check("bad host").is_err());
        let narrow = NetworkPolicy {
            allowed: vec!["10.0.0.0/8".parse().unwrap()],
            allow_hostnames: false,
            ..NetworkPolicy::default()
        };
        assert!(narrow.check("10.1.2.3").is_ok());
        assert!(narrow.check("192.168.1.1").is_err());
        assert!(narrow.check("example.com").is_err());
    }

    /// Found by `fuzz/fuzz_targets/registry_body.rs`: an empty unknown key gave
    /// an error whose field was empty (`invalid : unknown field ...`).
    #[test]
    fn fuzz_regression_empty_unknown_key_is_named() {
        let err = parse_registration(&json!({"": "orders.internal", "port": 8080})).unwrap_err();
        assert_eq!(err.field, "\"\"");
        assert!(
            err.to_string().starts_with("invalid \"\": unknown field"),
            "{err}"
        );
    }

    #[test]
    fn body_errors_name_the_field() {
        let cases = [
            (json!([]), "body"),
            (json!({"port": 1}), "address"),
            (json!({"address": "a"}), "port"),
            (json!({"address": "a", "port": 0}), "port"),
            (json!({"address": "a", "port": 70000}), "port"),
            (json!({"address": "a", "port": "80"}), "port"),
            (
                json!({"address": "a", "port": 80, "version": "1.x"}),
                "version",
            ),
            (json!({"address": "a", "port": 80, "tags": [1]}), "tags[0]"),
            (
                json!({"address": "a", "port": 80, "metadata": {"k": 1}}),
                "metadata.k",
            ),
            (json!({"address": "a", "port": 80, "extra": 1}), "extra"),
            (json!({"address": "a", "port": 80, "check": {}}), "check"),
            (
                json!({"address": "a", "port": 80, "check": {"http": "x"}}),
                "check.http",
            ),
            (
                json!({"address": "a", "port": 80, "check": {"http": "/", "interval": "soon"}}),
                "check.interval",
            ),
            (
                json!({"address": "a", "port": 80, "check": {"http": "/", "interval": "1s", "timeout": "0ms"}}),
                "check.timeout",
            ),
            (
                json!({"address": "a", "port": 80, "check": {"ttl": "1m 30s"}}),
                "check.ttl",
            ),
            (
                json!({"address": "a", "port": 80, "check": {"ttl": "1s", "healthy_threshold": 0}}),
                "check.healthy_threshold",
            ),
            (
                json!({"address": "a", "port": 80, "check": {"tcp": false}}),
                "check.tcp",
            ),
        ];
        for (body, field) in cases {
            let err = parse_registration(&body).unwrap_err();
            assert_eq!(err.field, field, "{body} -> {err}");
        }
    }

    #[test]
    fn full_body_round_trips() {
        let body = json!({"address": "127.0.0.1", "port": 4001, "version": "1.4.0", "tags": ["a"],
            "metadata": {"zone": "a"}, "check": {"http": "/health", "interval": "2s"}});
        let reg = parse_registration(&body).unwrap();
        assert_eq!(reg.port, 4001);
        let check = reg.check.clone().unwrap();
        assert_eq!(check.interval, Duration::from_secs(2));
        assert_eq!(check.timeout, Duration::from_secs(2));
        assert_eq!(parse_registration(&reg.to_json()).unwrap(), reg);
    }

    #[test]
    fn durations_and_their_patterns() {
        assert_eq!(parse_ms("0ms"), Some(0));
        assert_eq!(parse_ms("90s"), Some(90_000));
        assert_eq!(parse_ms("2h"), Some(7_200_000));
        for bad in [
            "", "s", "01s", "1", "1 s", "1.5s", "1m30s", "-1s", "1sec", "1d",
        ] {
            assert_eq!(parse_ms(bad), None, "{bad}");
        }
        assert_eq!(fmt_ms(Duration::from_millis(90_000)), "90s");
        assert_eq!(fmt_ms(Duration::from_millis(1_500)), "1500ms");
        assert_eq!(fmt_ms(Duration::from_secs(7200)), "2h");
        assert_eq!(fmt_ms(Duration::ZERO), "0ms");
        let timeout = parse_registration(
            &json!({"address": "a", "port": 80, "check": {"http": "/", "interval": "1s", "timeout": "2s"}}),
        )
        .unwrap()
        .check
        .unwrap()
        .timeout;
        assert_eq!(timeout, Duration::from_secs(1), "cut to the interval");
    }

    #[test]
    fn range_regexes_match_exactly_the_range() {
        let cases = [
            (0, 0),
            (0, 9),
            (3, 7),
            (5, 123),
            (50, 86_400_000),
            (1, 1440),
            (0, u64::MAX),
            (99, 100),
            (10, 10_000),
        ];
        for (lo, hi) in cases {
            let re = regex::Regex::new(&format!("^(?:{})$", range_regex(lo, hi))).unwrap();
            let probes = [
                0,
                1,
                9,
                10,
                11,
                99,
                100,
                101,
                999,
                1000,
                1440,
                1441,
                49,
                50,
                51,
                86_399_999,
                86_400_000,
                86_400_001,
                u64::MAX - 1,
                u64::MAX,
                lo,
                hi,
                lo.saturating_sub(1),
                hi.saturating_add(1),
            ];
            for n in probes {
                assert_eq!(
                    re.is_match(&n.to_string()),
                    (lo..=hi).contains(&n),
                    "{n} in {lo}..={hi}: {re}"
                );
            }
            assert!(!re.is_match(&format!("0{lo}")), "no leading zero: {re}");
        }
        let big = regex::Regex::new(&format!("^(?:{})$", range_regex(0, u64::MAX))).unwrap();
        assert!(!big.is_match("18446744073709551616"));
        assert!(big.is_match("18446744073709551615"));
    }

    #[test]
    fn null_check_means_no_check_as_the_openapi_schema_says() {
        let reg = parse_registration(&json!({"address": "a", "port": 80, "check": null})).unwrap();
        assert!(reg.check.is_none());
        let doc = crate::http::openapi();
        let check = &doc["components"]["schemas"]["Registration"]["properties"]["check"];
        let alts = check["anyOf"].as_array().expect("check is anyOf");
        assert!(alts.contains(&json!({"type": "null"})), "{check}");
        assert!(
            alts.contains(&json!({"$ref": "#/components/schemas/Check"})),
            "{check}"
        );
    }
}
