//! The conformance suite every backend runs (after Watermill's universal Pub/Sub tests).
//!
//! A backend's test file implements [`Fixture`] and invokes
//! [`conformance_tests!`]; each case skips itself, with a printed reason, when
//! the backend's [`Capabilities`] say it does not promise what the case checks.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use switchboard_bus::deadletter::{DeadLetter, Reason};
use switchboard_bus::{
    Bus, Capabilities, Event, HandlerError, Nack, RetryBackoff, SubscribeOptions, current_delivery,
};
use tokio::sync::{Semaphore, mpsc};

/// How long a case waits for what it expects before failing.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A backend under test.
pub trait Fixture: Send {
    /// The bus URL.
    fn url(&self) -> String;
    /// Kills the broker (SIGKILL) and starts it again on the same port and data.
    /// `false` if the backend has no broker to restart.
    fn restart_broker(&mut self) -> bool;
    /// Kills the broker without restarting it.
    fn kill_broker(&mut self);
    /// Starts a killed broker again.
    fn start_broker(&mut self);
}

/// A short ack wait and fast constant backoff keep the suite quick.
pub fn fast_options() -> SubscribeOptions {
    SubscribeOptions::default()
        .ack_wait(Duration::from_millis(700))
        .backoff(RetryBackoff::constant(Duration::from_millis(20)))
        .max_deliveries(5)
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A topic name unique within the process.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}.{}.{n}", std::process::id())
}

pub fn event(topic: &str, n: usize) -> Event {
    Event::builder()
        .source("/conformance")
        .ty(topic)
        .id(format!("e{n:05}"))
        .data(&serde_json::json!({ "n": n }))
        .build()
        .unwrap()
}

pub async fn publish_n(bus: &Bus, topic: &str, range: std::ops::Range<usize>) {
    for n in range {
        bus.publish(event(topic, n)).await.unwrap();
    }
}

/// A handler that forwards every delivery (id) to a channel and succeeds.
pub fn recorder() -> (
    impl switchboard_bus::Handler,
    mpsc::UnboundedReceiver<Event>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = move |e: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(e);
            Ok::<_, HandlerError>(())
        }
    };
    (handler, rx)
}

/// Receives until `n` distinct ids arrived; panics after [`PATIENCE`].
pub async fn collect_ids(rx: &mut mpsc::UnboundedReceiver<Event>, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut distinct = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while distinct.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => {
                distinct.insert(e.id().to_owned());
                seen.push(e.id().to_owned());
            }
            _ => panic!(
                "only {} of {n} events arrived within {PATIENCE:?}",
                distinct.len()
            ),
        }
    }
    seen
}

/// Asserts nothing more arrives for `quiet`.
pub async fn assert_quiet(rx: &mut mpsc::UnboundedReceiver<Event>, quiet: Duration) {
    if let Ok(Some(e)) = tokio::time::timeout(quiet, rx.recv()).await {
        panic!("unexpected extra delivery of {}", e.id());
    }
}

fn ids(range: std::ops::Range<usize>) -> BTreeSet<String> {
    range.map(|n| format!("e{n:05}")).collect()
}

fn skip(caps: &Capabilities, what: &str) {
    eprintln!(
        "skipping on {}: the backend does not promise {what}",
        caps.backend
    );
}

pub async fn publish_subscribe(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    let topic = unique("ps");
    let (h, mut rx) = recorder();
    let sub = bus.subscribe(&topic, "g", h, fast_options()).await.unwrap();
    publish_n(&bus, &topic, 0..50).await;
    let got: BTreeSet<_> = collect_ids(&mut rx, 50).await.into_iter().collect();
    assert_eq!(got, ids(0..50));
    sub.shutdown().await;
    let m = bus.metrics().snapshot();
    assert_eq!(m.published, 50);
    assert!(m.acked >= 50, "{m:?}");
}

pub async fn fan_out_across_groups(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    let topic = unique("fan");
    let (h1, mut rx1) = recorder();
    let (h2, mut rx2) = recorder();
    let s1 = bus
        .subscribe(&topic, "g1", h1, fast_options())
        .await
        .unwrap();
    let s2 = bus
        .subscribe(&topic, "g2", h2, fast_options())
        .await
        .unwrap();
    publish_n(&bus, &topic, 0..30).await;
    let a: BTreeSet<_> = collect_ids(&mut rx1, 30).await.into_iter().collect();
    let b: BTreeSet<_> = collect_ids(&mut rx2, 30).await.into_iter().collect();
    assert_eq!(a, ids(0..30));
    assert_eq!(b, ids(0..30));
    s1.shutdown().await;
    s2.shutdown().await;
}

pub async fn competing_consumers(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().competing_consumers {
        return skip(&bus.capabilities(), "competing consumers");
    }
    let topic = unique("compete");
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Event)>();
    let mut subs = Vec::new();
    for worker in 0..3 {
        let tx = tx.clone();
        let handler = move |e: Event| {
            let tx = tx.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let _ = tx.send((worker, e));
                Ok::<_, HandlerError>(())
            }
        };
        let opts = fast_options()
            .max_in_flight(2)
            .consumer_name(format!("w{worker}"));
        subs.push(
            bus.subscribe(&topic, "workers", handler, opts)
                .await
                .unwrap(),
        );
    }
    publish_n(&bus, &topic, 0..90).await;
    let mut per_worker: BTreeMap<usize, usize> = BTreeMap::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while seen.len() < 90 {
        let (w, e) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("all events within patience")
            .unwrap();
        *per_worker.entry(w).or_default() += 1;
        *seen.entry(e.id().to_owned()).or_default() += 1;
    }
    assert!(per_worker.len() >= 2, "work was not shared: {per_worker:?}");
    assert!(
        seen.values().all(|&c| c == 1),
        "an event was handled twice in one group"
    );
    for s in subs {
        s.shutdown().await;
    }
}

pub async fn redelivery_after_handler_error(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    let topic = unique("retry");
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = Arc::clone(&attempts);
    let handler = move |e: Event| {
        let (a, tx) = (Arc::clone(&a), tx.clone());
        async move {
            let n = {
                let mut g = a.lock();
                let c = g.entry(e.id().to_owned()).or_default();
                *c += 1;
                *c
            };
            match n {
                1 => Err::<(), HandlerError>("transient failure".into()),
                2 => panic!("handler panics on the second attempt"),
                _ => {
                    let _ = tx.send(e);
                    Ok(())
                }
            }
        }
    };
    // Redelivery after an error follows the backoff, not the ack wait; a long
    // ack wait keeps a slow (loaded) machine from also reclaiming an entry
    // whose retry is running, which would make a fourth attempt.
    let opts = fast_options().ack_wait(Duration::from_secs(10));
    let sub = bus.subscribe(&topic, "g", handler, opts).await.unwrap();
    publish_n(&bus, &topic, 0..10).await;
    let got: BTreeSet<_> = collect_ids(&mut rx, 10).await.into_iter().collect();
    assert_eq!(got, ids(0..10));
    assert!(attempts.lock().values().all(|&n| n == 3), "{attempts:?}");
    sub.shutdown().await;
    let m = bus.metrics().snapshot();
    assert!(m.redelivered >= 20, "{m:?}");
    assert_eq!(m.handler_errors, 20, "{m:?}");
    assert_eq!(m.dead_lettered, 0, "{m:?}");
}

pub async fn redelivery_after_consumer_dies(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().redelivery_after_crash {
        return skip(&bus.capabilities(), "redelivery after a crash");
    }
    let topic = unique("crash");
    // The first consumer takes the events and never finishes handling them.
    let (took_tx, mut took) = mpsc::unbounded_channel();
    let hang = move |e: Event| {
        let took_tx = took_tx.clone();
        async move {
            let _ = took_tx.send(e);
            std::future::pending::<()>().await;
            Ok::<_, HandlerError>(())
        }
    };
    let opts = fast_options().max_in_flight(100).consumer_name("doomed");
    let doomed = bus.subscribe(&topic, "g", hang, opts).await.unwrap();
    publish_n(&bus, &topic, 0..10).await;
    collect_ids(&mut took, 10).await;
    drop(doomed); // crash: nothing acked
    let (h, mut rx) = recorder();
    let opts = fast_options().consumer_name("survivor");
    let survivor = bus.subscribe(&topic, "g", h, opts).await.unwrap();
    let got: BTreeSet<_> = collect_ids(&mut rx, 10).await.into_iter().collect();
    assert_eq!(got, ids(0..10));
    survivor.shutdown().await;
}

pub async fn dead_letter_after_max_deliveries(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    let topic = unique("doomed");
    let dlq = unique("dlq");
    let failing = |_e: Event| async { Err::<(), HandlerError>("always fails".into()) };
    let opts = fast_options().max_deliveries(3).dead_letter_topic(&dlq);
    let sub = bus.subscribe(&topic, "g", failing, opts).await.unwrap();
    let (h, mut letters) = recorder();
    let dsub = bus
        .subscribe(&dlq, "inspect", h, fast_options())
        .await
        .unwrap();
    publish_n(&bus, &topic, 0..3).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut got = BTreeSet::new();
    while got.len() < 3 {
        let e = tokio::time::timeout_at(deadline, letters.recv())
            .await
            .expect("dead letters within patience")
            .unwrap();
        let d = DeadLetter::from_event(&e).expect("dead-letter attributes");
        assert_eq!(d.reason, Reason::MaxDeliveries);
        assert_eq!(d.attempts, 3);
        assert_eq!(d.error, "always fails");
        assert_eq!(d.topic, topic);
        assert_eq!(d.group, "g");
        let original = d.original().unwrap().unwrap();
        assert_eq!(original.ty(), topic);
        assert_eq!(
            original.data_as::<serde_json::Value>().unwrap()["n"],
            e.data_as::<serde_json::Value>().unwrap()["n"]
        );
        got.insert(original.id().to_owned());
    }
    assert_eq!(got, ids(0..3));
    sub.shutdown().await;
    dsub.shutdown().await;
    assert_eq!(bus.metrics().snapshot().dead_lettered, 3);
}

pub async fn late_group_sees_earlier_events(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().replay_for_new_groups {
        return skip(&bus.capabilities(), "replay for new groups");
    }
    let topic = unique("late");
    publish_n(&bus, &topic, 0..20).await;
    let (h, mut rx) = recorder();
    let sub = bus
        .subscribe(&topic, "late", h, fast_options())
        .await
        .unwrap();
    publish_n(&bus, &topic, 20..25).await;
    let got: BTreeSet<_> = collect_ids(&mut rx, 25).await.into_iter().collect();
    assert_eq!(got, ids(0..25));
    sub.shutdown().await;
    let peeked = bus.peek(&topic, 5).await.unwrap();
    let peeked: Vec<_> = peeked
        .into_iter()
        .map(|e| e.unwrap().id().to_owned())
        .collect();
    assert_eq!(peeked, ["e00000", "e00001", "e00002", "e00003", "e00004"]);
}

pub async fn ordered_per_topic(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().ordered_per_topic {
        return skip(&bus.capabilities(), "ordering");
    }
    let topic = unique("order");
    let (h, mut rx) = recorder();
    let sub = bus
        .subscribe(&topic, "g", h, fast_options().max_in_flight(1))
        .await
        .unwrap();
    let batch: Vec<Event> = (0..100).map(|n| event(&topic, n)).collect();
    bus.publish_batch(batch).await.unwrap();
    publish_n(&bus, &topic, 100..150).await;
    let got = collect_ids(&mut rx, 150).await;
    let want: Vec<String> = (0..150).map(|n| format!("e{n:05}")).collect();
    assert_eq!(got, want);
    sub.shutdown().await;
}

pub async fn graceful_shutdown_finishes_in_flight(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    let topic = unique("drain");
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let finished: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let fin = Arc::clone(&finished);
    let slow = move |e: Event| {
        let (started_tx, fin) = (started_tx.clone(), Arc::clone(&fin));
        async move {
            let _ = started_tx.send(e.clone());
            tokio::time::sleep(Duration::from_millis(300)).await;
            fin.lock().insert(e.id().to_owned());
            Ok::<_, HandlerError>(())
        }
    };
    let sub = bus
        .subscribe(
            &topic,
            "g",
            slow,
            fast_options()
                .ack_wait(Duration::from_secs(5))
                .max_in_flight(5),
        )
        .await
        .unwrap();
    publish_n(&bus, &topic, 0..5).await;
    collect_ids(&mut started, 5).await;
    sub.shutdown().await;
    assert_eq!(
        *finished.lock(),
        ids(0..5),
        "in-flight handlers finished before shutdown returned"
    );
    assert!(bus.metrics().snapshot().acked >= 5);
    // Acked: the group does not get them again.
    let (h, mut rx) = recorder();
    let again = bus.subscribe(&topic, "g", h, fast_options()).await.unwrap();
    publish_n(&bus, &topic, 5..6).await;
    let got = collect_ids(&mut rx, 1).await;
    assert_eq!(got, ["e00005"]);
    assert_quiet(&mut rx, Duration::from_millis(300)).await;
    again.shutdown().await;
}

/// Publishes 300 events while the broker is killed and restarted; every
/// event whose publish returned `Ok` is handled.
pub async fn broker_restart_loses_nothing(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().durable {
        return skip(&bus.capabilities(), "durability");
    }
    let topic = unique("restart");
    let (h, mut rx) = recorder();
    let sub = bus.subscribe(&topic, "g", h, fast_options()).await.unwrap();
    let mut accepted = BTreeSet::new();
    for n in 0..300 {
        if n == 100 {
            f.kill_broker();
        }
        if n == 102 {
            f.start_broker();
        }
        // A publish that failed was not accepted: the producer retries it, as real ones do.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match bus.publish(event(&topic, n)).await {
                Ok(()) => {
                    accepted.insert(format!("e{n:05}"));
                    break;
                }
                Err(e) if tokio::time::Instant::now() < deadline && n >= 100 => {
                    assert!(e.is_retryable(), "{e}");
                    if (100..102).contains(&n) {
                        break; // broker down: give up on this one, it was never accepted
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("publish {n} failed: {e}"),
            }
        }
    }
    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !accepted.is_subset(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => {
                got.insert(e.id().to_owned());
            }
            _ => panic!(
                "lost after restart: {:?}",
                accepted.difference(&got).take(10).collect::<Vec<_>>()
            ),
        }
    }
    assert!(accepted.len() >= 290, "only {} accepted", accepted.len());
    sub.shutdown().await;
}

/// Declares one `#[tokio::test]` per conformance case for a backend;
/// `$fixture` is an expression returning `Option<impl Fixture>` (`None` = skip).
/// With a list after `;`, only those cases (for backends that document not
/// promising the others, e.g. surviving a restart).
#[macro_export]
macro_rules! conformance_tests {
    ($fixture:expr; $($case:ident),* $(,)?) => {
        $crate::conformance_tests!(@cases $fixture; $($case),*);
    };
    ($fixture:expr) => {
        $crate::conformance_tests!(@cases $fixture;
            publish_subscribe,
            fan_out_across_groups,
            competing_consumers,
            redelivery_after_handler_error,
            redelivery_after_consumer_dies,
            dead_letter_after_max_deliveries,
            late_group_sees_earlier_events,
            ordered_per_topic,
            graceful_shutdown_finishes_in_flight,
            broker_restart_loses_nothing,
            start_at_latest_and_delete_group,
            stats_and_lag,
            shutdown_strands_nothing,
            shutdown_mid_stream_strands_nothing,
            shutdown_hands_back_released,
            shutdown_hands_back_scheduled_retries,
        );
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(mut fixture) = $fixture else { return };
                common::$case(&mut fixture).await;
            }
        )*
    };
}

/// A group created with `start_at_latest` skips retained events; deleting a
/// group forgets its position (a new group of that name starts over).
pub async fn start_at_latest_and_delete_group(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().replay_for_new_groups {
        return skip(&bus.capabilities(), "replay for new groups");
    }
    let topic = unique("latest");
    publish_n(&bus, &topic, 0..5).await;
    let (h, mut rx) = recorder();
    let sub = bus
        .subscribe(&topic, "tail", h, fast_options().start_at_latest(true))
        .await
        .unwrap();
    publish_n(&bus, &topic, 5..6).await;
    assert_eq!(collect_ids(&mut rx, 1).await, ["e00005"]);
    assert_quiet(&mut rx, Duration::from_millis(200)).await;
    sub.shutdown().await;
    bus.delete_group(&topic, "tail").await.unwrap();
    let (h, mut rx) = recorder();
    let sub = bus
        .subscribe(&topic, "tail", h, fast_options())
        .await
        .unwrap();
    let got: BTreeSet<_> = collect_ids(&mut rx, 6).await.into_iter().collect();
    assert_eq!(got, ids(0..6));
    sub.shutdown().await;
}

/// The stats tap counts publishes per topic and deliveries per group, keeps
/// the latest events, and the backend reports the lag of a stopped group.
pub async fn stats_and_lag(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    bus.stats().tap(true);
    let topic = unique("stats");
    let (h, mut rx) = recorder();
    let sub = bus
        .subscribe(&topic, "watchers", h, fast_options())
        .await
        .unwrap();
    publish_n(&bus, &topic, 0..4).await;
    assert_eq!(collect_ids(&mut rx, 4).await.len(), 4);
    sub.shutdown().await;
    publish_n(&bus, &topic, 4..7).await;
    assert_eq!(bus.lag(&topic, "watchers").await.unwrap(), Some(3));
    let snap = bus.stats_snapshot().await;
    let t = snap.topics.iter().find(|t| t.topic == topic).unwrap();
    assert_eq!(t.published, 7);
    let g = snap
        .groups
        .iter()
        .find(|g| g.topic == topic && g.group == "watchers")
        .unwrap();
    assert_eq!((g.delivered, g.acked, g.lag), (4, 4, Some(3)), "{g:?}");
    assert_eq!(snap.recent[0].id, "e00006");
    assert_eq!(bus.stats().find("e00002", 10).len(), 1);
}

/// An ack wait far longer than the shutdown cases below wait for a handed-back
/// event: one left stranded until the ack wait fails them.
const STRANDED: Duration = Duration::from_secs(30);

/// How soon a handed-back event must reach the group's next consumer.
const HANDBACK: Duration = Duration::from_secs(8);

/// Subscribes the group's next consumer of `topic`, waits until `n` distinct
/// events reached it (id -> attempt of its last delivery) and shuts it down;
/// panics if they take longer than [`HANDBACK`].
async fn next_consumer_gets(bus: &Bus, topic: &str, n: usize) -> BTreeMap<String, u32> {
    let (h, mut rx) = attempt_recorder();
    let next = bus
        .subscribe(topic, "g", h, fast_options().ack_wait(STRANDED))
        .await
        .unwrap();
    let got = collect_attempts(&mut rx, n, HANDBACK).await;
    next.shutdown().await;
    got
}

/// A handler that reports each delivery's event id and attempt.
fn attempt_recorder() -> (
    impl switchboard_bus::Handler,
    mpsc::UnboundedReceiver<(String, u32)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = move |e: Event| {
        let tx = tx.clone();
        async move {
            let attempt = current_delivery().map_or(0, |d| d.attempt);
            let _ = tx.send((e.id().to_owned(), attempt));
            Ok::<_, HandlerError>(())
        }
    };
    (handler, rx)
}

/// Receives until `n` distinct ids arrived (id -> attempt of its last
/// delivery); panics if that takes longer than `within`.
async fn collect_attempts(
    rx: &mut mpsc::UnboundedReceiver<(String, u32)>,
    n: usize,
    within: Duration,
) -> BTreeMap<String, u32> {
    let mut got = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((id, attempt))) => {
                got.insert(id, attempt);
            }
            _ => panic!(
                "only {got:?} of {n} events reached the next consumer within {within:?} \
                 (the ack wait is {STRANDED:?})"
            ),
        }
    }
    got
}

/// A handler that reports each event it starts and then waits for a permit
/// of `gate` before it returns `outcome()`.
fn gated<F>(
    gate: &Arc<Semaphore>,
    outcome: F,
) -> (
    impl switchboard_bus::Handler,
    mpsc::UnboundedReceiver<Event>,
)
where
    F: Fn() -> Result<(), HandlerError> + Send + Sync + Copy + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let gate = Arc::clone(gate);
    let handler = move |e: Event| {
        let (tx, gate) = (tx.clone(), Arc::clone(&gate));
        async move {
            let _ = tx.send(e);
            gate.acquire().await.expect("gate open").forget();
            outcome()
        }
    };
    (handler, rx)
}

/// A subscription shut down while its handler runs leaves nothing behind:
/// with `max_in_flight(1)` it has fetched no event but the one it handles, so
/// the group's next consumer gets the rest at once, not after the ack wait
/// (a client that prefetched more would strand them until then).
pub async fn shutdown_strands_nothing(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().redelivery_after_crash {
        return skip(
            &bus.capabilities(),
            "that a group keeps events for its next consumer",
        );
    }
    let topic = unique("strand");
    let gate = Arc::new(Semaphore::new(0));
    let (h, mut started) = gated(&gate, || Ok(()));
    let opts = fast_options().ack_wait(STRANDED).max_in_flight(1);
    let sub = bus.subscribe(&topic, "g", h, opts).await.unwrap();
    publish_n(&bus, &topic, 0..5).await;
    assert_eq!(collect_ids(&mut started, 1).await, ["e00000"]);
    // Stop fetching before the running handler finishes, as `events tail --count` does.
    sub.stop();
    gate.add_permits(1);
    tokio::time::timeout(HANDBACK, sub.shutdown())
        .await
        .expect("shutdown within the handback time");
    let got = next_consumer_gets(&bus, &topic, 4).await;
    let want: BTreeMap<String, u32> = ids(1..5).into_iter().map(|id| (id, 1)).collect();
    assert_eq!(
        got, want,
        "e00000 was acked; the others were never delivered"
    );
}

/// A subscription shut down while it is busy consuming a backlog strands
/// nothing: every event it did not handle reaches the group's next consumer
/// at once. (A fetch dropped midway, or a client that pulled ahead of its
/// handlers, would keep some until the ack wait.)
pub async fn shutdown_mid_stream_strands_nothing(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().redelivery_after_crash {
        return skip(
            &bus.capabilities(),
            "that a group keeps events for its next consumer",
        );
    }
    let topic = unique("busy");
    let batch: Vec<Event> = (0..40).map(|n| event(&topic, n)).collect();
    bus.publish_batch(batch).await.unwrap();
    // Handlers slower than fetching, so that room, not events, limits fetches.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let slow = move |e: Event| {
        let tx = tx.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = tx.send(e);
            Ok::<_, HandlerError>(())
        }
    };
    let opts = fast_options().ack_wait(STRANDED).max_in_flight(4);
    let sub = bus.subscribe(&topic, "g", slow, opts).await.unwrap();
    let mut handled: BTreeSet<String> = collect_ids(&mut rx, 5).await.into_iter().collect();
    tokio::time::timeout(HANDBACK, sub.shutdown())
        .await
        .expect("shutdown within the handback time");
    while let Ok(e) = rx.try_recv() {
        handled.insert(e.id().to_owned());
    }
    let rest = 40 - handled.len();
    let got = next_consumer_gets(&bus, &topic, rest).await;
    let all: BTreeSet<String> = handled.iter().cloned().chain(got.into_keys()).collect();
    assert_eq!(all, ids(0..40));
}

/// Handlers running when shutdown begins that refuse with [`Nack::release`]
/// hand their events back to the group: the next consumer gets them at once.
/// A release does not count as a delivery, except on NATS (a NAK does). The
/// bus counts them as handed back, `released`.
pub async fn shutdown_hands_back_released(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().redelivery_after_crash {
        return skip(
            &bus.capabilities(),
            "that a group keeps events for its next consumer",
        );
    }
    let topic = unique("release");
    let gate = Arc::new(Semaphore::new(0));
    let (h, mut started) = gated(&gate, || Err(Nack::release("stopping").into()));
    let opts = fast_options().ack_wait(STRANDED).max_in_flight(4);
    let sub = bus.subscribe(&topic, "g", h, opts).await.unwrap();
    publish_n(&bus, &topic, 0..4).await;
    collect_ids(&mut started, 4).await;
    sub.stop();
    gate.add_permits(4);
    tokio::time::timeout(HANDBACK, sub.shutdown())
        .await
        .expect("shutdown within the handback time");
    let m = bus.metrics().snapshot();
    assert_eq!((m.acked, m.handler_errors), (0, 0), "{m:?}");
    assert_eq!((m.released, m.held), (4, 0), "{m:?}");
    let snap = bus.stats().snapshot();
    let g = snap.groups.iter().find(|g| g.topic == topic).unwrap();
    assert_eq!((g.released, g.held), (4, 0), "{g:?}");
    let got = next_consumer_gets(&bus, &topic, 4).await;
    let attempt = if bus.capabilities().backend == "nats" {
        2
    } else {
        1
    };
    let want: BTreeMap<String, u32> = ids(0..4).into_iter().map(|id| (id, attempt)).collect();
    assert_eq!(got, want);
}

/// A failed event whose redelivery is still waiting for its backoff when the
/// subscription shuts down goes to the next consumer once the backoff ends,
/// not after the ack wait (Redis keeps it in-process until then, and counts
/// it as handed back, `held`).
pub async fn shutdown_hands_back_scheduled_retries(f: &mut dyn Fixture) {
    let bus = Bus::open(&f.url()).await.unwrap();
    if !bus.capabilities().redelivery_after_crash {
        return skip(
            &bus.capabilities(),
            "that a group keeps events for its next consumer",
        );
    }
    let topic = unique("pending-retry");
    let (tx, mut failed) = mpsc::unbounded_channel();
    let failing = move |e: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(e);
            Err::<(), HandlerError>("fails once".into())
        }
    };
    let backoff = Duration::from_secs(1);
    let opts = fast_options()
        .ack_wait(STRANDED)
        .backoff(RetryBackoff::constant(backoff));
    let sub = bus.subscribe(&topic, "g", failing, opts).await.unwrap();
    publish_n(&bus, &topic, 0..1).await;
    collect_ids(&mut failed, 1).await;
    let failed_at = tokio::time::Instant::now();
    tokio::time::timeout(HANDBACK, sub.shutdown())
        .await
        .expect("shutdown within the handback time");
    // The other backends keep the redelivery themselves: nothing to hand back.
    let held = u64::from(bus.capabilities().backend == "redis");
    let m = bus.metrics().snapshot();
    assert_eq!((m.released, m.held), (0, held), "{m:?}");
    let snap = bus.stats().snapshot();
    let g = snap.groups.iter().find(|g| g.topic == topic).unwrap();
    assert_eq!((g.released, g.held), (0, held), "{g:?}");
    let got = next_consumer_gets(&bus, &topic, 1).await;
    assert_eq!(got, BTreeMap::from([("e00000".to_owned(), 2)]));
    // The backoff still holds (less a little for clocks measured apart).
    let waited = failed_at.elapsed();
    assert!(waited >= backoff / 2, "redelivered after {waited:?}");
}
