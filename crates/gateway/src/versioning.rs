//! API versioning: a route selects instances by the semver major of their
//! registered `version`, and a deprecated route says so in its responses.
//!
//! Two ways to choose the major:
//! - **path**: the route's prefix carries the version (`prefix = "/v1/users"`)
//!   and `version = { major = 1 }` pins it. The filter is applied when
//!   discovery publishes a snapshot, so a request pays nothing for it.
//! - **header**: `version = { header = "Api-Version", default = 2 }` reads the
//!   major from the header (`2`, `v2`, `2.1`), falling back to `default`. The
//!   snapshot keeps one instance list per major; a request picks a list.
//!
//! Instances registered without a version never serve a versioned route.
//!
//! `deprecated = { since = "2026-01-01", sunset = "2026-12-31", successor = "/v2/users" }`
//! adds `Deprecation: @<unix seconds>` (RFC 9745, a structured-field date),
//! `Sunset: <HTTP-date>` (RFC 8594) and
//! `Link: </v2/users>; rel="successor-version"` (RFC 5829) to every response.
//! The header values are built once from the config.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

/// `Deprecation` (RFC 9745).
pub static DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
/// `Sunset` (RFC 8594).
pub static SUNSET: HeaderName = HeaderName::from_static("sunset");
/// The default version header.
pub static API_VERSION: HeaderName = HeaderName::from_static("api-version");

/// `version = { ... }` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVersion {
    /// Pin the route to this major (path versioning: `/v1/...`).
    pub major: Option<u64>,
    /// Read the major from this request header (default `Api-Version`).
    pub header: Option<String>,
    /// The major used when the header is absent (header versioning).
    pub default: Option<u64>,
}

/// `deprecated = { ... }` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeprecated {
    /// When the route was deprecated: RFC 3339 (`2026-01-01T00:00:00Z`) or a date.
    pub since: String,
    /// When it stops working: RFC 3339 or a date.
    pub sunset: Option<String>,
    /// URI of the successor (`/v2/users` or an absolute URL).
    pub successor: Option<String>,
}

/// How a route chooses the major version of its instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSelect {
    /// Always this major (the prefix carries it).
    Pinned(u64),
    /// From a header, with a default.
    Header {
        /// Header read.
        name: HeaderName,
        /// Used when the header is absent.
        default: u64,
    },
}

/// The response headers of a deprecated route, built once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deprecation {
    /// `Deprecation: @<unix>`.
    pub deprecation: HeaderValue,
    /// `Sunset: <HTTP-date>`.
    pub sunset: Option<HeaderValue>,
    /// `Link: <successor>; rel="successor-version"`.
    pub link: Option<HeaderValue>,
}

impl Deprecation {
    /// Adds the headers to a response.
    pub fn apply(&self, h: &mut HeaderMap) {
        h.insert(DEPRECATION.clone(), self.deprecation.clone());
        if let Some(s) = &self.sunset {
            h.insert(SUNSET.clone(), s.clone());
        }
        if let Some(l) = &self.link {
            h.append(http::header::LINK, l.clone());
        }
    }
}

impl RawVersion {
    /// Validates; errors are `(key suffix, message)`.
    pub fn resolve(&self) -> Result<VersionSelect, (String, String)> {
        match (self.major, self.default) {
            (Some(_), Some(_)) => Err((
                "version".into(),
                "set either `major` (path versioning) or `default` (header versioning), not both"
                    .into(),
            )),
            (Some(_), None) if self.header.is_some() => Err((
                "version.header".into(),
                "`header` needs `default` instead of `major`".into(),
            )),
            (Some(m), None) => Ok(VersionSelect::Pinned(m)),
            (None, Some(d)) => {
                let name = match &self.header {
                    None => API_VERSION.clone(),
                    Some(h) => HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                        (
                            "version.header".into(),
                            format!("`{h}` is not a valid header name"),
                        )
                    })?,
                };
                Ok(VersionSelect::Header { name, default: d })
            }
            (None, None) => Err((
                "version".into(),
                "set `major` (path versioning) or `default` (header versioning)".into(),
            )),
        }
    }
}

impl RawDeprecated {
    /// Validates and builds the header values; errors are `(key suffix, message)`.
    pub fn resolve(&self) -> Result<Deprecation, (String, String)> {
        let since = parse_time(&self.since).map_err(|m| ("deprecated.since".to_owned(), m))?;
        let secs = since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let deprecation = HeaderValue::from_str(&format!("@{secs}"))
            .unwrap_or_else(|_| HeaderValue::from_static("@0"));
        let sunset = match &self.sunset {
            None => None,
            Some(s) => {
                let t = parse_time(s).map_err(|m| ("deprecated.sunset".to_owned(), m))?;
                if t < since {
                    return Err((
                        "deprecated.sunset".into(),
                        "must not be before `since`".into(),
                    ));
                }
                HeaderValue::from_str(&httpdate::fmt_http_date(t)).ok()
            }
        };
        let link = match &self.successor {
            None => None,
            Some(s) => Some(successor_link(s).map_err(|m| ("deprecated.successor".to_owned(), m))?),
        };
        Ok(Deprecation {
            deprecation,
            sunset,
            link,
        })
    }
}

/// `<uri>; rel="successor-version"`, refusing what would break the header.
pub fn successor_link(uri: &str) -> Result<HeaderValue, String> {
    if uri.is_empty()
        || uri.bytes().any(|b| {
            !b.is_ascii()
                || b.is_ascii_whitespace()
                || b.is_ascii_control()
                || matches!(b, b'<' | b'>' | b'"')
        })
        || uri.parse::<http::Uri>().is_err()
    {
        return Err(format!("`{uri}` is not a URI reference"));
    }
    HeaderValue::from_str(&format!("<{uri}>; rel=\"successor-version\""))
        .map_err(|_| format!("`{uri}` cannot be sent in a header"))
}

/// RFC 3339 (`2026-01-01T00:00:00Z`) or a bare date (`2026-01-01`, midnight UTC).
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    let full = if s.len() == 10 && !s.contains('T') {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    let t = humantime::parse_rfc3339(&full).map_err(|_| {
        format!("`{s}` is not a date (use RFC 3339, e.g. `2026-01-01T00:00:00Z`, or `2026-01-01`)")
    })?;
    if t < UNIX_EPOCH + Duration::from_secs(1) {
        return Err(format!("`{s}` is before 1970"));
    }
    Ok(t)
}

/// The major in an `Api-Version` value: `2`, `v2`, `V2`, `2.1`, `2.1.3`.
pub fn parse_major(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    let v = v
        .strip_prefix(b"v")
        .or_else(|| v.strip_prefix(b"V"))
        .unwrap_or(v);
    let end = v.iter().position(|&b| b == b'.').unwrap_or(v.len());
    let (major, rest) = v.split_at(end);
    if major.is_empty() || major.len() > 19 || !major.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if !rest.is_empty() {
        let rest = &rest[1..];
        if rest.is_empty() || !rest.iter().all(|&b| b.is_ascii_digit() || b == b'.') {
            return None;
        }
    }
    std::str::from_utf8(major).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors() {
        assert_eq!(parse_major(b"2"), Some(2));
        assert_eq!(parse_major(b" v3 "), Some(3));
        assert_eq!(parse_major(b"1.4.0"), Some(1));
        for bad in [
            &b""[..],
            b"v",
            b"two",
            b"1.",
            b"-1",
            b"1.x",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_major(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn deprecation_headers() {
        let d = RawDeprecated {
            since: "2023-06-30T23:59:59Z".into(),
            sunset: Some("2024-01-01".into()),
            successor: Some("/v2/users".into()),
        }
        .resolve()
        .unwrap();
        assert_eq!(d.deprecation, "@1688169599");
        assert_eq!(d.sunset.unwrap(), "Mon, 01 Jan 2024 00:00:00 GMT");
        assert_eq!(d.link.unwrap(), "</v2/users>; rel=\"successor-version\"");
        let e = RawDeprecated {
            since: "2024-01-01".into(),
            sunset: Some("2023-01-01".into()),
            successor: None,
        }
        .resolve()
        .unwrap_err();
        assert_eq!(e.0, "deprecated.sunset");
        let e = RawDeprecated {
            since: "yesterday".into(),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.1.contains("`yesterday`"), "{e:?}");
    }

    #[test]
    fn version_select() {
        let v = |major, header: Option<&str>, default| RawVersion {
            major,
            header: header.map(Into::into),
            default,
        };
        assert_eq!(
            v(Some(1), None, None).resolve(),
            Ok(VersionSelect::Pinned(1))
        );
        assert!(v(Some(1), None, Some(1)).resolve().is_err());
        assert!(v(None, None, None).resolve().is_err());
        assert!(v(None, Some("bad header"), Some(1)).resolve().is_err());
        assert_eq!(
            v(None, Some("X-Version"), Some(2)).resolve(),
            Ok(VersionSelect::Header {
                name: HeaderName::from_static("x-version"),
                default: 2
            })
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_major_never_panics(s in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..30)) {
            let _ = parse_major(&s);
        }

        #[test]
        fn parse_major_reads_semver(m in 0u64..1_000_000, n in 0u64..1000, p in 0u64..1000, v in proptest::prelude::any::<bool>()) {
            let s = format!("{}{m}.{n}.{p}", if v { "v" } else { "" });
            proptest::prop_assert_eq!(parse_major(s.as_bytes()), Some(m));
        }

        #[test]
        fn successor_link_is_a_valid_header_or_an_error(s in "\\PC{0,40}") {
            if let Ok(v) = successor_link(&s) {
                let text = v.to_str().unwrap();
                proptest::prop_assert!(text.starts_with('<'));
                proptest::prop_assert!(text.ends_with("; rel=\"successor-version\""));
            }
        }

        #[test]
        fn parse_time_never_panics(s in "\\PC{0,40}") {
            let _ = parse_time(&s);
        }
    }
}
