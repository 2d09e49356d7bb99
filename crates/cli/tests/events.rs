//! `switchboard events publish|tail` against a real redis-server and
//! nats-server started by the testkit on free ports: publish exits 0 once the
//! backend accepted the event, and `tail --group` reads as a durable consumer
//! group that resumes where the previous run stopped, at once: a run hands
//! back what it fetched but did not print instead of acking it or leaving it
//! to the ack wait (30 s).

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::switchboard;
use switchboard_testkit::{NatsServer, Persistence, RedisServer};

/// How long one `tail --count 1` run may take when its event is waiting: far
/// below the 30 s ack wait that a stranded event would cost.
const QUICK: Duration = Duration::from_secs(10);

async fn publish_then_tail_resumes(bus: &str) {
    for (id, n) in [("e-1", 1), ("e-2", 2)] {
        let data = format!("{{\"n\":{n}}}");
        switchboard(&[
            "events", "--bus", bus, "publish", "cli.test", &data, "--id", id,
        ])
        .await;
    }
    let tail = [
        "events", "--bus", bus, "tail", "--group", "g1", "--count", "1", "cli.test",
    ];
    let first = switchboard(&tail).await;
    assert!(
        first.contains("cli.test") && first.contains("e-1"),
        "first tail printed {first:?}"
    );
    assert!(first.contains("\"n\":1"), "first tail printed {first:?}");
    // The group acked e-1, so a second run of the same group resumes at e-2.
    let started = Instant::now();
    let second = switchboard(&tail).await;
    assert!(
        second.contains("e-2") && !second.contains("e-1"),
        "second tail printed {second:?}"
    );
    assert!(
        started.elapsed() < QUICK,
        "second tail took {:?}",
        started.elapsed()
    );
}

/// Two types tailed by one group: both subscriptions fetch at once, one event
/// is printed and the other handed back, so the next run prints it at once.
async fn tail_of_two_types_hands_back_the_other(bus: &str) {
    for (ty, id) in [("cli.a", "a-1"), ("cli.b", "b-1")] {
        switchboard(&["events", "--bus", bus, "publish", ty, "{}", "--id", id]).await;
    }
    let tail = [
        "events", "--bus", bus, "tail", "--group", "g2", "--count", "1", "cli.a", "cli.b",
    ];
    let mut printed = BTreeSet::new();
    for run in 0..2 {
        let started = Instant::now();
        let out = switchboard(&tail).await;
        assert!(
            started.elapsed() < QUICK,
            "run {run} took {:?}",
            started.elapsed()
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "run {run} printed {out:?}");
        let id = lines[0].split(' ').nth(1).unwrap_or_default().to_owned();
        assert!(printed.insert(id), "run {run} printed {out:?} again");
    }
    assert_eq!(
        printed,
        BTreeSet::from(["a-1".to_owned(), "b-1".to_owned()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_tail_on_redis_streams() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    publish_then_tail_resumes(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_of_two_types_on_redis_streams() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    tail_of_two_types_hands_back_the_other(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_tail_on_nats() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    publish_then_tail_resumes(&nats.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_of_two_types_on_nats() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    tail_of_two_types_hands_back_the_other(&nats.url()).await;
}
