//! `switchboard bench chaos gateway|bus|registry|shop`: fault injection under load
//! (issue 8). Each scenario holds a closed-loop load, injects its faults on a
//! schedule, counts what was lost and prints one line per phase (and with
//! `--json` one JSON object as the last line). It exits non-zero when
//! anything was lost, so `bench/chaos.sh` can gate on it.
//!
//! - `gateway`: upstreams are killed (listener and every connection closed at
//!   once, as the kernel does on kill -9) and restarted on the same port, next
//!   to one that accepts and never answers, one that answers too slowly, one
//!   that resets after reading the request and (last phase) one that resets
//!   in the middle of its response body. Idempotent GETs must not fail while
//!   a healthy instance remains.
//! - `bus`: a private `redis-server` with AOF `appendfsync always` is killed
//!   with SIGKILL and restarted under publish and consume load, consumers are
//!   killed and restarted, and a poison event is published: every
//!   acknowledged publish must be handled, side effects (recorded through
//!   an idempotency key) exactly once, and the poison event dead-lettered.
//! - `registry` ([`registry`]): two registry processes on one Redis, 10,000
//!   flapping instances, Redis and each registry killed in turn: both views
//!   must converge to the ground truth, no instance stuck in a wrong state.
//! - `shop` ([`shop`]): the demo shop under mixed traffic while service
//!   instances and redis-server are killed: every accepted order must end
//!   `confirmed` or `cancelled`, stock and payments must add up.

mod registry;
mod shop;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use switchboard_gateway::{Config, GatewayBuilder, discovery};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Arguments of `switchboard bench chaos`.
#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, clap::Subcommand)]
enum Scenario {
    /// Upstreams killed and restarted, black-holed, slow and resetting, under GET load.
    Gateway(GatewayChaos),
    /// redis-server kill -9 and restart (AOF always), consumers killed, a poison event.
    Bus(BusChaos),
    /// Two registries sharing one Redis, flapping instances, Redis and registries killed.
    Registry(registry::RegistryChaos),
    /// The demo shop under mixed traffic, instance and redis-server kills: every order ends.
    Shop(shop::ShopChaos),
}

/// `switchboard bench chaos gateway`.
#[derive(Debug, clap::Args)]
pub struct GatewayChaos {
    /// Seconds of each phase (baseline, faults, mid-body resets).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The route's `retry.attempts`: it must exceed the number of instances
    /// that can fail at once (here up to 4: black hole, slow, reset, and the
    /// instance being killed).
    #[arg(long, default_value_t = 5)]
    attempts: u32,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// `switchboard bench chaos bus`.
#[derive(Debug, clap::Args)]
pub struct BusChaos {
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Events published per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Consumers in the group.
    #[arg(long, default_value_t = 3)]
    consumers: usize,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// Runs one chaos scenario.
pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.scenario {
        Scenario::Gateway(a) => rt.block_on(gateway(&a)),
        Scenario::Bus(a) => rt.block_on(bus(&a)),
        Scenario::Registry(a) => rt.block_on(registry::run(&a)),
        Scenario::Shop(a) => rt.block_on(shop::run(&a)),
    }
}

// ---------------------------------------------------------------- gateway --

/// How a test upstream behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Answers 200 with a small body.
    Healthy,
    /// Accepts connections, reads, never answers.
    Blackhole,
    /// Answers after this long.
    Slow(Duration),
    /// Reads the request head, then closes the connection.
    ResetBeforeHead,
    /// Sends the head and half the body, then closes the connection.
    ResetMidBody,
}

struct Upstream {
    addr: SocketAddr,
    kind: Kind,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Upstream {
    async fn start(kind: Kind, addr: SocketAddr) -> anyhow::Result<Upstream> {
        // The port may linger for a moment after a kill: retry the bind.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(%addr, error = %e, "rebinding");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
            }
        };
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                conns.spawn(serve_upstream(kind, stream));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Upstream {
            addr,
            kind,
            task: Some(task),
        })
    }

    /// Closes the listener and every connection at once.
    async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        *self = Upstream::start(self.kind, self.addr).await?;
        Ok(())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

const PAYLOAD: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

async fn serve_upstream(kind: Kind, mut stream: tokio::net::TcpStream) {
    match kind {
        Kind::Blackhole => {
            let mut buf = [0u8; 4096];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        Kind::ResetBeforeHead => {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            // Dropping the stream with unread data makes the kernel send RST.
        }
        Kind::Healthy | Kind::Slow(_) | Kind::ResetMidBody => {
            let svc = hyper::service::service_fn(
                move |_req: Request<hyper::body::Incoming>| async move {
                    if let Kind::Slow(d) = kind {
                        tokio::time::sleep(d).await;
                    }
                    if kind == Kind::ResetMidBody {
                        let half = Bytes::from_static(&PAYLOAD[..PAYLOAD.len() / 2]);
                        let frames = half_then_reset(half);
                        let mut res = Response::new(StreamBody::new(frames).boxed());
                        res.headers_mut()
                            .insert("content-length", PAYLOAD.len().into());
                        return Ok::<_, Infallible>(res);
                    }
                    Ok(Response::new(
                        Full::new(Bytes::from_static(PAYLOAD))
                            .map_err(|never| match never {})
                            .boxed(),
                    ))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    }
}

/// A body stream that yields `half`, waits until it is on the wire, then
/// fails (the connection breaks mid-body, after the head went out).
fn half_then_reset(
    half: Bytes,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send {
    futures::stream::unfold(0u8, move |step| {
        let half = half.clone();
        async move {
            match step {
                0 => Some((Ok(Frame::data(half)), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((Err(std::io::Error::other("reset mid-body on purpose")), 2))
                }
                _ => None,
            }
        }
    })
}

/// What one phase of load measured.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// Latencies of successful requests, microseconds.
    micros: Vec<u32>,
    /// The first few failures, for the report.
    examples: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.micros.extend(other.micros);
        for e in other.examples {
            if self.examples.len() < 5 {
                self.examples.push(e);
            }
        }
    }

    fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        self.micros.sort_unstable();
        let i = ((self.micros.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.micros[i]) / 1000.0
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// One closed-loop client: GETs until `until`.
async fn get_loop(client: HttpClient, url: hyper::Uri, until: Instant) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < until {
        let start = Instant::now();
        let outcome = async {
            let res = client
                .get(url.clone())
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body after {status}: {e}"))?
                .to_bytes();
            if status != 200 || body.as_ref() != PAYLOAD {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                t.ok += 1;
                t.micros
                    .push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            Err(e) => {
                t.failed += 1;
                if t.examples.len() < 5 {
                    t.examples.push(e);
                }
            }
        }
    }
    t
}

async fn load(gw: SocketAddr, concurrency: usize, seconds: u64) -> anyhow::Result<Tally> {
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(concurrency)
            .build_http();
    let url: hyper::Uri = format!("http://{gw}/item").parse()?;
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        set.spawn(get_loop(client.clone(), url.clone(), until));
    }
    let mut total = Tally::default();
    while let Some(t) = set.join_next().await {
        total.merge(t?);
    }
    Ok(total)
}

fn instances(ups: &[&Upstream]) -> Vec<switchboard_gateway::Instance> {
    ups.iter()
        .map(|u| switchboard_gateway::Instance {
            id: u.addr.to_string(),
            addr: u.addr,
            status: switchboard_gateway::InstanceStatus::Passing,
            version: None,
        })
        .collect()
}

async fn gateway(args: &GatewayChaos) -> anyhow::Result<()> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let mut a = Upstream::start(Kind::Healthy, any).await?;
    let mut b = Upstream::start(Kind::Healthy, any).await?;
    let c = Upstream::start(Kind::Healthy, any).await?;
    let blackhole = Upstream::start(Kind::Blackhole, any).await?;
    let slow = Upstream::start(Kind::Slow(Duration::from_secs(2)), any).await?;
    let reset = Upstream::start(Kind::ResetBeforeHead, any).await?;
    let mid_body = Upstream::start(Kind::ResetMidBody, any).await?;
    let text = format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 1
access_log = false

[[services]]
name = "s"
instances = ["{}", "{}", "{}"]

[[routes]]
prefix = "/"
service = "s"
timeout = "5s"
attempt_timeout = "250ms"
connect_timeout = "100ms"
retry = {{ attempts = {}, budget_percent = 50, backoff = "2ms", max_backoff = "20ms" }}
breaker = {{ failure_rate = 0.5, min_calls = 10, window = "5s", open_for = "1s" }}
"#,
        a.addr, b.addr, c.addr, args.attempts
    );
    let config = Config::parse("chaos.toml".as_ref(), &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sources = discovery::static_sources(&config);
    let opened = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let (o, c2) = (opened.clone(), closed.clone());
    let running = GatewayBuilder::new(config)
        .sources(sources.receivers())
        .on_breaker_change(Arc::new(move |_svc: &str, ev| {
            use switchboard_resilience::breaker::State;
            match ev.state {
                State::Open => o.fetch_add(1, Ordering::Relaxed),
                State::Closed => c2.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
        }))
        .start()
        .await?;
    let gw = running.listen();
    let mut report = serde_json::Map::new();
    let mut lost = 0;

    // Phase 1: three healthy instances, no faults.
    let mut base = load(gw, args.concurrency, args.seconds).await?;
    print_phase("baseline: 3 healthy instances", &mut base, "");
    report.insert(
        "baseline".into(),
        serde_json::Value::Object(phase_json(&mut base)),
    );
    lost += base.failed;

    // Phase 2: add a black hole, a slow and a resetting instance; kill and
    // restart a and b in turn so that at least one healthy instance stays.
    anyhow::ensure!(sources.update("s", instances(&[&a, &b, &c, &blackhole, &slow, &reset])));
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU64::new(0));
    let killer = {
        let (stop, kills) = (stop.clone(), kills.clone());
        tokio::spawn(async move {
            let mut turn = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let victim = if turn.is_multiple_of(2) {
                    &mut a
                } else {
                    &mut b
                };
                victim.kill().await;
                kills.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(300)).await;
                victim.restart().await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                turn += 1;
            }
            anyhow::Ok((a, b))
        })
    };
    let opened_before = opened.load(Ordering::Relaxed);
    let mut faults = load(gw, args.concurrency, args.seconds).await?;
    stop.store(true, Ordering::Relaxed);
    let (a, b) = killer.await??;
    let kills = kills.load(Ordering::Relaxed);
    let opens = opened.load(Ordering::Relaxed) - opened_before;
    print_phase(
        "faults: kill -9/restart every 0.5 s, black hole, 2 s slow, reset before head",
        &mut faults,
        &format!("{kills} kills, {opens} breaker opens"),
    );
    let mut j = phase_json(&mut faults);
    j.insert("kills".into(), kills.into());
    j.insert("breaker_opens".into(), opens.into());
    report.insert("faults".into(), serde_json::Value::Object(j));
    lost += faults.failed;

    // Phase 3: an instance that breaks its response body half way. Those
    // responses have started: the gateway cannot retry them, only stop
    // choosing the instance.
    anyhow::ensure!(sources.update("s", instances(&[&a, &b, &c, &mid_body])));
    let opened_before = opened.load(Ordering::Relaxed);
    let mut mid = load(gw, args.concurrency, args.seconds).await?;
    let opens = opened.load(Ordering::Relaxed) - opened_before;
    print_phase(
        "mid-body resets: 3 healthy + 1 resetting mid-body",
        &mut mid,
        &format!("{opens} breaker opens"),
    );
    let mut j = phase_json(&mut mid);
    j.insert("breaker_opens".into(), opens.into());
    report.insert("mid_body_reset".into(), serde_json::Value::Object(j));

    running.shutdown().await;
    report.insert("lost_idempotent_requests".into(), lost.into());
    report.insert(
        "breaker_closes".into(),
        closed.load(Ordering::Relaxed).into(),
    );
    println!("gateway chaos: {lost} idempotent GETs failed in the baseline and fault phases");
    if args.json {
        println!("{}", serde_json::Value::Object(report));
    }
    if lost > 0 {
        bail!("{lost} idempotent requests failed");
    }
    Ok(())
}

fn print_phase(name: &str, t: &mut Tally, extra: &str) {
    let (p50, p99) = (t.percentile_ms(0.5), t.percentile_ms(0.99));
    println!(
        "{name}: {} ok, {} failed, p50 {p50:.2} ms, p99 {p99:.2} ms {extra}",
        t.ok, t.failed
    );
    for e in &t.examples {
        println!("  failure: {e}");
    }
}

fn phase_json(t: &mut Tally) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("ok".into(), t.ok.into());
    m.insert("failed".into(), t.failed.into());
    m.insert("p50_ms".into(), t.percentile_ms(0.5).into());
    m.insert("p99_ms".into(), t.percentile_ms(0.99).into());
    m
}

// -------------------------------------------------------------------- bus --

/// A private redis-server with AOF `appendfsync always`, killed with SIGKILL
/// and restarted on the same port and data directory.
struct Redis {
    bin: String,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Redis {
    async fn start(bin: &str) -> anyhow::Result<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("switchboard-chaos-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut r = Redis {
            bin: bin.to_owned(),
            port,
            dir,
            child: None,
        };
        r.spawn().await?;
        Ok(r)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = std::process::Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.bin))?;
        self.child = Some(child);
        // Ready when it accepts connections.
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(Instant::now() < until, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Per event id: how many times the side effect ran.
type Effects = Arc<Mutex<HashMap<String, u32>>>;

async fn consumer(
    bus: &switchboard_bus::Bus,
    inbox: &Arc<switchboard_bus::middleware::idempotency::RedisInbox>,
    effects: &Effects,
    name: &str,
) -> anyhow::Result<switchboard_bus::Subscription> {
    use switchboard_bus::middleware::idempotency::Idempotent;
    use switchboard_bus::{Event, HandlerError, RetryBackoff, SubscribeOptions};
    let effects = Arc::clone(effects);
    let handler = move |event: Event| {
        let effects = Arc::clone(&effects);
        async move {
            if event.data_json().is_some_and(|d| d.contains("poison")) {
                return Err(HandlerError::from("poison event: cannot be handled"));
            }
            *effects
                .lock()
                .map_err(|_| HandlerError::from("poisoned lock"))?
                .entry(event.id().to_owned())
                .or_default() += 1;
            Ok::<_, HandlerError>(())
        }
    };
    let handler = Idempotent::new(handler, Arc::clone(inbox)).lease(Duration::from_secs(3));
    let opts = SubscribeOptions::default()
        .consumer_name(name)
        .ack_wait(Duration::from_secs(3))
        .max_deliveries(4)
        .backoff(RetryBackoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
            2.0,
        )?)
        .dead_letter_topic("chaos.dlq");
    Ok(bus.subscribe("chaos.order", "chaos", handler, opts).await?)
}

#[allow(clippy::too_many_lines)]
async fn bus(args: &BusChaos) -> anyhow::Result<()> {
    use switchboard_bus::middleware::idempotency::RedisInbox;
    use switchboard_bus::{Bus, Event};

    let mut redis = Redis::start(&args.redis_server).await?;
    let url = redis.url();
    let bus = Bus::open(&url).await?;
    let inbox = Arc::new(
        RedisInbox::connect(&url, "chaos")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let effects: Effects = Arc::default();
    let mut consumers = Vec::new();
    let mut next_consumer = 0;
    for _ in 0..args.consumers {
        consumers.push(consumer(&bus, &inbox, &effects, &format!("c{next_consumer}")).await?);
        next_consumer += 1;
    }

    // Publisher: one event per tick; an event counts once publish returned Ok.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let publish_errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (bus, acked, errors, stop) = (
            bus.clone(),
            acked.clone(),
            publish_errors.clone(),
            stop.clone(),
        );
        let period = Duration::from_micros(1_000_000 / args.rate.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let id = format!("e{n}");
                let poison = n == 100;
                let data = if poison {
                    serde_json::json!({"n": n, "poison": true})
                } else {
                    serde_json::json!({"n": n})
                };
                let event = Event::builder()
                    .id(&id)
                    .source("/chaos")
                    .ty("chaos.order")
                    .data(&data)
                    .build()?;
                match tokio::time::timeout(Duration::from_secs(5), bus.publish(event)).await {
                    Ok(Ok(())) if !poison => {
                        acked.lock().map_err(|_| anyhow::anyhow!("lock"))?.push(id);
                    }
                    Ok(Ok(())) => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(n)
        })
    };

    // Faults: every 2 s one consumer is killed (dropped: nothing acked) and a
    // new one started; every 5 s redis-server gets SIGKILL and is restarted
    // 1 s later.
    let start = Instant::now();
    let until = start + Duration::from_secs(args.seconds);
    let (mut consumer_kills, mut redis_kills) = (0u64, 0u64);
    let mut next_redis_kill = start + Duration::from_secs(5);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if !consumers.is_empty() {
            drop(consumers.remove(0));
            consumer_kills += 1;
        }
        match consumer(&bus, &inbox, &effects, &format!("c{next_consumer}")).await {
            Ok(c) => {
                consumers.push(c);
                next_consumer += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "consumer did not start (redis down?); next round");
            }
        }
        if Instant::now() >= next_redis_kill {
            redis.kill();
            redis_kills += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
            redis.spawn().await?;
            next_redis_kill = Instant::now() + Duration::from_secs(5);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let published = publisher.await??;
    while consumers.len() < args.consumers {
        consumers.push(consumer(&bus, &inbox, &effects, &format!("c{next_consumer}")).await?);
        next_consumer += 1;
    }

    // Drain: wait until every acknowledged event was handled (or 60 s).
    let acked: Vec<String> = acked.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    let drain_until = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing: Vec<String> = {
            let e = effects.lock().map_err(|_| anyhow::anyhow!("lock"))?;
            acked
                .iter()
                .filter(|id| !e.contains_key(*id))
                .cloned()
                .collect()
        };
        if missing.is_empty() || Instant::now() >= drain_until {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drained_after = start.elapsed();
    // The poison event: in the dead-letter topic after max_deliveries.
    let mut poison_dead_lettered = false;
    let dlq_until = Instant::now() + Duration::from_secs(30);
    while !poison_dead_lettered && Instant::now() < dlq_until {
        poison_dead_lettered = bus
            .peek("chaos.dlq", 1000)
            .await
            .unwrap_or_default()
            .iter()
            .any(|e| e.as_ref().is_ok_and(|e| e.id() == "e100"));
        if !poison_dead_lettered {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for c in consumers {
        c.shutdown().await;
    }
    let effects = effects.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    let duplicates: u64 = effects
        .values()
        .map(|&n| u64::from(n.saturating_sub(1)))
        .sum();
    let poison_ran = effects.contains_key("e100");
    let by_count: BTreeMap<u32, usize> = effects.values().fold(BTreeMap::new(), |mut m, &n| {
        *m.entry(n).or_default() += 1;
        m
    });
    println!(
        "bus chaos: {published} published over {} s ({} acked, {} publish errors while redis was down), \
         {redis_kills} redis-server SIGKILLs, {consumer_kills} consumer kills; \
         {} acked events not handled, {duplicates} duplicate side effects (runs per event: {by_count:?}), \
         poison event dead-lettered: {poison_dead_lettered}; all handled after {:.1} s",
        args.seconds,
        acked.len(),
        publish_errors.load(Ordering::Relaxed),
        missing.len(),
        drained_after.as_secs_f64()
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "published": published,
                "acked": acked.len(),
                "publish_errors": publish_errors.load(Ordering::Relaxed),
                "redis_kills": redis_kills,
                "consumer_kills": consumer_kills,
                "lost": missing.len(),
                "duplicate_side_effects": duplicates,
                "poison_dead_lettered": poison_dead_lettered,
            })
        );
    }
    if !missing.is_empty() || duplicates > 0 || !poison_dead_lettered || poison_ran {
        bail!(
            "lost {} acked events (first: {:?}), {duplicates} duplicates, poison dead-lettered: {poison_dead_lettered}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
    }
    Ok(())
}
