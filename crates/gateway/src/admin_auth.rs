//! Bearer-token protection of the admin listener's writes.
//!
//! Every request to the admin listener whose method is not `GET`, `HEAD` or
//! `OPTIONS` needs `Authorization: Bearer TOKEN` when a token is configured
//! (`gateway.admin_token`, else `registry.token`); without one it gets 401
//! problem+json with `WWW-Authenticate: Bearer`. The listener serves the
//! gateway's own admin routes and whatever is merged into it (the registry
//! API, which checks the same token again), so one layer covers every write,
//! including routes added later. Without a token the admin listener must be
//! on loopback: [`GatewayBuilder::start`](crate::GatewayBuilder::start) and
//! [`start`](crate::start) refuse anything else.
//!
//! Tokens are compared in constant time (`subtle`), so response timing does
//! not reveal how much of a guess was right.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq as _;

/// True when `authorization` is `Bearer <token>` (scheme case-insensitive).
pub fn bearer_matches(authorization: Option<&HeaderValue>, token: &str) -> bool {
    let Some(v) = authorization else {
        return false;
    };
    let v = v.as_bytes();
    if v.len() < 7 || !v[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let given = v[7..].trim_ascii();
    bool::from(given.ct_eq(token.as_bytes()))
}

fn unauthorized(detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "/problems/unauthorized",
        "title": "Unauthorized",
        "status": 401,
        "detail": detail,
    });
    let mut res = (StatusCode::UNAUTHORIZED, body.to_string()).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

/// Wraps `app` so its writes need the bearer `token` (`None`: unchanged).
pub fn protect_writes(app: Router, token: Option<String>) -> Router {
    let Some(token) = token else {
        return app;
    };
    let token: std::sync::Arc<str> = token.into();
    app.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let token = std::sync::Arc::clone(&token);
            async move {
                let m = req.method();
                if m == Method::GET || m == Method::HEAD || m == Method::OPTIONS {
                    return next.run(req).await;
                }
                let auth = req.headers().get(header::AUTHORIZATION);
                if bearer_matches(auth, &token) {
                    next.run(req).await
                } else if auth.is_none() {
                    unauthorized("admin writes need an Authorization: Bearer token header")
                } else {
                    unauthorized("the bearer token is wrong")
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(bearer_matches(Some(&v("Bearer s3cret")), "s3cret"));
        assert!(bearer_matches(Some(&v("bearer  s3cret ")), "s3cret"));
        assert!(!bearer_matches(Some(&v("Bearer s3cre")), "s3cret"));
        assert!(!bearer_matches(Some(&v("Basic s3cret")), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }

    proptest::proptest! {
        #[test]
        fn only_the_token_matches(t in "[!-~]{1,40}", g in "[!-~]{0,40}") {
            let h = HeaderValue::from_str(&format!("Bearer {g}")).unwrap();
            proptest::prop_assert_eq!(bearer_matches(Some(&h), &t), g == t);
        }
    }
}
