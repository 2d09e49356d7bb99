//! Circuit breaker behaviour, on virtual time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard_resilience::breaker::{
    Breaker, BreakerConfig, CallError, CircuitBreakerLayer, InvalidBreakerConfig, KeyedBreakers,
    OpenDuration, Outcome, State, Window,
};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

fn config(window: u32, min_calls: u32) -> BreakerConfig {
    BreakerConfig {
        window: Window::Count(window),
        min_calls,
        failure_rate: 0.5,
        open_duration: OpenDuration::constant(Duration::from_secs(5)),
        half_open_probes: 2,
        ..BreakerConfig::default()
    }
}

fn record(breaker: &Breaker, outcome: Outcome) {
    breaker.try_acquire().expect("admitted").record(outcome);
}

fn trip(breaker: &Breaker) {
    while breaker.state() != State::Open {
        record(breaker, Outcome::Failure);
    }
}

#[test]
fn opens_at_the_threshold_only_with_min_calls() {
    let breaker = Breaker::new(config(10, 4)).unwrap();
    for _ in 0..3 {
        record(&breaker, Outcome::Failure);
    }
    assert_eq!(
        breaker.state(),
        State::Closed,
        "3 calls are below min_calls"
    );
    record(&breaker, Outcome::Success);
    // 3 failures of 4 calls = 75% >= 50%.
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn stays_closed_just_below_the_threshold() {
    let breaker = Breaker::new(config(10, 10)).unwrap();
    for i in 0..10 {
        record(
            &breaker,
            if i < 6 {
                Outcome::Success
            } else {
                Outcome::Failure
            },
        );
    }
    assert_eq!(breaker.state(), State::Closed);
    let snap = breaker.snapshot();
    assert_eq!((snap.calls, snap.failed_calls), (10, 4));
    assert!((snap.failure_rate - 0.4).abs() < 1e-9);
    // The 11th call slides the window past the oldest success: 5 of 10 = 50%.
    record(&breaker, Outcome::Failure);
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn ignored_outcomes_and_dropped_permits_do_not_count() {
    let breaker = Breaker::new(config(10, 2)).unwrap();
    record(&breaker, Outcome::Ignored);
    drop(breaker.try_acquire().unwrap());
    assert_eq!(breaker.snapshot().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn open_rejects_with_retry_after_then_half_open_probes_close_it() {
    let breaker = Breaker::new(config(4, 2)).unwrap();
    trip(&breaker);
    let open = breaker.try_acquire().unwrap_err();
    assert_eq!(open.retry_after, Duration::from_secs(5));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        breaker.try_acquire().unwrap_err().retry_after,
        Duration::from_secs(3)
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    let p1 = breaker.try_acquire().expect("first probe");
    assert!(p1.is_probe());
    assert_eq!(breaker.state(), State::HalfOpen);
    let p2 = breaker.try_acquire().expect("second probe");
    assert!(breaker.try_acquire().is_err(), "only two probes");
    p1.record(Outcome::Success);
    assert_eq!(breaker.state(), State::HalfOpen, "waits for every probe");
    p2.record(Outcome::Success);
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.snapshot().calls, 0, "closing starts a fresh window");
}

#[tokio::test(start_paused = true)]
async fn failed_probes_reopen_for_longer_each_time() {
    let mut cfg = config(4, 2);
    cfg.open_duration =
        OpenDuration::exponential(Duration::from_secs(1), 2.0, Duration::from_secs(3));
    cfg.half_open_probes = 1;
    let breaker = Breaker::new(cfg).unwrap();
    trip(&breaker);
    for expected in [2, 3, 3] {
        tokio::time::advance(Duration::from_secs(10)).await;
        record(&breaker, Outcome::Failure);
        assert_eq!(breaker.state(), State::Open);
        assert_eq!(
            breaker.try_acquire().unwrap_err().retry_after,
            Duration::from_secs(expected)
        );
    }
    assert_eq!(breaker.snapshot().consecutive_opens, 4);
    tokio::time::advance(Duration::from_secs(10)).await;
    record(&breaker, Outcome::Success);
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.snapshot().consecutive_opens, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_frees_its_slot() {
    let mut cfg = config(4, 2);
    cfg.half_open_probes = 1;
    let breaker = Breaker::new(cfg).unwrap();
    trip(&breaker);
    tokio::time::advance(Duration::from_secs(5)).await;
    let probe = breaker.try_acquire().unwrap();
    assert!(breaker.try_acquire().is_err());
    drop(probe);
    let probe = breaker.try_acquire().expect("slot freed");
    probe.record(Outcome::Success);
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_gives_up_after_max_wait() {
    let mut cfg = config(4, 2);
    cfg.half_open_probes = 1;
    cfg.half_open_max_wait = Duration::from_secs(30);
    let breaker = Breaker::new(cfg).unwrap();
    trip(&breaker);
    tokio::time::advance(Duration::from_secs(5)).await;
    let lost = breaker.try_acquire().unwrap();
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(breaker.try_acquire().is_err());
    assert_eq!(breaker.state(), State::HalfOpen);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(breaker.try_acquire().is_err());
    assert_eq!(breaker.state(), State::Open, "stuck half-open reopened");
    // The lost probe's late verdict belongs to a finished half-open: ignored.
    lost.record(Outcome::Success);
    assert_eq!(breaker.state(), State::Open);
    tokio::time::advance(Duration::from_secs(5)).await;
    record(&breaker, Outcome::Success);
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_the_breaker() {
    let cfg = BreakerConfig {
        slow_call_duration: Some(Duration::from_millis(100)),
        slow_call_rate: 0.5,
        ..config(4, 4)
    };
    let breaker = Breaker::new(cfg).unwrap();
    for _ in 0..2 {
        record(&breaker, Outcome::Success);
    }
    for _ in 0..2 {
        let permit = breaker.try_acquire().unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        permit.record(Outcome::Success);
    }
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let cfg = BreakerConfig {
        window: Window::Time(Duration::from_secs(10)),
        min_calls: 4,
        ..config(4, 4)
    };
    let breaker = Breaker::new(cfg).unwrap();
    for _ in 0..3 {
        record(&breaker, Outcome::Failure);
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(breaker.snapshot().calls, 0);
    record(&breaker, Outcome::Failure);
    assert_eq!(breaker.state(), State::Closed, "the old failures expired");
    for _ in 0..3 {
        record(&breaker, Outcome::Failure);
    }
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn operator_states() {
    let breaker = Breaker::new(config(4, 2)).unwrap();
    breaker.force_open();
    assert_eq!(breaker.state(), State::ForcedOpen);
    assert!(breaker.try_acquire().is_err());
    breaker.disable();
    for _ in 0..10 {
        record(&breaker, Outcome::Failure);
    }
    assert_eq!(breaker.state(), State::Disabled);
    assert_eq!(breaker.snapshot().calls, 0, "disabled records nothing");
    breaker.metrics_only();
    for _ in 0..10 {
        record(&breaker, Outcome::Failure);
    }
    assert_eq!(breaker.state(), State::MetricsOnly);
    assert_eq!(
        breaker.snapshot().failed_calls,
        4,
        "metrics-only still counts"
    );
    breaker.reset();
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.snapshot().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn notifies_state_changes() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let breaker = Breaker::with_listener(config(4, 2), move |t| {
        log.lock().unwrap().push((t.from, t.to));
    })
    .unwrap();
    let mut rx = breaker.subscribe();
    trip(&breaker);
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), State::Open);
    tokio::time::advance(Duration::from_secs(5)).await;
    record(&breaker, Outcome::Success);
    record(&breaker, Outcome::Success);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed)
        ]
    );
    assert_eq!(*rx.borrow(), State::Closed);
}

#[tokio::test]
async fn call_classifies_results() {
    let breaker = Breaker::new(config(4, 2)).unwrap();
    let ok: Result<u8, CallError<&str>> = breaker.call(async { Ok(1) }).await;
    assert_eq!(ok.unwrap(), 1);
    let err = breaker.call(async { Err::<u8, _>("boom") }).await;
    assert_eq!(err.unwrap_err().into_inner(), Some("boom"));
    let _ = breaker.call(async { Err::<u8, _>("boom") }).await;
    let rejected = breaker.call(async { Ok::<u8, &str>(1) }).await;
    assert!(matches!(rejected, Err(CallError::Open(_))));
}

#[tokio::test(start_paused = true)]
async fn tower_layer_fails_fast_when_open() {
    let breaker = Breaker::new(config(4, 2)).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer(service_fn(move |fail: bool| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if fail {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }
    }));
    for _ in 0..2 {
        assert!(svc.ready().await.unwrap().call(true).await.is_err());
    }
    let err = svc.ready().await.unwrap().call(false).await.unwrap_err();
    let open = err
        .downcast_ref::<switchboard_resilience::breaker::BreakerOpen>()
        .expect("typed rejection");
    assert_eq!(open.retry_after, Duration::from_secs(5));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the open call never reached the service"
    );
}

#[test]
fn keyed_breakers_are_independent_and_bounded() {
    let transitions = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&transitions);
    let set = KeyedBreakers::with_listener(config(4, 2), 3, move |key: &u32, t| {
        log.lock().unwrap().push((*key, t.to));
    })
    .unwrap();
    for _ in 0..2 {
        set.try_acquire(&1).unwrap().record(Outcome::Failure);
    }
    assert!(set.try_acquire(&1).is_err());
    assert!(set.try_acquire(&2).is_ok());
    assert_eq!(*transitions.lock().unwrap(), vec![(1, State::Open)]);
    set.get(&3);
    set.get(&4);
    assert_eq!(set.len(), 3, "capacity holds");
    assert!(
        set.get_existing(&1).is_some(),
        "the open breaker is kept, a closed idle one is evicted"
    );
    assert!(set.remove(&1).is_some());
    assert_eq!(set.len(), 2);
    set.retain(|k, _| *k != 4);
    assert_eq!(set.snapshots().len(), 1);
}

#[test]
fn invalid_configs_are_explained() {
    let bad = BreakerConfig {
        failure_rate: 1.5,
        ..BreakerConfig::default()
    };
    assert_eq!(
        Breaker::new(bad).unwrap_err().to_string(),
        "failure_rate must be in (0, 1], got 1.5"
    );
    let bad = BreakerConfig {
        min_calls: 200,
        ..BreakerConfig::default()
    };
    assert!(matches!(
        Breaker::new(bad).unwrap_err(),
        InvalidBreakerConfig::MinCalls { .. }
    ));
    let bad = BreakerConfig {
        open_duration: OpenDuration::exponential(
            Duration::from_secs(2),
            2.0,
            Duration::from_secs(1),
        ),
        ..BreakerConfig::default()
    };
    assert_eq!(
        bad.validate().unwrap_err().to_string(),
        "open duration: max must not be below base"
    );
}

#[test]
fn a_permit_turned_owned_records_once_and_only_for_its_breaker() {
    let a = Breaker::new(config(10, 4)).unwrap();
    let b = Breaker::new(config(10, 4)).unwrap();
    // Another breaker gets the permit back; it still records on `a`.
    let p = a.try_acquire().unwrap();
    let p = p.into_owned(&b).expect_err("b did not issue the permit");
    p.record(Outcome::Failure);
    assert_eq!(a.snapshot().failed_calls, 1);
    assert_eq!(b.snapshot().calls, 0);
    // Owned: the borrowed permit's drop records nothing, the owned one counts.
    for _ in 0..2 {
        let owned = a
            .try_acquire()
            .unwrap()
            .into_owned(&a)
            .expect("a issued it");
        owned.record(Outcome::Failure);
    }
    assert_eq!(a.snapshot().failed_calls, 3);
    assert_eq!(a.state(), State::Closed, "3 calls are below min_calls");
    let owned = a.try_acquire().unwrap().into_owned(&a).unwrap();
    owned.record(Outcome::Failure);
    assert_eq!(a.state(), State::Open);
    // A dropped owned permit counts as ignored.
    let c = Breaker::new(config(10, 1)).unwrap();
    drop(c.try_acquire().unwrap().into_owned(&c).unwrap());
    assert_eq!(c.snapshot().calls, 0);
    assert_eq!(c.state(), State::Closed);
}
