//! The dashboard's HTTP handlers: the page and its assets, the SSE stream,
//! the search, and the token check.

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::Dashboard;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");

/// Longest search text accepted.
pub const MAX_QUERY: usize = 128;
/// Most hits of each kind a search returns.
const MAX_HITS: usize = 50;

pub(super) fn router(d: Dashboard) -> Router {
    Router::new()
        .route(
            "/dashboard",
            get(|| asset(INDEX_HTML, "text/html; charset=utf-8")),
        )
        .route(
            "/dashboard/app.css",
            get(|| asset(APP_CSS, "text/css; charset=utf-8")),
        )
        .route(
            "/dashboard/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route("/v1/stream", get(sse))
        .route("/v1/search", get(search))
        .with_state(d)
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Everything the page needs is on this origin: nothing else may load.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'",
        ),
    );
    res
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let mut res = (
        status,
        axum::Json(json!({
            "type": format!("/problems/{}", title.to_lowercase().replace(' ', "-")),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        })),
    )
        .into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    res
}

/// A 401 unless the request carries the token (when one is set).
fn refuse(d: &Dashboard, headers: &HeaderMap) -> Option<Response> {
    let token = d.inner.sources.token.as_ref()?;
    let given = headers.get(header::AUTHORIZATION);
    if crate::admin_auth::bearer_matches(given, token) {
        return None;
    }
    Some(match given {
        Some(_) => problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the bearer token in the Authorization header is not the admin token",
        ),
        None => problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "this admin listener has a token: send Authorization: Bearer TOKEN",
        ),
    })
}

async fn sse(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Some(res) = refuse(&d, &headers) {
        return res;
    }
    let (history, latest, rx) = d.subscribe();
    let mut first = vec![Bytes::from_static(b"retry: 2000\n\n"), history];
    first.extend(latest);
    let head = stream::iter(first.into_iter().map(Ok::<_, std::convert::Infallible>));
    let stop = d.inner.stop.clone();
    let frames = stream::unfold(rx, move |mut rx| {
        let stop = stop.clone();
        async move {
            loop {
                let r = tokio::select! {
                    () = stop.cancelled() => return None,
                    r = rx.recv() => r,
                };
                match r {
                    Ok(frame) => return Some((Ok(frame), rx)),
                    // Too slow: the skipped frames are gone, carry on with the newest.
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    let mut res = Response::new(Body::from_stream(futures::StreamExt::chain(head, frames)));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// `GET /v1/search?q=TEXT`.
#[derive(Debug, Deserialize)]
pub(super) struct SearchParams {
    q: Option<String>,
}

/// What [`parse_query`] accepts, as the OpenAPI document states it.
pub(crate) const QUERY_PATTERN: &str = "^[\\t\\n\\f\\r ]*[!-~]{1,128}[\\t\\n\\f\\r ]*$";

/// Checks the search text: 1 to [`MAX_QUERY`] visible ASCII characters
/// (request ids and CloudEvents ids are), surrounding ASCII whitespace ignored.
pub fn parse_query(q: Option<&str>) -> Result<&str, String> {
    let Some(q) = q else {
        return Err("query parameter `q` is missing: give a request id or correlation id".into());
    };
    let q = q.trim_ascii();
    if q.is_empty() {
        return Err("query parameter `q` is empty".into());
    }
    if q.len() > MAX_QUERY {
        return Err(format!(
            "query parameter `q` is {} bytes long; at most {MAX_QUERY}",
            q.len()
        ));
    }
    if let Some((i, c)) = q.char_indices().find(|(_, c)| !c.is_ascii_graphic()) {
        return Err(format!(
            "query parameter `q` has {c:?} at byte {i}; only visible ASCII is allowed"
        ));
    }
    Ok(q)
}

fn matches(hay: &str, needle: &str) -> bool {
    hay.eq_ignore_ascii_case(needle)
        || (needle.len() >= 3
            && hay
                .to_ascii_lowercase()
                .contains(&needle.to_ascii_lowercase()))
}

async fn search(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(p): Query<SearchParams>,
) -> Response {
    if let Some(res) = refuse(&d, &headers) {
        return res;
    }
    let q = match parse_query(p.q.as_deref()) {
        Ok(q) => q,
        Err(detail) => return problem(StatusCode::BAD_REQUEST, "Bad search", &detail),
    };
    let gw = d.inner.gw;
    let mut requests: Vec<Value> = Vec::new();
    gw.access.ring().scan(|r| {
        let rec = &r.record;
        let id = rec.request_id.to_str().unwrap_or("");
        if matches(id, q) {
            let route = rec.route.map(|l| l.route.as_str());
            requests.push(json!({
                "t": r.time_ms,
                "request_id": id,
                "method": rec.method.as_str(),
                "route": route,
                "instance": rec.instance.map(|a| a.to_string()),
                "status": rec.status,
                "duration_ms": rec.duration.as_secs_f64() * 1000.0,
                "attempts": rec.attempts,
            }));
        }
        requests.len() < MAX_HITS
    });
    let events = d
        .inner
        .sources
        .bus
        .as_ref()
        .map(|b| b.stats().find(q, MAX_HITS))
        .unwrap_or_default();
    axum::Json(json!({"q": q, "requests": requests, "events": events})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn queries() {
        assert_eq!(parse_query(Some(" demo-1 ")), Ok("demo-1"));
        assert!(parse_query(None).unwrap_err().contains("missing"));
        assert!(parse_query(Some("  ")).unwrap_err().contains("empty"));
        assert!(parse_query(Some("a b")).unwrap_err().contains("byte 1"));
        assert!(
            parse_query(Some(&"x".repeat(200)))
                .unwrap_err()
                .contains("200 bytes")
        );
        assert!(matches("ABC-123", "abc") && matches("x", "X") && !matches("xy", "y"));
    }

    proptest! {
        #[test]
        fn accepted_queries_are_trimmed_visible_ascii(s in "\\PC{0,150}") {
            match parse_query(Some(&s)) {
                Ok(q) => {
                    prop_assert!(!q.is_empty() && q.len() <= MAX_QUERY);
                    prop_assert!(q.bytes().all(|b| b.is_ascii_graphic()));
                    prop_assert_eq!(q, s.trim_ascii());
                }
                Err(e) => prop_assert!(e.contains("`q`")),
            }
        }

        /// The OpenAPI pattern of `q` says exactly what is accepted.
        #[test]
        fn the_openapi_pattern_agrees(s in "[ \t\n!-~]{0,3}[\\PC\t\n\r\x0c ]{0,4}[ !-~]{0,130}[ \t\u{a0}]{0,2}") {
            let re = regex::Regex::new(QUERY_PATTERN).unwrap();
            prop_assert_eq!(re.is_match(&s), parse_query(Some(&s)).is_ok(), "{:?}", s);
        }
    }
}
