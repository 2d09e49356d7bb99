//! The conformance suite on the in-memory backend, plus its virtual-time tests.

mod common;

use std::time::Duration;

use common::Fixture;
use switchboard_bus::{Bus, Event, HandlerError, RetryBackoff, SubscribeOptions};

struct Memory(String);

impl Fixture for Memory {
    fn url(&self) -> String {
        format!("memory://{}", self.0)
    }
    fn restart_broker(&mut self) -> bool {
        false
    }
    fn kill_broker(&mut self) {}
    fn start_broker(&mut self) {}
}

fn fixture() -> Option<Memory> {
    Some(Memory(common::unique("mem")))
}

// Every case but `broker_restart_loses_nothing`: memory is not durable.
conformance_tests!(fixture();
    publish_subscribe,
    fan_out_across_groups,
    competing_consumers,
    redelivery_after_handler_error,
    redelivery_after_consumer_dies,
    dead_letter_after_max_deliveries,
    late_group_sees_earlier_events,
    ordered_per_topic,
    graceful_shutdown_finishes_in_flight,
    start_at_latest_and_delete_group,
    stats_and_lag,
    shutdown_strands_nothing,
    shutdown_mid_stream_strands_nothing,
    shutdown_hands_back_released,
    shutdown_hands_back_scheduled_retries,
);

#[tokio::test]
async fn memory_is_flagged_not_durable() {
    let bus = Bus::open(&fixture().unwrap().url()).await.unwrap();
    let caps = bus.capabilities();
    assert!(!caps.durable && caps.replay_for_new_groups && caps.competing_consumers);
}

/// Ack wait and backoff on virtual time: a failed event comes back exactly
/// after its backoff, an unacked one exactly after the ack wait.
#[tokio::test(start_paused = true)]
async fn timing_follows_backoff_and_ack_wait() {
    let bus = Bus::open(&format!("memory://{}", common::unique("vt")))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |e: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(tokio::time::Instant::now());
            if e.id() == "fail-once" {
                return Err::<(), HandlerError>("no".into());
            }
            Ok(())
        }
    };
    let opts = SubscribeOptions::default()
        .backoff(RetryBackoff::constant(Duration::from_secs(7)))
        .max_deliveries(2);
    let sub = bus.subscribe("vt", "g", handler, opts).await.unwrap();
    let e = Event::builder()
        .source("/s")
        .ty("vt")
        .id("fail-once")
        .build()
        .unwrap();
    bus.publish(e).await.unwrap();
    let first = rx.recv().await.unwrap();
    let second = rx.recv().await.unwrap();
    assert_eq!(second - first, Duration::from_secs(7));
    sub.shutdown().await;

    // A consumer that hangs: the event comes back after the 30 s default ack wait.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let hang = move |_e: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(tokio::time::Instant::now());
            std::future::pending::<()>().await;
            Ok::<_, HandlerError>(())
        }
    };
    let sub = bus
        .subscribe(
            "vt2",
            "g",
            hang,
            SubscribeOptions::default().max_in_flight(2),
        )
        .await
        .unwrap();
    bus.publish(Event::builder().source("/s").ty("vt2").build().unwrap())
        .await
        .unwrap();
    let first = rx.recv().await.unwrap();
    let second = rx.recv().await.unwrap();
    assert_eq!(second - first, Duration::from_secs(30));
    drop(sub);
}

#[tokio::test]
async fn buses_with_one_name_share_topics() {
    let name = common::unique("shared");
    let a = Bus::open(&format!("memory://{name}")).await.unwrap();
    let b = Bus::open(&format!("memory://{name}")).await.unwrap();
    let (h, mut rx) = common::recorder();
    let sub = b
        .subscribe("t", "g", h, SubscribeOptions::default())
        .await
        .unwrap();
    a.publish(common::event("t", 1)).await.unwrap();
    assert_eq!(common::collect_ids(&mut rx, 1).await, ["e00001"]);
    sub.shutdown().await;
    assert!(Bus::open("memory://x?bogus=1").await.is_err());
    assert!(Bus::open("carrier-pigeon://x").await.is_err());
}

/// A handler that panics before it returns its future (in the closure body)
/// is treated like one that panics inside it: redelivered, then dead-lettered
/// with the panic message; the subscription keeps running.
#[tokio::test(start_paused = true)]
async fn a_handler_panicking_before_its_future_is_dead_lettered() {
    let bus = Bus::open(&format!("memory://{}", common::unique("panic")))
        .await
        .unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c = std::sync::Arc::clone(&calls);
    let handler = move |e: Event| {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(e.id() != "poison", "boom");
        std::future::ready(Ok::<_, HandlerError>(()))
    };
    let opts = SubscribeOptions::default()
        .backoff(RetryBackoff::constant(Duration::from_millis(10)))
        .max_deliveries(2);
    let sub = bus.subscribe("p", "g", handler, opts).await.unwrap();
    let (dh, mut letters) = common::recorder();
    let dsub = bus
        .subscribe("deadletter", "inspect", dh, SubscribeOptions::default())
        .await
        .unwrap();
    let poison = Event::builder()
        .source("/s")
        .ty("p")
        .id("poison")
        .build()
        .unwrap();
    bus.publish(poison).await.unwrap();
    bus.publish(common::event("p", 1)).await.unwrap();
    let letter = letters.recv().await.unwrap();
    let d = switchboard_bus::deadletter::DeadLetter::from_event(&letter).unwrap();
    assert_eq!(d.attempts, 2);
    assert!(d.error.contains("handler panicked: boom"), "{}", d.error);
    // Two runs of the poison event, one of the good one.
    while calls.load(std::sync::atomic::Ordering::Relaxed) < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sub.shutdown().await;
    dsub.shutdown().await;
}

/// A permanent `Nack` dead-letters at once (reason `rejected`); a
/// `Nack::retry_after` delays the redelivery past the backoff; handlers see
/// which delivery they run for.
#[tokio::test(start_paused = true)]
async fn nack_rejects_or_delays_and_handlers_see_the_attempt() {
    use switchboard_bus::deadletter::{DeadLetter, Reason};
    use switchboard_bus::{Nack, current_delivery};
    let bus = Bus::open(&format!("memory://{}", common::unique("nack")))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |e: Event| {
        let tx = tx.clone();
        async move {
            let info = current_delivery().expect("inside a handler");
            let _ = tx.send((
                tokio::time::Instant::now(),
                info.attempt,
                info.max_deliveries,
            ));
            match (e.id(), info.attempt) {
                ("reject", _) => Err(Nack::permanent("HTTP 400: bad order").into()),
                ("slow", 1) => Err(Nack::retry_after("HTTP 429", Duration::from_secs(9)).into()),
                _ => Ok::<_, HandlerError>(()),
            }
        }
    };
    let opts = SubscribeOptions::default()
        .backoff(RetryBackoff::constant(Duration::from_secs(1)))
        .max_deliveries(4)
        .dead_letter_topic("nack.dlq");
    let sub = bus.subscribe("nack", "g", handler, opts).await.unwrap();
    let (h, mut letters) = common::recorder();
    let dsub = bus
        .subscribe("nack.dlq", "inspect", h, SubscribeOptions::default())
        .await
        .unwrap();
    let ev = |id: &str| {
        Event::builder()
            .source("/s")
            .ty("nack")
            .id(id)
            .build()
            .unwrap()
    };
    bus.publish(ev("slow")).await.unwrap();
    let (t1, a1, max) = rx.recv().await.unwrap();
    let (t2, a2, _) = rx.recv().await.unwrap();
    assert_eq!((a1, a2, max), (1, 2, 4));
    assert_eq!(
        t2 - t1,
        Duration::from_secs(9),
        "Retry-After beats the 1 s backoff"
    );
    bus.publish(ev("reject")).await.unwrap();
    let (_, attempt, _) = rx.recv().await.unwrap();
    assert_eq!(attempt, 1);
    let letter = letters.recv().await.unwrap();
    let d = DeadLetter::from_event(&letter).unwrap();
    assert_eq!((d.reason, d.attempts), (Reason::Rejected, 1));
    assert_eq!(d.error, "HTTP 400: bad order");
    assert!(d.original().is_some(), "rejected letters can be replayed");
    let again = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert!(again.is_err(), "a rejected event is not redelivered");
    sub.shutdown().await;
    dsub.shutdown().await;
}
