//! TLS, HTTP/2, gRPC and WebSocket through the gateway, over real sockets:
//! TLS clients with ALPN `http/1.1` and `h2` (certificates made by rcgen), a
//! gRPC unary call to a tonic service over an h2c upstream with its trailers,
//! a WebSocket echo spliced through an HTTP/1.1 upgrade, and the lingering
//! close over TLS.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::Value;
use support::Backend;
use switchboard_gateway::{Config, GatewayBuilder, RunningGateway};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A CA and a leaf for `localhost` / 127.0.0.1, as PEM files in `dir`.
struct Certs {
    ca: String,
    cert: PathBuf,
    key: PathBuf,
}

fn make_certs(dir: &Path) -> Certs {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "switchboard test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    Certs {
        ca: ca.pem(),
        cert,
        key,
    }
}

async fn start_gateway(body: &str, tls: Option<&Certs>, drain: &str) -> RunningGateway {
    let tls = tls.map_or(String::new(), |c| {
        format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}\n",
            c.cert.display(),
            c.key.display()
        )
    });
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 2\naccess_log = false\ndrain_timeout = \"{drain}\"\n{tls}\n{body}"
    );
    let config =
        Config::parse(Path::new("test.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let sources = switchboard_gateway::discovery::static_sources(&config);
    let gw = GatewayBuilder::new(config)
        .sources(sources.receivers())
        .start()
        .await
        .unwrap();
    // The static sources' senders must outlive the test.
    std::mem::forget(sources);
    gw
}

/// A TLS connection to `addr` trusting only the test CA, offering `alpn`.
async fn tls_connect(
    addr: SocketAddr,
    ca: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_over(TcpStream::connect(addr).await.unwrap(), ca, alpn).await
}

/// TLS over `tcp`, trusting only the test CA, offering `alpn`.
async fn tls_over(
    tcp: TcpStream,
    ca: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_over_http1_and_h2() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let backend = Backend::start("b1").await;
    let body = format!(
        "{}\n[[routes]]\nprefix = \"/api\"\nservice = \"svc\"\n",
        support::service("svc", &[backend.addr])
    );
    let gw = start_gateway(&body, Some(&certs), "5s").await;
    let listen = gw.listen();

    // HTTP/1.1 over TLS.
    let tls = tls_connect(listen, &certs.ca, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::get(format!("/api/one/{i}"))
            .header("host", format!("localhost:{}", listen.port()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        send.ready().await.unwrap();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let v: Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["path"], format!("/api/one/{i}"));
        assert_eq!(v["x-forwarded-proto"], "https");
    }

    // HTTP/2 over TLS: ALPN picks h2; concurrent streams on one connection.
    let tls = tls_connect(listen, &certs.ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut calls = Vec::new();
    for i in 0..10 {
        let mut send = send.clone();
        calls.push(tokio::spawn(async move {
            let req = Request::post(format!("https://localhost:{}/api/two/{i}", listen.port()))
                .body(Full::new(Bytes::from(vec![b'x'; i])))
                .unwrap();
            let res = send.send_request(req).await.unwrap();
            assert_eq!(res.version(), Version::HTTP_2);
            assert_eq!(res.status(), StatusCode::OK);
            assert!(res.headers().contains_key("x-request-id"));
            let v: Value =
                serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            assert_eq!(v["path"], format!("/api/two/{i}"));
            assert_eq!(v["body_len"], i);
            assert_eq!(v["x-forwarded-proto"], "https");
            assert_eq!(
                v["x-forwarded-host"],
                format!("localhost:{}", listen.port())
            );
        }));
    }
    for c in calls {
        c.await.unwrap();
    }

    // Plain HTTP to the TLS listener gets no HTTP answer.
    let plain = support::client()
        .get(format!("http://{listen}/api/x"))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    gw.shutdown().await;
}

#[test]
fn tls_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let text = format!(
        "[gateway]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        dir.path().join("missing.pem").display(),
        certs.key.display()
    );
    let e = Config::parse(Path::new("gw.toml"), &text).unwrap_err().0;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].key, "gateway.tls.cert");
    assert_eq!((e[0].line, e[0].column), (2, 16));
    assert!(e[0].message.contains("missing.pem"), "{}", e[0].message);
    // A certificate where the key should be.
    let text = format!(
        "[gateway.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        certs.cert.display(),
        certs.cert.display()
    );
    let e = Config::parse(Path::new("gw.toml"), &text).unwrap_err().0;
    assert_eq!(e[0].key, "gateway.tls.key");
    assert_eq!(e[0].line, 3);
    // Unknown keys are rejected like everywhere else.
    let text = format!(
        "[gateway.tls]\ncert = \"{}\"\nkey = \"{}\"\nciphers = \"all\"\n",
        certs.cert.display(),
        certs.key.display()
    );
    let e = Config::parse(Path::new("gw.toml"), &text).unwrap_err().0;
    assert_eq!(e[0].key, "gateway.tls.ciphers", "{e:?}");
    // Relative paths are relative to the config file.
    let text = "[gateway.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n";
    let c = Config::parse(&dir.path().join("gw.toml"), text).unwrap();
    assert_eq!(c.gateway.tls.unwrap().cert.into_inner(), certs.cert);
    let e = Config::parse(
        Path::new("gw.toml"),
        "[[services]]\nname = \"x\"\nprotocol = \"h3\"\n",
    )
    .unwrap_err()
    .0;
    assert_eq!(e[0].key, "services[0].protocol", "{e:?}");
    assert_eq!(e[0].line, 3);
}

// ---------------------------------------------------------------------------
// gRPC: a tonic service with a hand-written codec (no protoc, no build.rs).

/// Messages are raw bytes: the codec copies them in and out.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// `Say` answers "hello, NAME"; `Fail` answers NOT_FOUND.
#[derive(Clone, Copy)]
struct Greeter {
    fail: bool,
}

impl tonic::server::UnaryService<Bytes> for Greeter {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, tonic::Status>>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        if self.fail {
            return std::future::ready(Err(tonic::Status::not_found("no such greeting")));
        }
        let name = String::from_utf8_lossy(req.get_ref()).into_owned();
        std::future::ready(Ok(tonic::Response::new(Bytes::from(format!(
            "hello, {name}"
        )))))
    }
}

/// A gRPC server on h2c; counts the TCP connections it accepted.
async fn grpc_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&conns);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let fail = req.uri().path() != "/test.Greeter/Say";
                        let res = tonic::server::Grpc::new(RawCodec)
                            .unary(Greeter { fail }, req)
                            .await;
                        Ok::<_, std::convert::Infallible>(res)
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(msg.len()).unwrap());
    b.put_slice(msg);
    b.freeze()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_call_keeps_its_trailers_over_an_h2c_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let (grpc, upstream_conns) = grpc_server().await;
    let body = format!(
        "[[services]]\nname = \"greeter\"\ninstances = [\"{grpc}\"]\nprotocol = \"h2c\"\n\n[[routes]]\nprefix = \"/test.Greeter\"\nservice = \"greeter\"\n"
    );
    let gw = start_gateway(&body, Some(&certs), "5s").await;
    let listen = gw.listen();
    let tls = tls_connect(listen, &certs.ca, &[b"h2"]).await;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let call = |method: &str, msg: String| {
        let mut send = send.clone();
        let req = Request::post(format!(
            "https://localhost:{}/test.Greeter/{method}",
            listen.port()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc_frame(msg.as_bytes())))
        .unwrap();
        async move {
            let res = send.send_request(req).await.unwrap();
            let (parts, body) = res.into_parts();
            let collected = body.collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            (parts, collected.to_bytes(), trailers)
        }
    };

    let mut calls = Vec::new();
    for i in 0..20 {
        calls.push(tokio::spawn(call("Say", format!("client {i}"))));
    }
    for (i, c) in calls.into_iter().enumerate() {
        let (parts, mut data, trailers) = c.await.unwrap();
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers["content-type"], "application/grpc");
        assert!(
            !parts.headers.contains_key("grpc-status"),
            "grpc-status belongs in the trailers of a successful call"
        );
        let trailers = trailers.expect("the gRPC trailers reached the client");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(data.get_u8(), 0, "uncompressed message");
        let len = data.get_u32() as usize;
        assert_eq!(&data[..len], format!("hello, client {i}").as_bytes());
    }
    // Multiplexed: one upstream connection per gateway worker at most.
    let n = upstream_conns.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&n),
        "{n} upstream connections for 20 calls"
    );

    // An error status (a trailers-only response) reaches the client too.
    let (parts, _, trailers) = call("Fail", "x".into()).await;
    assert_eq!(parts.status, StatusCode::OK);
    let status = parts
        .headers
        .get("grpc-status")
        .or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-status")))
        .expect("grpc-status present");
    assert_eq!(status, "5");
    let message = parts
        .headers
        .get("grpc-message")
        .or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-message")))
        .unwrap();
    assert_eq!(message, "no%20such%20greeting");
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// WebSocket.

async fn ws_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let text = support::metrics_page(admin).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_is_spliced_and_closed_after_the_drain_deadline() {
    let echo = ws_echo_server().await;
    let body = format!(
        "{}\n[[routes]]\nprefix = \"/ws\"\nservice = \"echo\"\nstrip_prefix = true\n",
        support::service("echo", &[echo])
    );
    let gw = start_gateway(&body, None, "1s").await;
    let (listen, admin) = (gw.listen(), gw.admin());

    let tcp = TcpStream::connect(listen).await.unwrap();
    let (mut ws, res) = tokio_tungstenite::client_async(format!("ws://{listen}/ws/chat"), tcp)
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(res.headers().contains_key("x-request-id"));
    for i in 0..5 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), format!("ping {i}"));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &[0u8, 1, 2, 255]
    );
    assert_eq!(
        metric(admin, "switchboard_gateway_upgraded_connections").await,
        1
    );
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(admin, "switchboard_gateway_upgraded_connections").await != 0 {
        assert!(
            Instant::now() < deadline,
            "the spliced connection never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(admin, "switchboard_gateway_upgrades_total").await, 1);

    // A connection still open at shutdown is cut once the drain deadline (1 s) passes.
    let tcp = TcpStream::connect(listen).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{listen}/ws/late"), tcp)
        .await
        .unwrap();
    ws.send(Message::text("still here")).await.unwrap();
    assert!(ws.next().await.unwrap().unwrap().is_text());
    let started = Instant::now();
    let shutdown = tokio::spawn(gw.shutdown());
    // During the drain the connection still works.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.send(Message::text("draining")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "draining"
    );
    // Then it is closed.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    shutdown.await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "shutdown took {took:?}"
    );
}

/// The lingering close over TLS (RFC 9112 §9.6): a client that uploads
/// 2 MB before it reads, after a head over the route's limit, completes its
/// upload (the gateway decrypts and discards it after its `413` and
/// `close_notify`), then reads the `413` and a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_uploads_before_it_reads_gets_its_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let backend = Backend::start("b1").await;
    let body = format!(
        "{}\n[[routes]]\nprefix = \"/\"\nservice = \"svc\"\nmax_body_bytes = 1000\n",
        support::service("svc", &[backend.addr])
    );
    let gw = start_gateway(&body, Some(&certs), "5s").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(8 * 1024).unwrap();
    let tcp = socket.connect(gw.listen()).await.unwrap();
    let mut tls = tls_over(tcp, &certs.ca, &[b"http/1.1"]).await;
    tls.write_all(b"POST /up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2000000\r\n\r\n")
        .await
        .unwrap();
    let bytes = vec![b'x'; 2_000_000];
    let upload = tls.write_all(&bytes);
    tokio::time::timeout(Duration::from_secs(10), upload)
        .await
        .expect("the upload stalled")
        .expect("the upload after the 413 was cut off");
    tls.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got))
        .await
        .expect("no end within 5 s")
        .expect("a clean end, not a reset");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    gw.shutdown().await;
}
