//! `switchboard bench chaos registry`: two `switchboard registry` processes
//! share one private `redis-server` (AOF `appendfsync always`); N instances
//! register over HTTP and flap while Redis and each registry process in turn
//! get SIGKILL and a restart. Then every instance settles in a final state
//! and the driver measures how long both registries' views take to equal its
//! ground truth; anything still wrong after `--bound` seconds is stuck.
//!
//! - TTL instances (all but `--active`) heartbeat every TTL/3 while "alive"
//!   and stop while "dead"; now and then one deregisters and comes back,
//!   sometimes on another port (a new registration). Each instance talks to
//!   one registry and fails over to the other when it cannot connect.
//! - `--active` instances have an HTTP check against one in-process stub
//!   server whose answer for each instance (200 or 503) flaps.
//! - Ground truth: the last acknowledged operation. An operation that failed
//!   without a definite answer (timeout, 503 while Redis was down, a killed
//!   registry) leaves the instance "dirty"; when the final states are fixed,
//!   only dirty or changed instances get one more acknowledged request (a PUT
//!   of the same body or a DELETE), as a client that saw an error would retry.
//! - Expected: an alive (or up) instance `passing` on its port, a dead (or
//!   down) one `critical`, a deregistered one absent, in both views.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use switchboard_registry::client::ClientError;
use switchboard_registry::{CheckSpec, Registration, RegistryClient, ServiceView, Status};
use tokio::sync::{Semaphore, watch};

use super::Redis;

/// `switchboard bench chaos registry`.
#[derive(Debug, clap::Args)]
pub struct RegistryChaos {
    /// Instances registered (TTL heartbeats, except `--active` of them).
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Services the instances are spread over (instance n is in service n mod this).
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Instances with an active HTTP check (interval 1 s, thresholds 2/2) instead of a TTL.
    #[arg(long, default_value_t = 200)]
    active: usize,
    /// TTL of the heartbeat instances; they heartbeat every TTL/3 while alive.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Seconds of flapping with faults.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// A fault every this many seconds, in turn: redis-server SIGKILL, registry A SIGKILL,
    /// registry B SIGKILL.
    #[arg(long, default_value_t = 10)]
    fault_every: u64,
    /// How long a killed process stays down before it is restarted.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    down: Duration,
    /// Restart redis-server with an empty data directory (as if it had no
    /// persistence) instead of from its AOF.
    #[arg(long)]
    redis_loses_data: bool,
    /// Seconds after the final states are fixed within which both views must equal the truth.
    #[arg(long, default_value_t = 60)]
    bound: u64,
    /// Seconds both views must stay equal to the truth to count as converged.
    #[arg(long, default_value_t = 3)]
    stable: u64,
    /// Requests in flight at most (registrations, heartbeats, deregistrations).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

// ------------------------------------------------------------ processes --

/// One `switchboard registry` child process on a fixed port.
struct RegistryProc {
    name: &'static str,
    port: u16,
    store: String,
    log: PathBuf,
    child: Option<std::process::Child>,
}

impl RegistryProc {
    async fn start(name: &'static str, store: &str, log: PathBuf) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut p = RegistryProc {
            name,
            port,
            store: store.to_owned(),
            log,
            child: None,
        };
        p.spawn().await?;
        Ok(p)
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating the switchboard binary")?;
        let client = RegistryClient::new(&self.base())?;
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .with_context(|| format!("opening {}", self.log.display()))?;
            let mut child = std::process::Command::new(&exe)
                .args(["registry", "--listen", &format!("127.0.0.1:{}", self.port)])
                .args(["--store", &self.store])
                .env(
                    "SWITCHBOARD_LOG",
                    std::env::var("CHAOS_REGISTRY_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .env_remove("SWITCHBOARD_REGISTRY_TOKEN")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {} registry", exe.display()))?;
            // Ready when it answers; if it exits (port still held), start it again.
            loop {
                if client.services().await.is_ok() {
                    self.child = Some(child);
                    return Ok(());
                }
                if child.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > until {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "registry {} did not start on port {} (see {})",
                        self.name,
                        self.port,
                        self.log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::ensure!(
                Instant::now() < until,
                "registry {} kept exiting (see {})",
                self.name,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills redis-server; with `lose_data` its data directory is emptied, so
/// the restart comes up empty as a server without persistence would.
async fn restart_redis(redis: &mut Redis, down: Duration, lose_data: bool) -> anyhow::Result<()> {
    redis.kill();
    if lose_data {
        std::fs::remove_dir_all(&redis.dir)?;
        std::fs::create_dir_all(&redis.dir)?;
    }
    tokio::time::sleep(down).await;
    redis.spawn().await
}

// ---------------------------------------------------------------- model --

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Register,
    Flap,
    Final,
    Stop,
}

/// What one instance should look like in both views once things settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    Absent,
    Present { port: u16, status: Status },
}

#[derive(Default)]
struct Stats {
    registered: AtomicU64,
    heartbeats: AtomicU64,
    heartbeat_failures: AtomicU64,
    /// A heartbeat answered 404 for an acknowledged registration.
    heartbeat_not_found: AtomicU64,
    registrations: AtomicU64,
    deregistrations: AtomicU64,
    write_failures: AtomicU64,
    /// Requests that could not connect to their registry and went to the other one.
    failovers: AtomicU64,
    transitions: AtomicU64,
    /// Requests sent to fix the final states.
    fixes: AtomicU64,
    /// Answers no client should get (4xx other than 404): the driver or the registry is wrong.
    rejected: AtomicU64,
}

struct Shared {
    clients: [RegistryClient; 2],
    sem: Semaphore,
    phase: watch::Receiver<Phase>,
    ttl: Duration,
    services: usize,
    stub_port: u16,
    /// Per active instance: whether its health endpoint answers 200.
    up: Arc<Vec<AtomicBool>>,
    stats: Stats,
    truth: Mutex<Vec<Option<Expected>>>,
    fixed: AtomicUsize,
    examples: Mutex<Vec<String>>,
    /// Per instance: milliseconds after `epoch` since which it is registered,
    /// acknowledged and not heartbeating (`u64::MAX`: alive, gone or unknown).
    dead_since: Vec<AtomicU64>,
    epoch: Instant,
}

enum Outcome {
    Ok,
    NotFound,
    /// No definite answer: the operation may or may not have happened.
    Unknown,
}

impl Shared {
    fn service(&self, n: usize) -> String {
        format!("chaos-s{}", n % self.services)
    }

    fn note(&self, what: String) {
        let mut e = self.examples.lock().expect("examples lock");
        if e.len() < 10 {
            e.push(what);
        }
    }

    /// Sends one request to the instance's registry, or to the other one when
    /// it cannot connect; at most `concurrency` requests are in flight.
    async fn call<T, F, Fut>(&self, prefer: usize, op: F) -> Outcome
    where
        F: Fn(RegistryClient) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let _permit = self.sem.acquire().await.expect("semaphore open");
        let mut result = op(self.clients[prefer].clone()).await;
        if matches!(result, Err(ClientError::Transport(ref e)) if e.is_connect() || e.is_request())
        {
            self.stats.failovers.fetch_add(1, Ordering::Relaxed);
            result = op(self.clients[1 - prefer].clone()).await;
        }
        match result {
            Ok(_) => Outcome::Ok,
            Err(ClientError::Status { status: 404, .. }) => Outcome::NotFound,
            Err(ClientError::Status { status, detail }) if (400..500).contains(&status) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                self.note(format!("rejected {status}: {detail}"));
                Outcome::Unknown
            }
            Err(_) => Outcome::Unknown,
        }
    }

    fn mark(&self, n: usize, dead_at: Option<Instant>) {
        let ms = dead_at.map_or(u64::MAX, |t| {
            u64::try_from(t.duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
        });
        self.dead_since[n].store(ms, Ordering::Relaxed);
    }

    fn report(&self, n: usize, expected: Expected) {
        self.truth.lock().expect("truth lock")[n] = Some(expected);
        self.fixed.fetch_add(1, Ordering::Relaxed);
    }
}

fn random_port() -> u16 {
    rand::random_range(1024..=65000)
}

fn secs(lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rand::random_range(lo..hi))
}

/// Waits until `at` or a phase change, whichever comes first; returns the phase.
async fn wait(phase: &mut watch::Receiver<Phase>, at: Instant) -> Phase {
    let _ = tokio::time::timeout_at(at.into(), phase.changed()).await;
    *phase.borrow_and_update()
}

async fn register_until_acked(sh: &Shared, prefer: usize, svc: &str, id: &str, reg: &Registration) {
    loop {
        let outcome = sh
            .call(prefer, |c| async move { c.register(svc, id, reg).await })
            .await;
        if matches!(outcome, Outcome::Ok) {
            sh.stats.registrations.fetch_add(1, Ordering::Relaxed);
            return;
        }
        sh.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One heartbeat instance, from registration until the driver stops.
#[allow(clippy::too_many_lines)]
async fn ttl_instance(sh: Arc<Shared>, n: usize) {
    let svc = sh.service(n);
    let id = format!("i{n}");
    let prefer = n % 2;
    let mut phase = sh.phase.clone();
    let ttl = sh.ttl;
    let hb_every = ttl / 3;
    let body = |port: u16| Registration::new("127.0.0.1", port).check(CheckSpec::ttl(ttl));
    let mut port = random_port();
    register_until_acked(&sh, prefer, &svc, &id, &body(port)).await;
    sh.stats.registered.fetch_add(1, Ordering::Relaxed);
    while *phase.borrow_and_update() == Phase::Register {
        let _ = phase.changed().await;
    }

    let mut registered = true;
    let mut dirty = false;
    let mut alive = true;
    let mut dead_at: Option<Instant> = None;
    let mut next_flip = Instant::now() + secs(2.0, 30.0);
    let mut next_hb = Instant::now() + hb_every.mul_f64(rand::random::<f64>());
    let mut current = *phase.borrow();
    loop {
        let now = Instant::now();
        if current == Phase::Flap && now >= next_flip {
            sh.stats.transitions.fetch_add(1, Ordering::Relaxed);
            if !registered || dirty {
                // Come back, on another port half the time (a new registration).
                if rand::random::<bool>() {
                    port = random_port();
                }
                let outcome = sh
                    .call(prefer, |c| {
                        let (svc, id, reg) = (&svc, &id, body(port));
                        async move { c.register(svc, id, &reg).await }
                    })
                    .await;
                dirty = !matches!(outcome, Outcome::Ok);
                if dirty {
                    sh.stats.write_failures.fetch_add(1, Ordering::Relaxed);
                } else {
                    sh.stats.registrations.fetch_add(1, Ordering::Relaxed);
                    registered = true;
                    alive = true;
                    next_hb = now + hb_every;
                }
                next_flip = now + secs(5.0, 30.0);
            } else if alive && rand::random_range(0..20) == 0 {
                let outcome = sh
                    .call(prefer, |c| {
                        let (svc, id) = (&svc, &id);
                        async move { c.deregister(svc, id).await }
                    })
                    .await;
                dirty = !matches!(outcome, Outcome::Ok);
                if dirty {
                    sh.stats.write_failures.fetch_add(1, Ordering::Relaxed);
                } else {
                    sh.stats.deregistrations.fetch_add(1, Ordering::Relaxed);
                    registered = false;
                }
                next_flip = now + secs(2.0, 20.0);
            } else {
                alive = !alive;
                dead_at = (!alive).then_some(now);
                next_hb = now;
                next_flip = now
                    + if alive {
                        secs(5.0, 30.0)
                    } else {
                        secs(1.0, 2.5) * u32::try_from(ttl.as_secs().max(1)).unwrap_or(10)
                    };
            }
        }
        if current == Phase::Final {
            // Settle: 60 % alive, 30 % dead, 10 % gone; one acknowledged
            // request only where the registry's state is unknown or must change.
            let roll = rand::random_range(0..10);
            let expected = if roll == 0 {
                if registered || dirty {
                    loop {
                        sh.stats.fixes.fetch_add(1, Ordering::Relaxed);
                        let outcome = sh
                            .call(prefer, |c| {
                                let (svc, id) = (&svc, &id);
                                async move { c.deregister(svc, id).await }
                            })
                            .await;
                        if matches!(outcome, Outcome::Ok) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                registered = false;
                alive = false;
                Expected::Absent
            } else {
                alive = roll <= 6;
                if !registered || dirty {
                    sh.stats.fixes.fetch_add(1, Ordering::Relaxed);
                    register_until_acked(&sh, prefer, &svc, &id, &body(port)).await;
                    registered = true;
                }
                next_hb = Instant::now();
                Expected::Present {
                    port,
                    status: if alive {
                        Status::Passing
                    } else {
                        Status::Critical
                    },
                }
            };
            dirty = false;
            sh.report(n, expected);
            current = Phase::Stop; // marker: settled (the real phase is re-read below)
            next_flip = Instant::now() + Duration::from_secs(86_400);
        }
        if alive && registered && Instant::now() >= next_hb {
            let outcome = sh
                .call(prefer, |c| {
                    let (svc, id) = (&svc, &id);
                    async move { c.heartbeat(svc, id).await }
                })
                .await;
            sh.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
            match outcome {
                Outcome::Ok => {}
                Outcome::NotFound => {
                    // The registry forgot an acknowledged registration (or a
                    // dirty deregistration did happen): register again.
                    if dirty {
                        registered = false;
                    } else {
                        sh.stats.heartbeat_not_found.fetch_add(1, Ordering::Relaxed);
                        sh.note(format!("heartbeat of {svc}/{id} answered 404"));
                        let outcome = sh
                            .call(prefer, |c| {
                                let (svc, id, reg) = (&svc, &id, body(port));
                                async move { c.register(svc, id, &reg).await }
                            })
                            .await;
                        dirty = !matches!(outcome, Outcome::Ok);
                    }
                }
                Outcome::Unknown => {
                    sh.stats.heartbeat_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            next_hb = Instant::now() + hb_every;
        }
        let at = if alive && registered {
            next_hb.min(next_flip)
        } else {
            next_flip
        };
        let settled = current == Phase::Stop;
        sh.mark(
            n,
            dead_at.filter(|_| registered && !dirty && !alive && !settled),
        );
        let p = wait(&mut phase, at).await;
        if p == Phase::Stop {
            return;
        }
        if !settled {
            current = p;
        }
    }
}

/// One instance with an active HTTP check; only its health endpoint flaps.
async fn active_instance(sh: Arc<Shared>, n: usize, k: usize) {
    let svc = sh.service(n);
    let id = format!("i{n}");
    let reg = Registration::new("127.0.0.1", sh.stub_port).check(
        CheckSpec::http(format!("/h/{k}"))
            .interval(Duration::from_secs(1))
            .thresholds(2, 2),
    );
    register_until_acked(&sh, n % 2, &svc, &id, &reg).await;
    sh.stats.registered.fetch_add(1, Ordering::Relaxed);
    let mut phase = sh.phase.clone();
    loop {
        let now = *phase.borrow_and_update();
        match now {
            Phase::Register => {}
            Phase::Flap => {
                let now = !sh.up[k].load(Ordering::Relaxed);
                sh.up[k].store(now, Ordering::Relaxed);
                sh.stats.transitions.fetch_add(1, Ordering::Relaxed);
            }
            Phase::Final => {
                let up = rand::random_range(0..10) < 7;
                sh.up[k].store(up, Ordering::Relaxed);
                sh.report(
                    n,
                    Expected::Present {
                        port: sh.stub_port,
                        status: if up {
                            Status::Passing
                        } else {
                            Status::Critical
                        },
                    },
                );
                while *phase.borrow_and_update() != Phase::Stop {
                    if phase.changed().await.is_err() {
                        return;
                    }
                }
                return;
            }
            Phase::Stop => return,
        }
        let p = wait(&mut phase, Instant::now() + secs(3.0, 20.0)).await;
        if p == Phase::Stop {
            return;
        }
    }
}

/// The health endpoints of the active instances: `GET /h/{k}` is 200 while up, 503 while down.
async fn stub_server(up: Arc<Vec<AtomicBool>>) -> anyhow::Result<u16> {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    let app = axum::Router::new()
        .route(
            "/h/{k}",
            axum::routing::get(
                |State(up): State<Arc<Vec<AtomicBool>>>, Path(k): Path<usize>| async move {
                    if up.get(k).is_some_and(|u| u.load(Ordering::Relaxed)) {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                },
            ),
        )
        .with_state(up);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}

// ---------------------------------------------------------- verification --

/// Differences between one registry's view of every service and the truth.
async fn differences(
    client: &RegistryClient,
    services: usize,
    truth: &[Expected],
) -> anyhow::Result<Vec<String>> {
    let mut wrong = Vec::new();
    for s in 0..services {
        let svc = format!("chaos-s{s}");
        let view: ServiceView = client
            .service(&svc, None, Duration::ZERO)
            .await
            .with_context(|| format!("reading {svc} from {}", client.base_url()))?;
        let mut seen: BTreeMap<usize, (u16, Status)> = BTreeMap::new();
        for i in &view.instances {
            match i.id.strip_prefix('i').and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n < truth.len() && n % services == s => {
                    seen.insert(n, (i.port, i.status));
                }
                _ => wrong.push(format!("{svc}/{}: unknown instance", i.id)),
            }
        }
        for (n, expected) in truth.iter().enumerate().skip(s).step_by(services) {
            let got = seen.get(&n);
            match (expected, got) {
                (Expected::Absent, None) => {}
                (Expected::Absent, Some((port, status))) => {
                    wrong.push(format!(
                        "{svc}/i{n}: expected absent, seen {status} on {port}"
                    ));
                }
                (Expected::Present { port, status }, None) => {
                    wrong.push(format!("{svc}/i{n}: expected {status} on {port}, missing"));
                }
                (Expected::Present { port, status }, Some((p, st))) => {
                    if port != p || status != st {
                        wrong.push(format!(
                            "{svc}/i{n}: expected {status} on {port}, seen {st} on {p}"
                        ));
                    }
                }
            }
        }
    }
    Ok(wrong)
}

/// What the monitor saw during the flapping: TTL instances listed as
/// `passing` although they had stopped heartbeating.
#[derive(Debug, Default)]
struct Sightings {
    rounds: u64,
    /// Seen passing more than TTL + slack after the last heartbeat.
    late: u64,
    /// The longest time since the last heartbeat at which one was still seen passing.
    max_after_death: Duration,
}

/// Reads both views every 2 s until `stop`, recording dead instances seen passing.
async fn monitor(sh: Arc<Shared>, slack: Duration, stop: Arc<AtomicBool>) -> Sightings {
    let mut out = Sightings::default();
    while !stop.load(Ordering::Relaxed) {
        for client in &sh.clients {
            for s in 0..sh.services {
                let read_at = u64::try_from(sh.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                let Ok(view) = client
                    .service(&format!("chaos-s{s}"), None, Duration::ZERO)
                    .await
                else {
                    continue; // that registry is down right now
                };
                for i in view
                    .instances
                    .iter()
                    .filter(|i| i.status == Status::Passing)
                {
                    let Some(n) = i.id.strip_prefix('i').and_then(|n| n.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    let since = sh
                        .dead_since
                        .get(n)
                        .map_or(u64::MAX, |d| d.load(Ordering::Relaxed));
                    if since >= read_at {
                        continue;
                    }
                    let after = Duration::from_millis(read_at - since);
                    out.max_after_death = out.max_after_death.max(after);
                    if after > sh.ttl + slack {
                        out.late += 1;
                        sh.note(format!(
                            "chaos-s{s}/{} seen passing {:.1} s after its last heartbeat",
                            i.id,
                            after.as_secs_f64()
                        ));
                    }
                }
            }
        }
        out.rounds += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    out
}

/// Both registries' differences; a registry that cannot be read counts every instance.
async fn both(
    clients: &[RegistryClient; 2],
    services: usize,
    truth: &[Expected],
) -> [Vec<String>; 2] {
    let mut out: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for (slot, client) in out.iter_mut().zip(clients) {
        *slot = differences(client, services, truth)
            .await
            .unwrap_or_else(|e| vec![format!("{e:#}")]);
    }
    out
}

// ----------------------------------------------------------------- driver --

/// Runs the scenario.
#[allow(clippy::too_many_lines)]
pub async fn run(args: &RegistryChaos) -> anyhow::Result<()> {
    anyhow::ensure!(args.services > 0, "--services must be at least 1");
    anyhow::ensure!(
        args.active <= args.instances,
        "--active ({}) must not exceed --instances ({})",
        args.active,
        args.instances
    );
    anyhow::ensure!(
        args.ttl >= Duration::from_millis(300),
        "--ttl must be at least 300ms (heartbeats go every TTL/3)"
    );
    let mut redis = Redis::start(&args.redis_server).await?;
    let store = redis.url();
    let logs = redis.dir.with_extension("logs");
    std::fs::create_dir_all(&logs)?;
    let mut regs = [
        RegistryProc::start("A", &store, logs.join("registry-a.log")).await?,
        RegistryProc::start("B", &store, logs.join("registry-b.log")).await?,
    ];
    let clients = [
        RegistryClient::new(&regs[0].base())?,
        RegistryClient::new(&regs[1].base())?,
    ];
    let (phase_tx, phase_rx) = watch::channel(Phase::Register);
    let up: Arc<Vec<AtomicBool>> =
        Arc::new((0..args.active).map(|_| AtomicBool::new(true)).collect());
    let stub_port = stub_server(Arc::clone(&up)).await?;
    let sh = Arc::new(Shared {
        clients: clients.clone(),
        sem: Semaphore::new(args.concurrency.max(1)),
        phase: phase_rx,
        ttl: args.ttl,
        services: args.services,
        stub_port,
        up,
        stats: Stats::default(),
        truth: Mutex::new(vec![None; args.instances]),
        fixed: AtomicUsize::new(0),
        examples: Mutex::default(),
        dead_since: (0..args.instances)
            .map(|_| AtomicU64::new(u64::MAX))
            .collect(),
        epoch: Instant::now(),
    });
    let mut report = serde_json::Map::new();
    println!(
        "registry chaos: {} instances ({} with HTTP checks, the rest TTL {}) in {} services, \
         2 registry processes on one redis-server ({}), {} requests in flight at most",
        args.instances,
        args.active,
        humantime::format_duration(args.ttl),
        args.services,
        if args.redis_loses_data {
            "restarted empty"
        } else {
            "AOF appendfsync always"
        },
        args.concurrency
    );

    // Phase 1: registration.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..args.instances {
        let sh = Arc::clone(&sh);
        if n < args.active {
            tasks.spawn(active_instance(sh, n, n));
        } else {
            tasks.spawn(ttl_instance(sh, n));
        }
    }
    while sh.stats.registered.load(Ordering::Relaxed) < args.instances as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    // Both views list every instance.
    let seen_all = Instant::now();
    loop {
        let mut counts = [0usize; 2];
        for (c, client) in counts.iter_mut().zip(&clients) {
            *c = client
                .services()
                .await
                .map(|s| s.iter().map(|x| x.instances).sum())
                .unwrap_or(0);
        }
        if counts.iter().all(|&c| c == args.instances) {
            break;
        }
        anyhow::ensure!(
            seen_all.elapsed() < Duration::from_secs(60),
            "after registration the views list {counts:?} instances, not {}",
            args.instances
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rate = args.instances as f64 / took.as_secs_f64();
    println!(
        "register: {} instances over HTTP in {:.1} s ({rate:.0}/s); both views list all of them {:.2} s later",
        args.instances,
        took.as_secs_f64(),
        seen_all.elapsed().as_secs_f64()
    );
    report.insert(
        "register".into(),
        serde_json::json!({
            "instances": args.instances,
            "seconds": took.as_secs_f64(),
            "per_second": rate,
            "views_complete_after_s": seen_all.elapsed().as_secs_f64(),
        }),
    );

    // Phase 2: flapping with faults.
    phase_tx.send_replace(Phase::Flap);
    let flap_start = Instant::now();
    // A dead instance may stay passing for its TTL, plus a deadline scan (250 ms)
    // and a notification, plus an outage. The slack still allows TTL/4 (at most
    // 2 s) twice, as when each instance had a polling owner, so results stay
    // comparable with the runs in docs/RELIABILITY.md.
    let poll = (args.ttl / 4).clamp(Duration::from_millis(25), Duration::from_secs(2));
    // A Redis that lost its data is restored from the processes' views, and a
    // restored passing TTL instance gets one TTL of grace (store::redis docs).
    let grace = if args.redis_loses_data {
        args.ttl
    } else {
        Duration::ZERO
    };
    let slack = args.down + poll * 2 + Duration::from_secs(2) + grace;
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let monitor_task = tokio::spawn(monitor(Arc::clone(&sh), slack, Arc::clone(&monitor_stop)));
    let until = flap_start + Duration::from_secs(args.seconds);
    let (mut redis_kills, mut registry_kills) = (0u64, [0u64; 2]);
    let mut turn = 0usize;
    loop {
        // Fault k starts k * fault_every after the flapping began, however long
        // the previous restart took: the number of faults depends only on the arguments.
        let next = flap_start
            + Duration::from_secs(args.fault_every.max(1))
                * u32::try_from(turn + 1).unwrap_or(u32::MAX);
        if next >= until {
            tokio::time::sleep_until(until.into()).await;
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        match turn % 3 {
            0 => {
                restart_redis(&mut redis, args.down, args.redis_loses_data).await?;
                redis_kills += 1;
                println!(
                    "  {:>5.1} s: redis-server SIGKILL, restarted after {}",
                    flap_start.elapsed().as_secs_f64(),
                    humantime::format_duration(args.down)
                );
            }
            k => {
                let r = &mut regs[k - 1];
                r.kill();
                tokio::time::sleep(args.down).await;
                let t = Instant::now();
                r.spawn().await?;
                registry_kills[k - 1] += 1;
                println!(
                    "  {:>5.1} s: registry {} SIGKILL, restarted after {}, serving {:.2} s later",
                    flap_start.elapsed().as_secs_f64(),
                    r.name,
                    humantime::format_duration(args.down),
                    t.elapsed().as_secs_f64()
                );
            }
        }
        turn += 1;
    }
    monitor_stop.store(true, Ordering::Relaxed);
    let seen = monitor_task.await?;
    let st = &sh.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "flap: {} s, {} transitions, {} heartbeats ({} failed, {} answered 404), {} registrations, \
         {} deregistrations, {} writes failed, {} failovers; {} redis-server kills, registry kills A {} B {}",
        args.seconds,
        load(&st.transitions),
        load(&st.heartbeats),
        load(&st.heartbeat_failures),
        load(&st.heartbeat_not_found),
        load(&st.registrations),
        load(&st.deregistrations),
        load(&st.write_failures),
        load(&st.failovers),
        redis_kills,
        registry_kills[0],
        registry_kills[1]
    );
    println!(
        "flap monitor: {} reads of both views; a dead TTL instance was seen passing at most {:.1} s \
         after its last heartbeat (TTL {}); {} sightings later than TTL + {:.1} s",
        seen.rounds,
        seen.max_after_death.as_secs_f64(),
        humantime::format_duration(args.ttl),
        seen.late,
        slack.as_secs_f64()
    );
    report.insert(
        "flap".into(),
        serde_json::json!({
            "seconds": args.seconds,
            "transitions": load(&st.transitions),
            "heartbeats": load(&st.heartbeats),
            "heartbeat_failures": load(&st.heartbeat_failures),
            "heartbeat_not_found": load(&st.heartbeat_not_found),
            "registrations": load(&st.registrations),
            "deregistrations": load(&st.deregistrations),
            "write_failures": load(&st.write_failures),
            "failovers": load(&st.failovers),
            "redis_kills": redis_kills,
            "registry_kills": registry_kills.iter().sum::<u64>(),
            "monitor_rounds": seen.rounds,
            "dead_seen_passing_max_s": seen.max_after_death.as_secs_f64(),
            "dead_seen_passing_late": seen.late,
        }),
    );

    // Phase 3: final states fixed.
    let fix_start = Instant::now();
    phase_tx.send_replace(Phase::Final);
    while sh.fixed.load(Ordering::Relaxed) < args.instances {
        anyhow::ensure!(
            fix_start.elapsed() < Duration::from_secs(120),
            "only {} of {} instances settled within 120 s",
            sh.fixed.load(Ordering::Relaxed),
            args.instances
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled = Instant::now();
    let truth: Vec<Expected> = sh
        .truth
        .lock()
        .expect("truth lock")
        .iter()
        .map(|e| e.unwrap_or(Expected::Absent))
        .collect();
    let count = |want: Option<Status>| {
        truth
            .iter()
            .filter(|e| match (e, want) {
                (Expected::Absent, None) => true,
                (Expected::Present { status, .. }, Some(w)) => *status == w,
                _ => false,
            })
            .count()
    };
    let (passing, critical, absent) = (
        count(Some(Status::Passing)),
        count(Some(Status::Critical)),
        count(None),
    );
    println!(
        "settle: final states fixed in {:.1} s with {} requests: {passing} passing, {critical} critical, {absent} deregistered",
        fix_start.elapsed().as_secs_f64(),
        load(&st.fixes),
    );

    // Phase 4: convergence of both views to the truth.
    let bound = Duration::from_secs(args.bound);
    let stable_for = Duration::from_secs(args.stable);
    let mut converged_at: Option<Duration> = None;
    let mut relapses = 0u64;
    let mut rounds = 0u64;
    let last = loop {
        let diff = both(&clients, args.services, &truth).await;
        rounds += 1;
        let ok = diff.iter().all(Vec::is_empty);
        let elapsed = settled.elapsed();
        match (ok, converged_at) {
            (true, None) => converged_at = Some(elapsed),
            (true, Some(at)) if elapsed >= at + stable_for => break diff,
            (false, Some(_)) => {
                relapses += 1;
                converged_at = None;
            }
            _ => {}
        }
        if elapsed > bound && converged_at.is_none() {
            break diff;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let stuck = last.iter().map(Vec::len).max().unwrap_or(0);
    match converged_at {
        Some(at) => println!(
            "converge: both views equal the truth {:.2} s after the final states were fixed (TTL {}), \
             held for {} s; {relapses} relapses; {rounds} rounds of reads",
            at.as_secs_f64(),
            humantime::format_duration(args.ttl),
            stable_for.as_secs()
        ),
        None => {
            println!(
                "converge: NOT within {} s: {} wrong in A, {} wrong in B",
                args.bound,
                last[0].len(),
                last[1].len()
            );
            for (name, d) in ["A", "B"].iter().zip(&last) {
                for w in d.iter().take(10) {
                    println!("  {name}: {w}");
                }
            }
        }
    }
    for e in sh.examples.lock().expect("examples lock").iter() {
        println!("  note: {e}");
    }
    phase_tx.send_replace(Phase::Stop);
    tasks.abort_all();
    let restored = regs
        .iter()
        .map(|r| {
            std::fs::read_to_string(&r.log)
                .map(|s| s.matches("restored it from this process's view").count())
                .unwrap_or(0)
        })
        .sum::<usize>();
    report.insert(
        "settle".into(),
        serde_json::json!({
            "passing": passing,
            "critical": critical,
            "deregistered": absent,
            "fix_requests": load(&st.fixes),
        }),
    );
    report.insert(
        "converged_after_s".into(),
        converged_at.map(|d| d.as_secs_f64()).into(),
    );
    report.insert("relapses".into(), relapses.into());
    report.insert("stuck".into(), stuck.into());
    report.insert("rejected".into(), load(&st.rejected).into());
    report.insert("redis_restores_logged".into(), restored.into());
    println!(
        "registry chaos: {stuck} instances stuck in a wrong state, {} requests rejected, \
         {restored} restores of a Redis that lost its data logged by the registries",
        load(&st.rejected),
    );
    if args.json {
        println!("{}", serde_json::Value::Object(report));
    }
    drop(regs);
    if seen.late > 0 {
        bail!(
            "{} times a dead instance was seen passing later than TTL + {:.1} s",
            seen.late,
            slack.as_secs_f64()
        );
    }
    if stuck > 0 || converged_at.is_none() {
        bail!(
            "{stuck} instances stuck in a wrong state after {} s (registry logs in {})",
            args.bound,
            logs.display()
        );
    }
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}
