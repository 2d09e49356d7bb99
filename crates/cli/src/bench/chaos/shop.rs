//! `switchboard bench chaos shop`: the demo shop soaked under faults (issue 8).
//!
//! The shop (two instances of each service behind the gateway) runs on a
//! Redis Streams bus backed by a private `redis-server` with AOF
//! `appendfsync always`. Closed-loop clients create users, place orders
//! (with `Idempotency-Key`, retried like a careful client; some ask for more
//! than the stock), read orders and check stock, while one service instance
//! at a time is killed like a crash and restarted, payments decline in
//! bursts, and redis-server gets SIGKILL and a restart. Then the shop
//! settles and `switchboard_shop::soak` counts: every accepted order ended
//! `confirmed` or `cancelled`, none stuck or placed twice, stock and money
//! add up. Exits non-zero otherwise.

use std::time::Duration;

use anyhow::bail;
use switchboard_shop::DemoOptions;
use switchboard_shop::soak::{Broker, SoakOptions, soak};

use super::Redis;

/// `switchboard bench chaos shop`.
#[derive(Debug, clap::Args)]
pub struct ShopChaos {
    /// Seconds of traffic.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Milliseconds each client pauses between two requests.
    #[arg(long, default_value_t = 5)]
    think_ms: u64,
    /// Mean seconds between two service instance kills.
    #[arg(long, default_value_t = 3.0)]
    kill_every: f64,
    /// Seconds between two redis-server SIGKILLs (0: never).
    #[arg(long, default_value_t = 20.0)]
    redis_kill_every: f64,
    /// Share of orders placed without Idempotency-Key (sent once, never retried), 0 to 1.
    #[arg(long, default_value_t = 0.1)]
    keyless_share: f64,
    /// Initial stock of each SKU.
    #[arg(long, default_value_t = 1_000_000)]
    stock: u64,
    /// Longest wait, in seconds, for every order to end after the traffic stops.
    #[arg(long, default_value_t = 60)]
    settle: u64,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// The private redis-server as the soak's broker.
struct Killable<'a>(&'a mut Redis);

impl Broker for Killable<'_> {
    fn kill(&mut self) {
        self.0.kill();
    }
    fn restart(&mut self) -> anyhow::Result<()> {
        // Called from `block_in_place` on the soak's runtime.
        tokio::runtime::Handle::current().block_on(self.0.spawn())
    }
}

fn seconds(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("--{what} {s}: {e}"))
}

/// Runs the scenario.
pub(super) async fn run(args: &ShopChaos) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.keyless_share),
        "--keyless-share {}: must be between 0 and 1",
        args.keyless_share
    );
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    let redis_kill_every = seconds(args.redis_kill_every, "redis-kill-every")?;
    let kill_every = seconds(args.kill_every, "kill-every")?;
    let mut redis = Redis::start(&args.redis_server).await?;
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let options = DemoOptions {
        listen: any,
        admin: any,
        bus: redis.url(),
        base_port: None,
        stock: args.stock,
        ..DemoOptions::default()
    };
    let mut shop = switchboard_shop::run(options).await?;
    let soak_options = SoakOptions {
        duration: Duration::from_secs(args.seconds),
        clients: args.clients,
        think: Duration::from_millis(args.think_ms),
        kill_every,
        broker_kill_every: (!redis_kill_every.is_zero()).then_some(redis_kill_every),
        settle: Duration::from_secs(args.settle),
        keyless_share: args.keyless_share,
        ..SoakOptions::default()
    };
    let report = soak(
        &mut shop,
        &soak_options,
        Some(&mut Killable(&mut redis)),
        |line| println!("{line}"),
    )
    .await;
    shop.shutdown().await;
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if !report.passed {
        bail!("shop soak failed: {}", report.problems.join("; "));
    }
    Ok(())
}
