//! `switchboard bench gateway`: requests/s and latency through the gateway,
//! in one process: a hyper backend returning a small JSON body, the gateway
//! in front of it (request ids, traceparent, metrics, breakers, P2C, retries
//! all on; the access log formatted into a discarded buffer), and a closed-loop
//! load generator over keep-alive connections.
//!
//! For the comparison with nginx and HAProxy use `bench/gateway.sh`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use switchboard_gateway::{Config, GatewayBuilder, discovery};

/// Arguments of `switchboard bench gateway`.
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Seconds of measured load (after one second of warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent keep-alive client connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Gateway worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

const BODY: &str = r#"{"id":42,"name":"Ada Lovelace","email":"ada@example.com"}"#;

async fn backend() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        let mut res = Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
                        res.headers_mut()
                            .insert("content-type", "application/json".parse().expect("static"));
                        Ok::<_, Infallible>(res)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One closed-loop client: sends GETs until `until`, returns latencies in µs.
async fn client(addr: SocketAddr, warm_until: Instant, until: Instant) -> anyhow::Result<Vec<u32>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut lat = Vec::with_capacity(64 * 1024);
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(lat);
        }
        let req = Request::get("/users/42")
            .header("host", "bench")
            .body(Empty::<Bytes>::new())?;
        tx.ready().await?;
        let res = tx.send_request(req).await?;
        anyhow::ensure!(res.status() == 200, "gateway answered {}", res.status());
        res.into_body().collect().await?;
        if now >= warm_until {
            lat.push(u32::try_from(now.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// Runs the benchmark and prints the figures.
pub fn run(args: &GatewayArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(bench(args))
}

async fn bench(args: &GatewayArgs) -> anyhow::Result<()> {
    let upstream = backend().await?;
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = {}\n\n\
         [[services]]\nname = \"backend\"\ninstances = [\"{upstream}\"]\n\n\
         [[routes]]\nprefix = \"/\"\nservice = \"backend\"\n",
        args.workers
    );
    let config = Config::parse("bench.toml".as_ref(), &text)?;
    let sources = discovery::static_sources(&config);
    // Access-log events are formatted as usual, into a buffer nobody reads.
    let sink = Arc::new(switchboard_gateway::access_log::JsonLines::new());
    let drain = Arc::clone(&sink);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = drain.drain_to(&mut std::io::sink());
        }
    });
    let gw = GatewayBuilder::new(config)
        .sources(sources.receivers())
        .access_log_dispatch(tracing::Dispatch::new(sink))
        .start()
        .await?;
    let addr = gw.listen();
    let start = Instant::now();
    let warm_until = start + Duration::from_secs(1);
    let until = warm_until + Duration::from_secs(args.seconds.max(1));
    let tasks: Vec<_> = (0..args.connections.max(1))
        .map(|_| tokio::spawn(client(addr, warm_until, until)))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("client task")??);
    }
    gw.shutdown().await;
    all.sort_unstable();
    let rps = all.len() as f64 / args.seconds.max(1) as f64;
    let (p50, p99) = (percentile(&all, 0.50), percentile(&all, 0.99));
    println!(
        "gateway: {rps:.0} req/s, p50 {p50:.3} ms, p99 {p99:.3} ms ({} connections, {} workers, {} s; \
         load generator and backend share this process)",
        args.connections, args.workers, args.seconds
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "requests_per_s": rps,
                "p50_ms": p50,
                "p99_ms": p99,
                "connections": args.connections,
                "workers": args.workers,
                "seconds": args.seconds,
            })
        );
    }
    Ok(())
}
