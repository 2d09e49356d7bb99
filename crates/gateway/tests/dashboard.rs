//! The dashboard's server side over real sockets: the page and its assets,
//! the sampler's view of traffic and breakers, the SSE stream read with
//! reqwest, the search over the access-log ring, and the admin token.

mod support;

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use support::Backend;
use switchboard_gateway::{Config, GatewayBuilder, RunningGateway};

/// A gateway with its discovery channels (dropping them would freeze the lists).
struct Gw {
    gw: RunningGateway,
    _sources: switchboard_gateway::discovery::StaticSources,
}

impl std::ops::Deref for Gw {
    type Target = RunningGateway;
    fn deref(&self) -> &RunningGateway {
        &self.gw
    }
}

impl Gw {
    async fn shutdown(self) {
        self.gw.shutdown().await;
    }
}

async fn gateway(backends: &[&Backend], extra: &str) -> Gw {
    gateway_open_for(backends, extra, "30s").await
}

async fn gateway_open_for(backends: &[&Backend], extra: &str, open_for: &str) -> Gw {
    let addrs: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let text = format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 2
drain_timeout = "2s"
access_log = true
{extra}

[[services]]
name = "svc"
instances = [{}]

[[routes]]
prefix = "/svc"
service = "svc"
strip_prefix = true
retry = {{ attempts = 1 }}
breaker = {{ failure_rate = 0.5, min_calls = 4, window = "10s", open_for = "{open_for}" }}
"#,
        addrs.join(", ")
    );
    let config = Config::parse(Path::new("dash.toml"), &text).unwrap();
    let sources = switchboard_gateway::discovery::static_sources(&config);
    let gw = GatewayBuilder::new(config)
        .sources(sources.receivers())
        // Records reach the ring; nothing is printed.
        .access_log_dispatch(tracing::Dispatch::none())
        .start()
        .await
        .unwrap();
    Gw {
        gw,
        _sources: sources,
    }
}

/// Reads SSE events (name, JSON) from a streaming response until `n` arrived.
async fn read_events(res: reqwest::Response, n: usize) -> Vec<(String, Value)> {
    read_events_until(res, |out| out.len() >= n).await
}

/// Reads SSE events (name, JSON) from a streaming response until `done`
/// holds for those read so far (within 10 s).
async fn read_events_until(
    res: reqwest::Response,
    done: impl Fn(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let mut body = res.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(&out) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("no SSE frame within 10 s; so far: {out:?}"))
            .expect("the stream stays open")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(cut) = buf.find("\n\n") {
            let block: String = buf.drain(..cut + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if !data.is_empty() {
                out.push((name, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_and_assets_are_embedded() {
    let b = Backend::start("a").await;
    let gw = gateway(&[&b], "").await;
    let c = support::client();
    let admin = gw.admin();
    for (path, ty, needle) in [
        ("/dashboard", "text/html", "/dashboard/app.js"),
        ("/dashboard/app.js", "text/javascript", "/v1/stream"),
        ("/dashboard/app.css", "text/css", "--bad"),
    ] {
        let res = c.get(format!("http://{admin}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with(ty), "{path}: {ct}");
        let csp = res.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        let text = res.text().await.unwrap();
        assert!(text.contains(needle), "{path} lacks {needle}");
        assert!(!text.contains("https://"), "{path} loads something remote");
    }
    let doc: Value = c
        .get(format!("http://{admin}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in ["/dashboard", "/v1/stream", "/v1/search"] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from OpenAPI"
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_sends_history_then_frames_with_traffic_and_breakers() {
    let ok = Backend::start("ok").await;
    let bad = Backend::start("bad").await;
    bad.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let gw = gateway(&[&ok, &bad], "").await;
    let c = support::client();
    let stream = c
        .get(format!("http://{}/v1/stream", gw.admin()))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    for i in 0..40 {
        let _ = c
            .get(format!("http://{}/svc/x", gw.listen()))
            .header("x-request-id", format!("dash-{i}"))
            .send()
            .await
            .unwrap();
    }
    // Let the workers flush their access-log batches to the ring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Frames taken while the requests ran may still be in the stream (on a
    // loaded machine, even one taken before the first): read until a frame
    // has counted all 40 requests, errors included.
    let events = read_events_until(stream, |out| {
        out.last()
            .is_some_and(|(n, v)| n == "sample" && v["routes"][0]["total"] == 40)
    })
    .await;
    assert_eq!(events[0].0, "history");
    assert!(events[0].1["routes"].is_object());
    // Totals only grow from frame to frame.
    let totals: Vec<u64> = events[1..]
        .iter()
        .filter(|(n, _)| n == "sample")
        .map(|(_, v)| v["routes"][0]["total"].as_u64().unwrap())
        .collect();
    assert!(totals.windows(2).all(|w| w[0] <= w[1]), "{totals:?}");
    // Sampled directly too: breakers and services are all there.
    let frame = gw.dashboard().tick().await;
    let route = &frame.routes[0];
    assert_eq!(route.route, "/svc");
    assert_eq!(frame.breakers.len(), 2);
    let bad_breaker = frame
        .breakers
        .iter()
        .find(|b| b.addr == bad.addr.to_string())
        .unwrap();
    assert_eq!(bad_breaker.state, "open", "{bad_breaker:?}");
    assert!(
        frame
            .transitions
            .iter()
            .any(|t| t.to == "open" && t.route == "/svc"),
        "{:?}",
        frame.transitions
    );
    // No registry services here, so the services come from discovery.
    assert_eq!(frame.services.len(), 1);
    assert_eq!(frame.services[0].instances.len(), 2);
    // The search finds a request id in the access-log ring.
    let found: Value = c
        .get(format!("http://{}/v1/search?q=dash-7", gw.admin()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hits = found["requests"].as_array().unwrap();
    assert_eq!(hits.len(), 1, "{found}");
    assert_eq!(hits[0]["request_id"], "dash-7");
    assert_eq!(hits[0]["route"], "/svc");
    let bad_q = c
        .get(format!("http://{}/v1/search?q=a%20b", gw.admin()))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_q.status(), 400);
    assert_eq!(bad_q.headers()["content-type"], "application/problem+json");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_the_stream_and_search_but_not_the_page() {
    let b = Backend::start("a").await;
    let gw = gateway(&[&b], "\n[registry]\ntoken = \"s3cret-token\"\n").await;
    let c = support::client();
    let admin = gw.admin();
    let page = c
        .get(format!("http://{admin}/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    for path in ["/v1/stream", "/v1/search?q=abc"] {
        let res = c.get(format!("http://{admin}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
        let wrong = c
            .get(format!("http://{admin}{path}"))
            .bearer_auth("nope")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
    }
    let res = c
        .get(format!("http://{admin}/v1/stream"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = read_events(res, 2).await;
    let frame = &events[1].1;
    assert_eq!(frame["info"]["token_required"], true);
    assert!(
        !frame.to_string().contains("s3cret"),
        "the token leaked: {frame}"
    );
    // Shutdown ends open streams instead of waiting for them.
    tokio::time::timeout(Duration::from_secs(5), gw.shutdown())
        .await
        .expect("shutdown with an open stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_never_stalls_the_sampler() {
    let b = Backend::start("a").await;
    let gw = gateway(&[&b], "").await;
    let c = support::client();
    let _idle = c
        .get(format!("http://{}/v1/stream", gw.admin()))
        .send()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..200 {
        gw.dashboard().tick().await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "200 ticks took {:?}",
        started.elapsed()
    );
    gw.shutdown().await;
}

/// The walkthrough's fault step as the dashboard sees it: open, then
/// half-open once the open time passed and a probe arrives, then closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_transitions_open_half_open_closed_reach_the_frames() {
    let b = Backend::start("flaky").await;
    let gw = gateway_open_for(&[&b], "", "300ms").await;
    let c = support::client();
    b.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..6 {
        let _ = c
            .get(format!("http://{}/svc/x", gw.listen()))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(gw.dashboard().tick().await.breakers[0].state, "open");
    b.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..20 {
        let _ = c
            .get(format!("http://{}/svc/x", gw.listen()))
            .send()
            .await
            .unwrap();
    }
    let frame = gw.dashboard().tick().await;
    assert_eq!(frame.breakers[0].state, "closed");
    let states: Vec<&str> = frame.transitions.iter().map(|t| t.to).collect();
    assert_eq!(states, ["open", "half_open", "closed"]);
    gw.shutdown().await;
}

/// TTL instances have no active check: their "last check" on the dashboard
/// is the last heartbeat the registry accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_instance_that_heartbeats_shows_its_last_check() {
    use switchboard_registry::{CheckSpec, Registration, Registry, RegistryOptions};
    let registry = Registry::memory(RegistryOptions::default());
    let ttl = || Registration::new("127.0.0.1", 9).check(CheckSpec::ttl(Duration::from_secs(30)));
    registry.register("jobs", "beating", ttl()).await.unwrap();
    registry.register("jobs", "quiet", ttl()).await.unwrap();
    let config = Config::parse(
        Path::new("ttl.toml"),
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 1\n",
    )
    .unwrap();
    let gw = GatewayBuilder::new(config)
        .dashboard_registry(registry.clone())
        .start()
        .await
        .unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    registry.heartbeat("jobs", "beating").await.unwrap();
    let frame = gw.dashboard().tick().await;
    let jobs = frame.services.iter().find(|s| s.name == "jobs").unwrap();
    let row = |id: &str| jobs.instances.iter().find(|i| i.id == id).unwrap();
    let beating = row("beating");
    let last = beating.last_check.expect("a last check after a heartbeat");
    assert!(u128::from(last) >= before, "{beating:?}");
    assert_eq!(beating.last_check_by, Some("heartbeat"));
    // Registered, never heartbeat since: nothing to show yet.
    assert_eq!(row("quiet").last_check, None, "{:?}", row("quiet"));
    gw.shutdown().await;
    registry.shutdown().await;
}
