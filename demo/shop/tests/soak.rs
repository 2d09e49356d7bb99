//! The shortest shop soak (issue 8): 8 s of mixed traffic through the
//! gateway on the Redis Streams bus while service instances are killed like a
//! crash and restarted, payments decline in bursts and redis-server (AOF
//! always) gets SIGKILL once. Every accepted order must end `confirmed` or
//! `cancelled`, none stuck or placed twice, and stock and payments must add
//! up. `switchboard bench chaos shop` runs the same soak for minutes.

use std::time::Duration;

use switchboard_shop::soak::{Broker, SoakOptions, soak};
use switchboard_shop::{DemoOptions, run};
use switchboard_testkit::{Persistence, RedisServer};

struct Redis(RedisServer);

impl Broker for Redis {
    fn kill(&mut self) {
        self.0.kill();
    }
    fn restart(&mut self) -> anyhow::Result<()> {
        self.0.restart();
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_with_kills_ends_every_order() {
    let Some(redis) = RedisServer::start(Persistence::AofAlways) else {
        return;
    };
    let options = DemoOptions {
        bus: redis.url(),
        ..DemoOptions::for_tests()
    };
    let mut shop = run(options).await.unwrap();
    let mut redis = Redis(redis);
    let soak_options = SoakOptions {
        duration: Duration::from_secs(8),
        clients: 4,
        kill_every: Duration::from_millis(1500),
        down_for: Duration::from_millis(500),
        broker_kill_every: Some(Duration::from_secs(5)),
        decline_every: Duration::from_secs(2),
        out_of_stock_share: 0.2,
        keyless_share: 0.2,
        settle: Duration::from_secs(30),
        ..SoakOptions::default()
    };
    let report = soak(&mut shop, &soak_options, Some(&mut redis), |line| {
        println!("{line}");
    })
    .await
    .unwrap();
    println!("{}", serde_json::to_string(&report).unwrap());
    assert!(report.passed, "{:?}", report.problems);
    // The soak did what it says: kills happened, both end states occurred.
    assert!(report.instance_kills >= 2, "{report:?}");
    assert_eq!(report.broker_kills, 1, "{report:?}");
    assert!(report.orders_accepted >= 20, "{report:?}");
    assert!(report.cancelled_out_of_stock > 0, "{report:?}");
    assert!(report.cancelled_payment_failed > 0, "{report:?}");
    assert!(report.confirmed > 0, "{report:?}");
    assert_eq!(
        report.orders_accepted,
        report.confirmed + report.cancelled,
        "{report:?}"
    );
    shop.shutdown().await;
}
