//! The conformance suite on Redis Streams against a real redis-server
//! (AOF with `appendfsync always`, so a SIGKILL loses nothing acknowledged),
//! plus the Redis-specific cases.

mod common;

use std::time::Duration;

use common::Fixture;
use switchboard_bus::deadletter::{DeadLetter, MALFORMED_TYPE, Reason};
use switchboard_bus::{Bus, Event, HandlerError};
use switchboard_testkit::{Persistence, RedisServer};

struct Redis(RedisServer);

impl Fixture for Redis {
    fn url(&self) -> String {
        // Trim often so that the suite exercises it alongside everything else.
        format!(
            "{}?trim_interval=200ms&retention=1s&block=200ms",
            self.0.url()
        )
    }
    fn restart_broker(&mut self) -> bool {
        self.0.restart();
        true
    }
    fn kill_broker(&mut self) {
        self.0.kill();
    }
    fn start_broker(&mut self) {
        self.0.restart();
    }
}

fn fixture() -> Option<Redis> {
    RedisServer::start(Persistence::AofAlways).map(Redis)
}

conformance_tests!(fixture());

async fn redis_cmd(url: &str, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// Garbage on a stream goes to the dead-letter topic with a decode error;
/// good events around it are handled; nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered() {
    let Some(f) = fixture() else { return };
    let bus = Bus::open(&f.url()).await.unwrap();
    let topic = common::unique("garbage");
    let dlq = common::unique("dlq");
    let (h, mut rx) = common::recorder();
    let sub = bus
        .subscribe(
            &topic,
            "g",
            h,
            common::fast_options().dead_letter_topic(&dlq),
        )
        .await
        .unwrap();
    let (dh, mut letters) = common::recorder();
    let dsub = bus
        .subscribe(&dlq, "inspect", dh, common::fast_options())
        .await
        .unwrap();
    let key = format!("sb:{topic}");
    let url = f.0.url();
    common::publish_n(&bus, &topic, 0..1).await;
    redis_cmd(&url, &["XADD", &key, "*", "e", "{not json"]).await;
    redis_cmd(
        &url,
        &[
            "XADD",
            &key,
            "*",
            "e",
            r#"{"specversion":"1.0","id":"x","type":"t"}"#,
        ],
    )
    .await;
    redis_cmd(&url, &["XADD", &key, "*", "other", "field"]).await;
    common::publish_n(&bus, &topic, 1..2).await;
    assert_eq!(common::collect_ids(&mut rx, 2).await, ["e00000", "e00001"]);
    let mut errors = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(common::PATIENCE, letters.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.ty(), MALFORMED_TYPE);
        let d = DeadLetter::from_event(&e).unwrap();
        assert_eq!(d.reason, Reason::DecodeError);
        assert_eq!(d.topic, topic);
        errors.push(d.error);
    }
    assert!(errors[0].contains("line 1 column"), "{errors:?}");
    assert!(
        errors[1].contains("missing required attribute `source`"),
        "{errors:?}"
    );
    assert!(errors[2].contains("no `e` field"), "{errors:?}");
    sub.shutdown().await;
    dsub.shutdown().await;
}

/// A poison event that kills every consumer that takes it is dead-lettered
/// by delivery count, without running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_that_crashes_consumers_is_dead_lettered() {
    let Some(f) = fixture() else { return };
    let bus = Bus::open(&f.url()).await.unwrap();
    let topic = common::unique("poison");
    let dlq = common::unique("dlq");
    bus.publish(common::event(&topic, 0)).await.unwrap();
    let opts = common::fast_options()
        .ack_wait(Duration::from_millis(200))
        .max_deliveries(2)
        .dead_letter_topic(&dlq);
    for round in 0..2 {
        let (tx, mut took) = tokio::sync::mpsc::unbounded_channel();
        let hang = move |e: Event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
                std::future::pending::<()>().await;
                Ok::<_, HandlerError>(())
            }
        };
        let sub = bus
            .subscribe(&topic, "g", hang, opts.clone())
            .await
            .unwrap();
        tokio::time::timeout(common::PATIENCE, took.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: delivered"));
        drop(sub); // the consumer "crashes"
    }
    let (h, mut rx) = common::recorder();
    let sub = bus.subscribe(&topic, "g", h, opts.clone()).await.unwrap();
    let (dh, mut letters) = common::recorder();
    let dsub = bus
        .subscribe(&dlq, "inspect", dh, common::fast_options())
        .await
        .unwrap();
    let letter = tokio::time::timeout(common::PATIENCE, letters.recv())
        .await
        .unwrap()
        .unwrap();
    let d = DeadLetter::from_event(&letter).unwrap();
    assert_eq!((d.reason, d.attempts), (Reason::MaxDeliveries, 2));
    assert!(d.error.contains("ack wait"), "{}", d.error);
    common::assert_quiet(&mut rx, Duration::from_millis(300)).await;
    sub.shutdown().await;
    dsub.shutdown().await;
}

/// Trimming removes acknowledged entries past the retention and never an
/// unacknowledged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_never_drops_unacked_entries() {
    let Some(f) = fixture() else { return };
    let bus = Bus::open(&f.url()).await.unwrap();
    let topic = common::unique("trim");
    let key = format!("sb:{topic}");
    // A group that reads nothing yet: every entry is unacknowledged for it.
    let (h, mut rx) = common::recorder();
    let idle = bus
        .subscribe(&topic, "slow", h, common::fast_options())
        .await
        .unwrap();
    drop(idle);
    let batch: Vec<Event> = (0..500).map(|n| common::event(&topic, n)).collect();
    bus.publish_batch(batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1600)).await; // past retention, several trims
    let len = redis_cmd(&f.0.url(), &["XLEN", &key]).await;
    assert_eq!(len, redis::Value::Int(500), "nothing trimmed while unread");
    let (h2, mut rx2) = common::recorder();
    let sub = bus
        .subscribe(
            &topic,
            "slow",
            h2,
            common::fast_options().max_in_flight(500),
        )
        .await
        .unwrap();
    common::collect_ids(&mut rx2, 500).await;
    sub.shutdown().await;
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let redis::Value::Int(len) = redis_cmd(&f.0.url(), &["XLEN", &key]).await else {
            panic!("XLEN")
        };
        if len < 500 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acked entries were never trimmed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rx.try_recv().is_err());
}
