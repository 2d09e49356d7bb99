//! Circuit breaker cost per call, against tower-resilience's in the same run.
//!
//! `cargo bench -p switchboard-resilience --bench breaker`

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use switchboard_resilience::breaker::{
    Breaker, BreakerConfig, CircuitBreakerLayer, Outcome, Window,
};
use tower::{Layer, Service, ServiceExt, service_fn};

fn closed() -> Breaker {
    Breaker::new(BreakerConfig::default()).expect("valid config")
}

fn raw(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker");

    // What one uncontended atomic read-modify-write costs on this machine, to
    // read the other figures against.
    let counter = std::sync::atomic::AtomicU64::new(0);
    group.bench_function("baseline/atomic_fetch_add", |b| {
        b.iter(|| black_box(&counter).fetch_add(1, std::sync::atomic::Ordering::AcqRel));
    });
    let clock = tokio::time::Instant::now();
    group.bench_function("baseline/tokio_instant_elapsed", |b| {
        b.iter(|| black_box(black_box(clock).elapsed()));
    });

    let breaker = closed();
    group.bench_function("closed/try_acquire+record", |b| {
        b.iter(|| {
            let permit = black_box(&breaker).try_acquire().expect("closed");
            permit.record(black_box(Outcome::Success));
        });
    });

    let breaker = closed();
    let mut n = 0u32;
    group.bench_function("closed/10%_failures", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let outcome = if n.is_multiple_of(10) {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            black_box(&breaker)
                .try_acquire()
                .expect("closed")
                .record(outcome);
        });
    });

    let breaker = Breaker::new(BreakerConfig {
        window: Window::Time(Duration::from_secs(10)),
        ..BreakerConfig::default()
    })
    .expect("valid config");
    group.bench_function("closed/time_window", |b| {
        b.iter(|| {
            black_box(&breaker)
                .try_acquire()
                .expect("closed")
                .record(Outcome::Success);
        });
    });

    let breaker = Breaker::new(BreakerConfig {
        slow_call_duration: Some(Duration::from_secs(1)),
        ..BreakerConfig::default()
    })
    .expect("valid config");
    group.bench_function("closed/slow_call_tracking", |b| {
        b.iter(|| {
            black_box(&breaker)
                .try_acquire()
                .expect("closed")
                .record(Outcome::Success);
        });
    });

    let breaker = closed();
    breaker.force_open();
    group.bench_function("forced_open/rejected", |b| {
        b.iter(|| black_box(black_box(&breaker).try_acquire().is_err()));
    });

    let breaker = Breaker::new(BreakerConfig {
        min_calls: 1,
        open_duration: switchboard_resilience::breaker::OpenDuration::constant(
            Duration::from_secs(3600),
        ),
        ..BreakerConfig::default()
    })
    .expect("valid config");
    breaker
        .try_acquire()
        .expect("closed")
        .record(Outcome::Failure);
    group.bench_function("open/rejected", |b| {
        b.iter(|| black_box(black_box(&breaker).try_acquire().is_err()));
    });
    group.finish();
}

/// Mean time of `iters` calls through `svc`, driven in one loop on a
/// current-thread runtime (no per-call task or clone, same for every service).
fn drive<S>(rt: &tokio::runtime::Runtime, svc: &mut S, iters: u64) -> Duration
where
    S: Service<u32, Response = u32>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = std::time::Instant::now();
        for n in 0..iters {
            let ready = svc.ready().await.expect("ready");
            black_box(ready.call(black_box(n as u32)).await.expect("ok"));
        }
        start.elapsed()
    })
}

fn versus_tower_resilience(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let upstream = || service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n) });
    let mut group = c.benchmark_group("tower_layer");

    let mut ours = CircuitBreakerLayer::new(closed()).layer(upstream());
    group.bench_function("switchboard", |b| {
        b.iter_custom(|iters| drive(&rt, &mut ours, iters));
    });

    let mut theirs = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .minimum_number_of_calls(20)
        .build()
        .expect("valid config")
        .layer(upstream());
    group.bench_function("tower-resilience", |b| {
        b.iter_custom(|iters| drive(&rt, &mut theirs, iters));
    });

    let mut bare = upstream();
    group.bench_function("no_breaker", |b| {
        b.iter_custom(|iters| drive(&rt, &mut bare, iters));
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = raw, versus_tower_resilience
}
criterion_main!(benches);
