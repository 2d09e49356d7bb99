//! The HTTP event bridge over real sockets: publishing in every mode and every
//! rejection, push delivery with retries, dead letters and failover, the
//! subscriptions API and the metrics. Push cases run on the memory bus and on
//! Redis Streams (a redis-server of their own, skipped with a reason when absent).

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};
use switchboard_bus::deadletter::{DeadLetter, Reason};
use switchboard_bus::{Bus, Event, HandlerError, SubscribeOptions};
use switchboard_gateway::bridge::config::SubscriptionSpec;
use switchboard_gateway::bridge::{Bridge, BridgeOptions, sources_resolver};
use switchboard_gateway::discovery::StaticSources;
use switchboard_gateway::{Config, GatewayBuilder, Instance, InstanceStatus, RunningGateway};
use switchboard_testkit::{Persistence, RedisServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(15);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, SeqCst))
}

/// A gateway (no routes) with the bridge on its admin listener.
struct Harness {
    gw: RunningGateway,
    bridge: Bridge,
    sources: StaticSources,
    http: reqwest::Client,
}

impl Harness {
    async fn start(bus_url: &str, token: Option<&str>, max_body: u64) -> Harness {
        let cfg = Config::parse(
            "bridge-test.toml".as_ref(),
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 1\naccess_log = false\n",
        )
        .unwrap();
        let bus = Bus::open(bus_url).await.unwrap();
        let mut sources = StaticSources::default();
        sources.set("subscriber", Vec::new());
        let mut o = BridgeOptions::new(bus, sources_resolver(sources.receivers()));
        o.token = token.map(str::to_owned);
        o.max_body_bytes = max_body;
        let bridge = Bridge::start(o).await.unwrap();
        let gw = GatewayBuilder::new(cfg)
            .bridge(bridge.clone())
            .start()
            .await
            .unwrap();
        Harness {
            gw,
            bridge,
            sources,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.admin())
    }

    fn set_instances(&self, addrs: &[SocketAddr]) {
        let list = addrs
            .iter()
            .map(|a| Instance {
                id: a.to_string(),
                addr: *a,
                status: InstanceStatus::Passing,
                version: None,
            })
            .collect();
        assert!(self.sources.update("subscriber", list));
    }

    async fn subscribe(&self, name: &str, spec: Value) -> reqwest::Response {
        self.http
            .put(self.url(&format!("/v1/subscriptions/{name}")))
            .json(&spec)
            .send()
            .await
            .unwrap()
    }

    async fn publish_structured(&self, event: Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/events"))
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string())
            .send()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        support::metrics_page(self.gw.admin()).await
    }

    async fn stop(self) {
        self.bridge.shutdown().await;
        self.gw.shutdown().await;
    }
}

fn ce(ty: &str, id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/test", "type": ty, "data": {"id": id}})
}

/// Records every event of `topic` seen by group `g` of the bus.
async fn tap(
    bus: &Bus,
    topic: &str,
) -> (
    switchboard_bus::Subscription,
    mpsc::UnboundedReceiver<Event>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sub = bus
        .subscribe(
            topic,
            &unique("tap"),
            move |e: Event| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(e);
                    Ok::<_, HandlerError>(())
                }
            },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    (sub, rx)
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("within patience")
        .expect("channel open")
}

// ---------------------------------------------------------------------------
// A subscriber: answers by script, records requests, can die.

#[derive(Debug, Clone)]
struct Seen {
    /// Path and query.
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
    at: tokio::time::Instant,
}

type Script = Arc<dyn Fn(&Seen, usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync>;

/// Status a [`Script`] answers to close the connection without a response.
const HANG_UP: u16 = 0;

struct Subscriber {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    tx: mpsc::UnboundedSender<Seen>,
    rx: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// `script(request, n)` answers the `n`-th request (0-based) for this
    /// event id ([`HANG_UP`]: closes the connection instead).
    async fn start(script: Script) -> Subscriber {
        Self::start_at(
            "127.0.0.1:0".parse().unwrap(),
            script,
            Arc::new(|_| Duration::ZERO),
        )
        .await
    }

    /// [`Self::start`] on `addr`, answering the `n`-th request for an event
    /// id after `delay(n)` (it is recorded on arrival).
    async fn start_at(
        addr: SocketAddr,
        script: Script,
        delay: Arc<dyn Fn(usize) -> Duration + Send + Sync>,
    ) -> Subscriber {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let (s, t) = (Arc::clone(&seen), tx.clone());
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the task kills them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, t, script, delay) = (
                    Arc::clone(&s),
                    t.clone(),
                    Arc::clone(&script),
                    Arc::clone(&delay),
                );
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (s, t, script, delay) = (
                            Arc::clone(&s),
                            t.clone(),
                            Arc::clone(&script),
                            Arc::clone(&delay),
                        );
                        async move {
                            let path = req
                                .uri()
                                .path_and_query()
                                .map_or("/", |p| p.as_str())
                                .to_owned();
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(http_body_util::Collected::to_bytes)
                                .unwrap_or_default();
                            let seen = Seen {
                                path,
                                headers: parts.headers,
                                body,
                                at: tokio::time::Instant::now(),
                            };
                            let id = seen.headers.get("ce-id").cloned();
                            let n = {
                                let mut all = s.lock();
                                let n = all
                                    .iter()
                                    .filter(|x| x.headers.get("ce-id") == id.as_ref())
                                    .count();
                                all.push(seen.clone());
                                n
                            };
                            let (status, headers, text) = script(&seen, n);
                            let _ = t.send(seen);
                            tokio::time::sleep(delay(n)).await;
                            if status == HANG_UP {
                                return Err(std::io::Error::other("hang up"));
                            }
                            let mut res = Response::new(Full::new(Bytes::from(text)));
                            *res.status_mut() = StatusCode::from_u16(status).unwrap();
                            for (k, v) in headers {
                                res.headers_mut().insert(k, v.parse().unwrap());
                            }
                            Ok::<_, std::io::Error>(res)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Subscriber {
            addr,
            seen,
            tx,
            rx,
            task,
        }
    }

    fn ok() -> Script {
        Arc::new(|_, _| (200, vec![], String::new()))
    }

    fn ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .iter()
            .filter_map(|s| {
                s.headers
                    .get("ce-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Dies like a crashed process: the listener and every connection close.
    fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
        let _ = &self.tx;
    }
}

fn fast_spec(topic: &str) -> Value {
    json!({
        "topic": topic,
        "service": "subscriber",
        "path": "/events",
        "ack_timeout": "2s",
        "backoff": {"initial": "20ms", "max": "20ms", "multiplier": 1.0},
        "max_deliveries": 5,
        "dead_letter_topic": format!("{topic}.dlq"),
    })
}

fn redis() -> Option<RedisServer> {
    RedisServer::start(Persistence::None)
}

// ---------------------------------------------------------------------------
// Publishing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_structured_binary_and_batch() {
    let h = Harness::start(&format!("memory://{}", unique("pub")), None, 1 << 20).await;
    let (tap_sub, mut got) = tap(h.bridge.bus(), "order.confirmed").await;

    let r = h.publish_structured(ce("order.confirmed", "s-1")).await;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, json!({"accepted": 1, "ids": ["s-1"]}));
    let e = next(&mut got).await;
    assert_eq!((e.id(), e.source()), ("s-1", "/test"));
    assert_eq!(e.data_as::<Value>().unwrap(), json!({"id": "s-1"}));

    // Binary mode: attributes in headers (percent-encoded), correlation from
    // the request's traceparent and x-request-id.
    let r = h
        .http
        .post(h.url("/v1/events"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "b-1")
        .header("ce-source", "/shop/orders")
        .header("ce-type", "order.confirmed")
        .header("ce-subject", "caf%C3%A9%20order")
        .header("content-type", "application/json")
        .header("traceparent", TRACEPARENT)
        .header("x-request-id", "req-42")
        .body(r#"{"order_id":"o-7"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let e = next(&mut got).await;
    assert_eq!(e.id(), "b-1");
    assert_eq!(e.subject(), Some("café order"));
    assert_eq!(e.traceparent(), Some(TRACEPARENT));
    assert_eq!(e.correlation_id(), Some("req-42"));
    assert_eq!(e.data_as::<Value>().unwrap()["order_id"], "o-7");

    // An event's own correlation wins over the request's.
    let mut own = ce("order.confirmed", "s-2");
    own["correlationid"] = json!("own");
    let r = h
        .http
        .post(h.url("/v1/events"))
        .header(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )
        .header("correlationid", "from-header")
        .body(own.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(next(&mut got).await.correlation_id(), Some("own"));

    // Batch mode: every event, one 202.
    let batch = json!([
        ce("order.confirmed", "x-1"),
        ce("order.confirmed", "x-2"),
        ce("order.confirmed", "x-3")
    ]);
    let r = h
        .http
        .post(h.url("/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["accepted"], 3);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(next(&mut got).await.id().to_owned());
    }
    assert_eq!(ids, ["x-1", "x-2", "x-3"]);

    let m = h.metrics().await;
    for line in [
        "switchboard_bridge_published_total{mode=\"structured\"} 2",
        "switchboard_bridge_published_total{mode=\"binary\"} 1",
        "switchboard_bridge_published_total{mode=\"batch\"} 3",
    ] {
        assert!(m.contains(line), "missing {line}");
    }
    // The bus's own counters are on the same page.
    let published: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_bus_published_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no switchboard_bus_published_total in {m}"));
    assert!(published >= 6, "bus published {published}");
    tap_sub.shutdown().await;
    h.stop().await;
}

/// `bridge.publish = "both"`: the proxy listener answers the publish path
/// before routing (with the same token check); `"admin"` leaves it to routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_on_the_proxy_listener_when_configured() {
    for (on, proxy_serves) in [
        (switchboard_gateway::bridge::config::PublishOn::Both, true),
        (switchboard_gateway::bridge::config::PublishOn::Admin, false),
    ] {
        let cfg = Config::parse(
            "bridge-test.toml".as_ref(),
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 1\naccess_log = false\n",
        )
        .unwrap();
        let bus = Bus::open(&format!("memory://{}", unique("proxy-pub")))
            .await
            .unwrap();
        let mut o = BridgeOptions::new(bus, sources_resolver(StaticSources::default().receivers()));
        o.publish = on;
        o.token = Some("s3cret".into());
        let bridge = Bridge::start(o).await.unwrap();
        let (tap_sub, mut got) = tap(bridge.bus(), "order.confirmed").await;
        let gw = GatewayBuilder::new(cfg)
            .bridge(bridge.clone())
            .start()
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let url = format!("http://{}/v1/events", gw.listen());
        let post = |token: Option<&'static str>| {
            let mut req = http
                .post(&url)
                .header("content-type", "application/cloudevents+json")
                .body(ce("order.confirmed", "p-1").to_string());
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send()
        };
        if proxy_serves {
            assert_eq!(post(None).await.unwrap().status(), 401);
            let r = post(Some("s3cret")).await.unwrap();
            assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
            assert_eq!(next(&mut got).await.id(), "p-1");
        } else {
            // No route matches: the proxy's own 404, nothing published.
            assert_eq!(post(Some("s3cret")).await.unwrap().status(), 404);
            assert!(
                tokio::time::timeout(Duration::from_millis(200), got.recv())
                    .await
                    .is_err()
            );
        }
        tap_sub.shutdown().await;
        bridge.shutdown().await;
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_bad_events_naming_the_attribute() {
    let h = Harness::start(&format!("memory://{}", unique("rej")), None, 64 * 1024).await;
    let (tap_sub, mut got) = tap(h.bridge.bus(), "t.ok").await;
    let post =
        |ct: Option<&'static str>, headers: Vec<(&'static str, &'static str)>, body: String| {
            let mut r = h.http.post(h.url("/v1/events"));
            if let Some(ct) = ct {
                r = r.header("content-type", ct);
            }
            for (k, v) in headers {
                r = r.header(k, v);
            }
            async move {
                let r = r.body(body).send().await.unwrap();
                let status = r.status().as_u16();
                let ct = r
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body: Value = r.json().await.unwrap();
                if status >= 400 {
                    assert_eq!(ct.as_deref(), Some("application/problem+json"));
                    assert_eq!(body["status"], status);
                }
                (status, body)
            }
        };
    const S: Option<&str> = Some("application/cloudevents+json");
    let mut no_source = ce("t.ok", "1");
    no_source.as_object_mut().unwrap().remove("source");
    let (st, p) = post(S, vec![], no_source.to_string()).await;
    assert_eq!((st, p["attribute"].as_str()), (400, Some("source")), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("`source`"), "{p}");

    let mut bad_spec = ce("t.ok", "1");
    bad_spec["specversion"] = json!("0.3");
    let (st, p) = post(S, vec![], bad_spec.to_string()).await;
    assert_eq!(
        (st, p["attribute"].as_str()),
        (400, Some("specversion")),
        "{p}"
    );

    let (st, p) = post(S, vec![], "{not json".into()).await;
    assert_eq!(st, 400, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("line 1"), "{p}");

    let (st, p) = post(S, vec![], ce("bad type!", "1").to_string()).await;
    assert_eq!((st, p["attribute"].as_str()), (400, Some("type")), "{p}");

    let binary = vec![
        ("ce-specversion", "1.0"),
        ("ce-source", "/s"),
        ("ce-type", "t.ok"),
    ];
    let (st, p) = post(Some("application/json"), binary.clone(), "{}".into()).await;
    assert_eq!((st, p["attribute"].as_str()), (400, Some("id")), "{p}");
    let mut bad_tp = binary.clone();
    bad_tp.extend([("ce-id", "1"), ("ce-traceparent", "00-zz")]);
    let (st, p) = post(None, bad_tp, String::new()).await;
    assert_eq!(
        (st, p["attribute"].as_str()),
        (400, Some("traceparent")),
        "{p}"
    );

    let batch = json!([ce("t.ok", "1"), {"specversion": "1.0", "id": "2", "source": "/s"}]);
    let (st, p) = post(
        Some("application/cloudevents-batch+json"),
        vec![],
        batch.to_string(),
    )
    .await;
    assert_eq!(
        (st, p["attribute"].as_str(), p["index"].as_u64()),
        (400, Some("type"), Some(1)),
        "{p}"
    );
    let (st, p) = post(
        Some("application/cloudevents-batch+json"),
        vec![],
        "{}".into(),
    )
    .await;
    assert_eq!(st, 400, "{p}");

    let (st, p) = post(
        Some("application/json"),
        vec![],
        ce("t.ok", "1").to_string(),
    )
    .await;
    assert_eq!(st, 415, "{p}");
    let (st, _) = post(None, vec![], ce("t.ok", "1").to_string()).await;
    assert_eq!(st, 415);

    // The limit is 64 KiB here: an event of 60 KiB passes, 70 KiB does not
    // (declared, and streamed without a length).
    let mut big = ce("t.ok", "big");
    big["data"] = json!("x".repeat(60 * 1024));
    let (st, _) = post(S, vec![], big.to_string()).await;
    assert_eq!(st, 202);
    assert_eq!(next(&mut got).await.id(), "big");
    big["data"] = json!("x".repeat(70 * 1024));
    let (st, p) = post(S, vec![], big.to_string()).await;
    assert_eq!(st, 413, "{p}");
    let chunks = futures::stream::iter(
        (0..70).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 1024]))),
    );
    let r = h
        .http
        .post(h.url("/v1/events"))
        .header("content-type", "application/cloudevents+json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Nothing refused reached the bus.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), got.recv())
            .await
            .is_err()
    );
    let m = h.metrics().await;
    assert!(
        m.contains("switchboard_bridge_publish_rejected_total{status=\"413\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("switchboard_bridge_publish_rejected_total{status=\"415\"} 2"),
        "{m}"
    );
    tap_sub.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_publishing_and_subscription_writes() {
    let h = Harness::start(
        &format!("memory://{}", unique("tok")),
        Some("s3cret"),
        1 << 20,
    )
    .await;
    let r = h.publish_structured(ce("t.a", "1")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth("s3cret")
        .header("content-type", "application/cloudevents+json")
        .body(ce("t.a", "1").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let spec = json!({"topic": "t.a", "url": "http://127.0.0.1:9/"});
    assert_eq!(h.subscribe("s", spec.clone()).await.status(), 401);
    let r = h
        .http
        .put(h.url("/v1/subscriptions/s"))
        .bearer_auth("wrong")
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .http
        .put(h.url("/v1/subscriptions/s"))
        .bearer_auth("s3cret")
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Reads are open, deletes are writes.
    assert_eq!(
        h.http
            .get(h.url("/v1/subscriptions/s"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        h.http
            .delete(h.url("/v1/subscriptions/s"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_api_creates_replaces_lists_and_deletes() {
    let h = Harness::start(&format!("memory://{}", unique("api")), None, 1 << 20).await;
    let r = h.subscribe("notify", fast_spec("order.confirmed")).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (
            v["name"].as_str(),
            v["group"].as_str(),
            v["origin"].as_str()
        ),
        (Some("notify"), Some("notify"), Some("api"))
    );
    assert_eq!(v["ack_timeout"], "2s");
    let mut changed = fast_spec("order.confirmed");
    changed["max_in_flight"] = json!(4);
    let r = h.subscribe("notify", changed).await;
    assert_eq!(r.status(), 200);
    let list: Value = h
        .http
        .get(h.url("/v1/subscriptions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["max_in_flight"], 4);

    // Every bad key is named.
    let r = h
        .subscribe("bad", json!({"topic": "has space", "max_deliveries": 0}))
        .await;
    assert_eq!(r.status(), 400);
    let p: Value = r.json().await.unwrap();
    let keys: BTreeSet<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["topic", "service", "max_deliveries"]),
        "{p}"
    );
    let r = h
        .subscribe(
            "bad",
            json!({"topic": "t", "service": "s", "colour": "red"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("colour"));

    let m = h.metrics().await;
    assert!(m.contains("switchboard_bridge_subscriptions 1"), "{m}");
    assert!(
        m.contains("switchboard_bridge_acked_total{subscription=\"notify\"} 0"),
        "{m}"
    );
    promtool(&m);
    let doc: Value = h
        .http
        .get(h.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/v1/events"]["post"].is_object());
    assert!(doc["paths"]["/v1/subscriptions/{name}"]["put"].is_object());

    assert_eq!(
        h.http
            .delete(h.url("/v1/subscriptions/notify"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        h.http
            .delete(h.url("/v1/subscriptions/notify"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        h.http
            .get(h.url("/v1/subscriptions/notify"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    h.stop().await;
}

/// `promtool check metrics` accepts the text (skipped with a reason without promtool).
fn promtool(text: &str) {
    use std::io::Write as _;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        assert!(
            !switchboard_testkit::require_servers(),
            "promtool is required"
        );
        eprintln!("skipping promtool check: promtool not installed");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Push delivery, on each bus

async fn retries_then_acks(bus_url: &str) {
    let h = Harness::start(bus_url, None, 1 << 20).await;
    let topic = unique("order.retry").replace('-', "_");
    // 503, then 429 with Retry-After: 1, then 200.
    let mut sub = Subscriber::start(Arc::new(|_, n| match n {
        0 => (503, vec![], "busy".into()),
        1 => (
            429,
            vec![("retry-after", "1".to_owned())],
            "slow down".into(),
        ),
        _ => (200, vec![], String::new()),
    }))
    .await;
    h.set_instances(&[sub.addr]);
    assert_eq!(h.subscribe("retry", fast_spec(&topic)).await.status(), 201);
    let mut e = ce(&topic, "evt-1");
    e["traceparent"] = json!(TRACEPARENT);
    e["correlationid"] = json!("corr-9");
    assert_eq!(h.publish_structured(e).await.status(), 202);
    let a = next(&mut sub.rx).await;
    let b = next(&mut sub.rx).await;
    let c = next(&mut sub.rx).await;
    assert!(
        c.at - b.at >= Duration::from_millis(950),
        "Retry-After honoured: {:?}",
        c.at - b.at
    );
    for (s, n) in [(&a, "1"), (&b, "2"), (&c, "3")] {
        let h = &s.headers;
        assert_eq!(h["ce-id"], "evt-1");
        assert_eq!(h["ce-type"], topic.as_str());
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-switchboard-delivery-attempt"], n);
        assert_eq!(h["x-request-id"], "corr-9");
        assert_eq!(h["ce-correlationid"], "corr-9");
        assert_eq!(h["ce-traceparent"], TRACEPARENT);
        let tp = h["traceparent"].to_str().unwrap();
        assert_eq!(&tp[..36], &TRACEPARENT[..36], "same trace, new span: {tp}");
        assert_eq!(&s.body[..], br#"{"id":"evt-1"}"#);
    }
    // Exactly three deliveries: the third was acked.
    assert!(
        tokio::time::timeout(Duration::from_millis(600), sub.rx.recv())
            .await
            .is_err()
    );
    assert_eq!(sub.ids().len(), 3);
    let m = h.metrics().await;
    for line in [
        "switchboard_bridge_pushed_total{subscription=\"retry\"} 3",
        "switchboard_bridge_acked_total{subscription=\"retry\"} 1",
        "switchboard_bridge_retried_total{subscription=\"retry\"} 2",
        "switchboard_bridge_dead_lettered_total{subscription=\"retry\"} 0",
        "switchboard_bridge_push_duration_seconds_count{subscription=\"retry\"} 3",
    ] {
        assert!(m.contains(line), "missing {line}\n{m}");
    }
    promtool(&m);
    h.stop().await;
}

async fn client_error_dead_letters(bus_url: &str) {
    let h = Harness::start(bus_url, None, 1 << 20).await;
    let topic = unique("payment.bad").replace('-', "_");
    let dlq = format!("{topic}.dlq");
    let (dsub, mut letters) = tap(h.bridge.bus(), &dlq).await;
    let mut sub = Subscriber::start(Arc::new(|_, _| {
        (400, vec![], "{\"error\":\n\"unknown order\"}".into())
    }))
    .await;
    h.set_instances(&[sub.addr]);
    assert_eq!(h.subscribe("bad", fast_spec(&topic)).await.status(), 201);
    assert_eq!(
        h.publish_structured(ce(&topic, "evt-400")).await.status(),
        202
    );
    let letter = next(&mut letters).await;
    let d = DeadLetter::from_event(&letter).expect("dead-letter attributes");
    assert_eq!((d.reason, d.attempts), (Reason::Rejected, 1));
    assert!(
        d.error.starts_with("HTTP 400 from service `subscriber`"),
        "{}",
        d.error
    );
    assert!(
        d.error.ends_with("{\"error\": \"unknown order\"}"),
        "{}",
        d.error
    );
    assert_eq!(
        (d.topic.as_str(), d.group.as_str()),
        (topic.as_str(), "bad")
    );
    assert_eq!(d.original().unwrap().unwrap().id(), "evt-400");
    next(&mut sub.rx).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.rx.recv())
            .await
            .is_err(),
        "no redelivery"
    );

    // A subscriber that keeps failing with 5xx: dead-lettered after max_deliveries.
    let failing = Subscriber::start(Arc::new(|_, _| (500, vec![], "down".into()))).await;
    h.set_instances(&[failing.addr]);
    let mut spec = fast_spec(&topic);
    spec["max_deliveries"] = json!(3);
    assert_eq!(h.subscribe("bad", spec).await.status(), 200);
    assert_eq!(
        h.publish_structured(ce(&topic, "evt-500")).await.status(),
        202
    );
    let d = DeadLetter::from_event(&next(&mut letters).await).unwrap();
    assert_eq!((d.reason, d.attempts), (Reason::MaxDeliveries, 3));
    assert!(
        d.error.starts_with("HTTP 500 from service `subscriber`") && d.error.ends_with("down"),
        "{}",
        d.error
    );
    assert_eq!(failing.ids(), ["evt-500"; 3]);
    let m = h.metrics().await;
    assert!(
        m.contains("switchboard_bridge_dead_lettered_total{subscription=\"bad\"} 1"),
        "{m}"
    );
    dsub.shutdown().await;
    h.stop().await;
}

async fn dead_instance_fails_over(bus_url: &str) {
    let h = Harness::start(bus_url, None, 1 << 20).await;
    let topic = unique("order.failover").replace('-', "_");
    let mut a = Subscriber::start(Subscriber::ok()).await;
    let b = Subscriber::start(Subscriber::ok()).await;
    h.set_instances(&[a.addr, b.addr]);
    let mut spec = fast_spec(&topic);
    spec["max_in_flight"] = json!(8);
    spec["max_deliveries"] = json!(10);
    assert_eq!(h.subscribe("failover", spec).await.status(), 201);
    const N: usize = 300;
    let events: Vec<Value> = (0..N).map(|i| ce(&topic, &format!("e{i:04}"))).collect();
    for chunk in events.chunks(50) {
        let r = h
            .http
            .post(h.url("/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(Value::from(chunk.to_vec()).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    // Let instance A take some of the stream, then kill it mid-stream.
    for _ in 0..10 {
        next(&mut a.rx).await;
    }
    a.kill();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got: BTreeSet<String> = a.ids().into_iter().chain(b.ids()).collect();
        if got.len() == N {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {N} events delivered",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (on_a, on_b) = (a.ids().len(), b.ids().len());
    assert!(on_a >= 10 && on_b > 0, "a {on_a}, b {on_b}");
    let m = h.metrics().await;
    assert!(
        m.contains("switchboard_bridge_dead_lettered_total{subscription=\"failover\"} 0"),
        "{m}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_push_retries_then_acks() {
    retries_then_acks(&format!("memory://{}", unique("m"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_push_client_error_dead_letters() {
    client_error_dead_letters(&format!("memory://{}", unique("m"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_push_dead_instance_fails_over() {
    dead_instance_fails_over(&format!("memory://{}", unique("m"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_push_retries_then_acks() {
    let Some(r) = redis() else { return };
    retries_then_acks(&r.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_push_client_error_dead_letters() {
    let Some(r) = redis() else { return };
    client_error_dead_letters(&r.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_push_dead_instance_fails_over() {
    let Some(r) = redis() else { return };
    dead_instance_fails_over(&r.url()).await;
}

#[test]
fn config_declares_bridge_and_subscriptions() {
    let text = r#"
[bridge]
bus = "memory://"
max_body_bytes = 131072

[[subscriptions]]
name = "notify"
topic = "order.confirmed"
service = "notification-service"
path = "/events"
ack_timeout = "3s"
backoff = { initial = "50ms", max = "5s", multiplier = 3.0 }
max_deliveries = 7
"#;
    let c = Config::parse("gw.toml".as_ref(), text).unwrap();
    assert_eq!(c.bridge.bus.as_deref(), Some("memory://"));
    assert_eq!(c.subscriptions.len(), 1);
    let s = &c.subscriptions[0];
    assert_eq!(
        (s.name.as_str(), s.group.as_str(), s.spec.max_deliveries),
        ("notify", "notify", 7)
    );
    let _: &SubscriptionSpec = &s.spec;

    let bad =
        "[bridge]\nmax_body_bytes = 1000\n\n[[subscriptions]]\ntopic = \"t\"\nurl = \"ftp://x\"\n";
    let errs = Config::parse("gw.toml".as_ref(), bad)
        .unwrap_err()
        .to_string();
    for key in [
        "bridge.max_body_bytes",
        "subscriptions[0]",
        "subscriptions[0].name",
        "subscriptions[0].url",
    ] {
        assert!(
            errs.contains(&format!("key `{key}`")),
            "{key} not named in:\n{errs}"
        );
    }
}

// ---------------------------------------------------------------------------
// Refusals, config subscriptions, URL targets and delivery failures

/// Only POST publishes (405 problem+json naming it, on either listener), and
/// a body that breaks off or is not valid HTTP framing is a 400, not a 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_other_methods_and_broken_bodies() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let cfg = Config::parse(
        "bridge-test.toml".as_ref(),
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 1\naccess_log = false\n",
    )
    .unwrap();
    let bus = Bus::open(&format!("memory://{}", unique("methods")))
        .await
        .unwrap();
    let mut o = BridgeOptions::new(bus, sources_resolver(StaticSources::default().receivers()));
    o.publish = switchboard_gateway::bridge::config::PublishOn::Both;
    let bridge = Bridge::start(o).await.unwrap();
    let (tap_sub, mut got) = tap(bridge.bus(), "t.ok").await;
    let gw = GatewayBuilder::new(cfg)
        .bridge(bridge.clone())
        .start()
        .await
        .unwrap();
    let http = reqwest::Client::new();
    for listener in [gw.admin(), gw.listen()] {
        let url = format!("http://{listener}/v1/events");
        for method in [http::Method::GET, http::Method::PUT, http::Method::DELETE] {
            let r = http
                .request(method.clone(), &url)
                .header("content-type", "application/cloudevents+json")
                .body(ce("t.ok", "wrong-method").to_string())
                .send()
                .await
                .unwrap();
            let what = format!("{method} on {listener}");
            assert_eq!(r.status(), 405, "{what}");
            assert_eq!(r.headers()["allow"], "POST", "{what}");
            assert_eq!(
                r.headers()["content-type"],
                "application/problem+json",
                "{what}"
            );
            let p: Value = r.json().await.unwrap();
            assert_eq!(p["status"], 405, "{what}: {p}");
        }

        // Raw requests: the body breaks off (the client half-closes after
        // 20 of 200 declared bytes), or its chunked framing is garbage.
        let event = ce("t.ok", "broken").to_string();
        let truncated = format!(
            "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents+json\r\ncontent-length: 200\r\n\r\n{}",
            &event[..20]
        );
        let bad_chunks = "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents+json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_owned();
        for (what, raw) in [("truncated", truncated), ("bad chunks", bad_chunks)] {
            let mut s = tokio::net::TcpStream::connect(listener).await.unwrap();
            s.write_all(raw.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            let mut answer = String::new();
            tokio::time::timeout(PATIENCE, s.read_to_string(&mut answer))
                .await
                .expect("an answer")
                .unwrap();
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "{what} on {listener}:\n{answer}"
            );
        }
    }
    // Nothing was published.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), got.recv())
            .await
            .is_err()
    );
    tap_sub.shutdown().await;
    bridge.shutdown().await;
    gw.shutdown().await;
}

/// Asserts a 503 problem+json from a publish that the bus did not accept.
async fn assert_bus_unavailable(r: reqwest::Response, what: &str) {
    let status = r.status();
    let ct = r.headers().get("content-type").cloned();
    let retry_after = r.headers().get("retry-after").cloned();
    let body = r.text().await.unwrap();
    assert_eq!(status, 503, "{what}: {body}");
    assert_eq!(
        ct.as_ref().map(|v| v.to_str().unwrap()),
        Some("application/problem+json"),
        "{what}"
    );
    assert!(retry_after.is_some(), "{what}: no retry-after");
    let p: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&p["status"], &p["type"]),
        (&json!(503), &json!("/problems/bus-unavailable")),
        "{what}: {p}"
    );
}

/// Sends one inline command to a Redis server and returns its reply line.
fn redis_command(addr: SocketAddr, command: &str) -> String {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("{command}\r\n").as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// 202 means the bus accepted: a Redis bus that is down, or that refuses
/// writes (out of memory), answers 503 problem+json in every mode, never 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_bus_that_is_down_or_refuses_answers_503() {
    let Some(mut redis) = redis() else { return };
    let h = Harness::start(&redis.url(), None, 1 << 20).await;
    let http = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let modes = |id: &str| {
        let structured = http
            .post(h.url("/v1/events"))
            .header("content-type", "application/cloudevents+json")
            .body(ce("t.down", &format!("{id}-s")).to_string());
        let binary = http
            .post(h.url("/v1/events"))
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("{id}-b"))
            .header("ce-source", "/test")
            .header("ce-type", "t.down")
            .header("content-type", "application/json")
            .body("{}");
        let batch = http
            .post(h.url("/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(
                json!([
                    ce("t.down", &format!("{id}-x1")),
                    ce("t.down", &format!("{id}-x2"))
                ])
                .to_string(),
            );
        [
            ("structured", structured),
            ("binary", binary),
            ("batch", batch),
        ]
    };
    for (mode, req) in modes("up") {
        assert_eq!(req.send().await.unwrap().status(), 202, "{mode}");
    }

    // Out of memory: Redis refuses the writes.
    let reply = redis_command(redis.addr(), "CONFIG SET maxmemory 1");
    assert!(reply.starts_with("+OK"), "{reply}");
    for (mode, req) in modes("oom") {
        assert_bus_unavailable(req.send().await.unwrap(), &format!("refused, {mode}")).await;
    }

    // Down: killed like a crash.
    redis.kill();
    for round in 0..3 {
        for (mode, req) in modes(&format!("down{round}")) {
            let r = req.send().await.expect("an answer, not a hang");
            assert_bus_unavailable(r, &format!("down, {mode}")).await;
        }
    }
    let m = h.metrics().await;
    assert!(
        m.contains("switchboard_bridge_publish_rejected_total{status=\"503\"} 12"),
        "{m}"
    );
    assert!(
        m.contains("switchboard_bridge_published_total{mode=\"structured\"} 1"),
        "{m}"
    );

    // Back up (empty: no persistence): publishing works again.
    redis.restart();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let [(_, req), ..] = modes("again");
        let status = req.send().await.unwrap().status();
        if status == 202 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            tokio::time::Instant::now() < deadline,
            "still 503 after a restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.stop().await;
}

/// Waits until `/metrics` has `line`.
async fn metric(h: &Harness, line: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let m = h.metrics().await;
        if m.contains(line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {line} within {PATIENCE:?}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next request that carries an event (health checks have no `ce-id`).
async fn next_event(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    loop {
        let s = next(rx).await;
        if s.headers.contains_key("ce-id") {
            return s;
        }
    }
}

/// A gateway started from a config file with `[bridge]` and two
/// `[[subscriptions]]`: one to a static service, one to a URL. Both push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_subscriptions_push_to_a_service_and_to_a_url() {
    let mut svc = Subscriber::start(Subscriber::ok()).await;
    let mut hook = Subscriber::start(Subscriber::ok()).await;
    let bus_url = format!("memory://{}", unique("cfg"));
    let text = format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 1
access_log = false

[bridge]
bus = "{bus_url}"

[[services]]
name = "notification-service"
instances = ["{svc}"]

[[subscriptions]]
name = "notify"
topic = "order.confirmed"
service = "notification-service"
path = "/events"
ack_timeout = "2s"

[[subscriptions]]
name = "hook"
topic = "payment.completed"
url = "http://{hook}/hooks/payments?from=bridge"
"#,
        svc = svc.addr,
        hook = hook.addr,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, text).unwrap();
    let running = switchboard_gateway::start(Config::load(&file).unwrap())
        .await
        .unwrap();
    let admin = format!("http://{}", running.gateway.admin());
    let http = reqwest::Client::new();
    let list: Value = http
        .get(format!("{admin}/v1/subscriptions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let origins: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["origin"].as_str().unwrap()))
        .collect();
    assert_eq!(origins, [("hook", "config"), ("notify", "config")]);

    for (ty, id) in [("order.confirmed", "cfg-1"), ("payment.completed", "cfg-2")] {
        let mut e = ce(ty, id);
        e["correlationid"] = json!("corr-cfg");
        let r = http
            .post(format!("{admin}/v1/events"))
            .header("content-type", "application/cloudevents+json")
            .body(e.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    }
    let got = next_event(&mut svc.rx).await;
    assert_eq!(got.path, "/events");
    assert_eq!(got.headers["ce-id"], "cfg-1");
    assert_eq!(got.headers["ce-type"], "order.confirmed");
    assert_eq!(got.headers["ce-correlationid"], "corr-cfg");
    let got = next_event(&mut hook.rx).await;
    assert_eq!(got.path, "/hooks/payments?from=bridge");
    assert_eq!(got.headers["ce-id"], "cfg-2");
    assert_eq!(&got.body[..], br#"{"id":"cfg-2"}"#);
    // Each got its own topic only, and both were acked.
    for name in ["notify", "hook"] {
        let mut acked = Value::Null;
        for _ in 0..100 {
            let s: Value = http
                .get(format!("{admin}/v1/subscriptions/{name}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            acked = s["stats"]["acked"].clone();
            if acked == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(acked, 1, "{name}");
    }
    assert_eq!(svc.ids(), ["cfg-1"]);
    assert_eq!(hook.ids(), ["cfg-2"]);
    running.shutdown().await;
}

/// `PUT /v1/subscriptions/{name}` with a `url` target: events go to that
/// address and path (query included), with no registry involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_subscription_pushes_to_the_url() {
    let h = Harness::start(&format!("memory://{}", unique("url")), None, 1 << 20).await;
    let mut hook = Subscriber::start(Subscriber::ok()).await;
    let topic = unique("order.url").replace('-', "_");
    let spec = json!({
        "topic": topic,
        "url": format!("http://{}/inbox/events?tenant=7", hook.addr),
        "ack_timeout": "2s",
    });
    let r = h.subscribe("by-url", spec).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert_eq!(h.publish_structured(ce(&topic, "u-1")).await.status(), 202);
    let got = next_event(&mut hook.rx).await;
    assert_eq!(got.path, "/inbox/events?tenant=7");
    assert_eq!(got.headers["ce-id"], "u-1");
    assert_eq!(got.headers["host"], hook.addr.to_string().as_str());
    metric(
        &h,
        "switchboard_bridge_acked_total{subscription=\"by-url\"} 1",
    )
    .await;
    assert_eq!(hook.ids(), ["u-1"]);
    h.stop().await;
}

/// A subscriber that answers the first delivery only after the ack timeout
/// (200, too late) gets the event again, answers at once and it is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_retries_after_a_subscriber_timeout() {
    let h = Harness::start(&format!("memory://{}", unique("slow")), None, 1 << 20).await;
    let topic = unique("order.slow").replace('-', "_");
    let mut sub = Subscriber::start_at(
        "127.0.0.1:0".parse().unwrap(),
        Subscriber::ok(),
        Arc::new(|n| {
            if n == 0 {
                Duration::from_millis(1500)
            } else {
                Duration::ZERO
            }
        }),
    )
    .await;
    h.set_instances(&[sub.addr]);
    let mut spec = fast_spec(&topic);
    spec["ack_timeout"] = json!("300ms");
    assert_eq!(h.subscribe("slow", spec).await.status(), 201);
    assert_eq!(h.publish_structured(ce(&topic, "t-1")).await.status(), 202);
    let a = next(&mut sub.rx).await;
    let b = next(&mut sub.rx).await;
    assert_eq!(
        (
            &a.headers["x-switchboard-delivery-attempt"],
            &b.headers["x-switchboard-delivery-attempt"]
        ),
        (
            &"1".parse::<http::HeaderValue>().unwrap(),
            &"2".parse().unwrap()
        )
    );
    let waited = b.at - a.at;
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500),
        "redelivered after the ack timeout, not after the late answer: {waited:?}"
    );
    metric(
        &h,
        "switchboard_bridge_acked_total{subscription=\"slow\"} 1",
    )
    .await;
    // The late 200 of the first delivery settles nothing: no third delivery.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sub.ids(), ["t-1", "t-1"]);
    let m = h.metrics().await;
    for line in [
        "switchboard_bridge_pushed_total{subscription=\"slow\"} 2",
        "switchboard_bridge_acked_total{subscription=\"slow\"} 1",
        "switchboard_bridge_retried_total{subscription=\"slow\"} 1",
        "switchboard_bridge_dead_lettered_total{subscription=\"slow\"} 0",
    ] {
        assert!(m.contains(line), "missing {line}\n{m}");
    }
    h.stop().await;
}

/// Connection errors are retried: the only instance first refuses
/// connections (nothing listens), then hangs up without an answer, then acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_retries_after_connection_errors() {
    let h = Harness::start(&format!("memory://{}", unique("conn")), None, 1 << 20).await;
    let topic = unique("order.conn").replace('-', "_");
    // A free port with nothing on it.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    h.set_instances(&[addr]);
    let mut spec = fast_spec(&topic);
    spec["backoff"] = json!({"initial": "100ms", "max": "100ms", "multiplier": 1.0});
    spec["max_deliveries"] = json!(100);
    assert_eq!(h.subscribe("conn", spec).await.status(), 201);
    assert_eq!(h.publish_structured(ce(&topic, "c-1")).await.status(), 202);
    metric(
        &h,
        "switchboard_bridge_retried_total{subscription=\"conn\"} 2",
    )
    .await;
    let refused = 2;
    // Now something listens: it hangs up on the first request, then acks.
    let mut sub = Subscriber::start_at(
        addr,
        Arc::new(|_, n| {
            if n == 0 {
                (HANG_UP, vec![], String::new())
            } else {
                (200, vec![], String::new())
            }
        }),
        Arc::new(|_| Duration::ZERO),
    )
    .await;
    let a = next(&mut sub.rx).await;
    let b = next(&mut sub.rx).await;
    let attempt = |s: &Seen| -> u32 {
        s.headers["x-switchboard-delivery-attempt"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(attempt(&a) > refused, "{}", attempt(&a));
    assert_eq!(attempt(&b), attempt(&a) + 1);
    metric(
        &h,
        "switchboard_bridge_acked_total{subscription=\"conn\"} 1",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sub.ids(), ["c-1", "c-1"]);
    let m = h.metrics().await;
    assert!(
        m.contains("switchboard_bridge_dead_lettered_total{subscription=\"conn\"} 0"),
        "{m}"
    );
    h.stop().await;
}

/// Per-instance breakers eject a failing instance: of two instances, one
/// always answers 503. Once its breaker opens (after `min_calls` failures),
/// every delivery goes to the other and the failing one gets nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_ejects_a_failing_instance() {
    let h = Harness::start(&format!("memory://{}", unique("brk")), None, 1 << 20).await;
    let topic = unique("order.brk").replace('-', "_");
    let bad = Subscriber::start(Arc::new(|_, _| (503, vec![], "down".into()))).await;
    let good = Subscriber::start(Subscriber::ok()).await;
    h.set_instances(&[bad.addr, good.addr]);
    let mut spec = fast_spec(&topic);
    // One at a time, so the count on the failing instance is exact.
    spec["max_in_flight"] = json!(1);
    spec["max_deliveries"] = json!(10);
    spec["breaker"] =
        json!({"failure_rate": 0.5, "min_calls": 4, "window": "60s", "open_for": "60s"});
    assert_eq!(h.subscribe("brk", spec).await.status(), 201);
    let publish = |from: usize, n: usize| {
        let events: Vec<Value> = (from..from + n)
            .map(|i| ce(&topic, &format!("k{i:03}")))
            .collect();
        h.http
            .post(h.url("/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(Value::from(events).to_string())
            .send()
    };
    assert_eq!(publish(0, 40).await.unwrap().status(), 202);
    metric(
        &h,
        "switchboard_bridge_acked_total{subscription=\"brk\"} 40",
    )
    .await;
    let on_bad = bad.ids().len();
    assert_eq!(on_bad, 4, "the breaker opens after min_calls failures");
    assert_eq!(
        good.ids().into_iter().collect::<BTreeSet<_>>().len(),
        40,
        "every event acked by the good instance"
    );
    assert_eq!(publish(40, 40).await.unwrap().status(), 202);
    metric(
        &h,
        "switchboard_bridge_acked_total{subscription=\"brk\"} 80",
    )
    .await;
    assert_eq!(bad.ids().len(), on_bad, "the ejected instance got more");
    assert_eq!(good.ids().into_iter().collect::<BTreeSet<_>>().len(), 80);
    let m = h.metrics().await;
    for line in [
        "switchboard_bridge_retried_total{subscription=\"brk\"} 4",
        "switchboard_bridge_dead_lettered_total{subscription=\"brk\"} 0",
    ] {
        assert!(m.contains(line), "missing {line}\n{m}");
    }
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Connection reuse

/// Pushes reuse their keep-alive connections whichever worker thread the
/// subscription's task runs on: at most one connection per delivery in
/// flight (with room for a rare keep-alive race), not one every few pushes
/// as when idle connections were kept per worker thread (`switchboard bench
/// bridge` opened a connection for about every second push on 2 workers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reuse_connections_across_workers() {
    const EVENTS: usize = 3000;
    const IN_FLIGHT: usize = 16;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conns, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, r) = (Arc::clone(&conns), Arc::clone(&requests));
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, SeqCst);
            let r = Arc::clone(&r);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = Arc::clone(&r);
                    async move {
                        let _ = req.into_body().collect().await;
                        r.fetch_add(1, SeqCst);
                        let mut res = Response::new(Full::new(Bytes::new()));
                        *res.status_mut() = StatusCode::NO_CONTENT;
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let bus = Bus::open(&format!("memory://{}", unique("reuse")))
        .await
        .unwrap();
    let topic = unique("reuse.t").replace('-', "_");
    let mut o = BridgeOptions::new(bus.clone(), sources_resolver(Default::default()));
    let spec: SubscriptionSpec = serde_json::from_value(json!({
        "name": "reuse",
        "topic": topic,
        "url": format!("http://{addr}/events"),
        "max_in_flight": IN_FLIGHT,
    }))
    .unwrap();
    o.subscriptions = vec![spec.resolve(None).unwrap()];
    let bridge = Bridge::start(o).await.unwrap();
    for chunk in 0..EVENTS / 100 {
        let events = (0..100)
            .map(|i| {
                Event::builder()
                    .source("/test")
                    .ty(topic.as_str())
                    .id(format!("{chunk}-{i}"))
                    .build()
                    .unwrap()
            })
            .collect();
        bus.publish_batch(events).await.unwrap();
    }
    tokio::time::timeout(PATIENCE, async {
        while requests.load(SeqCst) < EVENTS {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every event pushed within patience");
    let opened = conns.load(SeqCst);
    assert!(
        opened <= 2 * IN_FLIGHT,
        "{opened} connections for {EVENTS} pushes with {IN_FLIGHT} in flight"
    );
    bridge.shutdown().await;
    server.abort();
}
