//! Orders per second through the whole shop: client -> gateway -> orders
//! (-> users over HTTP) -> bus -> inventory -> bus -> payments -> bus -> orders,
//! and the time from sending `POST /orders` to seeing `order.confirmed`.
//!
//! `cargo run --release -p switchboard-shop --example shop_bench -- [--bus URL|redis] [--seconds N] [--concurrency N]`
//!
//! `--bus redis` starts a private redis-server (no persistence) on a free port.
//! Closed loop: each of `concurrency` workers places an order, waits until it
//! is confirmed, and places the next. The last line is one JSON object.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use switchboard_bus::{Event, HandlerError, SubscribeOptions};
use switchboard_shop::{DemoOptions, events};
use tokio::sync::oneshot;

enum Seen {
    Waiting(oneshot::Sender<Instant>),
    Done(Instant),
}

type Pending = Arc<Mutex<HashMap<String, Seen>>>;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let bus = arg(&args, "--bus", "memory://");
    let seconds: u64 = arg(&args, "--seconds", "10").parse()?;
    let concurrency: usize = arg(&args, "--concurrency", "64").parse()?;
    let warmup = Duration::from_secs(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut redis = None;
        let bus = if bus == "redis" {
            let server = switchboard_testkit::RedisServer::start(switchboard_testkit::Persistence::None)
                .ok_or_else(|| anyhow::anyhow!("redis-server not found"))?;
            let url = server.url();
            redis = Some(server);
            url
        } else {
            bus
        };
        let options = DemoOptions {
            bus: bus.clone(),
            stock: u64::MAX / 4,
            ..DemoOptions::for_tests()
        };
        let shop = switchboard_shop::run(options).await?;
        let gateway = shop.gateway_addr().expect("gateway");
        let pending: Pending = Arc::default();
        let observer = {
            let pending = pending.clone();
            shop.bus()
                .subscribe(
                    events::ORDER_CONFIRMED,
                    "bench",
                    move |e: Event| {
                        let now = Instant::now();
                        let order: events::OrderRef = match e.data_as() {
                            Ok(o) => o,
                            Err(err) => return std::future::ready(Err::<(), HandlerError>(err.into())),
                        };
                        let mut p = pending.lock();
                        match p.remove(&order.order_id) {
                            Some(Seen::Waiting(tx)) => {
                                let _ = tx.send(now);
                            }
                            _ => {
                                p.insert(order.order_id, Seen::Done(now));
                            }
                        }
                        std::future::ready(Ok(()))
                    },
                    SubscribeOptions::default().max_in_flight(1024),
                )
                .await?
        };
        let http: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .build_http();
        let user: serde_json::Value = {
            let req = http::Request::post(format!("http://{gateway}/users"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(br#"{"name":"Bench","email":"bench@example.com"}"#)))?;
            let res = http.request(req).await?;
            serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?
        };
        let body = Bytes::from(format!(
            r#"{{"user_id":"{}","items":[{{"sku":"widget","qty":1}}]}}"#,
            user["id"].as_str().unwrap_or_default()
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let measure_from = started + warmup;
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let (http, body, pending, stop) = (http.clone(), body.clone(), pending.clone(), stop.clone());
            let url = format!("http://{gateway}/orders");
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let req = http::Request::post(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .expect("request");
                    let Ok(res) = http.request(req).await else {
                        errors += 1;
                        continue;
                    };
                    let ok = res.status() == http::StatusCode::CREATED;
                    let Ok(bytes) = res.into_body().collect().await.map(http_body_util::Collected::to_bytes) else {
                        errors += 1;
                        continue;
                    };
                    if !ok {
                        errors += 1;
                        continue;
                    }
                    // The id is the first field: {"id":"ord_...",...
                    let id = String::from_utf8_lossy(&bytes[7..23]).into_owned();
                    let rx = {
                        let mut p = pending.lock();
                        match p.remove(&id) {
                            Some(Seen::Done(t)) => Ok(t),
                            _ => {
                                let (tx, rx) = oneshot::channel();
                                p.insert(id, Seen::Waiting(tx));
                                Err(rx)
                            }
                        }
                    };
                    let done = match rx {
                        Ok(t) => t,
                        Err(rx) => match tokio::time::timeout(Duration::from_secs(30), rx).await {
                            Ok(Ok(t)) => t,
                            _ => {
                                errors += 1;
                                continue;
                            }
                        },
                    };
                    if t0 >= measure_from {
                        latencies.push(done - t0);
                    }
                }
                (latencies, errors)
            }));
        }
        tokio::time::sleep(warmup + Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut errors = 0;
        for w in workers {
            let (l, e) = w.await?;
            all.extend(l);
            errors += e;
        }
        all.sort();
        let n = all.len();
        let pct = |p: f64| all.get(((n as f64 * p) as usize).min(n.saturating_sub(1))).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let per_s = n as f64 / seconds as f64;
        println!(
            "bus {bus}: {n} orders confirmed in {seconds}s = {per_s:.0} orders/s; POST->confirmed p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; errors {errors}; concurrency {concurrency}",
            pct(0.50),
            pct(0.99),
            pct(1.0)
        );
        println!(
            "{}",
            serde_json::json!({
                "bus": if redis.is_some() { "redis" } else { bus.as_str() },
                "orders_per_s": per_s.round(),
                "p50_ms": (pct(0.50) * 100.0).round() / 100.0,
                "p99_ms": (pct(0.99) * 100.0).round() / 100.0,
                "errors": errors,
                "concurrency": concurrency,
                "seconds": seconds,
            })
        );
        observer.shutdown().await;
        shop.shutdown().await;
        drop(redis);
        Ok(())
    })
}
