//! `switchboard bench bridge`: the HTTP event bridge end to end.
//!
//! One process runs the bridge (its admin router on 127.0.0.1:0, as on the
//! admin listener), a local subscriber (hyper, answers 204) and the load:
//! `--connections` keep-alive HTTP/1.1 connections POST `--events` events to
//! `/v1/events` (`--batch 1`: binary mode, one event per request; more:
//! batch mode), and a push subscription delivers each event to the subscriber
//! as its own POST. The clock runs from the first publish until every event
//! was pushed, answered and acked on the bus.
//!
//! `--json` prints one JSON object as the last line with `events_per_s` (end
//! to end), `publish_events_per_s` (until the last 202), `pushed`,
//! `cpu_us_per_event` (this process's user + system CPU over the measured
//! span, per event: the figure to compare on a busy machine, since the
//! machine's other load is not in it) and `subscriber_connections` (TCP
//! connections the pushes opened to the subscriber; with pooled keep-alive
//! connections, at most about `--in-flight`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use switchboard_bus::Bus;
use switchboard_gateway::bridge::config::SubscriptionSpec;
use switchboard_gateway::bridge::{Bridge, BridgeOptions, sources_resolver};

/// Arguments of `switchboard bench bridge`.
#[derive(Debug, clap::Args)]
pub struct BridgeArgs {
    /// Bus URL (memory://, redis://HOST:PORT, nats://HOST:PORT).
    #[arg(long, default_value = "memory://bench-bridge")]
    bus: String,
    /// Events to publish and push.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Events per publish request: 1 sends binary mode, more sends batch mode.
    #[arg(long, default_value_t = 1)]
    batch: u64,
    /// Concurrent keep-alive publishing connections.
    #[arg(long, default_value_t = 16)]
    connections: u64,
    /// The push subscription's max in-flight deliveries.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Payload size in bytes (a JSON string of that length).
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print a JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark.
pub fn run(args: &BridgeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(bench(args))
}

/// A subscriber that answers 204 to everything and counts requests and connections.
async fn subscriber(count: Arc<AtomicU64>, conns: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            conns.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let count = Arc::clone(&count);
                    async move {
                        let _ = req.into_body().collect().await;
                        count.fetch_add(1, Ordering::Relaxed);
                        let mut res = hyper::Response::new(Full::new(Bytes::new()));
                        *res.status_mut() = hyper::StatusCode::NO_CONTENT;
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn request(
    admin: SocketAddr,
    topic: &str,
    payload: &str,
    first: u64,
    n: u64,
    run: u128,
) -> hyper::Request<Full<Bytes>> {
    let b = hyper::Request::post("/v1/events").header("host", admin.to_string());
    if n == 1 {
        b.header("ce-specversion", "1.0")
            .header("ce-id", format!("{run}-{first}"))
            .header("ce-source", "/bench")
            .header("ce-type", topic)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!("\"{payload}\""))))
            .expect("valid request")
    } else {
        let mut body = String::with_capacity((payload.len() + 120) * n as usize);
        body.push('[');
        for i in first..first + n {
            if i > first {
                body.push(',');
            }
            body.push_str(&format!(
                r#"{{"specversion":"1.0","id":"{run}-{i}","source":"/bench","type":"{topic}","data":"{payload}"}}"#
            ));
        }
        body.push(']');
        b.header("content-type", "application/cloudevents-batch+json")
            .body(Full::new(Bytes::from(body)))
            .expect("valid request")
    }
}

async fn bench(args: &BridgeArgs) -> anyhow::Result<()> {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let topic = format!("bench.bridge.{run}");
    let bus = Bus::open(&args.bus)
        .await
        .with_context(|| format!("open the bus {}", args.bus))?;
    let pushed = Arc::new(AtomicU64::new(0));
    let sub_conns = Arc::new(AtomicU64::new(0));
    let sub_addr = subscriber(Arc::clone(&pushed), Arc::clone(&sub_conns)).await?;

    let mut opts = BridgeOptions::new(bus, sources_resolver(Default::default()));
    opts.max_body_bytes = 64 << 20;
    let spec: SubscriptionSpec = serde_json::from_value(serde_json::json!({
        "name": "bench",
        "topic": topic,
        "url": format!("http://{sub_addr}/events"),
        "max_in_flight": args.in_flight,
        "ack_timeout": "10s",
    }))?;
    let sub = spec
        .resolve(None)
        .map_err(|e| anyhow::anyhow!("bench subscription: {e:?}"))?;
    opts.subscriptions = vec![sub];
    let bridge = Bridge::start(opts).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = listener.local_addr()?;
    let app = bridge.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let payload = "x".repeat(args.payload);
    let batch = args.batch.max(1);
    let requests = args.events.div_ceil(batch);
    let next = Arc::new(AtomicU64::new(0));
    let cpu_before = super::process_cpu_s();
    let started = Instant::now();
    let mut publishers = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (next, topic, payload) = (Arc::clone(&next), topic.clone(), payload.clone());
        let events = args.events;
        publishers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(admin).await?;
            stream.set_nodelay(true)?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= requests {
                    return Ok::<_, anyhow::Error>(());
                }
                let first = k * batch;
                let n = batch.min(events - first);
                send.ready().await?;
                let res = send
                    .send_request(request(admin, &topic, &payload, first, n, run))
                    .await?;
                let status = res.status();
                let body = res.into_body().collect().await?.to_bytes();
                if status != hyper::StatusCode::ACCEPTED {
                    bail!(
                        "publish answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
        }));
    }
    for p in publishers {
        p.await??;
    }
    let published_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let acked = loop {
        let subs = bridge.subscriptions().await;
        let acked = subs
            .first()
            .and_then(|s| s["stats"]["acked"].as_u64())
            .unwrap_or(0);
        if acked >= args.events {
            break acked;
        }
        if Instant::now() > deadline {
            bail!(
                "only {acked} of {} events acked within 10 minutes",
                args.events
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let took = started.elapsed();
    let cpu_s = super::process_cpu_s().zip(cpu_before).map(|(a, b)| a - b);
    let cpu_us_per_event = cpu_s.map(|c| (c * 1e6 / args.events as f64 * 100.0).round() / 100.0);
    let sub_conns = sub_conns.load(Ordering::Relaxed);
    let events_per_s = args.events as f64 / took.as_secs_f64();
    let publish_per_s = args.events as f64 / published_in.as_secs_f64();
    let pushed = pushed.load(Ordering::Relaxed);
    println!(
        "bridge on {}: {} events ({} per request, {} connections, {} B payload): \
         published in {:.2}s ({:.0} events/s), pushed and acked in {:.2}s: {:.0} events/s end to end \
         ({pushed} pushes, {acked} acks, {sub_conns} subscriber connections; \
         this process's CPU {}us per event)",
        args.bus,
        args.events,
        batch,
        args.connections,
        args.payload,
        published_in.as_secs_f64(),
        publish_per_s,
        took.as_secs_f64(),
        events_per_s,
        cpu_us_per_event.map_or_else(|| "?".to_owned(), |c| format!("{c:.2}")),
    );
    bridge.delete("bench").await;
    let _ = bridge.bus().delete_group(&topic, "bench").await;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bus": args.bus,
                "events": args.events,
                "batch": batch,
                "connections": args.connections,
                "events_per_s": events_per_s.round(),
                "publish_events_per_s": publish_per_s.round(),
                "pushed": pushed,
                "acked": acked,
                "cpu_s": cpu_s,
                "cpu_us_per_event": cpu_us_per_event,
                "subscriber_connections": sub_conns,
            })
        );
    }
    bridge.shutdown().await;
    Ok(())
}
