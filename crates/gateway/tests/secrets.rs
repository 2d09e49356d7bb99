//! Security (issue 8): registry and admin writes on the admin listener need
//! the bearer token, instances outside the upstream allow-list are refused,
//! and no secret — the token, a store password — ever shows up in
//! logs (every `tracing` event at TRACE, captured process-wide), in error
//! messages or in `/metrics`.
//!
//! One test in its own binary: it installs the global subscriber.

mod support;

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::json;
use support::Backend;
use switchboard_gateway::Config;

const TOKEN: &str = "tok-7f3a9c-never-log-me";
const STORE_PASSWORD: &str = "pw-51d2e8-never-log-me";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [TOKEN, STORE_PASSWORD] {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_and_no_secret_leaks() {
    let logs = Capture::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .init();

    // A store URL with a password that cannot connect: the error names the
    // store, not the password.
    let dead = support::dead_addr();
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 1\n\
         [registry]\nstore = \"redis://:{STORE_PASSWORD}@{dead}\"\ntoken = \"{TOKEN}\"\n"
    );
    let err = switchboard_gateway::start(Config::parse(Path::new("t.toml"), &text).unwrap())
        .await
        .expect_err("a dead store must fail the start");
    let shown = err.to_string();
    assert!(shown.contains(&dead.to_string()), "{shown}");
    assert_no_secret("the store error", &shown);
    assert_no_secret("the store error (Debug)", &format!("{err:?}"));
    for url in [
        format!("redis://user:{STORE_PASSWORD}@{dead}/0"),
        format!("ftp://user:{STORE_PASSWORD}@{dead}"),
    ] {
        let err = switchboard_registry::Registry::open(&url, Default::default())
            .await
            .expect_err(&url);
        assert_no_secret("a registry open error", &err.to_string());
    }

    // A working gateway with the token set.
    let b = Backend::start("b").await;
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 1\n\
         [registry]\ntoken = \"{TOKEN}\"\n{}[[routes]]\nprefix = \"/\"\nservice = \"s\"\n",
        support::service("s", &[b.addr])
    );
    let running = switchboard_gateway::start(Config::parse(Path::new("t.toml"), &text).unwrap())
        .await
        .unwrap();
    let admin = running.gateway.admin();
    let client = support::client();
    let url = |p: &str| format!("http://{admin}{p}");
    let inst = "/v1/services/s/instances/dyn-1";
    let body = json!({"address": "127.0.0.1", "port": b.addr.port()});
    let bad_guess = format!("{TOKEN}x");
    for (label, auth) in [
        ("no token", None),
        ("wrong token", Some("Bearer nope")),
        ("longer token", Some(bad_guess.as_str())),
        ("Basic scheme", Some("Basic dG9rOnBhc3M=")),
    ] {
        let with = |r: reqwest::RequestBuilder| match auth {
            Some(a) => r.header("authorization", a),
            None => r,
        };
        let res = with(client.put(url(inst)).json(&body))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "PUT with {label}");
        assert!(res.headers().contains_key("www-authenticate"), "{label}");
        assert_no_secret("a 401 body", &res.text().await.unwrap());
        let res = with(client.put(url(&format!("{inst}/heartbeat"))))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "heartbeat with {label}");
        let res = with(client.delete(url(&format!("/v1/services/s/instances/{}", b.addr))))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "DELETE with {label}");
    }
    // Admin writes (a reload) need the token too.
    for auth in [None, Some("Bearer nope")] {
        let mut r = client.post(url("/v1/reload"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let res = r.send().await.unwrap();
        assert_eq!(res.status(), 401, "POST /v1/reload with {auth:?}");
    }
    // Reads stay open; nothing was written.
    let view: serde_json::Value = client
        .get(url("/v1/services/s"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["instances"].as_array().unwrap().len(), 1, "{view}");
    // With the token: allowed.
    let bearer = format!("Bearer {TOKEN}");
    let res = client
        .put(url(inst))
        .header("authorization", &bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = client
        .delete(url(inst))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    // Even with the token, an instance outside the upstream allow-list (the
    // cloud metadata address, a public address) is refused.
    for address in ["169.254.169.254", "8.8.8.8"] {
        let res = client
            .put(url("/v1/services/s/instances/evil"))
            .header("authorization", &bearer)
            .json(&json!({"address": address, "port": 80}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 403, "{address} registered");
    }
    let view: serde_json::Value = client
        .get(url("/v1/services/s"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["instances"].as_array().unwrap().len(), 1, "{view}");

    // Proxied requests carrying credentials: the upstream gets the end-to-end
    // Authorization, never the hop-by-hop Proxy-Authorization.
    for _ in 0..3 {
        let res = client
            .get(format!(
                "http://{}/echo?token={TOKEN}",
                running.gateway.listen()
            ))
            .header("authorization", &bearer)
            .header("proxy-authorization", &bearer)
            .header("x-request-id", "secret-test-1")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let _ = res.text().await.unwrap();
    }
    let res = client
        .get(format!("http://{}/status/503", running.gateway.listen()))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);

    let metrics = client
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("# TYPE"), "{metrics}");
    assert_no_secret("/metrics", &metrics);
    for p in [
        "/v1/routes",
        "/v1/breakers",
        "/openapi.json",
        "/v1/services",
    ] {
        let text = client
            .get(url(p))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_no_secret(p, &text);
    }
    running.shutdown().await;

    let _ = std::io::stdout().flush();
    let captured = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    // The capture saw the run (the failed store connect is logged), and
    // nothing in it is secret.
    assert!(!captured.is_empty(), "no log line captured");
    assert_no_secret("the logs", &captured);
}
