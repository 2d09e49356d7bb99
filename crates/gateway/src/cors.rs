//! CORS per route (the Fetch standard's CORS protocol), answered at the gateway.
//!
//! `cors = { origins = ["https://app.example"], methods = ["GET", "POST"],
//! headers = ["content-type"], expose = ["x-request-id"], credentials = false, max_age = "10m" }`
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
//!   is answered by the gateway and never reaches the upstream: 204 with
//!   `Access-Control-Allow-Origin`, `-Methods`, `-Headers`, `-Max-Age` (and
//!   `-Credentials`) when the origin is allowed, 403 problem+json when not.
//!   The browser enforces the method and header lists itself.
//! - Other requests from an allowed origin get `Access-Control-Allow-Origin`
//!   (the origin itself, or `*` when `origins = ["*"]` without credentials),
//!   `-Credentials` and `-Expose-Headers`.
//! - Every response of the route carries `Vary: Origin` (unless the route
//!   answers `*`), so caches keep one copy per origin.
//!
//! Every header value is built once from the config.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde::Deserialize;

/// `cors = { ... }` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// Allowed origins (`scheme://host[:port]`), or `["*"]`.
    pub origins: Vec<String>,
    /// Allowed methods (default `GET`, `HEAD`, `POST`).
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Allowed request headers (default none beyond the CORS-safelisted ones).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Response headers the browser may expose to scripts.
    #[serde(default)]
    pub expose: Vec<String>,
    /// Allow credentials (cookies, Authorization).
    #[serde(default)]
    pub credentials: bool,
    /// How long a browser may cache a preflight (default `5s`, the Fetch default).
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

/// A route's CORS policy, with prebuilt header values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// Lowercased allowed origins; empty means any (`*`).
    origins: Vec<HeaderValue>,
    any: bool,
    credentials: bool,
    methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: HeaderValue,
}

/// `Access-Control-Request-Method`.
pub static ACRM: HeaderName = HeaderName::from_static("access-control-request-method");

/// Checks an origin: `scheme://host[:port]`, lowercase-insensitive, no path.
pub fn parse_origin(s: &str) -> Result<String, String> {
    let bad = || format!("`{s}` is not an origin (use scheme://host[:port], or \"*\")");
    let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        || rest.is_empty()
        || rest.contains(['/', '?', '#', '@', ' '])
    {
        return Err(bad());
    }
    let uri: http::Uri = s.parse().map_err(|_| bad())?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad());
    }
    Ok(s.to_ascii_lowercase())
}

fn join_header(items: &[String]) -> Option<HeaderValue> {
    if items.is_empty() {
        return None;
    }
    HeaderValue::from_str(&items.join(", ")).ok()
}

impl RawCors {
    /// Validates and builds; errors are `(key suffix, message)`.
    pub fn resolve(&self) -> Result<Cors, (String, String)> {
        let e = |k: &str, m: String| (format!("cors.{k}"), m);
        if self.origins.is_empty() {
            return Err(e("origins", "must not be empty".into()));
        }
        let any = self.origins.iter().any(|o| o == "*");
        if any && self.origins.len() > 1 {
            return Err(e(
                "origins",
                "\"*\" allows every origin; list no others with it".into(),
            ));
        }
        if any && self.credentials {
            return Err(e(
                "credentials",
                "browsers refuse credentials with `origins = [\"*\"]`; list the origins".into(),
            ));
        }
        let mut origins = Vec::new();
        if !any {
            for o in &self.origins {
                let o = parse_origin(o).map_err(|m| e("origins", m))?;
                origins.push(HeaderValue::from_str(&o).map_err(|_| e("origins", o.clone()))?);
            }
        }
        let methods: Vec<String> = match &self.methods {
            None => vec!["GET".into(), "HEAD".into(), "POST".into()],
            Some(m) if m.is_empty() => return Err(e("methods", "must not be empty".into())),
            Some(m) => m
                .iter()
                .map(|x| {
                    Method::from_bytes(x.to_ascii_uppercase().as_bytes())
                        .map(|m| m.as_str().to_owned())
                        .map_err(|_| e("methods", format!("`{x}` is not an HTTP method")))
                })
                .collect::<Result<_, _>>()?,
        };
        let names = |k: &str, l: &[String]| -> Result<Vec<String>, (String, String)> {
            l.iter()
                .map(|h| {
                    HeaderName::from_bytes(h.as_bytes())
                        .map(|n| n.as_str().to_owned())
                        .map_err(|_| e(k, format!("`{h}` is not a valid header name")))
                })
                .collect()
        };
        let allow_headers = join_header(&names("headers", &self.headers)?);
        let expose = join_header(&names("expose", &self.expose)?);
        let max_age = self.max_age.unwrap_or(Duration::from_secs(5));
        if max_age > Duration::from_secs(86400) {
            return Err(e(
                "max_age",
                "must be at most 24h (browsers cap it lower)".into(),
            ));
        }
        Ok(Cors {
            origins,
            any,
            credentials: self.credentials,
            methods: join_header(&methods).unwrap_or(HeaderValue::from_static("GET")),
            allow_headers,
            expose,
            max_age: HeaderValue::from(max_age.as_secs()),
        })
    }
}

/// A preflight's outcome.
#[derive(Debug)]
pub enum Preflight {
    /// Not a preflight: handle as a normal request.
    No,
    /// Answer 204 with these headers.
    Allow(HeaderMap),
    /// Origin not allowed: answer 403.
    Deny,
}

impl Cors {
    fn allowed(&self, origin: &HeaderValue) -> bool {
        self.any
            || self
                .origins
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
    }

    fn allow_origin(&self, h: &mut HeaderMap, origin: &HeaderValue) {
        if self.any {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        } else {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.append(header::VARY, HeaderValue::from_static("origin"));
        }
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// Recognises a preflight and builds its answer.
    pub fn preflight(&self, method: &Method, req: &HeaderMap) -> Preflight {
        if method != Method::OPTIONS || !req.contains_key(&ACRM) {
            return Preflight::No;
        }
        let Some(origin) = req.get(header::ORIGIN) else {
            return Preflight::No;
        };
        if !self.allowed(origin) {
            return Preflight::Deny;
        }
        let mut h = HeaderMap::new();
        self.allow_origin(&mut h, origin);
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        if let Some(a) = &self.allow_headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, a.clone());
        }
        h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        Preflight::Allow(h)
    }

    /// Adds the response headers of an actual (non-preflight) request.
    pub fn apply(&self, origin: Option<&HeaderValue>, res: &mut HeaderMap) {
        if res.contains_key(header::ACCESS_CONTROL_ALLOW_METHODS) {
            // An answered preflight already has its CORS headers.
            return;
        }
        match origin {
            Some(o) if self.allowed(o) => {
                self.allow_origin(res, o);
                if let Some(x) = &self.expose {
                    res.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, x.clone());
                }
            }
            _ if !self.any => {
                res.append(header::VARY, HeaderValue::from_static("origin"));
            }
            _ => {}
        }
    }

    /// The status of a denied preflight.
    pub fn deny_status() -> StatusCode {
        StatusCode::FORBIDDEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(origins: &[&str], credentials: bool) -> RawCors {
        RawCors {
            origins: origins.iter().map(|s| (*s).to_owned()).collect(),
            methods: Some(vec!["get".into(), "POST".into()]),
            headers: vec!["Content-Type".into()],
            expose: vec![],
            credentials,
            max_age: Some(Duration::from_secs(600)),
        }
    }

    #[test]
    fn preflight_allowed_and_denied() {
        let c = raw(&["https://App.example"], true).resolve().unwrap();
        let mut req = HeaderMap::new();
        req.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example"),
        );
        req.insert(ACRM.clone(), HeaderValue::from_static("POST"));
        let Preflight::Allow(h) = c.preflight(&Method::OPTIONS, &req) else {
            panic!()
        };
        assert_eq!(h["access-control-allow-origin"], "https://app.example");
        assert_eq!(h["access-control-allow-methods"], "GET, POST");
        assert_eq!(h["access-control-allow-headers"], "content-type");
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["vary"], "origin");
        req.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(matches!(
            c.preflight(&Method::OPTIONS, &req),
            Preflight::Deny
        ));
        assert!(matches!(c.preflight(&Method::GET, &req), Preflight::No));
    }

    #[test]
    fn invalid_configs() {
        assert_eq!(
            raw(&["*"], true).resolve().unwrap_err().0,
            "cors.credentials"
        );
        assert_eq!(
            raw(&["*", "https://a.b"], false).resolve().unwrap_err().0,
            "cors.origins"
        );
        assert!(
            raw(&["https://a.b/path"], false)
                .resolve()
                .unwrap_err()
                .1
                .contains("`https://a.b/path`")
        );
        assert!(raw(&[], false).resolve().is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_origin_never_panics(s in "\\PC{0,40}") {
            if let Ok(o) = parse_origin(&s) {
                proptest::prop_assert!(HeaderValue::from_str(&o).is_ok());
            }
        }

        #[test]
        fn origins_round_trip(host in "[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,5})?", port in proptest::option::of(1u16..)) {
            let o = match port { Some(p) => format!("https://{host}:{p}"), None => format!("https://{host}") };
            proptest::prop_assert_eq!(parse_origin(&o), Ok(o.clone()));
        }
    }
}
