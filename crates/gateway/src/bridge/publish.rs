//! `POST /v1/events`: CloudEvents over HTTP onto the bus.
//!
//! The request is read up to the size limit (413 beyond), parsed in whichever
//! mode it uses ([`super::http_binding::parse`]: 400 naming the attribute,
//! 415 for other content types), given the request's `traceparent` and
//! correlation id (`correlationid` or `x-request-id` header) where the event
//! carries none, and published; the answer is 202 only once the bus has
//! accepted every event (durably, on a durable backend). Each event goes to
//! the topic named by its `type`, as [`switchboard_bus::Bus::publish`] does.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt as _;
use switchboard_bus::{BusError, Event};

use super::Bridge;
use super::http_binding::{self, ErrorKind, Mode};

/// The request header carrying a correlation id (besides `x-request-id`).
pub const CORRELATION_ID: HeaderName = HeaderName::from_static("correlationid");

/// A publish answer: status, problem or acceptance, as bytes.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) content_type: &'static str,
    pub(crate) retry_after: Option<u64>,
    pub(crate) body: Bytes,
}

impl Answer {
    pub(crate) fn problem(
        status: StatusCode,
        slug: &str,
        title: &str,
        detail: &str,
        extra: &[(&str, serde_json::Value)],
        request_id: &HeaderValue,
    ) -> Self {
        let mut body = serde_json::json!({
            "type": format!("/problems/{slug}"),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
            "request_id": request_id.to_str().unwrap_or(""),
        });
        for (k, v) in extra {
            body[*k] = v.clone();
        }
        Answer {
            status,
            content_type: "application/problem+json",
            retry_after: None,
            body: Bytes::from(body.to_string()),
        }
    }

    /// As an HTTP response with any body type built from bytes.
    pub(crate) fn into_response<B: From<Bytes>>(self, request_id: HeaderValue) -> Response<B> {
        let mut res = Response::new(B::from(self.body));
        *res.status_mut() = self.status;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        h.insert(crate::headers::X_REQUEST_ID.clone(), request_id);
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

/// A valid `traceparent` request header, if any.
fn header_traceparent(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(&crate::headers::TRACEPARENT)?.to_str().ok()?;
    switchboard_bus::event::is_traceparent(v).then(|| v.to_owned())
}

/// The request's correlation id: `correlationid`, else a sane `x-request-id`.
fn header_correlation(headers: &HeaderMap) -> Option<String> {
    [&CORRELATION_ID, &crate::headers::X_REQUEST_ID]
        .into_iter()
        .filter_map(|n| headers.get(n))
        .find(|v| crate::correlation::is_sane_request_id(v.as_bytes()))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Fills in the request's correlation where the event has none.
fn correlate(event: Event, traceparent: Option<&str>, correlation: Option<&str>) -> Event {
    let add_tp = traceparent.filter(|_| event.traceparent().is_none());
    let add_cid = correlation.filter(|_| event.correlation_id().is_none());
    if add_tp.is_none() && add_cid.is_none() {
        return event;
    }
    let mut b = event.to_builder();
    if let Some(tp) = add_tp {
        b = b.traceparent(tp);
    }
    if let Some(c) = add_cid {
        b = b.correlation_id(c);
    }
    // Both values were validated above; keep the original if not.
    b.build().unwrap_or(event)
}

/// Handles one publish request (either listener).
pub(crate) async fn publish<B>(
    bridge: &Bridge,
    headers: &HeaderMap,
    body: B,
    request_id: &HeaderValue,
) -> Answer
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let answer = publish_inner(bridge, headers, body, request_id).await;
    if !answer.status.is_success() {
        bridge.inner.metrics.rejected(answer.status.as_u16());
    }
    answer
}

async fn publish_inner<B>(
    bridge: &Bridge,
    headers: &HeaderMap,
    body: B,
    request_id: &HeaderValue,
) -> Answer
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = bridge.inner.max_body_bytes;
    if let Err(p) = bridge.authorize(headers, request_id) {
        return p;
    }
    let too_large = || {
        Answer::problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            &format!("the request body exceeds the bridge's limit of {limit} bytes"),
            &[],
            request_id,
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_large();
    }
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(e) => {
            return Answer::problem(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "Bad request",
                &format!("could not read the request body: {e}"),
                &[],
                request_id,
            );
        }
    };
    let (mode, events) = match http_binding::parse(headers, &bytes) {
        Ok(x) => x,
        Err(e) => {
            let (status, slug, title) = match e.kind {
                ErrorKind::BadRequest => (
                    StatusCode::BAD_REQUEST,
                    "invalid-event",
                    "Invalid CloudEvent",
                ),
                ErrorKind::UnsupportedMediaType => (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    "Unsupported media type",
                ),
            };
            let mut extra = Vec::new();
            if let Some(a) = &e.attribute {
                extra.push(("attribute", serde_json::json!(a)));
            }
            if let Some(i) = e.index {
                extra.push(("index", serde_json::json!(i)));
            }
            return Answer::problem(status, slug, title, &e.detail, &extra, request_id);
        }
    };
    // The bus names topics after types; refuse types it cannot carry before
    // publishing anything of a batch.
    for (i, e) in events.iter().enumerate() {
        if !super::config::valid_bus_name(e.ty()) {
            let at = if mode == Mode::Batch {
                format!("events[{i}]: ")
            } else {
                String::new()
            };
            let mut extra = vec![("attribute", serde_json::json!("type"))];
            if mode == Mode::Batch {
                extra.push(("index", serde_json::json!(i)));
            }
            return Answer::problem(
                StatusCode::BAD_REQUEST,
                "invalid-event",
                "Invalid CloudEvent",
                &format!(
                    "{at}attribute `type`: {:?} cannot name a topic (1 to 200 ASCII letters, digits, `_`, `-`, `.`; no empty parts)",
                    e.ty()
                ),
                &extra,
                request_id,
            );
        }
    }
    let tp = header_traceparent(headers);
    let cid = header_correlation(headers);
    let events: Vec<Event> = events
        .into_iter()
        .map(|e| correlate(e, tp.as_deref(), cid.as_deref()))
        .collect();
    let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let n = events.len() as u64;
    let result = if mode == Mode::Batch {
        bridge.inner.bus.publish_batch(events).await
    } else {
        match events.into_iter().next() {
            Some(e) => bridge.inner.bus.publish(e).await,
            None => Ok(()),
        }
    };
    match result {
        Ok(()) => {
            bridge.inner.metrics.published(mode, n);
            Answer {
                status: StatusCode::ACCEPTED,
                content_type: "application/json",
                retry_after: None,
                body: Bytes::from(serde_json::json!({"accepted": n, "ids": ids}).to_string()),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "bridge: the bus did not accept published events");
            let retryable = e.is_retryable() || matches!(e, BusError::Backend(_));
            let mut a = Answer::problem(
                if retryable {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                },
                "bus-unavailable",
                "Bus unavailable",
                &format!(
                    "the event bus did not accept the events; nothing may be assumed published: {e}"
                ),
                &[],
                request_id,
            );
            if retryable {
                a.retry_after = Some(1);
            }
            a
        }
    }
}
