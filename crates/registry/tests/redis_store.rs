//! The `redis://` store against a real redis-server: a shared view between
//! registries, check ownership and takeover, Redis restarts and lost notifications.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use futures::StreamExt;
use switchboard_registry::{
    CheckSpec, Registration, Registry, RegistryError, RegistryOptions, ServiceView, Status,
};
use switchboard_testkit::{Persistence, RedisServer};

fn opts() -> RegistryOptions {
    RegistryOptions::default().resync_interval(Duration::from_millis(300))
}

async fn open(url: &str) -> Registry {
    Registry::open(url, opts()).await.unwrap()
}

/// Waits until `pred` holds for the service's view; panics with the view after `secs`.
async fn until(
    r: &Registry,
    service: &str,
    secs: u64,
    pred: impl Fn(&ServiceView) -> bool,
) -> Duration {
    let started = Instant::now();
    let mut w = r.watch(service);
    let ok = tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            if pred(&w.load()) {
                return;
            }
            // also poll: some conditions (lease ownership) change without a view change
            let _ = tokio::time::timeout(Duration::from_millis(20), w.changed()).await;
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "condition on {service} not met in {secs}s: {:?}",
        w.load()
    );
    started.elapsed()
}

#[derive(Clone)]
struct Backend {
    code: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
}

async fn backend() -> (Backend, u16) {
    let b = Backend {
        code: Arc::new(AtomicU16::new(200)),
        hits: Arc::new(AtomicUsize::new(0)),
    };
    let app = axum::Router::new()
        .route(
            "/health",
            axum::routing::get(|State(b): State<Backend>| async move {
                b.hits.fetch_add(1, Ordering::SeqCst);
                StatusCode::from_u16(b.code.load(Ordering::SeqCst)).unwrap()
            }),
        )
        .with_state(b.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (b, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registries_share_one_view() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let a = open(&redis.url()).await;
    let b = open(&redis.url()).await;
    assert_eq!(a.store_kind(), "redis");

    let mut wb = b.watch("users");
    let t = Instant::now();
    a.register("users", "u1", Registration::new("127.0.0.1", 4001).tag("x"))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(2), wb.changed())
        .await
        .unwrap()
        .unwrap();
    // the target is 250 ms (see bench/registry.sh); leave room for a loaded CI machine
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "propagation took {:?}",
        t.elapsed()
    );
    assert_eq!(seen.passing[0].tags, ["x"]);
    assert_eq!(b.services()[0].instances, 1);

    // a heartbeat through B renews a TTL instance registered through A
    let ttl =
        Registration::new("127.0.0.1", 4002).check(CheckSpec::ttl(Duration::from_millis(400)));
    a.register("users", "u2", ttl).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        b.heartbeat("users", "u2").await.unwrap();
    }
    let st = |v: &ServiceView| v.instances.iter().find(|i| i.id == "u2").map(|i| i.status);
    assert_eq!(st(&a.view("users").unwrap()), Some(Status::Passing));
    assert_eq!(st(&b.view("users").unwrap()), Some(Status::Passing));
    until(&a, "users", 3, |v| st(v) == Some(Status::Critical)).await;
    until(&b, "users", 3, |v| st(v) == Some(Status::Critical)).await;
    b.heartbeat("users", "u2").await.unwrap();
    until(&a, "users", 3, |v| st(v) == Some(Status::Passing)).await;

    // deregistration through B reaches A
    assert!(b.deregister("users", "u1").await.unwrap());
    until(&a, "users", 2, |v| v.instances.iter().all(|i| i.id != "u1")).await;
    assert!(matches!(
        b.heartbeat("users", "u1").await,
        Err(RegistryError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_checks_and_another_takes_over_when_it_dies() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let (backend, port) = backend().await;
    let interval = Duration::from_millis(400);
    let a = open(&redis.url()).await;
    let b = open(&redis.url()).await;
    let check = CheckSpec::http("/health")
        .interval(interval)
        .thresholds(1, 1);
    a.register(
        "web",
        "w1",
        Registration::new("127.0.0.1", port).check(check),
    )
    .await
    .unwrap();
    until(&b, "web", 5, |v| v.passing.len() == 1).await;

    // exactly one process probes. The bounds allow a loaded 2-core machine
    // (late ticks make fewer probes, never more); two probers would make about 20.
    until(&a, "web", 5, |_| a.checks_owned() + b.checks_owned() == 1).await;
    tokio::time::sleep(interval).await;
    assert_eq!(a.checks_owned() + b.checks_owned(), 1);
    let before = backend.hits.load(Ordering::SeqCst);
    tokio::time::sleep(interval * 10).await;
    let hits = backend.hits.load(Ordering::SeqCst) - before;
    assert!(
        (1..=13).contains(&hits),
        "{hits} checks in 10 intervals: more than one prober (or none)?"
    );

    // kill the owner (drop without releasing its lease, like a crash)
    let (owner, other) = if a.checks_owned() == 1 {
        (a, b)
    } else {
        (b, a)
    };
    drop(owner);
    let t = Instant::now();
    let took = until(&other, "web", 10, |_| other.checks_owned() == 1).await;
    // two intervals by design; the slack is for a loaded machine (a lease that
    // never expired would fail here)
    assert!(
        took <= interval * 2 + Duration::from_secs(2),
        "takeover took {:?}",
        t.elapsed()
    );

    // and the survivor's checks drive the status
    backend.code.store(500, Ordering::SeqCst);
    until(&other, "web", 5, |v| v.passing.is_empty()).await;
    backend.code.store(200, Ordering::SeqCst);
    until(&other, "web", 5, |v| v.passing.len() == 1).await;

    // a graceful shutdown hands the lease over at once
    let third = open(&redis.url()).await;
    other.shutdown().await;
    let took = until(&third, "web", 10, |_| third.checks_owned() == 1).await;
    assert!(
        took <= interval * 2 + Duration::from_secs(2),
        "handover took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_is_followed_by_a_full_resync() {
    let Some(mut redis) = RedisServer::start(Persistence::AofAlways) else {
        return;
    };
    let a = open(&redis.url()).await;
    let b = open(&redis.url()).await;
    a.register("orders", "o1", Registration::new("127.0.0.1", 5001))
        .await
        .unwrap();
    until(&b, "orders", 2, |v| v.instances.len() == 1).await;

    redis.kill();
    let err = a
        .register("orders", "o2", Registration::new("127.0.0.1", 5002))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Store(_)), "{err}");
    // readers keep the last view while Redis is away
    assert_eq!(b.view("orders").unwrap().instances.len(), 1);

    redis.restart();
    // writes work again once the connection is back, and every process sees them
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match a
            .register("orders", "o2", Registration::new("127.0.0.1", 5002))
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "redis never came back: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    until(&b, "orders", 5, |v| v.instances.len() == 2).await;

    // a change written while B's subscription was down is not lost
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("HDEL")
        .arg("switchboard:registry:svc:orders")
        .arg("o1")
        .query_async(&mut raw)
        .await
        .unwrap();
    // no notification was published: the periodic resync repairs it
    until(&b, "orders", 3, |v| v.instances.len() == 1).await;
    until(&a, "orders", 3, |v| v.instances.len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_lost_its_data_is_restored_from_the_processes() {
    let Some(mut redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let a = open(&redis.url()).await;
    a.register("stock", "s1", Registration::new("127.0.0.1", 6001))
        .await
        .unwrap();
    redis.restart(); // empty again
    let url = redis.url();
    // A notices on reconnect (or the next resync) and writes back what it knows
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = open(&url).await;
        if fresh.view("stock").is_some_and(|v| v.instances.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "registry was not restored");
        drop(fresh);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(a.view("stock").unwrap().instances.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_query_on_one_server_sees_a_write_through_another() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let a = open(&redis.url()).await;
    let b = open(&redis.url()).await;
    let opts = switchboard_registry::http::HttpOptions::default();
    let listener = switchboard_registry::http::bind("127.0.0.1:0".parse().unwrap(), &opts)
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(switchboard_registry::http::serve(
        listener,
        b.clone(),
        opts,
        std::future::pending(),
    ));
    let client = switchboard_registry::RegistryClient::new(&base).unwrap();
    let first = client.service("pay", None, Duration::ZERO).await.unwrap();
    let query = tokio::spawn(async move {
        let v = client
            .service("pay", Some(first.index), Duration::from_secs(10))
            .await
            .unwrap();
        (v, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let written = Instant::now();
    a.register("pay", "p1", Registration::new("127.0.0.1", 7001))
        .await
        .unwrap();
    let (view, answered) = query.await.unwrap();
    assert_eq!(view.instances[0].id, "p1");
    assert!(
        answered - written < Duration::from_secs(1),
        "took {:?}",
        answered - written
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_ttl_instance_stays_critical_when_redis_is_restored() {
    // Found by `switchboard bench chaos registry --redis-loses-data`.
    let Some(mut redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let a = open(&redis.url()).await;
    let b = open(&redis.url()).await;
    let ttl = |port| {
        Registration::new("127.0.0.1", port).check(CheckSpec::ttl(Duration::from_millis(400)))
    };
    a.register("inv", "dead", ttl(4100)).await.unwrap();
    a.register("inv", "alive", ttl(4101)).await.unwrap();
    let st = |r: &Registry, id: &str| {
        r.view("inv")
            .and_then(|v| v.instances.iter().find(|i| i.id == id).map(|i| i.status))
    };
    let beat = async |r: &Registry| {
        let _ = r.heartbeat("inv", "alive").await;
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        beat(&a).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(st(&a, "dead"), Some(Status::Critical));
    assert_eq!(st(&b, "dead"), Some(Status::Critical));
    assert_eq!(st(&b, "alive"), Some(Status::Passing));

    redis.restart(); // empty: the processes write back what they know
    let restarted = Instant::now();
    let url = redis.url();
    let watch_until = Instant::now() + Duration::from_secs(3);
    let mut restored = false;
    while Instant::now() < watch_until {
        beat(&b).await;
        for r in [&a, &b] {
            assert_eq!(
                st(r, "dead"),
                Some(Status::Critical),
                "a dead instance turned passing after Redis was restored ({:?} after the restart)",
                restarted.elapsed()
            );
        }
        if !restored {
            let fresh = open(&url).await;
            restored = fresh.view("inv").is_some_and(|v| v.instances.len() == 2);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(restored, "redis was not restored from the processes");
    assert_eq!(st(&a, "alive"), Some(Status::Passing));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistration_after_redis_lost_its_data_is_not_undone_by_a_restore() {
    // Found by `switchboard bench chaos registry --redis-loses-data`: an
    // instance deregistered right after Redis came back empty was written back
    // by the other process (which still had it) and stayed forever.
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let slow = || RegistryOptions::default().resync_interval(Duration::from_secs(1));
    let a = Registry::open(&redis.url(), slow()).await.unwrap();
    let b = Registry::open(&redis.url(), slow()).await.unwrap();
    a.register("cart", "c1", Registration::new("127.0.0.1", 7101))
        .await
        .unwrap();
    a.register("cart", "c2", Registration::new("127.0.0.1", 7102))
        .await
        .unwrap();
    until(&b, "cart", 3, |v| v.instances.len() == 2).await;

    // Redis loses everything (no reconnect: only the periodic resyncs notice)
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.unwrap();
    // ... and c1 leaves before B's next resync restores what B knows
    assert!(a.deregister("cart", "c1").await.unwrap());

    // both resyncs run (1 s); c2 is restored, c1 stays gone everywhere
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ids = |r: &Registry| -> Vec<String> {
        let mut ids: Vec<String> = r
            .view("cart")
            .map(|v| v.instances.iter().map(|i| i.id.clone()).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    };
    assert_eq!(ids(&a), ["c2"]);
    assert_eq!(ids(&b), ["c2"]);
    let fresh = open(&redis.url()).await;
    assert_eq!(ids(&fresh), ["c2"]);

    // a client that registers c1 again (same body) gets it back
    b.register("cart", "c1", Registration::new("127.0.0.1", 7101))
        .await
        .unwrap();
    until(&a, "cart", 3, |v| v.instances.len() == 2).await;
}

/// Counts the messages that arrive until none comes for 300 ms.
async fn drain(c: &mut (impl futures::Stream<Item = redis::Msg> + Unpin)) -> usize {
    let mut seen = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), c.next()).await {
        seen += 1;
    }
    seen
}

async fn commands_processed(raw: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(raw)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_commands_processed in INFO stats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_costs_redis_work_per_change_not_per_instance() {
    // Found by `switchboard bench chaos registry --instances 10000`: one checker
    // task and lease per TTL instance in every process made about 6 Redis calls
    // per instance per second.
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let a = open(&redis.url()).await;
    let b = open(&redis.url()).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let mut changes = client.get_async_pubsub().await.unwrap();
    changes
        .subscribe("switchboard:registry:changes")
        .await
        .unwrap();
    let mut changes = Box::pin(changes.into_on_message());

    let n = 300;
    let reg = |ttl| {
        Registration::new("127.0.0.1", 4300).check(CheckSpec::ttl(Duration::from_millis(ttl)))
    };
    for i in 0..n {
        a.register("many", &format!("m{i}"), reg(30_000))
            .await
            .unwrap();
    }
    until(&b, "many", 5, |v| v.passing.len() == n).await;
    // quiet: nothing heartbeats or expires for 2 s
    let before = commands_processed(&mut raw).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = commands_processed(&mut raw).await - before;
    // two scanners at 4/s and the resyncs (every 300 ms here): well under 300 in
    // 2 s; a call per instance per second would be 600 or more
    assert!(
        used < 300,
        "{used} redis commands in 2 s with {n} idle TTL instances"
    );

    // one short-lived instance expires: both views see it critical, and the
    // flip is announced once (two scanners never both flip it)
    drain(&mut changes).await;
    let started = Instant::now();
    b.register("short", "s1", reg(500)).await.unwrap();
    let st = |v: &ServiceView| v.instances.first().map(|i| i.status);
    until(&a, "short", 5, |v| st(v) == Some(Status::Critical)).await;
    until(&b, "short", 5, |v| st(v) == Some(Status::Critical)).await;
    let took = started.elapsed();
    // TTL 500 ms + a scan (250 ms) + a notification; slack for a loaded machine
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "expired after {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    // the registration and the flip
    assert_eq!(drain(&mut changes).await, 2);
    // a heartbeat through A turns it passing on both
    a.heartbeat("short", "s1").await.unwrap();
    until(&a, "short", 3, |v| st(v) == Some(Status::Passing)).await;
    until(&b, "short", 3, |v| st(v) == Some(Status::Passing)).await;
    // the 300 others did not move
    assert_eq!(a.view("many").unwrap().passing.len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_ttl_instance_is_deregistered_after_its_critical_time_everywhere() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    let a = open(&redis.url()).await;
    let b = open(&redis.url()).await;
    let check = CheckSpec::ttl(Duration::from_millis(400))
        .deregister_critical_after(Duration::from_millis(600));
    a.register(
        "tmp",
        "t1",
        Registration::new("127.0.0.1", 4400).check(check),
    )
    .await
    .unwrap();
    until(&b, "tmp", 3, |v| v.passing.len() == 1).await;
    // kept alive through B for a while
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        b.heartbeat("tmp", "t1").await.unwrap();
    }
    assert_eq!(a.view("tmp").unwrap().passing.len(), 1);
    // dead: critical, then gone from both views
    until(&a, "tmp", 5, |v| {
        v.instances.len() == 1 && v.passing.is_empty()
    })
    .await;
    until(&a, "tmp", 5, |v| v.instances.is_empty()).await;
    until(&b, "tmp", 5, |v| v.instances.is_empty()).await;
    assert!(matches!(
        b.heartbeat("tmp", "t1").await,
        Err(RegistryError::NotFound { .. })
    ));
    // and nothing is left of it in Redis but the tombstone
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let left: u64 = redis::cmd("ZCARD")
        .arg("switchboard:registry:deadlines")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(left, 0);
    let gone: bool = redis::cmd("EXISTS")
        .arg("switchboard:registry:gone:tmp:t1")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(gone, "no tombstone for the deregistered instance");
}

/// Polls `r.heartbeats(service)` until it has `id` at `at` or later; panics after `within`.
async fn heartbeat_seen(
    r: &Registry,
    service: &str,
    id: &str,
    at: std::time::SystemTime,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        if r.heartbeats(service).get(id).is_some_and(|&t| t >= at) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "heartbeat of {service}/{id} at {at:?} not seen in {within:?}: {:?}",
            r.heartbeats(service)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_through_one_registry_shows_in_the_others() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    // A resync far away: what is tested is the scan's pick-up, not the resync's.
    let slow = RegistryOptions::default().resync_interval(Duration::from_secs(60));
    let a = Registry::open(&redis.url(), slow.clone()).await.unwrap();
    let b = Registry::open(&redis.url(), slow.clone()).await.unwrap();
    let ttl =
        || Registration::new("127.0.0.1", 4500).check(CheckSpec::ttl(Duration::from_secs(30)));
    a.register("beats", "b1", ttl()).await.unwrap();
    a.register("beats", "b2", ttl()).await.unwrap();
    until(&b, "beats", 3, |v| v.instances.len() == 2).await;

    // Redis's clock counts whole milliseconds.
    let before = std::time::SystemTime::now() - Duration::from_millis(1);
    a.heartbeat("beats", "b1").await.unwrap();
    let at = a.heartbeats("beats")["b1"];
    assert!(at >= before, "{at:?} < {before:?}");
    // documented: one scan (250 ms) plus a round trip; slack for a loaded machine
    let took = heartbeat_seen(&b, "beats", "b1", at, Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(1), "seen after {took:?}");
    // the same time on both, and in the HTTP API's instance (`last_heartbeat`)
    assert_eq!(b.heartbeats("beats")["b1"], at);
    let shown = b.snapshot("beats");
    let b1 = shown.instances.iter().find(|i| i.id == "b1").unwrap();
    assert_eq!(b1.last_heartbeat, Some(at));
    // never heartbeated: unknown everywhere
    assert!(!a.heartbeats("beats").contains_key("b2"));
    assert!(!b.heartbeats("beats").contains_key("b2"));

    // a later heartbeat through B moves A forward
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.heartbeat("beats", "b1").await.unwrap();
    let later = b.heartbeats("beats")["b1"];
    assert!(later > at);
    heartbeat_seen(&a, "beats", "b1", later, Duration::from_secs(1)).await;

    // a process started afterwards reads every recorded time
    let c = Registry::open(&redis.url(), slow).await.unwrap();
    heartbeat_seen(&c, "beats", "b1", later, Duration::from_secs(1)).await;
    assert!(!c.heartbeats("beats").contains_key("b2"));

    // a new registration body is a new instance: no heartbeat yet, anywhere
    a.register("beats", "b1", ttl().tag("v2")).await.unwrap();
    until(&b, "beats", 3, |v| {
        v.instances.iter().any(|i| i.id == "b1" && i.tags == ["v2"])
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for r in [&a, &b, &c] {
        assert!(
            r.heartbeats("beats").is_empty(),
            "{:?}",
            r.heartbeats("beats")
        );
    }
}
