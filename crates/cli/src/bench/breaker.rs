//! `switchboard bench breaker`: nanoseconds per circuit-breaker call.
//!
//! Measures `try_acquire` + `record` on a closed breaker (one thread, then two
//! threads sharing one breaker), the rejected path of an open breaker, and the
//! closed path with a time window and with slow-call tracking (both read the
//! clock), first with the precise clock and then with a `CoarseClock`
//! running, next to a baseline from the same run: one uncontended atomic
//! `fetch_add`.
//!
//! Each figure is the median over many short batches. Batches are kept short
//! (about a millisecond) so that on a shared, busy machine most of them run
//! without being preempted; a long batch would measure the scheduler instead.

use anyhow::{Context, ensure};
use clap::Args;
use std::hint::black_box;
use std::time::{Duration, Instant};
use switchboard_resilience::breaker::{
    Breaker, BreakerConfig, OpenDuration, Outcome, State, Window,
};
use switchboard_resilience::clock::CoarseClock;

/// Options of `switchboard bench breaker`.
#[derive(Debug, Args)]
pub struct BreakerArgs {
    /// Calls per batch and per thread.
    #[arg(long, default_value_t = 100_000)]
    iterations: u64,
    /// Batches per figure; the median is reported.
    #[arg(long, default_value_t = 41)]
    rounds: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

fn closed_path(breaker: &Breaker, iterations: u64) {
    for _ in 0..iterations {
        match black_box(breaker).try_acquire() {
            Ok(permit) => permit.record(black_box(Outcome::Success)),
            Err(_) => unreachable!("the breaker is closed"),
        }
    }
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn baseline_atomic(_: &Breaker, iterations: u64) {
    for _ in 0..iterations {
        black_box(COUNTER.fetch_add(1, std::sync::atomic::Ordering::AcqRel));
    }
}

fn open_path(breaker: &Breaker, iterations: u64) {
    for _ in 0..iterations {
        black_box(black_box(breaker).try_acquire().is_err());
    }
}

/// Median ns per call over `rounds` runs of `threads` threads each doing
/// `iterations` calls on `breaker` (wall time / calls per thread).
fn measure(
    breaker: &Breaker,
    threads: usize,
    iterations: u64,
    rounds: usize,
    body: fn(&Breaker, u64),
) -> f64 {
    // Warm up caches and branch predictors.
    body(breaker, iterations / 10 + 1);
    let mut samples: Vec<f64> = (0..rounds)
        .map(|_| {
            let barrier = std::sync::Barrier::new(threads);
            let start = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            let start = Instant::now();
                            body(breaker, iterations);
                            (start, Instant::now())
                        })
                    })
                    .collect();
                let spans: Vec<(Instant, Instant)> = handles
                    .into_iter()
                    .map(|h| h.join().expect("bench thread"))
                    .collect();
                let first = spans.iter().map(|s| s.0).min().expect("a thread");
                let last = spans.iter().map(|s| s.1).max().expect("a thread");
                last - first
            });
            start.as_nanos() as f64 / iterations as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn breaker(config: BreakerConfig) -> anyhow::Result<Breaker> {
    Breaker::new(config).context("bench breaker config")
}

/// Runs the benchmark and prints the figures.
pub fn run(args: &BreakerArgs) -> anyhow::Result<()> {
    ensure!(args.iterations > 0, "--iterations must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let (n, rounds) = (args.iterations, args.rounds);

    let closed = breaker(BreakerConfig::default())?;
    let closed_ns = measure(&closed, 1, n, rounds, closed_path);
    let closed_2threads_ns = measure(&closed, 2, n, rounds, closed_path);

    let open = breaker(BreakerConfig {
        min_calls: 1,
        open_duration: OpenDuration::constant(Duration::from_secs(3600)),
        ..BreakerConfig::default()
    })?;
    open.try_acquire()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .record(Outcome::Failure);
    ensure!(open.state().is_open(), "the open-path breaker did not open");
    let open_ns = measure(&open, 1, n, rounds, open_path);
    let open_2threads_ns = measure(&open, 2, n, rounds, open_path);

    let time_window = breaker(BreakerConfig {
        window: Window::Time(Duration::from_secs(10)),
        ..BreakerConfig::default()
    })?;
    let time_window_ns = measure(&time_window, 1, n, rounds, closed_path);
    let slow_tracking = breaker(BreakerConfig {
        slow_call_duration: Some(Duration::from_secs(1)),
        ..BreakerConfig::default()
    })?;
    let slow_tracking_ns = measure(&slow_tracking, 1, n, rounds, closed_path);

    let atomic_ns = measure(&closed, 1, n, rounds, baseline_atomic);

    let coarse = CoarseClock::start(Duration::from_millis(1)).context("coarse clock")?;
    let open_coarse_ns = measure(&open, 1, n, rounds, open_path);
    let time_window_coarse_ns = measure(&time_window, 1, n, rounds, closed_path);
    let slow_tracking_coarse_ns = measure(&slow_tracking, 1, n, rounds, closed_path);
    drop(coarse);

    let snapshot = closed.snapshot();
    ensure!(
        snapshot.failed_calls == 0 && closed.state() == State::Closed,
        "the closed-path breaker changed state during the bench"
    );

    println!("circuit breaker, ns per call (median of {rounds} batches of {n} calls per thread)");
    println!("  closed  try_acquire+record, 1 thread      {closed_ns:>8.1}");
    println!("  closed  try_acquire+record, 2 threads     {closed_2threads_ns:>8.1}");
    println!("  open    rejected, 1 thread                {open_ns:>8.1}");
    println!("  open    rejected, 2 threads               {open_2threads_ns:>8.1}");
    println!("  closed  time window (reads the clock)     {time_window_ns:>8.1}");
    println!("  closed  slow-call tracking (2 clock reads){slow_tracking_ns:>8.1}");
    println!("  with a CoarseClock (1 ms) running:");
    println!("  open    rejected, 1 thread                {open_coarse_ns:>8.1}");
    println!("  closed  time window                       {time_window_coarse_ns:>8.1}");
    println!("  closed  slow-call tracking                {slow_tracking_coarse_ns:>8.1}");
    println!("  baseline: one atomic fetch_add            {atomic_ns:>8.1}");
    if args.json {
        let json = serde_json::json!({
            "closed_ns_per_call": round(closed_ns),
            "closed_2threads_ns_per_call": round(closed_2threads_ns),
            "open_ns_per_call": round(open_ns),
            "open_2threads_ns_per_call": round(open_2threads_ns),
            "closed_time_window_ns_per_call": round(time_window_ns),
            "closed_slow_tracking_ns_per_call": round(slow_tracking_ns),
            "coarse_clock_open_ns_per_call": round(open_coarse_ns),
            "coarse_clock_closed_time_window_ns_per_call": round(time_window_coarse_ns),
            "coarse_clock_closed_slow_tracking_ns_per_call": round(slow_tracking_coarse_ns),
            "baseline_atomic_fetch_add_ns": round(atomic_ns),
            "iterations": n,
            "batches": rounds,
        });
        println!("{json}");
    }
    Ok(())
}

fn round(ns: f64) -> f64 {
    (ns * 100.0).round() / 100.0
}
