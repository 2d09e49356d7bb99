//! An upstream that sends its response head and then fails mid-body is
//! charged with the failure: its breaker opens and traffic moves to the
//! healthy instance, and the attempt is counted as `outcome="body_error"`,
//! not `ok`. A client that leaves mid-body charges nobody.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::{Backend, Harness, service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the raw upstream ends each response.
#[derive(Clone, Copy)]
enum Ending {
    /// Head with `content-length: 100`, 50 bytes, then close: a truncated body.
    Truncate,
    /// Head, then a chunk every 20 ms for 2 s (a client leaves before the end).
    Trickle,
}

/// A raw HTTP/1.1 upstream: one request per connection.
async fn raw_upstream(ending: Ending) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let h = Arc::clone(&h);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                match ending {
                    Ending::Truncate => {
                        let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_vec();
                        out.extend_from_slice(&[b'x'; 50]);
                        let _ = s.write_all(&out).await;
                        let _ = s.flush().await;
                        // Dropped here: the body ends 50 bytes short.
                    }
                    Ending::Trickle => {
                        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                        if s.write_all(head).await.is_err() {
                            return;
                        }
                        for _ in 0..100 {
                            if s.write_all(b"4\r\ndata\r\n").await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let _ = s.write_all(b"0\r\n\r\n").await;
                    }
                }
            });
        }
    });
    (addr, hits)
}

async fn breaker_of(h: &Harness, addr: SocketAddr) -> Value {
    let list: Value = h
        .client
        .get(h.admin("/v1/breakers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("no breaker for {addr} in {list}"))
}

/// `switchboard_gateway_upstream_attempts_total` of route `/` by outcome.
async fn attempts(h: &Harness, outcome: &str) -> u64 {
    let text = h.metrics().await;
    let series = format!(
        "switchboard_gateway_upstream_attempts_total{{route=\"/\",service=\"s\",outcome=\"{outcome}\"}} "
    );
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line.parse().unwrap()
}

/// Waits (up to 2 s) until the attempt counters are `(ok, body_error)`: an
/// `ok` is recorded when the gateway drops the body, just after the client
/// has read its end.
async fn expect_attempts(h: &Harness, ok: u64, body_error: u64) {
    let mut seen = (0, 0);
    for _ in 0..100 {
        seen = (attempts(h, "ok").await, attempts(h, "body_error").await);
        if seen == (ok, body_error) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "attempts (ok, body_error) = {seen:?}, expected {:?}",
        (ok, body_error)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn midbody_reset_opens_the_breaker_and_traffic_moves() {
    let good = Backend::start("good").await;
    let (bad, bad_hits) = raw_upstream(Ending::Truncate).await;
    let cfg = format!(
        "{}[[routes]]\nprefix = \"/\"\nservice = \"s\"\nretry = {{ attempts = 1 }}\nbreaker = {{ failure_rate = 0.5, min_calls = 4, window = \"10s\", open_for = \"30s\" }}\n",
        service("s", &[good.addr, bad])
    );
    let h = Harness::start(&cfg).await;
    let mut broken = 0;
    let mut sent = 0;
    for _ in 0..60 {
        sent += 1;
        let res = h.client.get(h.url("/x")).send().await.unwrap();
        assert_eq!(res.status(), 200, "the head arrived from either instance");
        if res.bytes().await.is_err() {
            broken += 1;
        }
        if breaker_of(&h, bad).await["state"] == "open" {
            break;
        }
    }
    let b = breaker_of(&h, bad).await;
    assert_eq!(b["state"], "open", "{b}");
    assert!(broken >= 4, "{broken} truncated bodies reached the client");
    assert!(bad_hits.load(Ordering::SeqCst) >= 4);
    // The good instance's clean bodies counted as successes, not failures.
    let g = breaker_of(&h, good.addr).await;
    assert_eq!(
        (g["state"].as_str(), g["failed_calls"].as_u64()),
        (Some("closed"), Some(0)),
        "{g}"
    );

    // Ejected: every further request goes to the healthy instance, whole.
    let before = bad_hits.load(Ordering::SeqCst);
    for _ in 0..20 {
        let res = h.client.get(h.url("/x")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let body = res
            .bytes()
            .await
            .expect("a whole body from the healthy instance");
        assert!(!body.is_empty());
    }
    assert_eq!(
        bad_hits.load(Ordering::SeqCst),
        before,
        "the ejected instance got traffic"
    );
    // Each truncated body is one attempt with outcome body_error, never ok.
    expect_attempts(&h, sent + 20 - broken, broken).await;
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_midbody_does_not_count_against_the_upstream() {
    let (slow, hits) = raw_upstream(Ending::Trickle).await;
    let cfg = format!(
        "{}[[routes]]\nprefix = \"/\"\nservice = \"s\"\nretry = {{ attempts = 1 }}\nbreaker = {{ failure_rate = 0.5, min_calls = 2, window = \"10s\", open_for = \"30s\" }}\n",
        service("s", &[slow])
    );
    let h = Harness::start(&cfg).await;
    for _ in 0..6 {
        // A fresh client per request so dropping the response closes its connection.
        let client = support::client();
        let mut res = client.get(h.url("/x")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let first = res.chunk().await.unwrap();
        assert!(first.is_some());
        drop(res);
        drop(client);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 6);
    // Let the gateway notice the closed client connections (its next write fails).
    let mut b = breaker_of(&h, slow).await;
    for _ in 0..50 {
        if b["outstanding"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        b = breaker_of(&h, slow).await;
    }
    assert_eq!(b["outstanding"], 0, "the abandoned requests ended: {b}");
    // The upstream did nothing wrong: six ok attempts, no body error.
    expect_attempts(&h, 6, 0).await;
    assert_eq!(
        (b["state"].as_str(), b["failed_calls"].as_u64()),
        (Some("closed"), Some(0)),
        "{b}"
    );
    h.gw.shutdown().await;
}
