//! RFC 9457 problem+json responses: every gateway error becomes one of these
//! and never reaches hyper as an error.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ResBody;
use crate::headers::X_REQUEST_ID;

/// What went wrong, as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// 400: the request's framing is ambiguous or invalid.
    BadRequest,
    /// 404: no route matches.
    NoRoute,
    /// 408: the client did not send its request body in time.
    RequestTimeout,
    /// 413: the body exceeds the route's limit.
    PayloadTooLarge,
    /// 502: the upstream failed (connection refused or reset, bad response).
    BadGateway,
    /// 503: no passing instance.
    NoHealthyInstance,
    /// 503 + Retry-After: every instance's breaker is open.
    BreakerOpen,
    /// 504: the upstream did not answer in time.
    GatewayTimeout,
    /// 400: a header the route reads is malformed (the connection stays usable).
    InvalidRequest,
    /// 403: a CORS preflight from an origin the route does not allow.
    CorsDenied,
    /// 429: over the route's rate limit.
    TooManyRequests,
    /// 409: a request with this idempotency key is still in flight.
    IdempotencyInFlight,
    /// 422: the idempotency key was used with a different request.
    IdempotencyMismatch,
    /// 431: the request head has too many or too large header fields.
    HeaderFieldsTooLarge,
    /// 409: the same request with this idempotency key was already processed,
    /// but its response was over the route's `max_response_bytes`, so there is
    /// nothing to replay and it must not run again.
    ///
    /// 409 Conflict, like [`Problem::IdempotencyInFlight`]: the request is
    /// well formed and matches the key's first use (so not 422, which says the
    /// client reused a key for a different request), but it conflicts with
    /// the key's state: that request is done. Its own `type` and no
    /// `Retry-After` tell a client it is final until the key's `ttl` ends,
    /// unlike the in-flight 409, which is worth retrying. Not 5xx: nothing
    /// failed, and a client or proxy that retries 5xx would only be refused again.
    IdempotencyNotKept,
}

impl Problem {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Problem::BadRequest => StatusCode::BAD_REQUEST,
            Problem::NoRoute => StatusCode::NOT_FOUND,
            Problem::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Problem::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::BadGateway => StatusCode::BAD_GATEWAY,
            Problem::NoHealthyInstance | Problem::BreakerOpen => StatusCode::SERVICE_UNAVAILABLE,
            Problem::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Problem::InvalidRequest => StatusCode::BAD_REQUEST,
            Problem::CorsDenied => StatusCode::FORBIDDEN,
            Problem::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Problem::IdempotencyInFlight | Problem::IdempotencyNotKept => StatusCode::CONFLICT,
            Problem::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::HeaderFieldsTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The `type` URI (a stable, relative identifier).
    pub fn type_uri(self) -> &'static str {
        match self {
            Problem::BadRequest => "/problems/bad-request",
            Problem::NoRoute => "/problems/no-route",
            Problem::RequestTimeout => "/problems/request-timeout",
            Problem::PayloadTooLarge => "/problems/payload-too-large",
            Problem::BadGateway => "/problems/bad-gateway",
            Problem::NoHealthyInstance => "/problems/no-healthy-instance",
            Problem::BreakerOpen => "/problems/breaker-open",
            Problem::GatewayTimeout => "/problems/gateway-timeout",
            Problem::InvalidRequest => "/problems/invalid-request",
            Problem::CorsDenied => "/problems/cors-origin-denied",
            Problem::TooManyRequests => "/problems/rate-limited",
            Problem::IdempotencyInFlight => "/problems/idempotency-key-in-flight",
            Problem::IdempotencyMismatch => "/problems/idempotency-key-reused",
            Problem::HeaderFieldsTooLarge => "/problems/header-fields-too-large",
            Problem::IdempotencyNotKept => "/problems/idempotency-response-not-kept",
        }
    }

    /// The short human `title`.
    pub fn title(self) -> &'static str {
        match self {
            Problem::BadRequest => "Bad request",
            Problem::NoRoute => "No route",
            Problem::RequestTimeout => "Request timeout",
            Problem::PayloadTooLarge => "Payload too large",
            Problem::BadGateway => "Bad gateway",
            Problem::NoHealthyInstance => "No healthy instance",
            Problem::BreakerOpen => "Circuit breaker open",
            Problem::GatewayTimeout => "Gateway timeout",
            Problem::InvalidRequest => "Invalid request",
            Problem::CorsDenied => "Origin not allowed",
            Problem::TooManyRequests => "Too many requests",
            Problem::IdempotencyInFlight => "Idempotency key in flight",
            Problem::IdempotencyMismatch => "Idempotency key reused",
            Problem::HeaderFieldsTooLarge => "Request header fields too large",
            Problem::IdempotencyNotKept => "Already processed, response not kept",
        }
    }
}

/// Builds the problem+json response. `retry_after` (seconds) adds the header.
pub fn response(
    problem: Problem,
    detail: &str,
    request_id: &HeaderValue,
    retry_after: Option<u64>,
) -> Response<ResBody> {
    let body = serde_json::json!({
        "type": problem.type_uri(),
        "title": problem.title(),
        "status": problem.status().as_u16(),
        "detail": detail,
        "request_id": request_id.to_str().unwrap_or(""),
    });
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let mut res = Response::new(ResBody::full(bytes));
    *res.status_mut() = problem.status();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    if let Some(secs) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if matches!(
        problem,
        Problem::BadRequest | Problem::RequestTimeout | Problem::HeaderFieldsTooLarge
    ) {
        // The framing is untrustworthy (or the body unfinished): the rest of
        // the stream cannot be parsed.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}
