//! Registry benchmarks, driven by `bench/registry.sh`.
//!
//! - `registry_bench backend PORT`: a tiny HTTP/1.1 health backend (`GET /health` -> 200).
//! - `registry_bench checks BACKEND_ADDR INSTANCES SECONDS`: registers INSTANCES
//!   instances with HTTP checks every second against the backend, waits until all
//!   pass, then prints the process's CPU seconds per wall second over SECONDS.
//! - `registry_bench lookup`: ns per lookup of a service's passing instances, as
//!   the minimum and median over 200 batches (robust on a shared, loaded machine;
//!   `benches/lookup.rs` is the criterion version).
//! - `registry_bench propagation STORE_URL ITERATIONS`: flips a check result and
//!   prints p50/p99 of the time from the check that saw the flip to a watcher
//!   seeing the new status (for `redis://`, the watcher is a second registry, so
//!   the change travels through Redis).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use switchboard_registry::{
    CheckResult, CheckSpec, Probe, ProbeTarget, Prober, Registration, Registry, RegistryOptions,
    Status,
};

fn usage() -> ! {
    eprintln!(
        "usage: registry_bench backend PORT | checks BACKEND_ADDR INSTANCES SECONDS | lookup | propagation STORE_URL ITERATIONS"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| usage());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match arg(0).as_str() {
        "backend" => rt.block_on(backend(arg(1).parse().unwrap_or_else(|_| usage()))),
        "checks" => rt.block_on(checks(
            &arg(1),
            arg(2).parse().unwrap_or_else(|_| usage()),
            arg(3).parse().unwrap_or_else(|_| usage()),
        )),
        "lookup" => rt.block_on(lookup()),
        "propagation" => rt.block_on(propagation(
            &arg(1),
            arg(2).parse().unwrap_or_else(|_| usage()),
        )),
        _ => usage(),
    }
}

async fn backend(port: u16) {
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind backend");
    println!("backend listening on 127.0.0.1:{port}");
    axum::serve(listener, app).await.expect("serve");
}

/// utime + stime of this process, from /proc (clock ticks: `CLK_TCK`, default 100).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // fields after the command name (which is in parentheses and may contain spaces)
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    let hz: f64 = std::env::var("CLK_TCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100.0);
    ticks / hz
}

async fn checks(backend: &str, instances: usize, seconds: u64) {
    let addr: std::net::SocketAddr = backend.parse().expect("BACKEND_ADDR like 127.0.0.1:18080");
    let registry = Registry::open("memory://", RegistryOptions::default())
        .await
        .expect("registry");
    let check = CheckSpec::http("/health")
        .interval(Duration::from_secs(1))
        .timeout(Duration::from_millis(900))
        .thresholds(2, 3);
    let services = 100;
    for i in 0..instances {
        let reg = Registration::new(addr.ip().to_string(), addr.port()).check(check.clone());
        registry
            .register(&format!("svc-{}", i % services), &format!("i{i}"), reg)
            .await
            .expect("register");
    }
    let started = Instant::now();
    loop {
        let passing: usize = registry.services().iter().map(|s| s.passing).sum();
        if passing == instances {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {passing} of {instances} passing after 60s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "all {instances} passing after {:?}; measuring {seconds}s",
        started.elapsed()
    );
    // let connection setup settle: measure the steady state
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (cpu1, wall) = (cpu_seconds(), wall0.elapsed().as_secs_f64());
    let recent = (0..services)
        .flat_map(|s| registry.snapshot(&format!("svc-{s}")).instances)
        .filter(|i| {
            i.last_check
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < Duration::from_millis(2500))
        })
        .count();
    let passing: usize = registry.services().iter().map(|s| s.passing).sum();
    println!(
        "{{\"instances\": {instances}, \"interval_s\": 1, \"checked_last_2_5s\": {recent}, \"passing\": {passing}, \"cpu_s_per_wall_s\": {:.3}}}",
        (cpu1 - cpu0) / wall
    );
}

/// A prober whose result the benchmark flips, remembering when a check first saw the flip.
#[derive(Clone)]
struct Flip {
    up: Arc<AtomicBool>,
    seen: Arc<Mutex<Option<Instant>>>,
}

struct FlipProbe(Flip);

impl Prober for Flip {
    fn probe(&self, _target: &ProbeTarget) -> Box<dyn Probe> {
        Box::new(FlipProbe(self.clone()))
    }
}

impl Probe for FlipProbe {
    fn check(&mut self) -> BoxFuture<'_, CheckResult> {
        let up = self.0.up.load(Ordering::SeqCst);
        let mut seen = self.0.seen.lock();
        if seen.is_none() {
            *seen = Some(Instant::now());
        }
        drop(seen);
        Box::pin(async move {
            if up {
                CheckResult::Pass
            } else {
                CheckResult::Fail
            }
        })
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn propagation(store: &str, iterations: usize) {
    let flip = Flip {
        up: Arc::new(AtomicBool::new(true)),
        seen: Arc::new(Mutex::new(None)),
    };
    let opts = RegistryOptions::default().prober(Arc::new(flip.clone()));
    let writer = Registry::open(store, opts.clone())
        .await
        .expect("open store");
    let interval = Duration::from_millis(50);
    let check = CheckSpec::http("/health")
        .interval(interval)
        .thresholds(1, 1);
    let service = format!("bench-{}", std::process::id());
    writer
        .register(
            &service,
            "i1",
            Registration::new("127.0.0.1", 1).check(check),
        )
        .await
        .expect("register");
    // the writer owns the check before a second registry (the watcher) exists
    while writer.checks_owned() == 0 || writer.view(&service).is_none_or(|v| v.passing.is_empty()) {
        tokio::time::sleep(interval).await;
    }
    let watcher = if store.starts_with("redis") {
        Registry::open(store, opts).await.expect("open store")
    } else {
        writer.clone()
    };
    let mut watch = watcher.watch(&service);
    let mut samples = Vec::with_capacity(iterations);
    for n in 0..iterations {
        let up = n % 2 == 1;
        let want = if up {
            Status::Passing
        } else {
            Status::Critical
        };
        *flip.seen.lock() = None;
        flip.up.store(up, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if watch.load().instances.first().map(|i| i.status) == Some(want) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "watcher never saw {want}");
            let _ = tokio::time::timeout(left, watch.changed()).await;
        }
        let seen_at = Instant::now();
        let flipped_at = flip.seen.lock().expect("a check ran");
        samples.push(seen_at.saturating_duration_since(flipped_at));
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{{\"store\": \"{}\", \"iterations\": {iterations}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"max_ms\": {:.3}}}",
        store.split("://").next().unwrap_or(store),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(samples[samples.len() - 1])
    );
    writer.deregister(&service, "i1").await.expect("cleanup");
}

async fn lookup() {
    let registry = Registry::open("memory://", RegistryOptions::default())
        .await
        .expect("registry");
    for s in 0..1000 {
        for i in 0..10u16 {
            registry
                .register(
                    &format!("service-{s}"),
                    &format!("i{i}"),
                    Registration::new("127.0.0.1", 4000 + i),
                )
                .await
                .expect("register");
        }
    }
    let watch = registry.watch("service-500");
    let batch = 20_000u32;
    let measure = |f: &dyn Fn() -> usize| {
        let mut per_call: Vec<f64> = (0..200)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..batch {
                    std::hint::black_box(f());
                }
                t.elapsed().as_secs_f64() * 1e9 / f64::from(batch)
            })
            .collect();
        per_call.sort_by(f64::total_cmp);
        (per_call[0], per_call[per_call.len() / 2])
    };
    let name = std::hint::black_box("service-500");
    let (v_min, v_med) = measure(&|| registry.view(name).map_or(0, |v| v.passing.len()));
    let (l_min, l_med) = measure(&|| watch.load().passing.len());
    let (p_min, p_med) = measure(&|| watch.peek().passing.len());
    println!(
        "{{\"view_ns_min\": {v_min:.1}, \"view_ns_median\": {v_med:.1}, \"watch_load_ns_min\": {l_min:.1}, \"watch_load_ns_median\": {l_med:.1}, \"watch_peek_ns_min\": {p_min:.1}, \"watch_peek_ns_median\": {p_med:.1}}}"
    );
}
