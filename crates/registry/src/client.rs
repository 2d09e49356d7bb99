//! Talking to a remote registry over its HTTP API.
//!
//! - [`RegistryClient`]: register, heartbeat, deregister, list, blocking reads.
//! - [`Membership`]: what a service holds while it is registered: heartbeats in
//!   the background (re-registering if the registry forgot it) and deregisters on
//!   [`Membership::leave`] (or, best effort, on drop).
//! - [`RemoteDiscovery`]: the [`Discovery`] of a remote registry: one blocking
//!   query loop per watched service feeding a lock-free [`ServiceWatch`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::Discovery;
use crate::model::{CheckKind, Instance, Registration, ServiceSummary, ServiceView};
use crate::watch::ServiceWatch;

/// Why a call to a remote registry failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not an `http://` URL.
    #[error("invalid registry url {0:?}: expected http://HOST:PORT")]
    InvalidUrl(String),
    /// The request did not complete (connect, timeout, decoding).
    #[error("registry request failed")]
    Transport(#[from] reqwest::Error),
    /// The registry answered with an error status; `detail` is from its problem document.
    #[error("registry answered {status}: {detail}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The problem's `detail`, or the body.
        detail: String,
    },
}

/// A client of the registry HTTP API.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    base: Arc<str>,
    token: Option<Arc<str>>,
    http: reqwest::Client,
}

/// A view as returned by `GET /v1/services/{service}`.
#[derive(Debug, Clone, Deserialize)]
struct RemoteView {
    index: u64,
    instances: Vec<Instance>,
}

impl RegistryClient {
    /// A client of the registry at `base_url` (`http://127.0.0.1:9900`).
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        let base = base_url.trim().trim_end_matches('/');
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(ClientError::InvalidUrl(base_url.to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()?;
        Ok(RegistryClient {
            base: Arc::from(base),
            token: None,
            http,
        })
    }

    /// Sends `Authorization: Bearer token` on writes.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Arc::from(token.into()));
        self
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn instance_url(&self, service: &str, id: &str) -> String {
        format!("{}/v1/services/{service}/instances/{id}", self.base)
    }

    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
            .unwrap_or(text);
        Err(ClientError::Status {
            status: status.as_u16(),
            detail,
        })
    }

    /// `PUT /v1/services/{service}/instances/{id}`.
    pub async fn register(
        &self,
        service: &str,
        id: &str,
        reg: &Registration,
    ) -> Result<Instance, ClientError> {
        let req = self
            .http
            .put(self.instance_url(service, id))
            .timeout(Duration::from_secs(10))
            .json(&reg.to_json());
        let resp = Self::check(self.authed(req).send().await?).await?;
        Ok(resp.json().await?)
    }

    /// `PUT /v1/services/{service}/instances/{id}/heartbeat`.
    pub async fn heartbeat(&self, service: &str, id: &str) -> Result<(), ClientError> {
        let req = self
            .http
            .put(format!("{}/heartbeat", self.instance_url(service, id)))
            .timeout(Duration::from_secs(10));
        Self::check(self.authed(req).send().await?).await?;
        Ok(())
    }

    /// `DELETE /v1/services/{service}/instances/{id}`.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<(), ClientError> {
        let req = self
            .http
            .delete(self.instance_url(service, id))
            .timeout(Duration::from_secs(10));
        Self::check(self.authed(req).send().await?).await?;
        Ok(())
    }

    /// `GET /v1/services`.
    pub async fn services(&self) -> Result<Vec<ServiceSummary>, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/services", self.base))
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// `GET /v1/services/{service}`; with `index`, a blocking query of at most `wait`.
    pub async fn service(
        &self,
        service: &str,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<ServiceView, ClientError> {
        let mut url = format!("{}/v1/services/{service}", self.base);
        if let Some(index) = index {
            url.push_str(&format!(
                "?index={index}&wait={}ms",
                wait.as_millis().max(1)
            ));
        }
        let resp = self
            .http
            .get(url)
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await?;
        let view: RemoteView = Self::check(resp).await?.json().await?;
        Ok(ServiceView::from_instances(view.index, view.instances))
    }

    /// Registers and keeps the registration alive until [`Membership::leave`].
    ///
    /// TTL instances heartbeat three times per TTL; others re-register every
    /// 10 s (a no-op when nothing changed, a repair when the registry lost them).
    /// A heartbeat answered 404 re-registers.
    pub async fn join(
        &self,
        service: &str,
        id: &str,
        reg: Registration,
    ) -> Result<Membership, ClientError> {
        self.register(service, id, &reg).await?;
        let period = match reg.check.as_ref().map(|c| &c.kind) {
            Some(CheckKind::Ttl { ttl }) => (*ttl / 3).max(Duration::from_millis(50)),
            _ => Duration::from_secs(10),
        };
        let is_ttl = matches!(
            reg.check.as_ref().map(|c| &c.kind),
            Some(CheckKind::Ttl { .. })
        );
        let cancel = CancellationToken::new();
        let task = {
            let (client, service, id, cancel) = (
                self.clone(),
                service.to_owned(),
                id.to_owned(),
                cancel.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(period) => {}
                    }
                    let result = if is_ttl {
                        match client.heartbeat(&service, &id).await {
                            Err(ClientError::Status { status: 404, .. }) => {
                                client.register(&service, &id, &reg).await.map(|_| ())
                            }
                            other => other,
                        }
                    } else {
                        client.register(&service, &id, &reg).await.map(|_| ())
                    };
                    if let Err(error) = result {
                        tracing::warn!(service, id, %error, "registry heartbeat failed; will retry");
                    }
                }
            })
        };
        Ok(Membership {
            client: self.clone(),
            service: service.to_owned(),
            id: id.to_owned(),
            cancel,
            task: Some(task),
        })
    }
}

/// A live registration; deregisters on [`Membership::leave`] or, best effort, on drop.
#[derive(Debug)]
pub struct Membership {
    client: RegistryClient,
    service: String,
    id: String,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Membership {
    /// Stops heartbeating and deregisters (call on graceful shutdown).
    pub async fn leave(mut self) -> Result<(), ClientError> {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.client.deregister(&self.service, &self.id).await
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.cancel.cancel();
        if self.task.take().is_some()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (client, service, id) =
                (self.client.clone(), self.service.clone(), self.id.clone());
            rt.spawn(async move {
                let _ = client.deregister(&service, &id).await;
            });
        }
    }
}

/// [`Discovery`] over a remote registry: each watched service is followed with
/// blocking queries; readers get the same lock-free [`ServiceWatch`] as in-process.
#[derive(Debug)]
pub struct RemoteDiscovery {
    client: RegistryClient,
    watches: Mutex<HashMap<String, ServiceWatch>>,
    cancel: CancellationToken,
    _guard: DropGuard,
}

impl RemoteDiscovery {
    /// Discovery through the registry at `client`'s URL. Loops stop when this is dropped.
    pub fn new(client: RegistryClient) -> Self {
        let cancel = CancellationToken::new();
        RemoteDiscovery {
            client,
            watches: Mutex::new(HashMap::new()),
            _guard: cancel.clone().drop_guard(),
            cancel,
        }
    }
}

impl Discovery for RemoteDiscovery {
    fn watch(&self, service: &str) -> ServiceWatch {
        let mut watches = self.watches.lock();
        if let Some(w) = watches.get(service) {
            return w.clone();
        }
        let view = Arc::new(ArcSwap::from_pointee(ServiceView::default()));
        let (tx, rx) = watch::channel(0u64);
        let w = ServiceWatch::new(Arc::clone(&view), rx);
        watches.insert(service.to_owned(), w.clone());
        let (client, service, cancel) =
            (self.client.clone(), service.to_owned(), self.cancel.clone());
        tokio::spawn(async move {
            let follow = async {
                let mut index = None;
                let mut backoff = Duration::from_millis(100);
                loop {
                    match client
                        .service(&service, index, Duration::from_secs(60))
                        .await
                    {
                        Ok(v) => {
                            backoff = Duration::from_millis(100);
                            // An index that went backwards means the registry restarted: take the view.
                            if index != Some(v.index) {
                                index = Some(v.index);
                                let idx = v.index;
                                view.store(Arc::new(v));
                                tx.send_replace(idx);
                            }
                        }
                        Err(error) => {
                            tracing::debug!(service, %error, "remote registry watch failed; retrying");
                            index = None;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            };
            tokio::select! {
                () = cancel.cancelled() => {}
                () = follow => {}
            }
        });
        w
    }
}
