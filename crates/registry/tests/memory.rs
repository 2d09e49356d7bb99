//! The in-process registry on virtual time: status transitions with thresholds,
//! TTL expiry, deregistration, passive reports, watching.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use switchboard_registry::{
    CheckResult, CheckSpec, PassiveOutcome, Probe, ProbeTarget, Prober, Registration, Registry,
    RegistryError, RegistryOptions, Status,
};
use tokio::time::sleep;

/// A prober whose answers the test sets per instance id (default: failing).
#[derive(Clone, Default)]
struct Scripted {
    results: Arc<Mutex<HashMap<String, CheckResult>>>,
    checks: Arc<AtomicUsize>,
}

impl Scripted {
    fn set(&self, id: &str, r: CheckResult) {
        self.results.lock().insert(id.to_owned(), r);
    }
    fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }
}

struct ScriptedProbe {
    id: String,
    owner: Scripted,
}

impl Prober for Scripted {
    fn probe(&self, target: &ProbeTarget) -> Box<dyn Probe> {
        Box::new(ScriptedProbe {
            id: target.id.clone(),
            owner: self.clone(),
        })
    }
}

impl Probe for ScriptedProbe {
    fn check(&mut self) -> BoxFuture<'_, CheckResult> {
        self.owner.checks.fetch_add(1, Ordering::SeqCst);
        let r = self
            .owner
            .results
            .lock()
            .get(&self.id)
            .copied()
            .unwrap_or(CheckResult::Fail);
        Box::pin(async move { r })
    }
}

fn registry(prober: &Scripted) -> Registry {
    Registry::memory(RegistryOptions::default().prober(Arc::new(prober.clone())))
}

fn status(r: &Registry, service: &str, id: &str) -> Option<Status> {
    r.view(service)?
        .instances
        .iter()
        .find(|i| i.id == id)
        .map(|i| i.status)
}

fn http(interval_s: u64) -> Registration {
    Registration::new("127.0.0.1", 4001).check(
        CheckSpec::http("/health")
            .interval(Duration::from_secs(interval_s))
            .thresholds(2, 3),
    )
}

const S: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn new_instance_gets_no_traffic_until_first_check_passes() {
    let p = Scripted::default();
    let r = registry(&p);
    let inst = r.register("users", "u1", http(1)).await.unwrap();
    assert_eq!(inst.status, Status::Critical);
    assert!(r.view("users").unwrap().passing.is_empty());
    sleep(S * 3).await;
    assert_eq!(status(&r, "users", "u1"), Some(Status::Critical));
    p.set("u1", CheckResult::Pass);
    sleep(S).await;
    // one pass is enough for a fresh instance
    let view = r.view("users").unwrap();
    assert_eq!(view.passing.len(), 1);
    assert_eq!(
        view.passing[0].socket_addr(),
        Some("127.0.0.1:4001".parse().unwrap())
    );
    assert!(view.passing[0].last_check.is_some());
}

#[tokio::test(start_paused = true)]
async fn thresholds_prevent_flapping() {
    let p = Scripted::default();
    let r = registry(&p);
    p.set("u1", CheckResult::Pass);
    r.register("users", "u1", http(1)).await.unwrap();
    sleep(S).await;
    assert_eq!(status(&r, "users", "u1"), Some(Status::Passing));

    p.set("u1", CheckResult::Fail);
    sleep(S * 2).await; // two failures
    assert_eq!(status(&r, "users", "u1"), Some(Status::Passing));
    sleep(S).await; // third failure
    assert_eq!(status(&r, "users", "u1"), Some(Status::Critical));

    p.set("u1", CheckResult::Pass);
    sleep(S).await;
    assert_eq!(status(&r, "users", "u1"), Some(Status::Critical));
    sleep(S).await;
    assert_eq!(status(&r, "users", "u1"), Some(Status::Passing));

    // alternate fail/pass: never flips
    for i in 0..6 {
        p.set(
            "u1",
            if i % 2 == 0 {
                CheckResult::Fail
            } else {
                CheckResult::Pass
            },
        );
        sleep(S).await;
        assert_eq!(status(&r, "users", "u1"), Some(Status::Passing));
    }
}

#[tokio::test(start_paused = true)]
async fn http_429_is_warning_and_not_routable() {
    let p = Scripted::default();
    let r = registry(&p);
    p.set("u1", CheckResult::Pass);
    r.register("users", "u1", http(1)).await.unwrap();
    sleep(S).await;
    p.set("u1", CheckResult::Warn);
    sleep(S * 3).await;
    assert_eq!(status(&r, "users", "u1"), Some(Status::Warning));
    let view = r.view("users").unwrap();
    assert!(view.passing.is_empty());
    assert_eq!(
        view.routable().len(),
        1,
        "warning instances are the fallback"
    );
}

#[tokio::test(start_paused = true)]
async fn ttl_expires_and_heartbeat_restores() {
    let p = Scripted::default();
    let r = registry(&p);
    let reg = Registration::new("10.0.0.1", 80).check(CheckSpec::ttl(Duration::from_secs(10)));
    assert_eq!(
        r.register("jobs", "j1", reg).await.unwrap().status,
        Status::Passing
    );
    assert!(r.heartbeats("jobs").is_empty(), "no heartbeat yet");
    sleep(S * 9).await;
    let before = std::time::SystemTime::now();
    r.heartbeat("jobs", "j1").await.unwrap();
    let seen = r.heartbeats("jobs");
    assert!(seen["j1"] >= before, "{seen:?}");
    // A heartbeat of an instance without a TTL check renews nothing.
    r.register("jobs", "j2", Registration::new("10.0.0.2", 80))
        .await
        .unwrap();
    r.heartbeat("jobs", "j2").await.unwrap();
    assert_eq!(r.heartbeats("jobs").len(), 1);
    r.deregister("jobs", "j2").await.unwrap();
    sleep(S * 9).await;
    assert_eq!(status(&r, "jobs", "j1"), Some(Status::Passing));
    sleep(S * 2).await;
    assert_eq!(status(&r, "jobs", "j1"), Some(Status::Critical));
    r.heartbeat("jobs", "j1").await.unwrap();
    sleep(Duration::from_millis(1)).await;
    assert_eq!(status(&r, "jobs", "j1"), Some(Status::Passing));
    assert_eq!(p.checks(), 0, "TTL checks are never probed");
}

#[tokio::test(start_paused = true)]
async fn critical_instances_are_deregistered() {
    let p = Scripted::default();
    let r = registry(&p);
    let ttl = Registration::new("10.0.0.1", 80).check(
        CheckSpec::ttl(Duration::from_secs(5)).deregister_critical_after(Duration::from_secs(10)),
    );
    r.register("jobs", "j1", ttl).await.unwrap();
    let active = Registration::new("10.0.0.2", 80).check(
        CheckSpec::tcp()
            .interval(S)
            .deregister_critical_after(Duration::from_secs(5)),
    );
    r.register("jobs", "j2", active).await.unwrap();
    sleep(S * 7).await;
    assert!(
        status(&r, "jobs", "j2").is_none(),
        "never-passing TCP instance removed"
    );
    assert_eq!(status(&r, "jobs", "j1"), Some(Status::Critical));
    sleep(S * 9).await;
    assert!(
        status(&r, "jobs", "j1").is_none(),
        "expired TTL instance removed"
    );
    assert!(r.services().is_empty());
    assert!(matches!(
        r.heartbeat("jobs", "j1").await,
        Err(RegistryError::NotFound { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn passive_failures_suspect_before_next_check() {
    let p = Scripted::default();
    let r = registry(&p);
    p.set("u1", CheckResult::Pass);
    r.register("users", "u1", http(30)).await.unwrap();
    sleep(S * 30).await;
    assert_eq!(status(&r, "users", "u1"), Some(Status::Passing));
    let checks = p.checks();

    r.report("users", "u1", PassiveOutcome::Failure);
    r.report("users", "u1", PassiveOutcome::Failure);
    r.report("users", "u1", PassiveOutcome::Success); // resets the count
    r.report("users", "u1", PassiveOutcome::Failure);
    r.report("users", "u1", PassiveOutcome::Failure);
    assert_eq!(status(&r, "users", "u1"), Some(Status::Passing));
    p.set("u1", CheckResult::Fail);
    r.report("users", "u1", PassiveOutcome::Failure);
    assert_eq!(
        status(&r, "users", "u1"),
        Some(Status::Critical),
        "suspected at once"
    );
    sleep(Duration::from_millis(1)).await;
    assert_eq!(
        p.checks(),
        checks + 1,
        "suspicion triggers an immediate active check"
    );

    // The ejection ends after 10 s, but failing checks (3 in a row) keep it critical.
    p.set("u1", CheckResult::Pass);
    sleep(Duration::from_secs(11)).await;
    assert_eq!(status(&r, "users", "u1"), Some(Status::Passing));

    // Without an active check, the suspicion simply expires.
    r.register("plain", "x", Registration::new("10.0.0.9", 80))
        .await
        .unwrap();
    for _ in 0..3 {
        r.report("plain", "x", PassiveOutcome::Failure);
    }
    assert_eq!(status(&r, "plain", "x"), Some(Status::Critical));
    sleep(Duration::from_millis(10_001)).await;
    assert_eq!(status(&r, "plain", "x"), Some(Status::Passing));
    r.report("nope", "x", PassiveOutcome::Failure); // unknown: ignored
}

#[tokio::test(start_paused = true)]
async fn watch_sees_every_change() {
    let p = Scripted::default();
    let r = registry(&p);
    let mut w = r.watch("orders");
    assert!(w.load().instances.is_empty());
    let waiter = tokio::spawn({
        let mut w = w.clone();
        async move { w.changed().await.map(|v| v.instances.len()) }
    });
    r.register("orders", "o1", Registration::new("127.0.0.1", 5000))
        .await
        .unwrap();
    assert_eq!(waiter.await.unwrap(), Some(1));
    let v1 = w.changed().await.unwrap();
    assert_eq!(v1.passing.len(), 1);
    r.deregister("orders", "o1").await.unwrap();
    let v2 = w.changed().await.unwrap();
    assert!(v2.index > v1.index);
    assert!(v2.instances.is_empty());
    // blocking read: times out with the current view when nothing changes
    let same = w.wait_past(v2.index, Duration::from_secs(5)).await;
    assert_eq!(same.index, v2.index);
}

#[tokio::test(start_paused = true)]
async fn reregistration_is_idempotent_and_changes_replace() {
    let p = Scripted::default();
    let r = registry(&p);
    p.set("u1", CheckResult::Pass);
    r.register("users", "u1", http(1)).await.unwrap();
    sleep(S).await;
    let index = r.view("users").unwrap().index;
    let again = r.register("users", "u1", http(1)).await.unwrap();
    assert_eq!(again.status, Status::Passing, "same body keeps the status");
    assert_eq!(r.view("users").unwrap().index, index, "and changes nothing");
    let moved = r.register("users", "u1", http(1).tag("v2")).await.unwrap();
    assert_eq!(moved.status, Status::Critical, "a new body starts over");
    assert_eq!(moved.tags, ["v2"]);
    assert!(r.deregister("users", "u1").await.unwrap());
    assert!(!r.deregister("users", "u1").await.unwrap());
}

#[tokio::test]
async fn invalid_input_is_rejected_with_the_field() {
    let r = Registry::open("memory://", RegistryOptions::default())
        .await
        .unwrap();
    let field = |e: RegistryError| match e {
        RegistryError::Invalid(v) | RegistryError::Forbidden(v) => v.field,
        other => panic!("unexpected {other}"),
    };
    let ok = Registration::new("127.0.0.1", 80);
    assert_eq!(
        field(r.register("Users", "a", ok.clone()).await.unwrap_err()),
        "service"
    );
    assert_eq!(
        field(r.register("users", "a b", ok.clone()).await.unwrap_err()),
        "id"
    );
    assert_eq!(
        field(
            r.register("users", "a", Registration::new("169.254.169.254", 80))
                .await
                .unwrap_err()
        ),
        "address"
    );
    assert_eq!(
        field(
            r.register("users", "a", Registration::new("127.0.0.1", 0))
                .await
                .unwrap_err()
        ),
        "port"
    );
    assert_eq!(field(r.heartbeat("users", "").await.unwrap_err()), "id");
    assert!(matches!(
        Registry::open("etcd://x", RegistryOptions::default()).await,
        Err(RegistryError::UnsupportedStore(_))
    ));
}

#[tokio::test]
async fn services_summarise() {
    let r = Registry::open("memory://", RegistryOptions::default())
        .await
        .unwrap();
    r.register("b-svc", "1", Registration::new("127.0.0.1", 1))
        .await
        .unwrap();
    r.register("a-svc", "1", Registration::new("127.0.0.1", 2))
        .await
        .unwrap();
    r.register("a-svc", "2", Registration::new("::1", 3))
        .await
        .unwrap();
    let s = r.services();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0].service.as_str(), s[0].instances, s[0].passing),
        ("a-svc", 2, 2)
    );
    assert_eq!(s[1].service, "b-svc");
    assert_eq!(r.view("a-svc").unwrap().passing[1].host_port(), "[::1]:3");
    assert!(r.view("zzz").is_none());
}
