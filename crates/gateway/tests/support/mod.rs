//! Test backends and a gateway harness, all on 127.0.0.1:0.

#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use switchboard_gateway::discovery::StaticSources;
use switchboard_gateway::{Config, GatewayBuilder, Instance, InstanceStatus, RunningGateway};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

type Body = BoxBody<Bytes, std::io::Error>;

/// A test upstream. Paths: `/slow/MS`, `/status/CODE`, `/stream/N`, `/die`,
/// `/hang`, anything else echoes the request as JSON.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    pub fail: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn handle(
    name: Arc<str>,
    hits: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    if fail.load(Ordering::SeqCst) {
        let mut r = Response::new(full(format!("{name} failing")));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(r);
    }
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let head = parts.next().unwrap_or("");
    let arg = parts.next().unwrap_or("");
    match head {
        "slow" => {
            let ms: u64 = arg.parse().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Response::new(full(name.to_string())))
        }
        "status" => {
            let mut r = Response::new(full(name.to_string()));
            *r.status_mut() = StatusCode::from_u16(arg.parse().unwrap_or(500)).unwrap();
            Ok(r)
        }
        "stream" => {
            let n: usize = arg.parse().unwrap_or(5);
            let name = name.to_string();
            let s = futures::stream::unfold(0usize, move |i| {
                let name = name.clone();
                async move {
                    if i == n {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Some((
                        Ok::<_, std::io::Error>(Frame::data(Bytes::from(format!("{name} {i}\n")))),
                        i + 1,
                    ))
                }
            });
            Ok(Response::new(BodyExt::boxed(StreamBody::new(s))))
        }
        "die" => Err(std::io::Error::other("dying on purpose")),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Response::new(full("")))
        }
        _ => {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            let h = |n: &str| {
                parts
                    .headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let doc = json!({
                "instance": &*name,
                "method": parts.method.as_str(),
                "path": pq,
                "body_len": body.len(),
                "x-request-id": h("x-request-id"),
                "traceparent": h("traceparent"),
                "tracestate": h("tracestate"),
                "x-forwarded-for": h("x-forwarded-for"),
                "x-forwarded-proto": h("x-forwarded-proto"),
                "x-forwarded-host": h("x-forwarded-host"),
                "host": h("host"),
                "connection": h("connection"),
                "x-secret": h("x-secret"),
                "idempotency-key": h("idempotency-key"),
            });
            let mut r = Response::new(full(doc.to_string()));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r.headers_mut()
                .insert("connection", "x-backend-private".parse().unwrap());
            r.headers_mut()
                .insert("x-backend-private", "1".parse().unwrap());
            Ok(r)
        }
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener)
    }

    pub fn serve(name: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(AtomicBool::new(false));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let name_arc: Arc<str> = Arc::from(name);
        let (h, f) = (hits.clone(), fail.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    r = listener.accept() => {
                        let Ok((stream, _)) = r else { continue };
                        let (name, hits, fail) = (name_arc.clone(), h.clone(), f.clone());
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| handle(name.clone(), hits.clone(), fail.clone(), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                }
            }
            // Dropping the set aborts every connection: a crash, not a drain.
            conns.abort_all();
            while conns.join_next().await.is_some() {}
        });
        Backend {
            addr,
            name: name.to_owned(),
            hits,
            fail,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops listening and cuts every connection.
    pub async fn kill(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// An address nothing listens on.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A started gateway plus its hand-fed discovery.
pub struct Harness {
    pub gw: RunningGateway,
    pub sources: StaticSources,
    pub client: reqwest::Client,
}

impl Harness {
    /// `body` is the config without `[gateway]` (listeners on port 0 are added).
    pub async fn start(body: &str) -> Harness {
        Self::start_with(body, "access_log = false").await
    }

    /// `gateway_extra` adds `[gateway]` keys (two workers unless it sets `workers`).
    pub async fn start_with(body: &str, gateway_extra: &str) -> Harness {
        let workers = if gateway_extra.contains("workers") {
            ""
        } else {
            "workers = 2\n"
        };
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{workers}drain_timeout = \"5s\"\n{gateway_extra}\n{body}"
        );
        let config =
            Config::parse(Path::new("test.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let sources = switchboard_gateway::discovery::static_sources(&config);
        let gw = GatewayBuilder::new(config)
            .sources(sources.receivers())
            .start()
            .await
            .unwrap();
        Harness {
            gw,
            sources,
            client: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.gw.listen(), path)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.gw.admin(), path)
    }

    /// The admin listener's `/metrics` page.
    pub async fn metrics(&self) -> String {
        metrics_page(self.gw.admin()).await
    }

    pub fn set_instances(&self, service: &str, addrs: &[SocketAddr]) {
        let list = addrs
            .iter()
            .map(|a| Instance {
                id: a.to_string(),
                addr: *a,
                status: InstanceStatus::Passing,
                version: None,
            })
            .collect();
        assert!(self.sources.update(service, list));
    }
}

/// The `/metrics` page of the admin listener at `admin`.
pub async fn metrics_page(admin: SocketAddr) -> String {
    client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// `[[services]]` + `[[routes]]` for one service over `addrs`.
pub fn service(name: &str, addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[services]]\nname = \"{name}\"\ninstances = [{}]\n",
        list.join(", ")
    )
}
