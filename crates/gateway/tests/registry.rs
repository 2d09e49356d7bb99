//! The gateway with its embedded registry: the seed scenario (two instances of
//! `user-service`, one stopped, requests still answered), health checks, and
//! dynamic registration through the registry API on the admin listener.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Backend;
use switchboard_gateway::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_with_health_checks_and_dynamic_instances() {
    let one = Backend::start("user-1").await;
    let mut two = Backend::start("user-2").await;
    let text = format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 2
access_log = false

[[services]]
name = "user-service"
instances = ["{}", "{}"]
health = {{ path = "/health", interval = "100ms", timeout = "100ms", healthy_threshold = 1, unhealthy_threshold = 2 }}

[[services]]
name = "orders"
instances = []

[[routes]]
prefix = "/users"
service = "user-service"
strip_prefix = true

[[routes]]
prefix = "/orders"
service = "orders"
"#,
        one.addr, two.addr
    );
    let config = Config::parse(Path::new("seed.toml"), &text).unwrap();
    let running = switchboard_gateway::start(config).await.unwrap();
    let (listen, admin) = (running.gateway.listen(), running.gateway.admin());
    let client = support::client();
    let get = |path: &str| client.get(format!("http://{listen}{path}")).send();

    // Instances with an HTTP check start critical until their first check passes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "instances never became passing");
        let res = get("/users/42").await.unwrap();
        if res.status() == 200 {
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["path"], "/42");
            seen.insert(v["instance"].as_str().unwrap().to_owned());
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // One instance stops: every request is still answered.
    two.kill().await;
    for _ in 0..50 {
        let res = get("/users/7").await.unwrap();
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["instance"], "user-1");
    }

    // The registry API lives on the admin listener; a new instance registered
    // there receives traffic without a restart.
    let orders = Backend::start("orders-1").await;
    let res = get("/orders/1").await.unwrap();
    assert_eq!(res.status(), 503);
    let put = client
        .put(format!("http://{admin}/v1/services/orders/instances/o1"))
        .json(&json!({"address": "127.0.0.1", "port": orders.addr.port()}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let res = get("/orders/1").await.unwrap();
        if res.status() == 200 {
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["instance"], "orders-1");
            break;
        }
        assert!(Instant::now() < deadline, "dynamic instance never routed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let services: Value = client
        .get(format!("http://{admin}/v1/services"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        services
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["service"] == "orders")
    );
    let doc: Value = client
        .get(format!("http://{admin}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/v1/services"].is_object() && doc["paths"]["/v1/routes"].is_object());
    let metrics = support::metrics_page(admin).await;
    assert!(
        metrics.contains("switchboard_registry_instances{service=\"user-service\""),
        "{metrics}"
    );
    running.shutdown().await;
}
