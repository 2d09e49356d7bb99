//! Lookup of the passing instances of a service: the gateway's per-request read.
//!
//! Target: at most 100 ns. Run: `cargo bench -p switchboard-registry --bench lookup`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard_registry::{Registration, Registry, RegistryOptions};

fn lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let registry = rt.block_on(async {
        let registry = Registry::open("memory://", RegistryOptions::default())
            .await
            .expect("memory registry");
        // 1,000 services of 10 instances each, so the service map is realistically large.
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
        registry
    });
    let watch = registry.watch("service-500");

    c.bench_function("registry.view(service).passing", |b| {
        b.iter(|| {
            let view = registry
                .view(black_box("service-500"))
                .expect("known service");
            black_box(view.passing.len())
        });
    });
    c.bench_function("watch.load().passing", |b| {
        b.iter(|| black_box(watch.load().passing.len()));
    });
    c.bench_function("watch.peek().passing", |b| {
        b.iter(|| black_box(watch.peek().passing.len()));
    });
    // What the gateway calls after every successful request (passive health).
    c.bench_function("registry.report(Success)", |b| {
        b.iter(|| {
            registry.report(
                black_box("service-500"),
                black_box("i3"),
                switchboard_registry::PassiveOutcome::Success,
            );
        });
    });
    // Concurrent readers do not contend: measure one reader while another thread reads too.
    let other = watch.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let reader = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            black_box(other.load().passing.len());
        }
    });
    c.bench_function("watch.load().passing, 2 threads", |b| {
        b.iter(|| black_box(watch.load().passing.len()));
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = reader.join();
    drop(rt);
}

criterion_group!(benches, lookup);
criterion_main!(benches);
