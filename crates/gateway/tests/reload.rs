//! Hot reload over real sockets: routes change twice under load with zero
//! failed requests; an invalid file is rejected (same errors as `switchboard
//! check`) while the old config keeps serving; `POST /v1/reload` needs the
//! admin token. (`SIGHUP` is tested in its own process: `reload_sighup.rs`.)

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::Backend;
use switchboard_gateway::Config;

fn config_text(alpha: &Backend, beta: &Backend, routes: &str) -> String {
    format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 2
access_log = false

[registry]
token = "s3cret"

[[services]]
name = "alpha"
instances = ["{}"]

[[services]]
name = "beta"
instances = ["{}"]
{routes}"#,
        alpha.addr, beta.addr
    )
}

const TO_ALPHA: &str = "\n[[routes]]\nprefix = \"/api\"\nservice = \"alpha\"\n";
const TO_BETA: &str = "\n[[routes]]\nprefix = \"/api\"\nservice = \"beta\"\nstrip_prefix = true\n";
const TWO_ROUTES: &str = "\n[[routes]]\nprefix = \"/api\"\nservice = \"alpha\"\n\n[[routes]]\nprefix = \"/new\"\nservice = \"beta\"\n";

/// Replaces the file atomically, as editors and config managers do.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn metric(admin: std::net::SocketAddr, line: &str) -> u64 {
    let text = support::metrics_page(admin).await;
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls `check` until it holds or 10 s pass.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_change_twice_under_load_without_a_failed_request() {
    let alpha = Backend::start("alpha").await;
    let beta = Backend::start("beta").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    write(&path, &config_text(&alpha, &beta, TO_ALPHA));
    let running = switchboard_gateway::start(Config::load(&path).unwrap())
        .await
        .unwrap();
    running.gateway.watch_config(path.clone());
    let (listen, admin) = (running.gateway.listen(), running.gateway.admin());

    // Eight clients on keep-alive connections, hammering until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let seen_beta = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, ok, seen_beta) = (stop.clone(), ok.clone(), seen_beta.clone());
        clients.push(tokio::spawn(async move {
            let client = support::client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.get(format!("http://{listen}/api/x")).send().await {
                    Ok(r) if r.status() == 200 => {
                        let v: Value = r.json().await.unwrap();
                        match (v["instance"].as_str(), v["path"].as_str()) {
                            (Some("alpha"), Some("/api/x")) => {}
                            (Some("beta"), Some("/x")) => seen_beta.store(true, Ordering::Relaxed),
                            other => failures.push(format!("unexpected answer {other:?}")),
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(format!("error {e}")),
                }
            }
            failures
        }));
    }
    let client = support::client();
    eventually("first requests", || {
        let n = ok.load(Ordering::Relaxed);
        async move { n > 50 }
    })
    .await;

    // Change 1: /api moves to beta, with its prefix stripped.
    write(&path, &config_text(&alpha, &beta, TO_BETA));
    eventually("the first reload to take effect", || {
        let s = seen_beta.load(Ordering::Relaxed);
        async move { s }
    })
    .await;
    let after_first = ok.load(Ordering::Relaxed);

    // Change 2: /api back to alpha, plus a new route to beta.
    write(&path, &config_text(&alpha, &beta, TWO_ROUTES));
    eventually("the second reload to take effect", || {
        let c = client.get(format!("http://{listen}/new/y")).send();
        async move { matches!(c.await, Ok(r) if r.status() == 200) }
    })
    .await;
    eventually("more requests after the second reload", || {
        let n = ok.load(Ordering::Relaxed);
        async move { n > after_first + 50 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let last: Value = client
        .get(format!("http://{listen}/api/z"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(last["instance"], "alpha");
    assert_eq!(
        metric(admin, "switchboard_config_reloads_total{result=\"ok\"}").await,
        2
    );
    let routes: Value = client
        .get(format!("http://{admin}/v1/routes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(routes.as_array().unwrap().len(), 2, "{routes}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_the_old_config_and_admin_reload_needs_the_token() {
    let alpha = Backend::start("alpha").await;
    let beta = Backend::start("beta").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    write(&path, &config_text(&alpha, &beta, TO_ALPHA));
    let running = switchboard_gateway::start(Config::load(&path).unwrap())
        .await
        .unwrap();
    running.gateway.watch_config(path.clone());
    let (listen, admin) = (running.gateway.listen(), running.gateway.admin());
    let client = support::client();

    // An unknown key: the watcher rejects it and counts the error.
    let bad = config_text(&alpha, &beta, TO_BETA)
        .replace("strip_prefix = true", "strip_prefix = true\nbogus = 1");
    write(&path, &bad);
    eventually("the rejected reload to be counted", || async move {
        metric(admin, "switchboard_config_reloads_total{result=\"error\"}").await == 1
    })
    .await;
    let v: Value = client
        .get(format!("http://{listen}/api/x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["instance"], "alpha", "the old config keeps serving");

    // The admin endpoint: 401 without the token, 422 with `switchboard check`'s error.
    let url = format!("http://{admin}/v1/reload");
    let res = client.post(&url).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = client.post(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .post(&url)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let problem: Value = res.json().await.unwrap();
    let check = Config::load(&path).unwrap_err().to_string();
    assert_eq!(problem["detail"], check.as_str());
    let line = bad.lines().position(|l| l == "bogus = 1").unwrap() + 1;
    assert!(
        check.starts_with(&format!(
            "{}:{line}:1: key `routes[0].bogus`",
            path.display()
        )),
        "{check}"
    );
    assert_eq!(
        metric(admin, "switchboard_config_reloads_total{result=\"error\"}").await,
        2
    );

    // Fixed file, reloaded through the endpoint (the watcher may race it).
    write(&path, &config_text(&alpha, &beta, TO_BETA));
    let res = client
        .post(&url)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["routes"], 1);
    let v: Value = client
        .get(format!("http://{listen}/api/x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["instance"], "beta");
    assert_eq!(v["path"], "/x");
    running.shutdown().await;
}
