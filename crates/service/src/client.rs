//! Calling another service by name: discovery, P2C balancing, per-instance
//! breakers, safe retries under a budget, timeouts, correlation headers.
//!
//! For each attempt the [`Client`] reads the service's lock-free registry
//! snapshot, picks two random routable instances whose breakers admit a call
//! and takes the one with fewer calls in flight (power of two choices), sends
//! the request with the current [`Correlation`]'s `x-request-id` and a child
//! `traceparent`, and reports the outcome to the instance's breaker and to the
//! registry (passive health). A connect error, timeout or 5xx is retried on
//! another instance only when the request is safe to repeat (`GET`, `HEAD`,
//! `OPTIONS`, `PUT`, `DELETE`, or any request with an `Idempotency-Key`) and
//! the retry budget allows: retries may add at most `retry_budget_percent` of
//! the original calls (plus a small floor), so retries cannot multiply load on
//! a struggling service.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use switchboard_registry::{Discovery, PassiveOutcome, ServiceWatch};
use switchboard_resilience::breaker::{BreakerConfig, KeyedBreakers, Outcome, Window};
use switchboard_resilience::retry::{RetryBudget, is_idempotent};

use crate::correlation::Correlation;
use crate::idempotency::IDEMPOTENCY_KEY;

/// Largest response body the client reads.
const MAX_RESPONSE: usize = 8 << 20;

/// How a [`Client`] calls: timeouts, retries, breakers.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline of one attempt (connect + response + body). Default 2 s.
    pub attempt_timeout: Duration,
    /// Attempts per call, the first included (default 3); only safe requests retry.
    pub attempts: u32,
    /// Delay before the first retry, doubled each time, with full jitter (default 10 ms).
    pub backoff: Duration,
    /// Retries may add this percentage of the calls of the last 10 s (default 20).
    pub retry_budget_percent: u32,
    /// Retries always allowed per second regardless of the percentage (default 10).
    pub retry_min_per_sec: u32,
    /// The per-instance breaker (default: opens at 50% failures over at least
    /// 10 of the last 50 calls, for 5 s).
    pub breaker: BreakerConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(2),
            attempts: 3,
            backoff: Duration::from_millis(10),
            retry_budget_percent: 20,
            retry_min_per_sec: 10,
            breaker: BreakerConfig {
                min_calls: 10,
                window: Window::Count(50),
                ..BreakerConfig::default()
            },
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The client has no registry to discover services in.
    #[error("no registry to discover {0} in")]
    NoRegistry(String),
    /// No instance of the service is routable.
    #[error("no healthy instance of {0}")]
    NoHealthyInstance(String),
    /// Every routable instance's breaker is open.
    #[error("every breaker for {service} is open; retry after {retry_after:?}")]
    BreakerOpen {
        /// The service.
        service: String,
        /// When the first breaker half-opens.
        retry_after: Duration,
    },
    /// The last attempt timed out.
    #[error("{service} timed out after {after:?}")]
    Timeout {
        /// The service.
        service: String,
        /// The attempt timeout.
        after: Duration,
    },
    /// The last attempt could not connect or lost the connection.
    #[error("{service}: {message}")]
    Transport {
        /// The service.
        service: String,
        /// What happened.
        message: String,
    },
    /// The request could not be built.
    #[error("bad request: {0}")]
    Request(String),
    /// The service answered with an error status (after retries, for a 5xx).
    #[error("{service} answered {status}")]
    Status {
        /// The service.
        service: String,
        /// The status.
        status: StatusCode,
        /// The response body.
        body: Bytes,
    },
    /// The body was not the JSON expected.
    #[error("{service} sent unexpected JSON: {message}")]
    Decode {
        /// The service.
        service: String,
        /// What was wrong.
        message: String,
    },
}

impl CallError {
    /// The HTTP status of an error response, if the service answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            CallError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Default)]
struct InFlight(AtomicUsize);

struct Inner {
    discovery: Option<Arc<dyn Discovery>>,
    http: HyperClient<HttpConnector, Full<Bytes>>,
    watches: Mutex<HashMap<String, ServiceWatch>>,
    in_flight: Mutex<HashMap<String, Arc<InFlight>>>,
    breakers: KeyedBreakers<String>,
    budget: RetryBudget,
    config: ClientConfig,
}

/// Calls other services by name; cheap to clone. See the module docs.
///
/// ```no_run
/// # async fn run(client: switchboard_service::Client) -> Result<(), switchboard_service::client::CallError> {
/// let user: serde_json::Value = client.get_json("user-service", "/users/usr_1").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn is_safe(method: &Method, headers: &HeaderMap) -> bool {
    is_idempotent(method.as_str()) || headers.contains_key(IDEMPOTENCY_KEY)
}

enum Attempt {
    Done(Response<Bytes>),
    /// Failed in a way another instance might not: retry if allowed.
    Retryable(CallError),
}

impl Client {
    /// A client discovering services through `discovery`: an in-process
    /// `Registry` (memory or Redis store) or a `RemoteDiscovery` of a registry
    /// server (None: every call fails with [`CallError::NoRegistry`]).
    ///
    /// # Panics
    /// If `config.breaker` or the retry budget settings are invalid.
    pub fn new(discovery: Option<Arc<dyn Discovery>>, config: ClientConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.attempt_timeout));
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let breakers = KeyedBreakers::new(config.breaker.clone(), 4096)
            .expect("ClientConfig::breaker must be a valid breaker config");
        Self {
            inner: Arc::new(Inner {
                discovery,
                http,
                watches: Mutex::default(),
                in_flight: Mutex::default(),
                breakers,
                budget: RetryBudget::new(
                    Duration::from_secs(10),
                    config.retry_min_per_sec,
                    f64::from(config.retry_budget_percent),
                )
                .expect("ClientConfig retry budget must be valid"),
                config,
            }),
        }
    }

    /// `GET path` on `service`, decoding a 2xx JSON body; any other status is [`CallError::Status`].
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        service: &str,
        path: &str,
    ) -> Result<T, CallError> {
        let req = Request::get(path)
            .body(Bytes::new())
            .map_err(|e| CallError::Request(e.to_string()))?;
        let res = self.send(service, req).await?;
        if !res.status().is_success() {
            return Err(CallError::Status {
                service: service.to_owned(),
                status: res.status(),
                body: res.into_body(),
            });
        }
        serde_json::from_slice(res.body()).map_err(|e| CallError::Decode {
            service: service.to_owned(),
            message: e.to_string(),
        })
    }

    /// Sends `req` (its URI is a path and query) to an instance of `service`;
    /// returns the response of the last attempt, whatever its status, unless
    /// it failed before getting one.
    pub async fn send(
        &self,
        service: &str,
        req: Request<Bytes>,
    ) -> Result<Response<Bytes>, CallError> {
        let cfg = &self.inner.config;
        let safe = is_safe(req.method(), req.headers());
        self.inner.budget.deposit();
        let (parts, body) = req.into_parts();
        let mut tried: Vec<String> = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .attempt(service, &parts, body.clone(), &mut tried)
                .await;
            let error = match result {
                Ok(Attempt::Done(res)) => {
                    if res.status().is_server_error()
                        && safe
                        && attempt < cfg.attempts
                        && self.inner.budget.withdraw()
                    {
                        tracing::debug!(%service, status = %res.status(), attempt, "retrying");
                    } else {
                        return Ok(res);
                    }
                    None
                }
                Ok(Attempt::Retryable(e)) => Some(e),
                Err(e) => return Err(e),
            };
            if let Some(error) = error {
                if !(safe && attempt < cfg.attempts && self.inner.budget.withdraw()) {
                    return Err(error);
                }
                tracing::debug!(%service, %error, attempt, "retrying");
            }
            let cap = cfg.backoff.saturating_mul(1 << (attempt - 1).min(10));
            tokio::time::sleep(cap.mul_f64(rand::random::<f64>())).await;
        }
    }

    fn watch(&self, service: &str) -> Option<Arc<switchboard_registry::ServiceView>> {
        let discovery = self.inner.discovery.as_ref()?;
        let mut watches = self.inner.watches.lock();
        let watch = watches
            .entry(service.to_owned())
            .or_insert_with(|| discovery.watch(service));
        Some(watch.load())
    }

    fn in_flight(&self, key: &str) -> Arc<InFlight> {
        self.inner
            .in_flight
            .lock()
            .entry(key.to_owned())
            .or_default()
            .clone()
    }

    async fn attempt(
        &self,
        service: &str,
        parts: &http::request::Parts,
        body: Bytes,
        tried: &mut Vec<String>,
    ) -> Result<Attempt, CallError> {
        let view = self
            .watch(service)
            .ok_or_else(|| CallError::NoRegistry(service.to_owned()))?;
        let routable = view.routable();
        if routable.is_empty() {
            return Err(CallError::NoHealthyInstance(service.to_owned()));
        }
        // Candidates: not tried yet in this call if possible, breaker not open.
        let key_of = |id: &str| format!("{service}/{id}");
        let admits = |id: &str| {
            self.inner
                .breakers
                .get_existing(&key_of(id))
                .is_none_or(|b| !b.state().is_open())
        };
        let mut candidates: Vec<_> = routable
            .iter()
            .filter(|i| !tried.contains(&i.id) && admits(&i.id))
            .collect();
        if candidates.is_empty() {
            candidates = routable.iter().filter(|i| admits(&i.id)).collect();
        }
        let picked = match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let load = |i: &&&switchboard_registry::Instance| {
                    self.in_flight(&key_of(&i.id)).0.load(Ordering::Relaxed)
                };
                Some(if load(&candidates[b]) < load(&candidates[a]) {
                    candidates[b]
                } else {
                    candidates[a]
                })
            }
        };
        let Some(instance) = picked else {
            let retry_after = routable
                .iter()
                .filter_map(|i| self.inner.breakers.try_acquire(&key_of(&i.id)).err())
                .map(|open| open.retry_after)
                .min()
                .unwrap_or(Duration::from_secs(1));
            return Err(CallError::BreakerOpen {
                service: service.to_owned(),
                retry_after,
            });
        };
        let key = key_of(&instance.id);
        let permit = match self.inner.breakers.try_acquire(&key) {
            Ok(p) => p,
            Err(open) => {
                tried.push(instance.id.clone());
                return Ok(Attempt::Retryable(CallError::BreakerOpen {
                    service: service.to_owned(),
                    retry_after: open.retry_after,
                }));
            }
        };
        tried.push(instance.id.clone());
        let uri = format!(
            "http://{}{}",
            instance.host_port(),
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let mut req = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| CallError::Request(e.to_string()))?;
        *req.headers_mut() = parts.headers.clone();
        if let Some(c) = Correlation::current() {
            c.inject(req.headers_mut());
        }
        let counter = self.in_flight(&key);
        counter.0.fetch_add(1, Ordering::Relaxed);
        let timeout = self.inner.config.attempt_timeout;
        let sent = tokio::time::timeout(timeout, async {
            let res = self.inner.http.request(req).await?;
            let (parts, body) = res.into_parts();
            let body = http_body_util::Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| LimitedError(e.to_string()))?
                .to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Response::from_parts(parts, body))
        })
        .await;
        counter.0.fetch_sub(1, Ordering::Relaxed);
        let report = |ok: bool| {
            if let Some(discovery) = &self.inner.discovery {
                let outcome = if ok {
                    PassiveOutcome::Success
                } else {
                    PassiveOutcome::Failure
                };
                discovery.report(service, &instance.id, outcome);
            }
        };
        match sent {
            Ok(Ok(res)) => {
                let failed = res.status().is_server_error();
                permit.record(if failed {
                    Outcome::Failure
                } else {
                    Outcome::Success
                });
                report(!failed);
                Ok(Attempt::Done(res))
            }
            Ok(Err(e)) => {
                permit.record(Outcome::Failure);
                report(false);
                Ok(Attempt::Retryable(CallError::Transport {
                    service: service.to_owned(),
                    message: format!("{} ({}): {e}", instance.id, instance.host_port()),
                }))
            }
            Err(_) => {
                permit.record(Outcome::Failure);
                report(false);
                Ok(Attempt::Retryable(CallError::Timeout {
                    service: service.to_owned(),
                    after: timeout,
                }))
            }
        }
    }

    /// Per-instance breaker states, as `service/instance` and state name.
    pub fn breakers(&self) -> Vec<(String, &'static str)> {
        let mut out: Vec<_> = self
            .inner
            .breakers
            .snapshots()
            .into_iter()
            .map(|(k, s)| (k, s.state.as_str()))
            .collect();
        out.sort();
        out
    }
}

#[derive(Debug, thiserror::Error)]
#[error("response body: {0}")]
struct LimitedError(String);

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn safe_methods_and_keyed_posts_retry() {
        let mut h = HeaderMap::new();
        assert!(is_safe(&Method::GET, &h));
        assert!(is_safe(&Method::PUT, &h));
        assert!(!is_safe(&Method::POST, &h));
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k"));
        assert!(is_safe(&Method::POST, &h));
    }
}
