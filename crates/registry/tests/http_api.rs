//! The HTTP API end to end over a socket, including every error path, the
//! blocking query, and the client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_registry::http::{self, HttpOptions, ServeError};
use switchboard_registry::{
    CheckSpec, Discovery, Registration, Registry, RegistryClient, RegistryOptions, RemoteDiscovery,
};

const TOKEN: &str = "s3cret-token";

struct Server {
    base: String,
    registry: Registry,
    http: reqwest::Client,
}

async fn start(token: Option<&str>, body_limit: usize) -> Server {
    let registry = Registry::open("memory://", RegistryOptions::default())
        .await
        .unwrap();
    let mut opts = HttpOptions::default().body_limit(body_limit);
    if let Some(t) = token {
        opts = opts.token(t);
    }
    let listener = http::bind("127.0.0.1:0".parse().unwrap(), &opts)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(http::serve(
        listener,
        registry.clone(),
        opts,
        std::future::pending(),
    ));
    Server {
        base: format!("http://{addr}"),
        registry,
        http: reqwest::Client::new(),
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn put(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .put(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }
}

/// Asserts an RFC 9457 problem with `status` naming `field` (when given).
async fn problem(resp: reqwest::Response, status: u16, field: Option<&str>) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let body: Value = resp.json().await.unwrap();
    for key in ["type", "title", "status", "detail"] {
        assert!(body.get(key).is_some(), "problem lacks {key}: {body}");
    }
    assert_eq!(body["status"], status);
    if let Some(field) = field {
        assert_eq!(body["field"], field, "{body}");
        assert!(body["detail"].as_str().unwrap().contains(field), "{body}");
    }
    body
}

fn body(v: &Value) -> String {
    v.to_string()
}

#[tokio::test]
async fn register_read_heartbeat_deregister() {
    let s = start(Some(TOKEN), 64 * 1024).await;
    let reg = json!({"address": "127.0.0.1", "port": 4001, "version": "1.4.0", "tags": ["blue"],
        "metadata": {"zone": "a"}, "check": {"ttl": "10s"}});
    let resp = s
        .put(
            "/v1/services/user-service/instances/u1",
            body(&reg),
            Some(TOKEN),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let inst: Value = resp.json().await.unwrap();
    assert_eq!(inst["status"], "passing");
    assert_eq!(inst["version"], "1.4.0");

    let resp = s
        .put(
            "/v1/services/user-service/instances/u1/heartbeat",
            "",
            Some(TOKEN),
        )
        .await;
    assert_eq!(resp.status(), 200);

    let list: Value = s.get("/v1/services").await.json().await.unwrap();
    assert_eq!(
        list,
        json!([{"service": "user-service", "instances": 1, "passing": 1}])
    );

    let resp = s.get("/v1/services/user-service?passing=true").await;
    assert_eq!(resp.status(), 200);
    let index: u64 = resp.headers()["x-registry-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let view: Value = resp.json().await.unwrap();
    assert_eq!(view["index"], index);
    let i = &view["instances"][0];
    for key in [
        "id", "address", "port", "version", "status", "tags", "metadata",
    ] {
        assert!(i.get(key).is_some(), "instance lacks {key}");
    }
    assert_eq!(i["id"], "u1");
    assert_eq!(i["port"], 4001);
    assert_eq!(i["tags"], json!(["blue"]));

    let unknown: Value = s.get("/v1/services/nobody").await.json().await.unwrap();
    assert_eq!(unknown["instances"], json!([]));

    let resp = s
        .http
        .delete(s.url("/v1/services/user-service/instances/u1"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(s.registry.services().is_empty());
}

#[tokio::test]
async fn every_error_is_a_problem() {
    let s = start(Some(TOKEN), 1024).await;
    let ok = json!({"address": "127.0.0.1", "port": 4001});
    let path = "/v1/services/users/instances/u1";

    // auth
    problem(s.put(path, body(&ok), None).await, 401, None).await;
    problem(s.put(path, body(&ok), Some("wrong")).await, 401, None).await;
    problem(
        s.put(&format!("{path}/heartbeat"), "", None).await,
        401,
        None,
    )
    .await;
    let del = s.http.delete(s.url(path)).send().await.unwrap();
    problem(del, 401, None).await;

    // path
    problem(
        s.put("/v1/services/Users/instances/u1", body(&ok), Some(TOKEN))
            .await,
        400,
        Some("service"),
    )
    .await;
    problem(
        s.put(
            &format!("/v1/services/{}/instances/u1", "a".repeat(64)),
            body(&ok),
            Some(TOKEN),
        )
        .await,
        400,
        Some("service"),
    )
    .await;
    problem(
        s.put("/v1/services/users/instances/u%201", body(&ok), Some(TOKEN))
            .await,
        400,
        Some("id"),
    )
    .await;
    problem(s.get("/v1/services/UPPER").await, 400, Some("service")).await;

    // body
    problem(
        s.put(path, "{not json", Some(TOKEN)).await,
        400,
        Some("body"),
    )
    .await;
    problem(s.put(path, "", Some(TOKEN)).await, 400, Some("body")).await;
    problem(
        s.put(path, vec![0xff, 0xfe], Some(TOKEN)).await,
        400,
        Some("body"),
    )
    .await;
    let cases = [
        (json!([1]), "body"),
        (json!({"port": 1}), "address"),
        (json!({"address": "127.0.0.1"}), "port"),
        (json!({"address": "127.0.0.1", "port": 0}), "port"),
        (json!({"address": "127.0.0.1", "port": 65536}), "port"),
        (json!({"address": "127.0.0.1", "port": -1}), "port"),
        (json!({"address": "127.0.0.1", "port": 1.5}), "port"),
        (json!({"address": "not a host", "port": 80}), "address"),
        (json!({"address": 5, "port": 80}), "address"),
        (
            json!({"address": "127.0.0.1", "port": 80, "version": "one"}),
            "version",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "tags": "x"}),
            "tags",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "tags": [""]}),
            "tags[0]",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "metadata": []}),
            "metadata",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "metadata": {"k": 1}}),
            "metadata.k",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "surprise": true}),
            "surprise",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "check": {"http": "/h", "ttl": "1s"}}),
            "check",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "check": {"http": "health"}}),
            "check.http",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "check": {"ttl": "forever"}}),
            "check.ttl",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "check": {"tcp": true, "interval": "1ms"}}),
            "check.interval",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "check": {"tcp": true, "unhealthy_threshold": 1000}}),
            "check.unhealthy_threshold",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "check": {"tcp": true, "deregister_critical_after": 5}}),
            "check.deregister_critical_after",
        ),
        (
            json!({"address": "127.0.0.1", "port": 80, "check": {"tcp": true, "nope": 1}}),
            "check.nope",
        ),
    ];
    for (b, field) in cases {
        problem(s.put(path, body(&b), Some(TOKEN)).await, 400, Some(field)).await;
    }
    // Well-formed addresses that the network policy refuses: 403.
    for address in ["169.254.169.254", "0.0.0.0", "::", "fe80::1"] {
        let b = json!({"address": address, "port": 80});
        problem(
            s.put(path, body(&b), Some(TOKEN)).await,
            403,
            Some("address"),
        )
        .await;
    }

    // size
    let big = json!({"address": "127.0.0.1", "port": 80, "metadata": {"k": "x".repeat(2000)}});
    problem(s.put(path, body(&big), Some(TOKEN)).await, 413, None).await;

    // query
    problem(
        s.get("/v1/services/users?index=x").await,
        400,
        Some("index"),
    )
    .await;
    problem(
        s.get("/v1/services/users?wait=forever&index=1").await,
        400,
        Some("wait"),
    )
    .await;
    problem(
        s.get("/v1/services/users?passing=maybe").await,
        400,
        Some("passing"),
    )
    .await;
    problem(s.get("/v1/services/users?dc=eu").await, 400, Some("dc")).await;

    // missing instance, routes, methods
    problem(
        s.put(&format!("{path}/heartbeat"), "", Some(TOKEN)).await,
        404,
        None,
    )
    .await;
    problem(s.get("/v2/nothing").await, 404, None).await;
    let post = s.http.post(s.url("/v1/services")).send().await.unwrap();
    problem(post, 405, None).await;

    assert!(
        s.registry.services().is_empty(),
        "no bad request registered anything"
    );
}

#[tokio::test]
async fn blocking_query_returns_within_100ms_of_a_change() {
    let s = start(None, 64 * 1024).await;
    let first: Value = s.get("/v1/services/orders").await.json().await.unwrap();
    let index = first["index"].as_u64().unwrap();

    let started = Instant::now();
    let url = s.url(&format!("/v1/services/orders?index={index}&wait=10s"));
    let http = s.http.clone();
    let query = tokio::spawn(async move {
        let v: Value = http.get(url).send().await.unwrap().json().await.unwrap();
        (v, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !query.is_finished(),
        "blocking query returned before any change"
    );
    let changed_at = Instant::now();
    s.registry
        .register("orders", "o1", Registration::new("127.0.0.1", 5000))
        .await
        .unwrap();
    let (view, returned_at) = query.await.unwrap();
    let latency = returned_at - changed_at;
    assert!(latency < Duration::from_millis(100), "took {latency:?}");
    assert!(view["index"].as_u64().unwrap() > index);
    assert_eq!(view["instances"][0]["id"], "o1");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // without a change, it returns after `wait` with the same index
    let idx = view["index"].as_u64().unwrap();
    let t = Instant::now();
    let same: Value = s
        .get(&format!("/v1/services/orders?index={idx}&wait=200ms"))
        .await
        .json()
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert_eq!(same["index"], idx);
}

#[tokio::test]
async fn admin_endpoints_and_openapi() {
    let s = start(None, 64 * 1024).await;
    s.registry
        .register("users", "u1", Registration::new("127.0.0.1", 1))
        .await
        .unwrap();
    assert_eq!(s.get("/health").await.status(), 200);
    assert_eq!(s.get("/ready").await.status(), 200);
    let metrics = s.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("switchboard_registry_instances{service=\"users\",status=\"passing\"} 1")
    );
    let doc: Value = s.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/v1/services",
        "/v1/services/{service}",
        "/v1/services/{service}/instances/{id}",
        "/v1/services/{service}/instances/{id}/heartbeat",
    ] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    assert_eq!(doc, http::openapi());
}

#[tokio::test]
async fn refuses_open_writes_off_loopback() {
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let err = http::bind(any, &HttpOptions::default()).await.unwrap_err();
    assert!(matches!(err, ServeError::InsecureListen(_)), "{err}");
    assert!(err.to_string().contains("token"));
    let empty = HttpOptions::default().token("");
    assert!(http::bind(any, &empty).await.is_err());
    assert!(
        http::bind(any, &HttpOptions::default().token("t"))
            .await
            .is_ok()
    );
    assert!(
        http::bind("127.0.0.1:0".parse().unwrap(), &HttpOptions::default())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn client_membership_and_remote_discovery() {
    let s = start(Some(TOKEN), 64 * 1024).await;
    let client = RegistryClient::new(&s.base).unwrap().with_token(TOKEN);
    assert!(RegistryClient::new("ftp://x").is_err());

    let discovery = RemoteDiscovery::new(RegistryClient::new(&s.base).unwrap());
    let mut watch = discovery.watch("payments");

    let reg = Registration::new("127.0.0.1", 7000)
        .version(semver::Version::new(2, 1, 0))
        .check(CheckSpec::ttl(Duration::from_millis(300)));
    let member = client.join("payments", "p1", reg).await.unwrap();
    let view = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let v = watch.changed().await.unwrap();
            if !v.passing.is_empty() {
                return v;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(view.passing[0].version, Some(semver::Version::new(2, 1, 0)));
    assert_eq!(
        view.passing[0].socket_addr(),
        Some("127.0.0.1:7000".parse().unwrap())
    );

    // heartbeats keep the 300 ms TTL alive
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(s.registry.view("payments").unwrap().passing.len(), 1);
    assert_eq!(client.services().await.unwrap()[0].passing, 1);

    // the registry forgets it: the next heartbeat (404) re-registers
    s.registry.deregister("payments", "p1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(s.registry.view("payments").unwrap().instances.len(), 1);

    member.leave().await.unwrap();
    assert!(s.registry.view("payments").unwrap().instances.is_empty());
    let v = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let v = watch.changed().await.unwrap();
            if v.instances.is_empty() {
                return v;
            }
        }
    })
    .await
    .unwrap();
    assert!(v.passing.is_empty());

    let err = RegistryClient::new(&s.base)
        .unwrap()
        .register("payments", "p2", &Registration::new("127.0.0.1", 1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}
