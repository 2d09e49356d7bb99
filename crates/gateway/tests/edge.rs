//! Bad input at the edge, over raw sockets: 431, 413, header-read timeout,
//! ambiguous framing; plus the admin listener and the access log.

mod support;

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Backend, Harness, service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes, returns everything read until the server closes or 2 s pass.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn harness(b: &Backend) -> Harness {
    let cfg = format!(
        "{}[[routes]]\nprefix = \"/\"\nservice = \"s\"\nmax_body_bytes = 1000\nretry_buffer_bytes = 100\n",
        service("s", &[b.addr])
    );
    Harness::start_with(
        &cfg,
        "access_log = false\nheader_read_timeout = \"300ms\"\nmax_header_bytes = 4096",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_block_gets_431() {
    let b = Backend::start("b").await;
    let h = harness(&b).await;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8000)
    );
    let resp = raw(h.gw.listen(), req.as_bytes()).await;
    assert_eq!(status_of(&resp), 431, "{resp}");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let resp = raw(h.gw.listen(), many.as_bytes()).await;
    assert_eq!(status_of(&resp), 431, "{resp}");
    assert_eq!(b.hits(), 0);
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let b = Backend::start("b").await;
    let h = harness(&b).await;
    // Declared too large: refused before reading.
    let resp = raw(
        h.gw.listen(),
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 413, "{resp}");
    assert!(resp.contains("application/problem+json"));
    // Chunked, growing past the limit while buffering.
    let mut req =
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..30 {
        req.extend_from_slice(b"64\r\n");
        req.extend_from_slice(&[b'a'; 100]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(h.gw.listen(), &req).await;
    assert_eq!(status_of(&resp), 413, "{resp}");
    // Within the limit but over the replay buffer: streamed, delivered whole.
    let client = h.client.clone();
    let res = client
        .post(h.url("/echo"))
        .body(vec![b'z'; 900])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["body_len"], 900);
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_headers_are_cut_off() {
    let b = Backend::start("b").await;
    let h = harness(&b).await;
    let mut s = TcpStream::connect(h.gw.listen()).await.unwrap();
    let t = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let mut closed = false;
    // Keep trickling one header every 100 ms; the server must hang up.
    for i in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(format!("X-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "connection still open after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(b.hits(), 0);
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_gets_400_and_is_never_forwarded() {
    let b = Backend::start("b").await;
    let h = harness(&b).await;
    let resp = raw(
        h.gw.listen(),
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    let resp = raw(
        h.gw.listen(),
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    let resp = raw(
        h.gw.listen(),
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert_eq!(b.hits(), 0);
    // The connection after a good request still works (the scan resets per response).
    let resp = raw(
        h.gw.listen(),
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    )
    .await;
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
    h.gw.shutdown().await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_access_log() {
    let b = Backend::start("b").await;
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 2\n{}[[routes]]\nprefix = \"/users\"\nservice = \"user-service\"\n",
        service("user-service", &[b.addr])
    );
    let config = switchboard_gateway::Config::parse("t.toml".as_ref(), &text).unwrap();
    let sources = switchboard_gateway::discovery::static_sources(&config);
    let capture = Capture::default();
    let sub = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(capture.clone())
        .finish();
    let gw = switchboard_gateway::GatewayBuilder::new(config)
        .sources(sources.receivers())
        .access_log_dispatch(tracing::Dispatch::new(sub))
        .start()
        .await
        .unwrap();
    let client = support::client();
    let res = client
        .get(format!("http://{}/users/1", gw.listen()))
        .header("x-request-id", "log-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.text().await.unwrap();
    let res = client
        .get(format!("http://{}/nothing", gw.listen()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    let admin = |p: &str| format!("http://{}{p}", gw.admin());
    assert_eq!(
        client.get(admin("/health")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        client.get(admin("/ready")).send().await.unwrap().status(),
        200
    );
    let routes: Value = client
        .get(admin("/v1/routes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(routes[0]["prefix"], "/users");
    assert_eq!(routes[0]["passing"], 1);
    let doc: Value = client
        .get(admin("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/v1/breakers"].is_object());
    let res = client.get(admin("/metrics")).send().await.unwrap();
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let metrics = res.text().await.unwrap();
    assert!(metrics.contains("switchboard_gateway_requests_total{route=\"/users\",service=\"user-service\",status_class=\"2xx\"} 1"), "{metrics}");
    assert!(metrics.contains(
        "switchboard_gateway_requests_total{route=\"\",service=\"\",status_class=\"4xx\"} 1"
    ));
    assert!(
        metrics.contains(
            "switchboard_gateway_instances{service=\"user-service\",status=\"passing\"} 1"
        )
    );
    check_with_promtool(&metrics);

    // The access log is written off the request path: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    let line = loop {
        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        if let Some(l) = text.lines().find(|l| l.contains("log-me-1")) {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "no access-log line: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["route"], "/users");
    assert_eq!(v["service"], "user-service");
    assert_eq!(v["instance"], b.addr.to_string());
    assert_eq!(v["status"], 200);
    assert_eq!(v["attempts"], 1);
    assert!(v["duration_us"].as_u64().is_some());
    gw.shutdown().await;
}

/// Runs `promtool check metrics` when promtool is installed (CI installs the
/// Debian `prometheus` package); the format assertions above run regardless.
fn check_with_promtool(metrics: &str) {
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: skipping the promtool lint");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
