//! Push delivery: the bus handler of a push subscription. Each event goes out
//! as one HTTP POST in binary mode to an instance the route balancer picks
//! (P2C over passing instances, each behind its own circuit breaker, the same
//! [`RouteUpstreams`] the proxy uses), over keep-alive connections pooled
//! per subscription ([`crate::pool::OwnedPool`]).
//!
//! | answer | settlement |
//! |---|---|
//! | 2xx | ack |
//! | 429, 5xx, timeout, connection error | redeliver after the backoff, or `Retry-After` if longer |
//! | any other status | dead-letter now (reason `rejected`, the status and a body excerpt as the error) |
//!
//! A connection that cannot be opened sent nothing, so the same delivery
//! fails over to another instance at once; everything else is left to the
//! bus's redelivery. Deliveries out of attempts are dead-lettered by the bus
//! (reason `max-deliveries`, the last status and excerpt as the error).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt as _;
use switchboard_bus::middleware::correlation;
use switchboard_bus::{Event, HandlerError, Nack, current_delivery};
use tokio::time::{Instant, timeout_at};

use super::http_binding::render_binary;
use super::metrics::SubStats;
use crate::h1::{self, H1Body, Outgoing};
use crate::pool;
use crate::upstream::{Pick, RouteUpstreams, Upstream};

/// The header telling the subscriber which delivery of the event this is (1-based).
pub const DELIVERY_ATTEMPT: HeaderName = HeaderName::from_static("x-switchboard-delivery-attempt");

/// How much of a refusing subscriber's body goes into the dead letter.
const EXCERPT_BYTES: usize = 256;
/// Response bodies up to this size are read so the connection can be reused.
const MAX_READ: usize = 64 * 1024;
/// Connection failures within one delivery before giving up on it.
const MAX_FAILOVERS: usize = 4;
/// How often a delivery with no passing instance looks again.
const NO_INSTANCE_POLL: Duration = Duration::from_millis(50);
/// `Retry-After` values are capped to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Delivers a subscription's events to its target.
#[derive(Debug)]
pub struct Pusher {
    /// Describes the target in errors (`service `x`` or the URL).
    pub target: String,
    /// The target's instances, balancer and breakers.
    pub upstreams: Arc<RouteUpstreams>,
    /// Request path.
    pub path: http::uri::PathAndQuery,
    /// One delivery's deadline, failovers included.
    pub ack_timeout: Duration,
    /// Connect timeout per instance.
    pub connect_timeout: Duration,
    /// Idle connections to the target's instances (the proxy's pool
    /// settings, with `max_idle` at least `max_in_flight`).
    pub idle: Arc<pool::OwnedPool>,
    /// Counters.
    pub stats: Arc<SubStats>,
}

enum Fail {
    Permanent(String),
    Retry(String, Option<Duration>),
}

enum SendError {
    /// Nothing was sent.
    Connect(String),
    Timeout,
    Reset(String),
}

struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    excerpt: String,
}

impl Pusher {
    /// The bus handler body: delivers `event` once and says how to settle it.
    pub async fn deliver(&self, event: Event) -> Result<(), HandlerError> {
        let delivery = current_delivery();
        let last = delivery.is_some_and(|d| d.attempt >= d.max_deliveries);
        let started = Instant::now();
        let outcome = self.attempt(&event, delivery.map(|d| d.attempt)).await;
        self.stats.latency(started.elapsed());
        match outcome {
            Ok(()) => {
                self.stats.acked.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(Fail::Permanent(msg)) => {
                self.stats.dead_lettered.fetch_add(1, Relaxed);
                Err(Nack::permanent(msg).into())
            }
            Err(Fail::Retry(msg, after)) => {
                if last {
                    self.stats.dead_lettered.fetch_add(1, Relaxed);
                } else {
                    self.stats.retried.fetch_add(1, Relaxed);
                }
                Err(match after {
                    Some(after) => Nack::retry_after(msg, after).into(),
                    None => msg.into(),
                })
            }
        }
    }

    fn headers(&self, event: &Event, attempt: Option<u32>) -> (HeaderMap, Bytes) {
        // Room for the ce-* attributes, content type, correlation and attempt.
        let mut headers = HeaderMap::with_capacity(16);
        let body = render_binary(event, &mut headers);
        // Correlation out as plain headers too, for receivers that know
        // nothing of CloudEvents: the bus continued the trace (new span id)
        // for this delivery; the correlation id is the request id.
        let traceparent = correlation::current()
            .and_then(|c| c.traceparent)
            .or_else(|| event.traceparent().map(str::to_owned));
        if let Some(tp) = traceparent
            && let Ok(v) = HeaderValue::from_str(&tp)
        {
            headers.insert(crate::headers::TRACEPARENT.clone(), v);
        }
        if let Some(id) = event.correlation_id()
            && crate::correlation::is_sane_request_id(id.as_bytes())
            && let Ok(v) = HeaderValue::from_str(id)
        {
            headers.insert(crate::headers::X_REQUEST_ID.clone(), v);
        }
        if let Some(n) = attempt {
            headers.insert(DELIVERY_ATTEMPT, HeaderValue::from(n));
        }
        (headers, body)
    }

    async fn attempt(&self, event: &Event, attempt: Option<u32>) -> Result<(), Fail> {
        let (headers, body) = self.headers(event, attempt);
        // The first attempt takes the headers; only a failover renders them again.
        let mut headers = Some(headers);
        let deadline = Instant::now() + self.ack_timeout;
        // Instances tried so far, without an allocation per delivery.
        let mut tried_buf = [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_FAILOVERS];
        let mut n_tried = 0;
        let mut last: Option<Fail> = None;
        while n_tried < MAX_FAILOVERS {
            let tried = &tried_buf[..n_tried];
            let u = match self.upstreams.pick(tried) {
                Pick::Instance(u) if !tried.contains(&u.addr) => u,
                // Every instance was tried once (the balancer starts over).
                Pick::Instance(_) => break,
                // No instance yet (a service that just registered, or whose
                // health check has not passed): wait for one within the ack
                // timeout rather than spend a delivery attempt at once.
                Pick::NoneHealthy
                    if last.is_none() && Instant::now() + NO_INSTANCE_POLL < deadline =>
                {
                    tokio::time::sleep(NO_INSTANCE_POLL).await;
                    continue;
                }
                Pick::NoneHealthy => {
                    return Err(last.unwrap_or_else(|| {
                        Fail::Retry(format!("no passing instance of {}", self.target), None)
                    }));
                }
                Pick::AllOpen(after) => {
                    return Err(last.unwrap_or_else(|| {
                        Fail::Retry(
                            format!(
                                "every instance of {} is ejected by its circuit breaker",
                                self.target
                            ),
                            Some(after),
                        )
                    }));
                }
            };
            tried_buf[n_tried] = u.addr;
            n_tried += 1;
            let Ok(permit) = u.breaker.try_acquire() else {
                continue;
            };
            let h = headers
                .take()
                .unwrap_or_else(|| self.headers(event, attempt).0);
            u.outstanding.inc();
            let result = self.send(&u, h, body.clone(), deadline).await;
            u.outstanding.dec();
            let at = || format!("{} instance `{}` ({})", self.target, u.id, u.addr);
            match result {
                Err(SendError::Connect(e)) => {
                    permit.record(false);
                    let at = at();
                    tracing::debug!(target = %at, error = %e, "push: connect failed; trying another instance");
                    last = Some(Fail::Retry(format!("{at}: {e}"), None));
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                Err(SendError::Timeout) => {
                    permit.record(false);
                    self.stats.pushed.fetch_add(1, Relaxed);
                    return Err(Fail::Retry(
                        format!(
                            "{}: no answer within ack_timeout {:?}",
                            at(),
                            self.ack_timeout
                        ),
                        None,
                    ));
                }
                Err(SendError::Reset(e)) => {
                    permit.record(false);
                    self.stats.pushed.fetch_add(1, Relaxed);
                    return Err(Fail::Retry(format!("{}: {e}", at()), None));
                }
                Ok(a) => {
                    permit.record(!a.status.is_server_error());
                    self.stats.pushed.fetch_add(1, Relaxed);
                    if a.status.is_success() {
                        return Ok(());
                    }
                    let msg = format!("HTTP {} from {}: {}", a.status.as_u16(), at(), a.excerpt);
                    return Err(
                        if a.status == StatusCode::TOO_MANY_REQUESTS || a.status.is_server_error() {
                            Fail::Retry(msg, a.retry_after)
                        } else {
                            Fail::Permanent(msg)
                        },
                    );
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            Fail::Retry(
                format!("no instance of {} accepted a connection", self.target),
                None,
            )
        }))
    }

    async fn send(
        &self,
        u: &Upstream,
        headers: HeaderMap,
        body: Bytes,
        deadline: Instant,
    ) -> Result<Answer, SendError> {
        let now = std::time::Instant::now();
        let out = Outgoing {
            method: &http::Method::POST,
            target: self.path.as_str(),
            host: &u.host,
            headers: &headers,
            forwarding: None,
            body: Some(&body),
            declares_body: true,
            // Retry-After is read from the map.
            raw_fields: false,
        };
        let idle = self.idle.take(u.addr, now);
        let (conn, head) =
            match h1::exchange(idle, u.addr, self.connect_timeout, &out, deadline).await {
                Ok(x) => x,
                Err(h1::Failed::Connect(e)) => return Err(SendError::Connect(e.to_string())),
                Err(h1::Failed::Timeout) => return Err(SendError::Timeout),
                Err(h1::Failed::Send(e)) => {
                    return Err(SendError::Reset(format!("the connection broke: {e:?}")));
                }
            };
        let body = H1Body::with_home(conn, &head, pool::Home::Owned(Arc::clone(&self.idle)), now);
        let res = Response::from_parts(head.parts, body);
        let status = res.status();
        let retry_after = res
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = http_body_util::Limited::new(res.into_body(), MAX_READ);
        // Read to the end, the connection goes back to the pool.
        let excerpt = match timeout_at(deadline, body.collect()).await {
            Ok(Ok(collected)) => {
                // Only a refusal's body is kept (for its dead letter or retry reason).
                if status.is_success() {
                    String::new()
                } else {
                    excerpt(&collected.to_bytes())
                }
            }
            // Too large or too slow: the connection is not reused.
            Ok(Err(_)) | Err(_) => String::new(),
        };
        Ok(Answer {
            status,
            retry_after,
            excerpt,
        })
    }
}

/// `Retry-After`: delay-seconds or an HTTP date (capped at an hour).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// The first bytes of a body as one line of text, for dead-letter reasons.
fn excerpt(body: &[u8]) -> String {
    let cut = &body[..body.len().min(EXCERPT_BYTES)];
    let mut s: String = String::from_utf8_lossy(cut)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if body.len() > EXCERPT_BYTES {
        s.push('…');
    }
    s.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("99999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        let future =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let d = parse_retry_after(&future).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn excerpts_are_one_short_line() {
        assert_eq!(excerpt(b"{\"error\":\n\"bad\"}"), "{\"error\": \"bad\"}");
        let long = vec![b'x'; 1000];
        assert_eq!(excerpt(&long).chars().count(), EXCERPT_BYTES + 1);
    }
}
