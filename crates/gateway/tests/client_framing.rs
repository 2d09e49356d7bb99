//! What clients see of the gateway's own HTTP/1.1 server (`h1_server`), byte
//! for byte: raw `TcpStream` clients against a real gateway whose upstream
//! is a raw stub on 127.0.0.1:0. Persistence and pipelining, HTTP/1.0
//! clients, `Expect: 100-continue`, responses without a body, bodies of
//! unknown length, upgrades, graceful shutdown and lingering close (RFC 9112,
//! RFC 9110).

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Harness, service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The stub upstream: reads each request (head, then a `Content-Length`
/// body), keeps its head, and answers by path. `/chunked`: a chunked body
/// with a trailer; `/broken`: a chunked body cut off by the close;
/// `/close`: `Connection: close`, then the close;
/// `/204`, `/304`: no body (with a `Content-Length`);
/// `/slow`: 300 ms late; an `Upgrade` request: `101`, then it echoes bytes;
/// anything else: the path as the body, with `x-path` and `x-body-len`
/// (no body for `HEAD`). No response carries a `Date`.
struct Upstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(upstream_conn(s, h.clone()));
            }
        });
        Upstream { addr, heads, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream_conn(mut s: TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = header_of(&head, "content-length").map_or(0, |v| v.parse().unwrap());
        while buf.len() < end + len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + len);
        heads.lock().unwrap().push(head.clone());
        let mut words = head.split(' ');
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
        if header_of(&head, "upgrade").is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
                .await;
            let (mut r, mut w) = s.split();
            let _ = w.write_all(&buf).await;
            let _ = tokio::io::copy(&mut r, &mut w).await;
            return;
        }
        let res = match path {
            "/chunked" => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-trailer\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_owned(),
            "/broken" => {
                let cut = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
                let _ = s.write_all(cut.as_bytes()).await;
                return;
            }
            "/close" => {
                let close = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok";
                let _ = s.write_all(close.as_bytes()).await;
                return;
            }
            "/204" => "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nx-path: /204\r\n\r\n".to_owned(),
            "/304" => "HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\nx-path: /304\r\n\r\n".to_owned(),
            _ => {
                if path == "/slow" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let body = if method == "head" { "" } else { path };
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-path: {path}\r\nx-body-len: {len}\r\n\r\n{body}",
                    path.len()
                )
            }
        };
        if s.write_all(res.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A field's value in a lower-cased head.
fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// One response as it came over the wire.
#[derive(Debug)]
struct Res {
    status: u16,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl Res {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn body(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// A raw client connection that reads responses as RFC 9112 §6.3 frames
/// them.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(h: &Harness) -> Client {
        Client {
            s: TcpStream::connect(h.gw.listen()).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &str) {
        self.s.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// One read into the buffer (within 5 s): how many bytes came.
    async fn read(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut chunk));
        let n = read.await.expect("nothing within 5 s")?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// More bytes into the buffer; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        self.read().await.is_ok_and(|n| n > 0)
    }

    /// The next response; `head` when it answers a `HEAD` request.
    async fn response(&mut self, head: bool) -> Res {
        let (status, headers) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(n) = r.parse(&self.buf).unwrap() {
                let headers = r
                    .headers
                    .iter()
                    .map(|h| {
                        let v = String::from_utf8(h.value.to_vec()).unwrap();
                        (h.name.to_ascii_lowercase(), v)
                    })
                    .collect();
                let status = r.code.unwrap();
                self.buf.drain(..n);
                break (status, headers);
            }
            assert!(self.fill().await, "closed before a response head");
        };
        let mut res = Res {
            status,
            headers,
            body: Vec::new(),
            trailers: Vec::new(),
        };
        if head || matches!(status, 100..=199 | 204 | 304) {
            return res;
        }
        if let Some(n) = res.header("content-length") {
            let n: usize = n.parse().unwrap();
            while self.buf.len() < n {
                assert!(self.fill().await, "body shorter than its length");
            }
            res.body = self.buf.drain(..n).collect();
        } else if res.header("transfer-encoding").is_some() {
            assert_eq!(res.header("transfer-encoding"), Some("chunked"));
            self.chunked(&mut res).await;
        } else {
            while self.fill().await {}
            res.body = std::mem::take(&mut self.buf);
        }
        res
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8(self.buf.drain(..i + 2).collect()).unwrap();
                return line.trim_end().to_owned();
            }
            assert!(self.fill().await, "chunked body cut short");
        }
    }

    async fn chunked(&mut self, res: &mut Res) {
        loop {
            let size = usize::from_str_radix(&self.line().await, 16).unwrap();
            if size == 0 {
                break;
            }
            while self.buf.len() < size + 2 {
                assert!(self.fill().await, "chunk cut short");
            }
            res.body.extend(self.buf.drain(..size));
            assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
        }
        loop {
            let line = self.line().await;
            let Some((name, value)) = line.split_once(':') else {
                assert!(line.is_empty(), "{line:?}");
                return;
            };
            res.trailers
                .push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
    }

    /// Everything up to the end of the stream, and how it ended.
    async fn rest(&mut self) -> std::io::Result<()> {
        while self.read().await? > 0 {}
        Ok(())
    }

    /// The gateway closed the connection with nothing more to say.
    async fn closed(&mut self) -> bool {
        !self.fill().await && self.buf.is_empty()
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

/// A gateway with one worker; request bodies over 16 bytes are streamed
/// upstream (hyper's client), shorter ones buffered (the gateway's own),
/// and over 1,000 bytes refused.
async fn gateway(up: &Upstream) -> Harness {
    one_route(
        up.addr,
        "timeout = \"2s\"\nretry_buffer_bytes = 16\nmax_body_bytes = 1000\n",
        "",
    )
    .await
}

/// A gateway with one worker, no access log and one route `/` to the
/// upstream at `addr`; `route` and `gateway` are more keys for each table.
async fn one_route(addr: SocketAddr, route: &str, gateway: &str) -> Harness {
    let cfg = format!(
        "{}[[routes]]\nprefix = \"/\"\nservice = \"s\"\n{route}",
        service("s", &[addr])
    );
    Harness::start_with(&cfg, &format!("access_log = false\nworkers = 1\n{gateway}")).await
}

/// Requests sent in one write are answered in order on one connection; a
/// `HEAD`, a 204 and a 304 among them keep the stream in step: no body
/// bytes, the upstream's length kept for `HEAD` and 304 and dropped for
/// 204 (RFC 9110 §8.6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_bodiless_responses_keep_step() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    let head = "HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n";
    c.send(&[get("/a"), head.into(), get("/204"), get("/304"), get("/b")].concat())
        .await;
    let a = c.response(false).await;
    assert_eq!((a.status, a.body()), (200, "/a"));
    let r = c.response(true).await;
    assert_eq!((r.status, r.header("x-path")), (200, Some("/head")));
    assert_eq!(
        r.header("content-length"),
        Some("5"),
        "HEAD keeps the length"
    );
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("content-length")), (204, None));
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("content-length")), (304, Some("5")));
    let b = c.response(false).await;
    assert_eq!(
        (b.status, b.body()),
        (200, "/b"),
        "no stray body bytes before it"
    );
    assert_eq!(up.heads.lock().unwrap().len(), 5);
    h.gw.shutdown().await;
}

/// A body of unknown length (the upstream's is chunked) reaches an
/// HTTP/1.1 client chunked, trailer included, on a connection that stays
/// open; an HTTP/1.0 client gets it delimited by the close. HTTP/1.0
/// connections persist only when asked (`Connection: keep-alive`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_lengths_are_chunked_for_http11_and_closed_for_http10() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send(&get("/chunked")).await;
    let r = c.response(false).await;
    assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{r:?}");
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.body(), "hello world");
    assert_eq!(r.trailers, [("x-trailer".to_owned(), "t".to_owned())]);
    c.send(&get("/a")).await;
    assert_eq!(c.response(false).await.body(), "/a", "still open");

    let mut c = Client::connect(&h).await;
    let keep = "HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n";
    c.send(&format!("GET /a {keep}")).await;
    let r = c.response(false).await;
    assert_eq!(r.header("connection"), Some("keep-alive"), "{r:?}");
    assert_eq!((r.header("content-length"), r.body()), (Some("2"), "/a"));
    c.send(&format!("GET /chunked {keep}")).await;
    let r = c.response(false).await;
    assert_eq!(r.header("transfer-encoding"), None, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.body(), "hello world", "delimited by the close");

    let mut c = Client::connect(&h).await;
    c.send("GET /a HTTP/1.0\r\nHost: x\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!((r.header("connection"), r.body()), (Some("close"), "/a"));
    assert!(c.closed().await, "HTTP/1.0 without keep-alive closes");
    h.gw.shutdown().await;
}

/// `Expect: 100-continue`: the client waits for `100 Continue` before it
/// sends the body, then gets the final response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_continue_then_the_final_response() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 100, "{r:?}");
    c.send("hello").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("x-body-len")), (200, Some("5")));
    h.gw.shutdown().await;
}

/// A final response before the body (`Expect: 100-continue`, a declared
/// length over the limit): no `100 Continue`, and since the body was not
/// read, `Connection: close` and the close (what follows cannot be framed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_body_closes_the_connection_after_the_response() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("connection")), (413, Some("close")));
    assert!(c.closed().await);
    assert!(up.heads.lock().unwrap().is_empty());
    h.gw.shutdown().await;
}

/// `Connection` is hop-by-hop: the upstream closing its connection leaves
/// the client's open, and the client's `close` closes only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_either_side_closes_only_that_side() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send(&get("/close")).await;
    let r = c.response(false).await;
    assert_eq!((r.body(), r.header("connection")), ("ok", None), "{r:?}");
    c.send("GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!((r.body(), r.header("connection")), ("/a", Some("close")));
    assert!(c.closed().await);
    let heads = up.heads.lock().unwrap().clone();
    assert!(
        heads.iter().all(|h| !h.contains("connection:")),
        "{heads:?}"
    );
    h.gw.shutdown().await;
}

/// An upgrade hands the connection over with the bytes the client sent
/// right behind its head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_hand_over_the_bytes_sent_behind_the_head() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send(&format!("GET /ws HTTP/1.1\r\n{UPGRADE}early")).await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("upgrade")), (101, Some("websocket")));
    assert_eq!(r.header("connection"), Some("upgrade"));
    while c.buf.len() < 5 {
        assert!(c.fill().await);
    }
    assert_eq!(c.buf, b"early", "echoed through the upstream");
    drop(c);
    h.gw.shutdown().await;
}

const UPGRADE: &str = "Host: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";

/// Shutdown closes an idle keep-alive connection at once and a busy one
/// right after its response, which says `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_and_busy_ones_after_their_response() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut idle = Client::connect(&h).await;
    // The empty line after a body that RFC 9112 §2.2 lets clients send
    // starts no request: the connection is still idle.
    idle.send("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\r\n")
        .await;
    assert_eq!(idle.response(false).await.status, 200);
    let mut busy = Client::connect(&h).await;
    busy.send(&get("/slow")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let stopped = tokio::spawn(h.gw.shutdown());
    assert!(idle.closed().await);
    assert!(
        t.elapsed() < Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );
    let r = busy.response(false).await;
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(busy.closed().await);
    stopped.await.unwrap();
}

/// RFC 9110 §6.6.1: the gateway's own 4xx carry a `Date`, and so does a
/// response forwarded from an upstream that sent none (hyper's server used
/// to add it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_a_date() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send(&get("/a")).await;
    let forwarded = c.response(false).await;
    c.send("GET /a HTTP/1.1\r\n\r\n").await;
    let refused = c.response(false).await;
    assert_eq!(refused.status, 400, "no Host");
    for r in [forwarded, refused] {
        let date = r.header("date").unwrap_or_else(|| panic!("no Date: {r:?}"));
        assert!(httpdate::parse_http_date(date).is_ok(), "{date:?}");
        assert_eq!(r.headers.iter().filter(|(n, _)| n == "date").count(), 1);
    }
    h.gw.shutdown().await;
}

/// `close` in any `Connection` field ends the connection after the
/// response, even when a later field says `keep-alive` (RFC 9112 §9.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_is_not_undone_by_a_later_keep_alive() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send("GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(c.closed().await, "the connection stayed open");
    h.gw.shutdown().await;
}

/// `Upgrade` in an HTTP/1.0 request is ignored (RFC 9110 §7.8): an ordinary
/// response, nothing asked of the upstream. It used to be switched, with a
/// `101` saying `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_in_http10_are_ignored() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send(&format!("GET /ws10 HTTP/1.0\r\n{UPGRADE}")).await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.body()), (200, "/ws10"), "{r:?}");
    let head = up.heads.lock().unwrap().pop().unwrap();
    assert!(header_of(&head, "upgrade").is_none(), "{head}");
    h.gw.shutdown().await;
}

/// A body that breaks off upstream must not look complete (RFC 9112 §8):
/// an HTTP/1.1 client gets no last chunk, and an HTTP/1.0 one, whose body
/// ends with the connection, a reset instead of a clean close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_broken_upstream_do_not_look_complete() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    for version in ["1.1", "1.0"] {
        let mut c = Client::connect(&h).await;
        c.send(&format!("GET /broken HTTP/{version}\r\nHost: x\r\n\r\n"))
            .await;
        let end = c.rest().await;
        let got = String::from_utf8_lossy(&c.buf);
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n") && got.contains("hello"),
            "{got}"
        );
        assert!(!got.ends_with("0\r\n\r\n"), "{got}");
        if version == "1.0" {
            let kind = end.expect_err("a clean close after a broken body").kind();
            assert_eq!(kind, std::io::ErrorKind::ConnectionReset);
        }
    }
    h.gw.shutdown().await;
}

/// `header_read_timeout` takes any duration; one too long to add to a clock
/// reading means no timeout, not a panic in every connection's task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_timeout_past_the_clock_still_serves() {
    let up = Upstream::start().await;
    let h = one_route(up.addr, "", "header_read_timeout = \"500000000000years\"").await;
    let mut c = Client::connect(&h).await;
    c.send(&get("/a")).await;
    assert_eq!(c.response(false).await.body(), "/a");
    h.gw.shutdown().await;
}

/// An identical duplicate `Content-Length` is accepted and forwarded as one
/// field (RFC 9110 §8.6), also when the body is streamed; it used to reach
/// the upstream twice that way (found by the `gateway_request` fuzz target).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_content_length_is_forwarded_once() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    for body in ["short", "longer than the retry buffer"] {
        let mut c = Client::connect(&h).await;
        let n = body.len();
        let length = format!("Content-Length: {n}\r\n");
        c.send(&format!(
            "POST /up HTTP/1.1\r\nHost: x\r\n{length}{length}\r\n{body}"
        ))
        .await;
        let r = c.response(false).await;
        assert_eq!(
            (r.status, r.header("x-body-len")),
            (200, Some(&*n.to_string()))
        );
        let head = up.heads.lock().unwrap().pop().unwrap();
        assert_eq!(head.matches("content-length:").count(), 1, "{head}");
    }
    h.gw.shutdown().await;
}

/// A `101` always says `Connection: upgrade` (RFC 9110 §7.8), also when the
/// request asked to close: the connection is handed over, not closed. It
/// used to say `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_says_connection_upgrade_even_when_close_was_asked() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    let ask = "Host: x\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n";
    c.send(&format!("GET /ws HTTP/1.1\r\n{ask}")).await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("connection")), (101, Some("upgrade")));
    drop(c);
    h.gw.shutdown().await;
}

/// An upstream that answers before the upload ends (the head and a first
/// chunk as soon as the request head arrives, the byte count once the whole
/// body is in) still gets the whole body: the request body keeps the
/// client's connection while the response goes out, as hyper's server let it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_starts_before_the_upload_ends_does_not_cut_the_upload() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let early = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the head");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = header_of(&head, "content-length").unwrap().parse().unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nstart\r\n")
            .await
            .unwrap();
        let mut got = buf.len() - end;
        while got < len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let tail = format!("got {got}");
        let last = format!("{:x}\r\n{tail}\r\n0\r\n\r\n", tail.len());
        let _ = s.write_all(last.as_bytes()).await;
        got
    });
    let h = one_route(addr, "timeout = \"5s\"\nretry_buffer_bytes = 16\n", "").await;
    let mut c = Client::connect(&h).await;
    let first = "a".repeat(1000);
    c.send(&format!(
        "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n{first}"
    ))
    .await;
    // The response has started; 2,000 bytes of the body are still to come.
    while find(&c.buf, b"start").is_none() {
        assert!(c.fill().await, "closed before the response started");
    }
    c.send(&"b".repeat(2000)).await;
    while find(&c.buf, b"0\r\n\r\n").is_none() {
        assert!(c.fill().await, "closed before the response ended");
    }
    let text = String::from_utf8_lossy(&c.buf).into_owned();
    assert!(text.contains("got 3000"), "{text}");
    assert_eq!(early.await.unwrap(), 3000);
    h.gw.shutdown().await;
}

/// A client whose socket buffers little of what it writes (8 KiB asked,
/// the kernel's floor is about 4.5 KiB): an upload past the gateway's
/// receive buffer goes through only as fast as the gateway reads it.
async fn connect_small_sndbuf(h: &Harness) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(8 * 1024).unwrap();
    Client {
        s: socket.connect(h.gw.listen()).await.unwrap(),
        buf: Vec::new(),
    }
}

/// A request head over the route's 1,000-byte limit; its body never goes upstream.
const TOO_LARGE: &str = "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n";

/// Writes `n` bytes, within 10 s.
async fn upload(c: &mut Client, n: usize) -> std::io::Result<()> {
    let body = vec![b'x'; n];
    tokio::time::timeout(Duration::from_secs(10), c.s.write_all(&body))
        .await
        .expect("the upload stalled for 10 s")
}

/// Whether the gateway still reads from the connection: two writes 50 ms
/// apart both succeed (on a closed socket the first draws a reset, and the
/// second fails).
async fn still_read(c: &mut Client) -> bool {
    for _ in 0..2 {
        if c.s.write_all(b"x").await.is_err() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// RFC 9112 §9.6, lingering close: a client that uploads its whole body
/// before it reads (2 MB, far past what the sockets buffer) while the
/// gateway answers `413` after the head: the gateway reads and discards the
/// body, so the upload completes, then the client reads the `413` and a
/// clean end. Closing at once left the body unread in the kernel, which
/// then answered it with a reset: the upload failed with `EPIPE` or
/// `ECONNRESET` and such a client never read its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_uploads_before_it_reads_gets_its_413_and_a_clean_close() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = connect_small_sndbuf(&h).await;
    c.send(TOO_LARGE).await;
    upload(&mut c, 2_000_000)
        .await
        .expect("the upload after the 413 was cut off");
    c.s.shutdown().await.unwrap();
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("connection")), (413, Some("close")));
    c.rest().await.expect("a FIN, not a reset");
    assert!(c.buf.is_empty(), "nothing after the response");
    assert!(up.heads.lock().unwrap().is_empty());
    assert_lingered(&h, &[("client_closed", 1), ("idle", 0), ("time", 0)]).await;
    h.gw.shutdown().await;
}

/// Waits up to 2 s for `switchboard_gateway_lingering_closes_total` on the
/// admin listener to show these counts (a lingering close is counted when
/// it ends, after the client saw the response).
async fn assert_lingered(h: &Harness, want: &[(&str, u64)]) {
    let t = Instant::now();
    loop {
        let page = h.metrics().await;
        let got: Vec<(&str, u64)> = want
            .iter()
            .map(|(ended, _)| {
                let key =
                    format!("switchboard_gateway_lingering_closes_total{{ended=\"{ended}\"}} ");
                let n = page
                    .lines()
                    .find_map(|l| l.strip_prefix(&key))
                    .unwrap_or_else(|| panic!("no {key} in /metrics"));
                (*ended, n.parse().unwrap())
            })
            .collect();
        if got == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "lingering closes {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that reads the `413` while it uploads and goes on sending for
/// a while (as clients that check for an early response do before they
/// stop): its writes keep succeeding until it closes its side, and the
/// stream ends cleanly after the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_sending_after_its_413_is_drained_until_it_closes() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send(TOO_LARGE).await;
    upload(&mut c, 64 * 1024).await.unwrap();
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("connection")), (413, Some("close")));
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        upload(&mut c, 16 * 1024)
            .await
            .unwrap_or_else(|e| panic!("write {i} after the response: {e}"));
    }
    c.s.shutdown().await.unwrap();
    c.rest().await.expect("a FIN, not a reset");
    assert!(c.buf.is_empty(), "nothing after the response");
    h.gw.shutdown().await;
}

/// A refused head lingers as well: the rest of a 200 KB head the gateway
/// answered with `431` after its first 16 KiB is read and discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_of_a_refused_head_is_drained() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = connect_small_sndbuf(&h).await;
    c.send(&format!("GET / HTTP/1.1\r\nx-big: {}", "a".repeat(200_000)))
        .await;
    c.s.shutdown().await.unwrap();
    let r = c.response(false).await;
    assert_eq!(r.status, 431, "{r:?}");
    c.rest().await.expect("a FIN, not a reset");
    h.gw.shutdown().await;
}

/// The bounds: a lingering connection closes after `lingering_timeout`
/// without a byte, and after `lingering_time` however steadily the client
/// trickles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lingering_ends_after_its_timeout_and_its_time() {
    let up = Upstream::start().await;
    let h = one_route(
        up.addr,
        "max_body_bytes = 1000\n",
        "lingering_time = \"1s\"\nlingering_timeout = \"300ms\"",
    )
    .await;

    let mut c = Client::connect(&h).await;
    c.send(TOO_LARGE).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 413);
    assert!(still_read(&mut c).await, "lingering");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !still_read(&mut c).await,
        "closed 300 ms after the last byte"
    );

    let mut c = Client::connect(&h).await;
    c.send(TOO_LARGE).await;
    assert_eq!(c.response(false).await.status, 413);
    let t = Instant::now();
    while still_read(&mut c).await {
        assert!(t.elapsed() < Duration::from_secs(3), "still lingering");
    }
    let took = t.elapsed();
    assert!(took > Duration::from_millis(800), "closed after {took:?}");
    assert_lingered(&h, &[("client_closed", 0), ("idle", 1), ("time", 1)]).await;
    h.gw.shutdown().await;
}

/// Past 16 MiB discarded, the connection closes whatever the times; the
/// response was delivered before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lingering_discards_at_most_16_mib() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send(TOO_LARGE).await;
    let t = Instant::now();
    let cut = upload(&mut c, 64 << 20).await;
    assert!(cut.is_err(), "64 MiB were all read");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(c.response(false).await.status, 413);
    h.gw.shutdown().await;
}

/// Shutdown waits for a lingering connection at most half a second, even
/// with a client that trickles bytes to keep it (and `lingering_time` is
/// 30 s, the drain deadline 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_up_by_a_lingering_client() {
    let up = Upstream::start().await;
    let h = gateway(&up).await;
    let mut c = Client::connect(&h).await;
    c.send(TOO_LARGE).await;
    assert_eq!(c.response(false).await.status, 413);
    let trickle = tokio::spawn(async move { while still_read(&mut c).await {} });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!trickle.is_finished(), "lingering");
    let t = Instant::now();
    h.gw.shutdown().await;
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1500), "shutdown took {took:?}");
    tokio::time::timeout(Duration::from_secs(2), trickle)
        .await
        .expect("the connection outlived the shutdown")
        .unwrap();
}

/// The other way to leave a body unread: an upstream that answers after
/// the head and closes without reading the upload (a streamed body, past
/// `retry_buffer_bytes`). The client, uploading 2 MB before it reads, gets
/// through its upload and then the upstream's answer and a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_without_reading_the_upload_leaves_a_clean_close() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let early = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
        while find(&buf, b"\r\n\r\n").is_none() {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the head");
            buf.extend_from_slice(&chunk[..n]);
        }
        let res = "HTTP/1.1 403 Forbidden\r\nconnection: close\r\ncontent-length: 2\r\n\r\nno";
        s.write_all(res.as_bytes()).await.unwrap();
        // Closes with the body unread: a reset toward the gateway. Not at
        // once: a reset that overtakes the gateway's read of this response
        // fails the streamed upload in hyper's client first, and the client
        // gets a 502 (seen once in CI). Here the answer has gone through
        // before the reset, as the test means it to.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let h = one_route(addr, "timeout = \"5s\"\nretry_buffer_bytes = 16\n", "").await;
    let mut c = connect_small_sndbuf(&h).await;
    c.send("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        .await;
    upload(&mut c, 2_000_000)
        .await
        .expect("the upload after the early answer was cut off");
    c.s.shutdown().await.unwrap();
    let r = c.response(false).await;
    assert_eq!((r.status, r.body()), (403, "no"), "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
    c.rest().await.expect("a FIN, not a reset");
    early.await.unwrap();
    h.gw.shutdown().await;
}
