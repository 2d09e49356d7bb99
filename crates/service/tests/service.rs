//! The service builder and the client on real sockets with an in-process registry.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use http::Request;
use switchboard_registry::{Registry, RegistryOptions};
use switchboard_service::{
    Client, ClientConfig, Correlation, RunningService, Service, TraceParent,
};

async fn instance(registry: &Registry, id: &str, healthy: bool) -> RunningService {
    let me = id.to_owned();
    let router = Router::new()
        .route(
            "/flaky",
            get(move || async move {
                if healthy {
                    (StatusCode::OK, me)
                } else {
                    (StatusCode::INTERNAL_SERVER_ERROR, me)
                }
            })
            .post(move || async move {
                if healthy {
                    StatusCode::OK
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }),
        )
        .route(
            "/whoami",
            get(|headers: HeaderMap| async move {
                let rid = headers["x-request-id"].to_str().unwrap().to_owned();
                let tp = headers["traceparent"].to_str().unwrap().to_owned();
                format!("{rid} {tp}")
            }),
        );
    Service::builder("echo")
        .version("1.2.3")
        .instance_id(id)
        .registry(registry.clone())
        .router(router)
        .start()
        .await
        .unwrap()
}

fn get_req(path: &str) -> Request<Bytes> {
    Request::get(path).body(Bytes::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_serves_health_and_deregisters_on_shutdown() {
    let registry = Registry::memory(RegistryOptions::default());
    let a = instance(&registry, "echo-a", true).await;
    let b = instance(&registry, "echo-b", true).await;
    let view = registry.view("echo").unwrap();
    assert_eq!(view.passing.len(), 2);
    assert_eq!(
        view.instances[0].version.as_ref().unwrap().to_string(),
        "1.2.3"
    );
    let health: serde_json::Value = reqwest::get(format!("http://{}/health", a.addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "passing");
    assert_eq!(health["instance"], "echo-a");
    a.shutdown().await;
    assert_eq!(registry.view("echo").unwrap().instances.len(), 1);
    // A kill leaves the registration to expire through its TTL.
    let addr = b.addr();
    b.kill();
    assert_eq!(registry.view("echo").unwrap().instances.len(), 1);
    assert!(reqwest::get(format!("http://{addr}/health")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_calls_retry_on_another_instance_and_the_breaker_opens() {
    let registry =
        Registry::memory(RegistryOptions::default().passive(1000, Duration::from_secs(1)));
    let _bad = instance(&registry, "echo-bad", false).await;
    let _good = instance(&registry, "echo-good", true).await;
    let client = Client::new(Some(Arc::new(registry.clone())), ClientConfig::default());
    for _ in 0..40 {
        let res = client.send("echo", get_req("/flaky")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.body(), "echo-good");
    }
    let breakers = client.breakers();
    assert!(
        breakers.contains(&("echo/echo-bad".to_owned(), "open")),
        "{breakers:?}"
    );
    assert!(breakers.contains(&("echo/echo-good".to_owned(), "closed")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_calls_retry_only_with_an_idempotency_key() {
    let registry =
        Registry::memory(RegistryOptions::default().passive(1000, Duration::from_secs(1)));
    let _bad = instance(&registry, "echo-bad", false).await;
    let _good = instance(&registry, "echo-good", true).await;
    // A breaker that never opens, so every call can pick the bad instance.
    let mut config = ClientConfig::default();
    config.breaker.min_calls = 50;
    config.breaker.window = switchboard_resilience::breaker::Window::Count(50);
    config.breaker.failure_rate = 1.0;
    let client = Client::new(Some(Arc::new(registry.clone())), config);
    let mut failed = 0;
    for _ in 0..20 {
        let req = Request::post("/flaky").body(Bytes::new()).unwrap();
        let res = client.send("echo", req).await.unwrap();
        failed += usize::from(res.status() == StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert!(failed > 0, "a POST without a key is never retried");
    for _ in 0..20 {
        let req = Request::post("/flaky")
            .header("idempotency-key", "k")
            .body(Bytes::new())
            .unwrap();
        assert_eq!(
            client.send("echo", req).await.unwrap().status(),
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_carry_the_current_correlation_and_unknown_services_fail_fast() {
    let registry = Registry::memory(RegistryOptions::default());
    let _a = instance(&registry, "echo-a", true).await;
    let client = Client::new(Some(Arc::new(registry.clone())), ClientConfig::default());
    let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let c = Correlation::new("req-7", tp);
    let res = c
        .scope(async { client.send("echo", get_req("/whoami")).await.unwrap() })
        .await;
    let body = String::from_utf8(res.body().to_vec()).unwrap();
    let (rid, sent) = body.split_once(' ').unwrap();
    assert_eq!(rid, "req-7");
    let sent = TraceParent::parse(sent).unwrap();
    assert_eq!(sent.trace_id(), tp.trace_id());
    assert_ne!(sent.span_id(), tp.span_id());
    let err = client.send("nobody", get_req("/")).await.unwrap_err();
    assert!(
        matches!(err, switchboard_service::CallError::NoHealthyInstance(ref s) if s == "nobody"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_a_registry_server_over_http_and_calls_through_it() {
    let registry = Registry::memory(RegistryOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(switchboard_registry::http::serve(
        listener,
        registry.clone(),
        switchboard_registry::http::HttpOptions::default(),
        std::future::pending(),
    ));
    let echo = Service::builder("echo")
        .instance_id("echo-remote")
        .registry_url(&url)
        .router(Router::new().route("/flaky", get(|| async { "remote" })))
        .start()
        .await
        .unwrap();
    assert_eq!(registry.view("echo").unwrap().passing.len(), 1);
    let caller = Service::builder("caller")
        .registry_url(&url)
        .start()
        .await
        .unwrap();
    let client = caller.context().client().clone();
    // The remote view arrives through a blocking query; give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let body = loop {
        match client.send("echo", get_req("/flaky")).await {
            Ok(res) => break res.into_body(),
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(body, "remote");
    echo.shutdown().await;
    assert!(registry.view("echo").unwrap().instances.is_empty());
    caller.shutdown().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_retry_budget_stops_retries() {
    let registry =
        Registry::memory(RegistryOptions::default().passive(1000, Duration::from_secs(1)));
    let _bad = instance(&registry, "echo-bad", false).await;
    let _good = instance(&registry, "echo-good", true).await;
    let mut config = ClientConfig {
        retry_budget_percent: 0,
        retry_min_per_sec: 0,
        ..ClientConfig::default()
    };
    config.breaker.min_calls = 50;
    config.breaker.window = switchboard_resilience::breaker::Window::Count(50);
    config.breaker.failure_rate = 1.0;
    let client = Client::new(Some(Arc::new(registry.clone())), config);
    let mut failed = 0;
    for _ in 0..20 {
        let res = client.send("echo", get_req("/flaky")).await.unwrap();
        failed += usize::from(res.status() == StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert!(failed > 0, "without budget a failed GET is not retried");
}
