//! The gateway's request path: the input is the raw byte stream a client
//! sends on one connection (a request head, a body, maybe more pipelined
//! requests). It goes through the real server (the gateway's own HTTP/1.1
//! server `h1_server`: `httparse` heads, framing checks, body decoding,
//! pipelining, the response writer; then routing, body buffering and
//! streaming, header filters, the pooled upstream client) to a recording
//! stub upstream.
//!
//! Invariants: no panic; what comes back is a sequence of well-formed
//! HTTP/1.1 responses (or nothing, when the connection is closed); every
//! request that reaches the upstream is well formed: origin-form target,
//! exactly one `Host`, at most one framing header that agrees with the body
//! received, no hop-by-hop header, `x-request-id` and `x-forwarded-for` set.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use switchboard_gateway::{Config, GatewayBuilder, RunningGateway, discovery};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

struct World {
    rt: Runtime,
    gateway: SocketAddr,
    _running: RunningGateway,
}

/// Malformed requests the stub upstream received (checked after each input).
static VIOLATIONS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (gateway, running) = rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(upstream_conn(s));
                }
            });
            let text = format!(
                r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 1
access_log = false
header_read_timeout = "1s"
max_header_bytes = 4096
max_headers = 32
drain_timeout = "1s"

[[services]]
name = "s"
instances = ["{upstream}"]

[[routes]]
prefix = "/"
service = "s"
timeout = "2s"
max_body_bytes = 4096
retry_buffer_bytes = 64

[[routes]]
prefix = "/strip"
service = "s"
strip_prefix = true
methods = ["GET", "POST"]
"#
            );
            let config = Config::parse(Path::new("fuzz.toml"), &text).unwrap();
            let sources = discovery::static_sources(&config);
            let running = GatewayBuilder::new(config)
                .sources(sources.receivers())
                .start()
                .await
                .unwrap();
            // The sources must outlive the gateway: leak them with it.
            Box::leak(Box::new(sources));
            (running.listen(), running)
        });
        World {
            rt,
            gateway,
            _running: running,
        }
    })
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

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "keep-alive",
    "proxy-connection",
];

/// Checks one forwarded head; returns the body framing.
fn check_head(head: &[u8]) -> Result<Framing, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        other => return Err(format!("unparsable head {other:?}")),
    }
    let path = req.path.unwrap_or("");
    if !path.starts_with('/') {
        return Err(format!("target not in origin-form: {path:?}"));
    }
    if req.version != Some(1) {
        return Err(format!("version {:?}", req.version));
    }
    let method = req.method.unwrap_or("");
    if method == "CONNECT" {
        return Err("CONNECT forwarded".into());
    }
    let count = |n: &str| req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(n)).count();
    let value = |n: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(n))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    if count("host") != 1 {
        return Err("not exactly one Host".into());
    }
    if count("x-request-id") != 1 || count("x-forwarded-for") != 1 {
        return Err("x-request-id or x-forwarded-for missing or repeated".into());
    }
    for h in HOP_BY_HOP {
        if count(h) != 0 {
            return Err(format!("hop-by-hop header {h} forwarded"));
        }
    }
    let te = count("transfer-encoding");
    let cl = count("content-length");
    match (te, cl) {
        (0, 0) => Ok(Framing::Length(0)),
        (0, 1) => {
            let v = value("content-length").unwrap();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("Content-Length {v:?} forwarded"));
            }
            v.parse()
                .map(Framing::Length)
                .map_err(|_| format!("Content-Length {v:?}"))
        }
        (1, 0) if value("transfer-encoding").unwrap().eq_ignore_ascii_case("chunked") => {
            Ok(Framing::Chunked)
        }
        _ => Err(format!("framing headers: {te} Transfer-Encoding, {cl} Content-Length")),
    }
}

enum Framing {
    Length(usize),
    Chunked,
}

/// The stub upstream: validates and answers each request.
async fn upstream_conn(mut s: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let end = loop {
            if let Some(e) = find(&buf, b"\r\n\r\n") {
                break e + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let framing = match check_head(&buf[..end]) {
            Ok(f) => f,
            Err(e) => {
                VIOLATIONS
                    .lock()
                    .unwrap()
                    .push(format!("{e}: {:?}", String::from_utf8_lossy(&buf[..end])));
                return;
            }
        };
        let head_request = buf.starts_with(b"HEAD ");
        buf.drain(..end);
        // Read the body as framed; a body cut short (the gateway aborted a
        // streamed body past the limit) just ends the connection.
        let len = loop {
            let done = match framing {
                Framing::Length(n) => (buf.len() >= n).then_some(n),
                Framing::Chunked => match chunked_end(&buf) {
                    Ok(end) => end,
                    Err(e) => {
                        VIOLATIONS.lock().unwrap().push(format!("bad chunked body: {e}"));
                        return;
                    }
                },
            };
            if let Some(n) = done {
                break n;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..len);
        // A response to HEAD has no body; `x-head` tells `check_responses`.
        let res: &[u8] = if head_request {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-head: 1\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        };
        if s.write_all(res).await.is_err() {
            return;
        }
    }
}

/// Checks the bytes the gateway sent back: zero or more whole responses, the
/// last one possibly cut by the close.
fn check_responses(mut out: &[u8]) {
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        let n = match res.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => panic!("truncated response head: {out:?}"),
            Err(e) => panic!("invalid response ({e}): {:?}", String::from_utf8_lossy(out)),
        };
        let code = res.code.unwrap();
        assert!((100..600).contains(&code), "status {code}");
        let cl = res
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| std::str::from_utf8(h.value).unwrap().parse::<usize>().unwrap());
        let chunked = res
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
        assert!(!(chunked && cl.is_some()), "response with both framings");
        let head = res.headers.iter().any(|h| h.name.eq_ignore_ascii_case("x-head"));
        let rest = &out[n..];
        let body = if head || code == 204 || code == 304 || code < 200 {
            0
        } else if let Some(cl) = cl {
            assert!(rest.len() >= cl, "response body shorter than its length");
            cl
        } else if chunked {
            chunked_end(rest)
                .expect("malformed chunked response")
                .expect("unterminated chunked response")
        } else {
            rest.len()
        };
        out = &rest[body..];
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let out = w.rt.block_on(async {
        let mut s = TcpStream::connect(w.gateway).await.unwrap();
        let _ = s.write_all(data).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        // The gateway answers or closes well within its own timeouts.
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the gateway neither answered nor closed within 5 s")
            .ok();
        out
    });
    check_responses(&out);
    let v = std::mem::take(&mut *VIOLATIONS.lock().unwrap());
    assert!(v.is_empty(), "malformed request forwarded: {v:?}");
});
