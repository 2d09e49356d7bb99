//! Edge policies end to end over sockets (issue 6): versioned routing and
//! deprecation headers, rate limits (memory and shared Redis), idempotency
//! keys (memory and Redis), CORS preflight, admin security and the upstream
//! allow list.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Backend, Harness};
use switchboard_gateway::{Config, GatewayBuilder, Instance, InstanceStatus};
use switchboard_testkit::{Persistence, RedisServer};

fn versioned(addr: SocketAddr, version: &str) -> Instance {
    Instance {
        id: addr.to_string(),
        addr,
        status: InstanceStatus::Passing,
        version: Some(version.parse().unwrap()),
    }
}

async fn instance_of(res: reqwest::Response) -> String {
    let v: Value = res.json().await.unwrap();
    v["instance"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_routing_picks_majors_and_deprecation_headers_appear() {
    let v1 = Backend::start("v1").await;
    let v2a = Backend::start("v2a").await;
    let v2b = Backend::start("v2b").await;
    let h = Harness::start(
        r#"
[[services]]
name = "users"
instances = []

[[routes]]
prefix = "/v1/users"
service = "users"
strip_prefix = true
version = { major = 1 }
deprecated = { since = "2023-06-30T23:59:59Z", sunset = "2030-01-01", successor = "/v2/users" }

[[routes]]
prefix = "/v2/users"
service = "users"
strip_prefix = true
version = { major = 2 }

[[routes]]
prefix = "/users"
service = "users"
version = { header = "Api-Version", default = 2 }
"#,
    )
    .await;
    assert!(h.sources.update(
        "users",
        vec![
            versioned(v1.addr, "1.4.0"),
            versioned(v2a.addr, "2.0.1"),
            versioned(v2b.addr, "2.3.0"),
            // No version: never serves a versioned route.
            Instance {
                id: "plain".into(),
                addr: support::dead_addr(),
                status: InstanceStatus::Passing,
                version: None,
            },
        ],
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let c = &h.client;

    for _ in 0..4 {
        let res = c.get(h.url("/v1/users/7")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["deprecation"], "@1688169599");
        assert_eq!(res.headers()["sunset"], "Tue, 01 Jan 2030 00:00:00 GMT");
        assert_eq!(
            res.headers()["link"],
            "</v2/users>; rel=\"successor-version\""
        );
        assert_eq!(instance_of(res).await, "v1");
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..12 {
        let res = c.get(h.url("/v2/users/7")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("deprecation").is_none());
        seen.insert(instance_of(res).await);
    }
    assert_eq!(
        seen,
        ["v2a", "v2b"].map(String::from).into_iter().collect(),
        "only major-2 instances, both used"
    );

    // Header versioning with a default.
    for (header, want) in [(Some("1"), "v1"), (Some("v1.2"), "v1"), (None, "v2")] {
        let mut req = c.get(h.url("/users/7"));
        if let Some(v) = header {
            req = req.header("api-version", v);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200, "{header:?}");
        assert!(instance_of(res).await.starts_with(want), "{header:?}");
    }
    let res = c
        .get(h.url("/users/7"))
        .header("api-version", "latest")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let res = c
        .get(h.url("/users/7"))
        .header("api-version", "7")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503, "no instance of major 7");
    h.gw.shutdown().await;
}

fn rate_limited_route(limit: &str) -> String {
    format!(
        r#"
[[services]]
name = "svc"
instances = []

[[routes]]
prefix = "/"
service = "svc"
rate_limit = {limit}
"#
    )
}

async fn statuses(h: &Harness, n: usize, key: Option<&str>) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut req = h.client.get(h.url("/x"));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        out.push(req.send().await.unwrap().status().as_u16());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_over_the_limit_gets_429_and_the_next_window_passes() {
    let b = Backend::start("b").await;
    let h = Harness::start(&rate_limited_route(
        r#"{ rate = 5, per = "500ms", burst = 5, key = "ip" }"#,
    ))
    .await;
    h.set_instances("svc", &[b.addr]);
    assert_eq!(statuses(&h, 5, None).await, vec![200; 5]);
    let res = h.client.get(h.url("/x")).send().await.unwrap();
    assert_eq!(res.status(), 429);
    let hd = res.headers().clone();
    assert_eq!(hd["content-type"], "application/problem+json");
    assert_eq!(hd["retry-after"], "1");
    assert_eq!(hd["ratelimit-policy"], "\"/\";q=5;w=1");
    assert_eq!(hd["ratelimit"], "\"/\";r=0;t=1");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], 429);
    assert_eq!(
        b.hits(),
        5,
        "the refused request never reached the upstream"
    );

    // The next window: a full burst again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(statuses(&h, 5, None).await, vec![200; 5]);
    assert_eq!(statuses(&h, 1, None).await, vec![429]);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("switchboard_gateway_rate_limited_total{route=\"/\"} 2"),
        "{metrics}"
    );
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_get_their_own_buckets() {
    let b = Backend::start("b").await;
    let h = Harness::start(&rate_limited_route(
        r#"{ rate = 2, per = "10s", key = "header:X-Api-Key", max_keys = 64 }"#,
    ))
    .await;
    h.set_instances("svc", &[b.addr]);
    assert_eq!(statuses(&h, 3, Some("alice")).await, vec![200, 200, 429]);
    assert_eq!(statuses(&h, 2, Some("bob")).await, vec![200, 200]);
    // Without the header, clients share one bucket.
    assert_eq!(statuses(&h, 3, None).await, vec![200, 200, 429]);
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_redis_share_a_limit_and_fail_open_without_it() {
    let Some(mut redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let b = Backend::start("b").await;
    let route = rate_limited_route(&format!(
        r#"{{ rate = 4, per = "60s", key = "none", store = "{}" }}"#,
        redis.url()
    ));
    let one = Harness::start(&route).await;
    let two = Harness::start(&route).await;
    one.set_instances("svc", &[b.addr]);
    two.set_instances("svc", &[b.addr]);
    assert_eq!(statuses(&one, 2, None).await, vec![200, 200]);
    assert_eq!(statuses(&two, 2, None).await, vec![200, 200]);
    assert_eq!(statuses(&one, 1, None).await, vec![429]);
    let res = two.client.get(two.url("/x")).send().await.unwrap();
    assert_eq!(res.status(), 429);
    let wait: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=15).contains(&wait), "one request every 15 s: {wait}");
    // A burst of 4 refills in 4 x 15 s: the window the quota applies to.
    assert_eq!(res.headers()["ratelimit-policy"], "\"/\";q=4;w=60");
    assert_eq!(res.headers()["ratelimit"], format!("\"/\";r=0;t={wait}"));

    // Redis gone: requests pass (fail open) and the failures are counted.
    redis.kill();
    assert_eq!(statuses(&one, 3, None).await, vec![200; 3]);
    let metrics = one
        .client
        .get(one.admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchboard_gateway_rate_limit_store_errors_total{route=\"/\"} 3"),
        "{metrics}"
    );
    one.gw.shutdown().await;
    two.gw.shutdown().await;
}

fn idempotent_route(store: &str) -> String {
    format!(
        r#"
[[services]]
name = "svc"
instances = []

[[routes]]
prefix = "/"
service = "svc"
idempotency = {{ ttl = "1m", store = "{store}" }}
"#
    )
}

async fn post(h: &Harness, path: &str, key: &str, body: &'static str) -> reqwest::Response {
    h.client
        .post(h.url(path))
        .header("idempotency-key", key)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Replay, 409 while in flight, 422 on a different body; `two` may be a second
/// gateway on the same store.
async fn idempotency_scenario(one: &Harness, two: &Harness, b: &Backend) {
    let first = post(one, "/orders", "\"k-1\"", "{\"n\":1}").await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body: Value = first.json().await.unwrap();
    assert_eq!(first_body["idempotency-key"], "\"k-1\"");
    assert_eq!(b.hits(), 1);

    let again = post(two, "/orders", "\"k-1\"", "{\"n\":1}").await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], "application/json");
    let again_body: Value = again.json().await.unwrap();
    assert_eq!(again_body, first_body, "the stored response, byte for byte");
    assert_eq!(b.hits(), 1, "a replay does not reach the upstream");

    let other = post(two, "/orders", "\"k-1\"", "{\"n\":2}").await;
    assert_eq!(other.status(), 422);
    assert_eq!(other.headers()["content-type"], "application/problem+json");

    // In flight: the first request takes 400 ms upstream.
    let slow = post(one, "/slow/400", "k-2", "x");
    let (a, b2) = tokio::join!(slow, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        post(two, "/slow/400", "k-2", "x").await
    });
    assert_eq!(a.status(), 200);
    assert_eq!(b2.status(), 409);

    // A 5xx is not kept: the repeat runs again.
    let before = b.hits();
    assert_eq!(post(one, "/status/500", "k-3", "").await.status(), 500);
    assert_eq!(post(two, "/status/500", "k-3", "").await.status(), 500);
    assert_eq!(b.hits(), before + 2);

    // GET ignores the key; a malformed key is 400.
    let res = one
        .client
        .post(one.url("/orders"))
        .header("idempotency-key", "\"\"")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_in_memory() {
    let b = Backend::start("b").await;
    let h = Harness::start(&idempotent_route("memory://")).await;
    h.set_instances("svc", &[b.addr]);
    idempotency_scenario(&h, &h, &b).await;
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_on_redis_shared_by_two_gateways() {
    let Some(mut redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let b = Backend::start("b").await;
    let route = idempotent_route(&redis.url());
    let one = Harness::start(&route).await;
    let two = Harness::start(&route).await;
    one.set_instances("svc", &[b.addr]);
    two.set_instances("svc", &[b.addr]);
    idempotency_scenario(&one, &two, &b).await;

    // Redis gone: forwarded without protection (fail open), and counted.
    redis.kill();
    let before = b.hits();
    assert_eq!(post(&one, "/orders", "k-9", "x").await.status(), 200);
    let res = post(&one, "/orders", "k-9", "x").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(b.hits(), before + 2);
    let metrics = one
        .client
        .get(one.admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchboard_gateway_idempotency_store_errors_total{route=\"/\"} 2"),
        "{metrics}"
    );
    one.gw.shutdown().await;
    two.gw.shutdown().await;
}

/// How long the limit routes keep a response (the config allows no less than 1 s).
const SHORT_TTL: Duration = Duration::from_secs(2);

/// Keeps bodies of up to 64 bytes for [`SHORT_TTL`].
fn idempotent_limits_route(store: &str) -> String {
    format!(
        r#"
[[services]]
name = "svc"
instances = []

[[routes]]
prefix = "/"
service = "svc"
idempotency = {{ ttl = "{}s", max_response_bytes = 64, store = "{store}" }}
"#,
        SHORT_TTL.as_secs()
    )
}

/// A response over `max_response_bytes`, whether its `Content-Length` says
/// so or its streamed body passes the limit, reaches the client whole but is
/// not kept: the key records the request as done, so a repeat with the same
/// request gets 409 naming the limit and never reaches the upstream again (no
/// second charge). A different request with the key still gets 422, and the
/// record ends with the key's TTL.
async fn too_large_scenario(one: &Harness, two: &Harness, b: &Backend) {
    let before = b.hits();
    let first = post(one, "/orders", "big-1", "{\"n\":1}").await;
    assert_eq!(first.status(), 200);
    let length: usize = first.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 64, "the echo is over the limit: {length}");
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body: Value = first.json().await.unwrap();
    assert_eq!(first_body["path"], "/orders");
    assert_eq!(b.hits(), before + 1);
    let again = post(two, "/orders", "big-1", "{\"n\":1}").await;
    assert_done_not_kept(again).await;
    assert_eq!(
        b.hits(),
        before + 1,
        "the repeat did not reach the upstream"
    );
    let other = post(two, "/orders", "big-1", "{\"n\":2}").await;
    assert_eq!(
        other.status(),
        422,
        "a different request is still a mismatch"
    );
    assert_eq!(b.hits(), before + 1);

    // Streamed without Content-Length (30 lines, 140 bytes): the gateway reads
    // past the limit before answering, then sends what it read and the rest.
    let whole: String = (0..30).map(|i| format!("b {i}\n")).collect();
    let res = post(one, "/stream/30", "big-2", "").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert!(res.headers().get("content-length").is_none(), "streamed");
    assert_eq!(
        res.text().await.unwrap(),
        whole,
        "whole, not cut at the limit"
    );
    assert_eq!(b.hits(), before + 2);
    assert_done_not_kept(post(two, "/stream/30", "big-2", "").await).await;
    assert_eq!(
        b.hits(),
        before + 2,
        "the repeat did not reach the upstream"
    );

    // The record lives for the key's TTL, like a kept response.
    tokio::time::sleep(SHORT_TTL + Duration::from_millis(1500)).await;
    let late = post(two, "/orders", "big-1", "{\"n\":1}").await;
    assert_eq!(late.status(), 200, "the key expired");
    assert_eq!(b.hits(), before + 3);
}

/// The answer to a repeat whose first response was too large to keep.
async fn assert_done_not_kept(res: reqwest::Response) {
    assert_eq!(res.status(), 409);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert!(
        res.headers().get("retry-after").is_none(),
        "final until the TTL ends: nothing to retry"
    );
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["type"], "/problems/idempotency-response-not-kept");
    assert_eq!(v["status"], 409);
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("already processed"), "{detail}");
    assert!(detail.contains("64 bytes"), "names the limit: {detail}");
}

/// Within the TTL a key replays; after it the key is new: the same request
/// reaches the upstream again, and its response is kept for a new TTL.
async fn ttl_scenario(one: &Harness, two: &Harness, b: &Backend) {
    let before = b.hits();
    let first = post(one, "/status/201", "ttl-1", "x").await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let again = post(two, "/status/201", "ttl-1", "x").await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(b.hits(), before + 1);

    tokio::time::sleep(SHORT_TTL + Duration::from_millis(1500)).await;
    let late = post(two, "/status/201", "ttl-1", "x").await;
    assert_eq!(late.status(), 201);
    assert!(
        late.headers().get("idempotent-replayed").is_none(),
        "the key expired"
    );
    assert_eq!(b.hits(), before + 2, "the expired key reached the upstream");
    let again = post(one, "/status/201", "ttl-1", "x").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true", "kept again");
    assert_eq!(post(one, "/status/201", "ttl-1", "y").await.status(), 422);
    assert_eq!(b.hits(), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_responses_over_the_limit_are_done_not_kept_in_memory() {
    let b = Backend::start("b").await;
    let h = Harness::start(&idempotent_limits_route("memory://")).await;
    h.set_instances("svc", &[b.addr]);
    too_large_scenario(&h, &h, &b).await;
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_responses_over_the_limit_are_done_not_kept_on_redis() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let b = Backend::start("b").await;
    let route = idempotent_limits_route(&redis.url());
    let one = Harness::start(&route).await;
    let two = Harness::start(&route).await;
    one.set_instances("svc", &[b.addr]);
    two.set_instances("svc", &[b.addr]);
    too_large_scenario(&one, &two, &b).await;
    one.gw.shutdown().await;
    two.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_new_after_the_ttl_in_memory() {
    let b = Backend::start("b").await;
    let h = Harness::start(&idempotent_limits_route("memory://")).await;
    h.set_instances("svc", &[b.addr]);
    ttl_scenario(&h, &h, &b).await;
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_new_after_the_ttl_on_redis() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let b = Backend::start("b").await;
    let route = idempotent_limits_route(&redis.url());
    let one = Harness::start(&route).await;
    let two = Harness::start(&route).await;
    one.set_instances("svc", &[b.addr]);
    two.set_instances("svc", &[b.addr]);
    ttl_scenario(&one, &two, &b).await;
    one.gw.shutdown().await;
    two.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_is_answered_at_the_gateway() {
    let b = Backend::start("b").await;
    let h = Harness::start(
        r#"
[[services]]
name = "svc"
instances = []

[[routes]]
prefix = "/api"
service = "svc"
methods = ["POST"]
cors = { origins = ["https://app.example"], methods = ["POST"], headers = ["content-type", "idempotency-key"], expose = ["x-request-id"], credentials = true, max_age = "10m" }
"#,
    )
    .await;
    h.set_instances("svc", &[b.addr]);
    let res = h
        .client
        .request(reqwest::Method::OPTIONS, h.url("/api/orders"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let hd = res.headers();
    assert_eq!(hd["access-control-allow-origin"], "https://app.example");
    assert_eq!(hd["access-control-allow-methods"], "POST");
    assert_eq!(
        hd["access-control-allow-headers"],
        "content-type, idempotency-key"
    );
    assert_eq!(hd["access-control-allow-credentials"], "true");
    assert_eq!(hd["access-control-max-age"], "600");
    assert_eq!(hd["vary"], "origin");
    assert_eq!(hd.get_all("vary").iter().count(), 1);
    assert_eq!(b.hits(), 0, "the preflight never reaches the upstream");

    let res = h
        .client
        .request(reqwest::Method::OPTIONS, h.url("/api/orders"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert!(res.headers().get("access-control-allow-origin").is_none());

    let res = h
        .client
        .post(h.url("/api/orders"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        res.headers()["access-control-expose-headers"],
        "x-request-id"
    );
    assert_eq!(res.headers()["vary"], "origin");
    assert_eq!(b.hits(), 1);
    h.gw.shutdown().await;
}

fn registry_config(admin: &str, token: Option<&str>) -> Config {
    let token = token.map_or(String::new(), |t| format!("token = \"{t}\"\n"));
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"{admin}\"\nworkers = 1\naccess_log = false\n\n[registry]\n{token}\n[[services]]\nname = \"svc\"\ninstances = []\n\n[[routes]]\nprefix = \"/\"\nservice = \"svc\"\n"
    );
    Config::parse(Path::new("admin.toml"), &text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_registry_writes_need_the_token_and_metadata_addresses_are_refused() {
    let running = switchboard_gateway::start(registry_config("127.0.0.1:0", Some("s3cret")))
        .await
        .unwrap();
    let admin = running.gateway.admin();
    let c = support::client();
    let reg = |ip: &str| json!({"address": ip, "port": 80});
    let put = |id: &str| c.put(format!("http://{admin}/v1/services/svc/instances/{id}"));

    let res = put("a").json(&reg("10.0.0.5")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let res = put("a")
        .bearer_auth("wrong")
        .json(&reg("10.0.0.5"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // A gateway admin write (any non-GET) without the token.
    let res = c
        .post(format!("http://{admin}/v1/routes"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // Reads stay open.
    let res = c
        .get(format!("http://{admin}/v1/routes"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let res = put("a")
        .bearer_auth("s3cret")
        .json(&reg("10.0.0.5"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    for ip in ["169.254.169.254", "fd00:ec2::254", "8.8.8.8"] {
        let res = put("meta")
            .bearer_auth("s3cret")
            .json(&reg(ip))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 403, "{ip}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["field"], "address");
        assert!(
            body["detail"].as_str().unwrap().contains(ip),
            "names the address: {body}"
        );
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_never_connects_to_a_denied_address_from_a_shared_store() {
    // As if 169.254.169.254 got into a shared store some other way.
    let h = Harness::start(
        "[[services]]\nname = \"svc\"\ninstances = []\n\n[[routes]]\nprefix = \"/\"\nservice = \"svc\"\n",
    )
    .await;
    h.set_instances("svc", &["169.254.169.254:80".parse().unwrap()]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let res = h
        .client
        .get(h.url("/latest/meta-data"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503, "no usable instance: nothing was dialled");
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_off_loopback_admin_listener_without_a_token() {
    let e = switchboard_gateway::start(registry_config("0.0.0.0:0", None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refusing"), "{e}");
    let e = GatewayBuilder::new(registry_config("0.0.0.0:0", None))
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("0.0.0.0"), "{e}");
}

#[test]
fn edge_config_errors_name_file_line_and_key() {
    let base = "[[services]]\nname = \"svc\"\ninstances = []\n\n[[routes]]\nprefix = \"/\"\nservice = \"svc\"\n";
    let check = |extra: &str, key: &str, line: usize, needle: &str| {
        let text = format!("{base}{extra}\n");
        let e = Config::parse(Path::new("edge.toml"), &text).unwrap_err().0;
        let e = e
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("no error for {key}: {e:?}"));
        assert_eq!(e.line, line, "{e}");
        assert!(e.message.contains(needle), "{e}");
    };
    check(
        "rate_limit = { rate = 0 }",
        "routes[0].rate_limit.rate",
        8,
        "at least 1",
    );
    check(
        "rate_limit = { rate = 1, key = \"cookie\" }",
        "routes[0].rate_limit.key",
        8,
        "`cookie`",
    );
    check(
        "rate_limit = { rate = 1, bogus = 2 }",
        "routes[0].rate_limit.bogus",
        8,
        "unknown field",
    );
    check(
        "cors = { origins = [\"*\"], credentials = true }",
        "routes[0].cors.credentials",
        8,
        "credentials",
    );
    check(
        "idempotency = { store = \"nats://x\" }",
        "routes[0].idempotency.store",
        8,
        "nats://x",
    );
    check(
        "deprecated = { since = \"soon\" }",
        "routes[0].deprecated.since",
        8,
        "`soon`",
    );
    check("version = { }", "routes[0].version", 8, "major");

    let text = format!("[gateway]\nupstream_allow = [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n{base}");
    let e = Config::parse(Path::new("edge.toml"), &text).unwrap_err().0;
    assert_eq!(e[0].key, "gateway.upstream_allow[1]");
    assert_eq!((e[0].line, e[0].column), (2, 1));
    assert!(e[0].message.contains("10.0.0.0/8"), "{}", e[0]);

    let text = base.replace("instances = []", "instances = [\"169.254.169.254:80\"]");
    let e = Config::parse(Path::new("edge.toml"), &text).unwrap_err().0;
    assert_eq!(e[0].key, "services[0].instances[0]");
    assert!(e[0].message.contains("169.254.169.254"), "{}", e[0]);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    #[test]
    fn any_cidr_list_parses_or_is_a_located_error(
        nets in proptest::collection::vec("[0-9a-f:./]{0,20}", 0..4)
    ) {
        let list: Vec<String> = nets.iter().map(|n| format!("{n:?}")).collect();
        let text = format!("[gateway]\nupstream_allow = [{}]\n", list.join(", "));
        if let Err(e) = Config::parse(Path::new("p.toml"), &text) {
            for x in e.0 {
                proptest::prop_assert!(x.key.starts_with("gateway.upstream_allow"), "{}", x);
                proptest::prop_assert_eq!(x.line, 2);
            }
        }
    }

    #[test]
    fn any_route_policy_value_parses_or_is_a_located_error(
        key in "(ip|none|header:[a-zA-Z-]{0,8}|[a-z]{0,5})",
        origin in "[a-z:/.*]{0,20}",
        version in "[v0-9.a-z]{0,6}",
    ) {
        let text = format!(
            "[[services]]\nname = \"s\"\ninstances = []\n[[routes]]\nprefix = \"/\"\nservice = \"s\"\n\
             rate_limit = {{ rate = 1, key = {key:?} }}\ncors = {{ origins = [{origin:?}] }}\n\
             deprecated = {{ since = {version:?} }}\n"
        );
        if let Err(e) = Config::parse(Path::new("p.toml"), &text) {
            for x in e.0 {
                proptest::prop_assert!(x.key.starts_with("routes[0]."), "{}", x);
                proptest::prop_assert!((7..=9).contains(&x.line), "{}", x);
            }
        }
    }
}
