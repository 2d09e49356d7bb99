//! The conformance suite on NATS JetStream against a real nats-server with
//! file storage, plus the NATS-specific cases.

mod common;

use common::Fixture;
use switchboard_bus::Bus;
use switchboard_bus::deadletter::{DeadLetter, MALFORMED_TYPE, Reason};
use switchboard_testkit::NatsServer;

struct Nats(NatsServer);

impl Fixture for Nats {
    fn url(&self) -> String {
        format!("{}?block=200ms", self.0.url())
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

fn fixture() -> Option<Nats> {
    NatsServer::start().map(Nats)
}

conformance_tests!(fixture());

/// Garbage on a topic's subject goes to the dead-letter topic with a decode
/// error; good events around it are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered() {
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
    common::publish_n(&bus, &topic, 0..1).await;
    let client = async_nats::connect(f.0.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish(format!("sb.{topic}"), "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    common::publish_n(&bus, &topic, 1..2).await;
    assert_eq!(common::collect_ids(&mut rx, 2).await, ["e00000", "e00001"]);
    let e = tokio::time::timeout(common::PATIENCE, letters.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.ty(), MALFORMED_TYPE);
    let d = DeadLetter::from_event(&e).unwrap();
    assert_eq!(d.reason, Reason::DecodeError);
    assert!(d.error.contains("line 1 column"), "{}", d.error);
    assert_eq!(e.data_as::<String>().unwrap(), "{not json");
    sub.shutdown().await;
    dsub.shutdown().await;
}

/// Publishing one event twice (a retry after a lost ack) stores it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_publishes_are_dropped_by_msg_id() {
    let Some(f) = fixture() else { return };
    let bus = Bus::open(&f.url()).await.unwrap();
    let topic = common::unique("dedupe");
    let e = common::event(&topic, 7);
    bus.publish(e.clone()).await.unwrap();
    bus.publish(e.clone()).await.unwrap();
    bus.publish(common::event(&topic, 8)).await.unwrap();
    let stored = bus.peek(&topic, 10).await.unwrap();
    let ids: Vec<_> = stored
        .into_iter()
        .map(|e| e.unwrap().id().to_owned())
        .collect();
    assert_eq!(ids, ["e00007", "e00008"]);
}
