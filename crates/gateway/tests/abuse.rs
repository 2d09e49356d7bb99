//! Protocol abuse (issue 8): request smuggling probes, malformed framing,
//! invalid bytes, oversized and slow input, CONNECT and absolute-form, and
//! file-descriptor exhaustion, each sent over a raw socket to a real gateway
//! whose upstream records every byte that reaches it.
//!
//! The invariant: every probe gets a 4xx or a closed connection, and no
//! request reaches the upstream.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Harness, service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that keeps the raw bytes of every request it receives and
/// answers each with `200 ok`. It frames requests itself (head, then
/// `Content-Length` bytes or chunks up to the last one), so whatever the
/// gateway forwards is seen exactly as it went over the wire — hyper would
/// normalise it.
struct Recorder {
    addr: SocketAddr,
    /// Raw bytes of each complete request, in arrival order.
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Connections opened to it.
    connections: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (r, c) = (requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                *c.lock().unwrap() += 1;
                tokio::spawn(record(s, r.clone()));
            }
        });
        Recorder {
            addr,
            requests,
            connections,
            task,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where a chunked body that starts at `buf[0]` ends: `Ok(Some(len))` once it
/// is complete, `Ok(None)` while more bytes are needed, `Err` if malformed.
fn chunked_end(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut i = 0;
    loop {
        let Some(nl) = find(&buf[i..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[i..i + nl]).map_err(|_| "chunk size not ASCII")?;
        let size = line.split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size, 16).map_err(|_| format!("chunk size {line:?}"))?;
        i += nl + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(nl) = find(&buf[i..], b"\r\n") else {
                    return Ok(None);
                };
                i += nl + 2;
                if nl == 0 {
                    return Ok(Some(i));
                }
            }
        }
        if buf.len() < i + size + 2 {
            return Ok(None);
        }
        if &buf[i + size..i + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        i += size + 2;
    }
}

/// Serves one upstream connection: frames each request and records it.
async fn record(mut s: TcpStream, out: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Frame one request from `buf`, reading more as needed.
        let len = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let body_start = end + 4;
                let cl = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if head.contains("transfer-encoding: chunked") {
                    match chunked_end(&buf[body_start..]) {
                        Ok(Some(n)) => break body_start + n,
                        Ok(None) => {}
                        Err(e) => panic!("the gateway forwarded a malformed chunked body: {e}"),
                    }
                } else {
                    let n = cl.unwrap_or(0);
                    if buf.len() >= body_start + n {
                        break body_start + n;
                    }
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        out.lock().unwrap().push(buf.drain(..len).collect());
        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Sends raw bytes; returns what came back until the server closed the
/// connection (`true`) or 1.5 s passed (`false`).
async fn send(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A server may answer and close before reading everything: a failed
    // write is part of the outcome, not a test error.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_millis(1500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Every status line in a response stream.
fn statuses(resp: &str) -> Vec<u16> {
    resp.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| resp.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

async fn gateway(up: &Recorder) -> Harness {
    let cfg = format!(
        "{}[[routes]]\nprefix = \"/\"\nservice = \"s\"\ntimeout = \"800ms\"\nmax_body_bytes = 1000\nretry_buffer_bytes = 100\nretry = {{ attempts = 1 }}\n",
        service("s", &[up.addr])
    );
    Harness::start_with(
        &cfg,
        "access_log = false\nheader_read_timeout = \"500ms\"\nmax_header_bytes = 4096",
    )
    .await
}

/// Probes that must be refused: (name, raw request). A smuggled second
/// request (`GET /smuggled`) follows the ambiguous ones; it must not reach
/// the upstream either.
fn refused_probes() -> Vec<(&'static str, Vec<u8>)> {
    let s = |name, text: &str| (name, text.as_bytes().to_vec());
    let b = |name, bytes: &[u8]| (name, bytes.to_vec());
    vec![
        s(
            "CL.TE",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        s(
            "TE.CL",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\nx=1\r\n0\r\n\r\n",
        ),
        s(
            "TE.CL, lower case and extra spaces",
            "POST /a HTTP/1.1\r\nHost: x\r\ntransfer-encoding:   chunked\r\ncontent-length:  3\r\n\r\n0\r\n\r\n",
        ),
        s(
            "duplicate Content-Length, different values",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 26\r\n\r\nabcGET /smuggled HTTP/1.1\r\n\r\n",
        ),
        s(
            "Content-Length list with different values",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 26\r\n\r\nabcGET /smuggled HTTP/1.1\r\n\r\n",
        ),
        s(
            "Content-Length list of one value twice (RFC 9110 8.6 lets a recipient refuse it)",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
        ),
        s(
            "Content-Length with a plus sign",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
        ),
        s(
            "negative Content-Length",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\nabc",
        ),
        s(
            "hex Content-Length",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc",
        ),
        s(
            "Content-Length overflowing u64",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 184467440737095516160\r\n\r\nabc",
        ),
        s(
            "space before the colon (Transfer-Encoding)",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc",
        ),
        s(
            "obs-fold hiding Transfer-Encoding",
            "POST /a HTTP/1.1\r\nHost: x\r\nX-Pad: y\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        ),
        s(
            "Transfer-Encoding: chunked by obs-fold",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        s(
            "unknown transfer coding",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        s(
            "chunked not the final coding",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        s(
            "two Transfer-Encoding lines, chunked first",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        s(
            "Transfer-Encoding in HTTP/1.0",
            "POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        s(
            "chunk size not hex",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
        s(
            "negative chunk size",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        ),
        s(
            "0x-prefixed chunk size",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        ),
        s(
            "chunk size overflowing u64",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        ),
        s(
            "chunk longer than its size",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
        ),
        s(
            "chunk data without CRLF",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc0\r\n\r\n",
        ),
        s(
            "chunked body cut short (408 after the route timeout)",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n10\r\nabc",
        ),
        s(
            "declared body larger than the limit",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nabc",
        ),
        b(
            "NUL in a header value",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n",
        ),
        b(
            "bare CR in a header value",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
        ),
        b(
            "control character in a header value",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
        ),
        b(
            "DEL in a header name",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-\x7fA: b\r\n\r\n",
        ),
        b(
            "invalid UTF-8 in a header name",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-\xc3\x28: b\r\n\r\n",
        ),
        b(
            "space in a header name",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
        ),
        b(
            "invalid UTF-8 in the path",
            b"GET /a\xc3\x28 HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        b(
            "raw non-ASCII in the path",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        b(
            "control character in the path",
            b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        b("NUL in the path", b"GET /a\0b HTTP/1.1\r\nHost: x\r\n\r\n"),
        b("tab in the path", b"GET /a\tb HTTP/1.1\r\nHost: x\r\n\r\n"),
        s("space in the path", "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"),
        s("HTTP/0.9 request line", "GET /a\r\n\r\n"),
        s("unknown HTTP version", "GET /a HTTP/1.7\r\nHost: x\r\n\r\n"),
        s(
            "HTTP/2 version on HTTP/1",
            "GET /a HTTP/2.0\r\nHost: x\r\n\r\n",
        ),
        b(
            "TLS ClientHello on the plain listener",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        ),
        s("no request target", "GET  HTTP/1.1\r\nHost: x\r\n\r\n"),
        s(
            "CONNECT",
            "CONNECT upstream.internal:443 HTTP/1.1\r\nHost: upstream.internal:443\r\n\r\n",
        ),
        s(
            "CONNECT to origin-form",
            "CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        s(
            "absolute-form naming another host than Host",
            "GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        s(
            "absolute-form without a Host header",
            "GET http://internal.example/a HTTP/1.1\r\n\r\n",
        ),
        s(
            "absolute-form with a non-http scheme",
            "GET ftp://x/a HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        s(
            "asterisk-form outside OPTIONS",
            "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        s(
            "two Host headers",
            "GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        ),
        s("no Host header in HTTP/1.1", "GET /a HTTP/1.1\r\n\r\n"),
        (
            "header block over max_header_bytes",
            format!(
                "GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(8000)
            )
            .into_bytes(),
        ),
        (
            "request line over max_header_bytes",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(8000)).into_bytes(),
        ),
        (
            "more headers than max_headers",
            format!(
                "GET /a HTTP/1.1\r\nHost: x\r\n{}\r\n",
                (0..150)
                    .map(|i| format!("X-{i}: v\r\n"))
                    .collect::<String>()
            )
            .into_bytes(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_requests_get_4xx_or_close_and_never_reach_the_upstream() {
    let up = Recorder::start().await;
    let h = gateway(&up).await;
    let mut failures = Vec::new();
    let probes = refused_probes();
    for (name, bytes) in &probes {
        let (resp, closed) = send(h.gw.listen(), bytes).await;
        let st = statuses(&resp);
        let refused = st.first().is_some_and(|s| (400..500).contains(s));
        // After a refusal nothing else may be answered on the connection
        // (a smuggled request would get a second status line), and the
        // connection must close: its framing can no longer be trusted.
        let ok = (refused && st.len() == 1 && closed) || (st.is_empty() && closed);
        if !ok {
            failures.push(format!(
                "{name}: statuses {st:?}, closed {closed}: {:?}",
                resp.lines().next().unwrap_or("")
            ));
        }
    }
    let reached = up.requests();
    let connections = *up.connections.lock().unwrap();
    assert!(
        failures.is_empty() && reached.is_empty() && connections == 0,
        "{} of {} probes misbehaved:\n{}\n{connections} connections and these requests reached the upstream: {reached:#?}",
        failures.len(),
        probes.len(),
        failures.join("\n")
    );
    // The gateway still serves a plain request afterwards.
    let (resp, _) = send(
        h.gw.listen(),
        b"GET /fine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&resp), vec![200], "{resp}");
    assert_eq!(up.requests().len(), 1);
    h.gw.shutdown().await;
}

/// Legal but unusual framing is accepted and forwarded with exactly one,
/// canonical framing header: the upstream never sees what it could read
/// differently from the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_framing_is_normalised_before_forwarding() {
    let up = Recorder::start().await;
    let h = gateway(&up).await;
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "identical duplicate Content-Length",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
            "abc",
        ),
        (
            "chunked with extensions and a trailer",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
            "abc",
        ),
        (
            "upper-case chunked",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "abc",
        ),
        (
            "absolute-form naming the Host",
            b"GET http://x/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "",
        ),
    ];
    for (name, bytes, body) in cases {
        let before = up.requests().len();
        let (resp, _) = send(h.gw.listen(), bytes).await;
        assert_eq!(statuses(&resp), vec![200], "{name}: {resp}");
        let reqs = up.requests();
        assert_eq!(reqs.len(), before + 1, "{name}");
        let fwd = &reqs[before];
        let (head, fwd_body) = fwd.split_once("\r\n\r\n").unwrap();
        let lower = head.to_ascii_lowercase();
        assert!(
            lower.starts_with("post /a http/1.1\r\n") || lower.starts_with("get /a http/1.1\r\n"),
            "{name}: origin-form upstream: {head}"
        );
        let cl = lower.matches("\r\ncontent-length:").count();
        let te = lower.matches("\r\ntransfer-encoding:").count();
        assert!(cl + te <= 1, "{name}: one framing header upstream: {head}");
        if cl == 1 {
            assert!(
                lower.contains(&format!("\r\ncontent-length: {}", body.len())),
                "{name}: {head}"
            );
            assert_eq!(fwd_body, body, "{name}");
        } else if te == 1 {
            assert!(lower.contains("\r\ntransfer-encoding: chunked"), "{name}");
            assert!(fwd_body.contains(body), "{name}: {fwd_body:?}");
        } else {
            assert!(body.is_empty() && fwd_body.is_empty(), "{name}: {fwd:?}");
        }
        assert_eq!(lower.matches("\r\nhost:").count(), 1, "{name}: {head}");
    }
    h.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off() {
    let up = Recorder::start().await;
    let h = gateway(&up).await;
    // Slowloris: one byte every 100 ms never finishes a head in 500 ms.
    let t = Instant::now();
    let mut s = TcpStream::connect(h.gw.listen()).await.unwrap();
    let mut closed_after = None;
    for &b in b"GET /a HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(&[b]).await.is_err() {
            closed_after = Some(t.elapsed());
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            closed_after = Some(t.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("a slow head was never cut off");
    assert!(
        closed_after < Duration::from_millis(1500),
        "{closed_after:?}"
    );
    // A connection that never sends a byte is closed too (it holds a file
    // descriptor), and so is a keep-alive connection left idle.
    let t = Instant::now();
    let (resp, closed) = send(h.gw.listen(), b"").await;
    assert!(
        closed && resp.is_empty(),
        "idle connection left open: {resp}"
    );
    assert!(t.elapsed() < Duration::from_millis(1400));
    let (resp, closed) = send(h.gw.listen(), b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(statuses(&resp), vec![200]);
    assert!(closed, "idle keep-alive connection left open");
    assert_eq!(up.requests().len(), 1);
    h.gw.shutdown().await;
}

/// A body past the route's limit gets 413 whether it is declared, chunked,
/// or sent after the replay buffer filled (then streamed); the upstream
/// never receives a complete request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_get_413_and_no_complete_request_upstream() {
    let up = Recorder::start().await;
    let h = gateway(&up).await;
    let mut chunked = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..200 {
        chunked.extend_from_slice(b"40\r\n");
        chunked.extend_from_slice(&[b'a'; 64]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (resp, _) = send(h.gw.listen(), &chunked).await;
    assert_eq!(statuses(&resp), vec![413], "{resp}");
    assert!(resp.contains("application/problem+json"));
    // Declared within the limit of u64 but lying: more bytes than declared
    // are the next request's, which must then parse (here: garbage -> 400).
    let mut lying = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".to_vec();
    lying.extend_from_slice(&[b'b'; 20_000]);
    let (resp, _) = send(h.gw.listen(), &lying).await;
    assert_eq!(statuses(&resp).first(), Some(&413), "{resp}");
    assert!(
        up.requests().is_empty(),
        "reached the upstream: {:?}",
        up.requests()
    );
    h.gw.shutdown().await;
}

const FD_CHILD: &str = "SWITCHBOARD_ABUSE_FD_CHILD";

/// Many connections: the process runs out of file descriptors (a child of
/// this test binary, re-run under `prlimit --nofile=256`). The gateway's
/// accept loop must back off and keep serving, not crash or spin, and serve
/// again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_is_answered_with_backpressure() {
    if std::env::var_os(FD_CHILD).is_some() {
        return fd_exhaustion_child().await;
    }
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            !switchboard_testkit_required(),
            "prlimit (util-linux) is required"
        );
        println!("skipping: prlimit (util-linux) not found");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new("prlimit")
        .arg("--nofile=256:256")
        .arg(&exe)
        .args([
            "--exact",
            "fd_exhaustion_is_answered_with_backpressure",
            "--nocapture",
        ])
        .env(FD_CHILD, "1")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed: {text}");
    let line = text.lines().find(|l| l.starts_with("fd-exhaustion:"));
    println!("{}", line.expect("the child did not report"));
}

fn switchboard_testkit_required() -> bool {
    std::env::var_os("SWITCHBOARD_REQUIRE_SERVERS").is_some()
}

async fn fd_exhaustion_child() {
    let up = Recorder::start().await;
    let h = gateway(&up).await;
    let mut held = Vec::new();
    let exhausted = loop {
        match TcpStream::connect(h.gw.listen()).await {
            Ok(s) => held.push(s),
            Err(e) => break e,
        }
        assert!(held.len() < 10_000, "the descriptor limit was not reached");
    };
    // The gateway's accept loop now fails with EMFILE; give it time to spin
    // if it were going to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let opened = held.len();
    held.truncate(opened / 2);
    // With descriptors free again, a new client is served.
    let t = Instant::now();
    let served = loop {
        if let Ok(mut s) = TcpStream::connect(h.gw.listen()).await {
            let _ = s
                .write_all(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out)).await;
            if String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200") {
                break true;
            }
        }
        if t.elapsed() > Duration::from_secs(3) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(served, "not served after descriptors were freed");
    drop(held);
    println!(
        "fd-exhaustion: {opened} connections held until `{exhausted}`, served again after {:?}",
        t.elapsed()
    );
    h.gw.shutdown().await;
}
