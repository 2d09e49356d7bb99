//! `switchboard bench bus`: event bus throughput and publish latency.
//!
//! Two phases against one subscription group on a fresh topic:
//! 1. **Throughput**: `--events N` events of `--payload BYTES` published in
//!    pipelined batches by `--publishers` tasks; the clock runs from the first
//!    publish until the N-th delivery was handled *and acked*.
//! 2. **Latency**: `--latency-events` single `publish` calls offered at a fixed
//!    `--rate` (open loop: a generator starts each call on its own task when it
//!    is due, whether or not earlier calls returned), with the subscriber
//!    consuming meanwhile; p50/p99 of those calls, each timed from its start
//!    to its return. The generator wakes once a millisecond and starts the
//!    calls due by then, so a call may start up to about a millisecond after
//!    it was due; that lag is reported apart (`issue_lag_p99_ms`) because it
//!    is the generator's timer, not the bus.
//!
//! `--json` prints one JSON object as the last line with `events_per_s`,
//! `publish_p50_ms` and `publish_p99_ms`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use switchboard_bus::{Bus, Event, HandlerError, SubscribeOptions};

/// Arguments of `switchboard bench bus`.
#[derive(Debug, clap::Args)]
pub struct BusArgs {
    /// Bus URL (memory://, redis://HOST:PORT, nats://HOST:PORT, redis+pubsub://HOST:PORT).
    #[arg(long, default_value = "memory://bench")]
    bus: String,
    /// Events in the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Payload size in bytes (the event data is a JSON string of that length).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Events per pipelined publish batch in the throughput phase.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Concurrent publisher tasks in the throughput phase.
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// The subscription's max in-flight deliveries.
    #[arg(long, default_value_t = 4096)]
    in_flight: usize,
    /// Offered publish rate (events/s) in the latency phase.
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Events in the latency phase (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    latency_events: u64,
    /// Print a JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark.
pub fn run(args: BusArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(bench(args))
}

struct Producer {
    topic: String,
    /// The payload, serialized once: building it is not what is measured.
    data: switchboard_bus::Data,
    /// `RUN-`, formatted once: formatting a u128 per event is bench overhead.
    id_prefix: String,
}

impl Producer {
    fn event(&self, n: u64) -> Event {
        Event::builder()
            .source("/bench")
            .ty(self.topic.as_str())
            .id(format!("{}{n}", self.id_prefix))
            .data_raw(Some(self.data.clone()))
            .build()
            .expect("bench events are valid")
    }
}

async fn bench(args: BusArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.batch == 0 || args.publishers == 0 {
        bail!("--events, --batch and --publishers must be at least 1");
    }
    let bus = Bus::open(&args.bus)
        .await
        .with_context(|| format!("opening bus {}", args.bus))?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let producer = Arc::new(Producer {
        topic: format!("bench.{run}"),
        data: switchboard_bus::Data::Json(
            serde_json::value::to_raw_value(&"x".repeat(args.payload))
                .context("serializing the payload")?,
        ),
        id_prefix: format!("{run}-"),
    });
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    let handler = move |_e: Event| {
        h.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok::<_, HandlerError>(()))
    };
    let opts = SubscribeOptions::default()
        .max_in_flight(args.in_flight)
        .start_at_latest(true);
    let sub = bus
        .subscribe(&producer.topic, "bench", handler, opts)
        .await
        .context("subscribing")?;

    // Phase 1: throughput, publish -> handled -> acked.
    let cpu_before = super::process_cpu_s();
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for _ in 0..args.publishers {
        let (bus, producer, next) = (bus.clone(), Arc::clone(&producer), Arc::clone(&next));
        let (total, batch) = (args.events, args.batch as u64);
        publishers.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let events: Vec<Event> = (from..(from + batch).min(total))
                    .map(|n| producer.event(n))
                    .collect();
                bus.publish_batch(events).await.context("publishing")?;
            }
        }));
    }
    for p in publishers {
        p.await.context("publisher task")??;
    }
    let published_at = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    while bus.metrics().snapshot().acked < args.events {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} events acked after 300 s",
                bus.metrics().snapshot().acked,
                args.events
            );
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let elapsed = started.elapsed();
    let cpu_s = super::process_cpu_s().zip(cpu_before).map(|(a, b)| a - b);
    let events_per_s = args.events as f64 / elapsed.as_secs_f64();
    let publish_per_s = args.events as f64 / published_at.as_secs_f64();

    // Phase 2: latency of single publishes at a fixed offered rate.
    let mut latencies = Vec::new();
    let mut lags = Vec::new();
    let latency_cpu_before = super::process_cpu_s();
    if args.latency_events > 0 && args.rate > 0 {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<anyhow::Result<(Duration, Duration)>>();
        let start = tokio::time::Instant::now();
        let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        let mut issued = 0u64;
        while issued < args.latency_events {
            ticker.tick().await;
            let due_now = (start.elapsed().as_secs_f64() * args.rate as f64) as u64;
            while issued < due_now.min(args.latency_events) {
                let due = start + interval * u32::try_from(issued).unwrap_or(u32::MAX);
                let event = producer.event(args.events + issued);
                let (bus, tx) = (bus.clone(), tx.clone());
                tokio::spawn(async move {
                    let called = tokio::time::Instant::now();
                    let lag = called.saturating_duration_since(due);
                    let r = bus.publish(event).await.map(|()| (called.elapsed(), lag));
                    let _ = tx.send(r.map_err(anyhow::Error::from));
                });
                issued += 1;
            }
        }
        drop(tx);
        while let Some(r) = rx.recv().await {
            let (latency, lag) = r.context("publishing in the latency phase")?;
            latencies.push(latency);
            lags.push(lag);
        }
        latencies.sort_unstable();
        lags.sort_unstable();
    }
    let pct = |sorted: &[Duration], p: f64| -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[i].as_secs_f64() * 1e3
    };
    let (p50, p99) = (pct(&latencies, 0.50), pct(&latencies, 0.99));
    let lag_p99 = pct(&lags, 0.99);
    let latency_cpu_s = super::process_cpu_s()
        .zip(latency_cpu_before)
        .map(|(a, b)| a - b);
    let total = args.events + args.latency_events;
    let wait = Instant::now() + Duration::from_secs(60);
    while bus.metrics().snapshot().acked < total && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sub.shutdown().await;
    let _ = bus.delete_group(&producer.topic, "bench").await;
    let backend = bus.capabilities().backend;

    println!(
        "bus bench: backend {backend}, {} events of {} bytes, batches of {} from {} publishers, max in flight {}",
        args.events, args.payload, args.batch, args.publishers, args.in_flight
    );
    println!(
        "  end to end (publish -> handled -> acked): {events_per_s:.0} events/s ({:.3} s)",
        elapsed.as_secs_f64()
    );
    println!("  publish only:                            {publish_per_s:.0} events/s");
    if let Some(cpu) = cpu_s {
        println!(
            "  this process's CPU in that phase:        {cpu:.2} s ({:.2} us per event; the machine's other load is not counted)",
            cpu * 1e6 / args.events as f64
        );
    }
    if !latencies.is_empty() {
        println!(
            "  single publish at {} events/s offered: p50 {p50:.3} ms, p99 {p99:.3} ms ({} calls; p99 of their start after their due time {lag_p99:.3} ms)",
            args.rate,
            latencies.len()
        );
        if let Some(cpu) = latency_cpu_s {
            println!(
                "  this process's CPU in that phase:        {cpu:.2} s ({:.2} us per event)",
                cpu * 1e6 / latencies.len() as f64
            );
        }
    }
    if args.json {
        let out = serde_json::json!({
            "backend": backend,
            "events": args.events,
            "payload_bytes": args.payload,
            "batch": args.batch,
            "publishers": args.publishers,
            "in_flight": args.in_flight,
            "elapsed_s": elapsed.as_secs_f64(),
            "events_per_s": events_per_s.round(),
            "publish_events_per_s": publish_per_s.round(),
            "cpu_s": cpu_s,
            "rate": args.rate,
            "latency_events": latencies.len(),
            "publish_p50_ms": p50,
            "publish_p99_ms": p99,
            "issue_lag_p99_ms": lag_p99,
            "latency_phase_cpu_s": latency_cpu_s,
        });
        println!("{out}");
    }
    Ok(())
}
