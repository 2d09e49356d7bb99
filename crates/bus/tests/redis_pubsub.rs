//! The conformance cases Redis Pub/Sub promises, against a real redis-server,
//! plus wire compatibility with the plain Node.js envelope.

mod common;

use std::time::Duration;

use common::Fixture;
use futures::StreamExt;
use switchboard_bus::{Bus, Event};
use switchboard_testkit::{Persistence, RedisServer};

struct PubSub(RedisServer);

impl Fixture for PubSub {
    fn url(&self) -> String {
        format!("redis+pubsub://127.0.0.1:{}", self.0.port())
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

fn fixture() -> Option<PubSub> {
    RedisServer::start(Persistence::None).map(PubSub)
}

// Not run: competing consumers, redelivery after a crash, replay for late
// groups and surviving a restart; the capabilities say so (checked below).
conformance_tests!(fixture();
    publish_subscribe,
    fan_out_across_groups,
    redelivery_after_handler_error,
    dead_letter_after_max_deliveries,
    ordered_per_topic,
    graceful_shutdown_finishes_in_flight,
);

#[tokio::test]
async fn capabilities_are_honest() {
    let Some(f) = fixture() else { return };
    let bus = Bus::open(&f.url()).await.unwrap();
    let caps = bus.capabilities();
    assert!(!caps.durable && !caps.replay_for_new_groups && !caps.competing_consumers);
    assert!(!caps.redelivery_after_crash);
    assert!(bus.peek("t", 1).await.is_err());
    // Honest about loss: an event published with nobody subscribed is gone.
    bus.publish(common::event("lost", 0)).await.unwrap();
    let (h, mut rx) = common::recorder();
    let sub = bus
        .subscribe("lost", "g", h, common::fast_options())
        .await
        .unwrap();
    common::assert_quiet(&mut rx, Duration::from_millis(200)).await;
    sub.shutdown().await;
}

/// A Node.js bus's `PUBLISH name JSON.stringify({id, timestamp, name, data, version})`
/// reaches our handlers, and what we publish is that envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_compatible_with_the_plain_envelope() {
    let Some(f) = fixture() else { return };
    let bus = Bus::open(&f.url()).await.unwrap();
    let (h, mut rx) = common::recorder();
    let sub = bus
        .subscribe("payment.completed", "orders", h, common::fast_options())
        .await
        .unwrap();

    let client = redis::Client::open(f.0.url()).unwrap();
    let mut raw_sub = client.get_async_pubsub().await.unwrap();
    raw_sub.subscribe("payment.completed").await.unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let node = r#"{"id":"1700000000000-k3j4h5g6f","timestamp":"2024-05-01T10:00:00.000Z","name":"payment.completed","data":{"orderId":"o-1","paymentId":"p-9"},"version":"1.0"}"#;
    let _: i64 = redis::cmd("PUBLISH")
        .arg("payment.completed")
        .arg(node)
        .query_async(&mut conn)
        .await
        .unwrap();
    let got = tokio::time::timeout(common::PATIENCE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id(), "1700000000000-k3j4h5g6f");
    assert_eq!(got.ty(), "payment.completed");
    assert_eq!(
        got.data_as::<serde_json::Value>().unwrap()["paymentId"],
        "p-9"
    );

    let ours = Event::builder()
        .source("/payments")
        .ty("payment.completed")
        .data(&serde_json::json!({"orderId": "o-2"}))
        .build()
        .unwrap();
    bus.publish(ours.clone()).await.unwrap();
    let mut messages = raw_sub.on_message();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(common::PATIENCE, messages.next())
            .await
            .unwrap()
            .unwrap();
        seen.push(serde_json::from_slice::<serde_json::Value>(msg.get_payload_bytes()).unwrap());
    }
    let wire = &seen[1];
    assert_eq!(wire["id"], ours.id());
    assert_eq!(wire["name"], "payment.completed");
    assert_eq!(wire["timestamp"], ours.time().unwrap());
    assert_eq!(wire["data"]["orderId"], "o-2");
    assert_eq!(wire["version"], "1.0");
    sub.shutdown().await;
}
