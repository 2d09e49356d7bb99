//! What upstreams answer, as the client sees it through the gateway: the
//! gateway's own HTTP/1.1 client (`h1`) against a raw upstream that writes
//! exactly the bytes each case scripts. Response framing per RFC 9112 §6.3,
//! connection reuse and its limits, and an upstream closing idle
//! connections (the keep-alive race).

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Harness, client, service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw upstream: for each request it reads a head (GET/POST with a
/// `Content-Length` body), answers with the response the request's path
/// names, and counts connections. `close_idle` closes a connection right
/// after each response that did not close it itself, as an upstream with a
/// very short keep-alive timeout would.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<Mutex<usize>>,
    requests: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

fn response(path: &str) -> (Vec<u8>, bool) {
    let (bytes, close): (&[u8], bool) = match path {
        "/length" => (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-up: 1\r\n\r\nhello", false),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
            false,
        ),
        // Both framings: chunked wins and no Content-Length reaches the client.
        "/both" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
        ),
        "/close" => (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello",
            true,
        ),
        "/http10" => (b"HTTP/1.0 200 OK\r\n\r\nuntil close", true),
        "/continue" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        "/empty204" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/lengths" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
            true,
        ),
        "/garbage" => (b"SSH-2.0-OpenSSH\r\n\r\n", true),
        "/short" => (b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nonly this", true),
        _ => (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", false),
    };
    (bytes.to_vec(), close)
}

impl Scripted {
    async fn start(close_idle: bool) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(0));
        let requests = Arc::new(Mutex::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                *c.lock().unwrap() += 1;
                tokio::spawn(serve(s, r.clone(), close_idle));
            }
        });
        Scripted {
            addr,
            connections,
            requests,
            task,
        }
    }
    fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }
    fn requests(&self) -> usize {
        *self.requests.lock().unwrap()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, requests: Arc<Mutex<usize>>, close_idle: bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + len);
        *requests.lock().unwrap() += 1;
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        let (bytes, close) = response(&path);
        if s.write_all(&bytes).await.is_err() || close || close_idle {
            return;
        }
    }
}

/// A gateway with one worker, so one connection pool sees every request.
async fn gateway(up: &Scripted, retry: u32) -> Harness {
    let cfg = format!(
        "{}[[routes]]\nprefix = \"/\"\nservice = \"s\"\ntimeout = \"2s\"\nretry = {{ attempts = {retry} }}\n",
        service("s", &[up.addr])
    );
    Harness::start_with(&cfg, "access_log = false\nworkers = 1").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_framing_reaches_the_client_intact() {
    let up = Scripted::start(false).await;
    let h = gateway(&up, 1).await;
    let http = client();
    let get = |p: &str| http.get(h.url(p)).send();

    let r = get("/length").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-up"], "1");
    assert_eq!(r.headers()["content-length"], "5");
    assert_eq!(r.text().await.unwrap(), "hello");

    let r = get("/chunked").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello world");

    let r = get("/both").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("content-length").is_none(),
        "the upstream's Content-Length must not survive beside chunked: {:?}",
        r.headers()
    );
    assert_eq!(r.text().await.unwrap(), "hello");

    let r = get("/continue").await.unwrap();
    assert_eq!(r.status(), 201, "interim 100 is not the answer");
    assert_eq!(r.text().await.unwrap(), "ok");

    let r = get("/empty204").await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.text().await.unwrap(), "");

    let r = get("/http10").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "until close");

    let r = http.head(h.url("/length")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "5");

    // Answers that cannot be framed safely are 502s, never guesses.
    for p in ["/lengths", "/garbage"] {
        let r = get(p).await.unwrap();
        assert_eq!(r.status(), 502, "{p}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{p}"
        );
    }
    // A body cut short reaches the client as an error, not as a shorter body.
    let r = get("/short").await.unwrap();
    assert_eq!(r.status(), 200, "the head is forwarded");
    assert!(
        r.bytes().await.is_err(),
        "a truncated body must not look complete"
    );
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_only_when_the_upstream_allows() {
    let up = Scripted::start(false).await;
    let h = gateway(&up, 1).await;
    let http = client();
    for p in ["/length", "/chunked", "/length", "/continue", "/empty204"] {
        let r = http.get(h.url(p)).send().await.unwrap();
        assert!(r.status().is_success(), "{p}");
        r.bytes().await.unwrap();
    }
    assert_eq!(
        up.connections(),
        1,
        "keep-alive responses reuse one connection"
    );
    // `Connection: close`, HTTP/1.0 and both framings are never reused.
    for p in [
        "/close", "/length", "/http10", "/length", "/both", "/length",
    ] {
        let r = http.get(h.url(p)).send().await.unwrap();
        assert!(r.status().is_success(), "{p}");
        r.bytes().await.unwrap();
    }
    assert_eq!(
        up.connections(),
        4,
        "after close, HTTP/1.0 and both framings: a new connection"
    );
    h.gw.shutdown().await;
}

/// An upstream that closes every connection once idle: a pooled connection
/// it closed is never used for the next request, so even a POST (never
/// retried once sent) succeeds every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_upstream_closed_while_idle_are_not_used() {
    let up = Scripted::start(true).await;
    let h = gateway(&up, 1).await;
    let http = client();
    for i in 0..20 {
        let r = http
            .post(h.url("/length"))
            .body(format!("order {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "hello");
        // Give the close time to arrive, as between real requests.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.requests(), 20, "each POST reached the upstream once");
    assert_eq!(up.connections(), 20);
    h.gw.shutdown().await;
}
