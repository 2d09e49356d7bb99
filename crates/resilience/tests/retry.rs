//! Retry policy, backoff, budget and idempotency helpers, on virtual time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use switchboard_resilience::retry::{
    Backoff, InvalidBackoff, InvalidBudget, InvalidRetry, Jitter, RetryBudget, RetryLayer,
    RetryPolicy, is_idempotent,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

/// A service that fails `failures` times, then succeeds; counts its calls.
fn flaky(
    failures: u32,
    calls: Arc<AtomicU32>,
) -> impl tower::Service<&'static str, Response = u32, Error = &'static str, Future: Send> + Clone {
    service_fn(move |_method: &'static str| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < failures {
                Err("unavailable")
            } else {
                Ok(n)
            }
        }
    })
}

#[tokio::test(start_paused = true)]
async fn retries_with_backoff_until_success() {
    let calls = Arc::new(AtomicU32::new(0));
    let policy = RetryPolicy::new(3, Backoff::constant(Duration::from_millis(100))).unwrap();
    let svc = RetryLayer::new(policy).layer(flaky(2, Arc::clone(&calls)));
    let start = Instant::now();
    assert_eq!(svc.oneshot("GET").await, Ok(2));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(start.elapsed(), Duration::from_millis(200), "two waits");
}

#[tokio::test(start_paused = true)]
async fn stops_after_max_attempts_with_the_last_error() {
    let calls = Arc::new(AtomicU32::new(0));
    let policy = RetryPolicy::new(3, Backoff::constant(Duration::ZERO)).unwrap();
    let svc = RetryLayer::new(policy).layer(flaky(10, Arc::clone(&calls)));
    assert_eq!(svc.oneshot("GET").await, Err("unavailable"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "max_attempts counts the first try"
    );
}

#[tokio::test(start_paused = true)]
async fn predicate_sees_the_request() {
    let calls = Arc::new(AtomicU32::new(0));
    let policy = RetryPolicy::new(3, Backoff::constant(Duration::ZERO))
        .unwrap()
        .with_predicate(
            |method: &&'static str, result: &Result<u32, &'static str>| {
                result.is_err() && is_idempotent(method)
            },
        );
    let svc = RetryLayer::new(policy).layer(flaky(1, Arc::clone(&calls)));
    assert_eq!(svc.clone().oneshot("POST").await, Err("unavailable"));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "POST is not retried");
    assert_eq!(svc.oneshot("PUT").await, Ok(1));
}

#[tokio::test(start_paused = true)]
async fn an_empty_budget_stops_retries_and_refills_after_ttl() {
    let calls = Arc::new(AtomicU32::new(0));
    // No percent, one retry per second over one second: exactly one retry.
    let budget = Arc::new(RetryBudget::new(Duration::from_secs(1), 1, 0.0).unwrap());
    let policy = RetryPolicy::new(5, Backoff::constant(Duration::ZERO))
        .unwrap()
        .with_budget(Arc::clone(&budget));
    let svc = RetryLayer::new(policy).layer(flaky(100, Arc::clone(&calls)));
    assert!(svc.clone().oneshot("GET").await.is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one try plus the one retry"
    );
    assert!(svc.clone().oneshot("GET").await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 3, "budget spent: no retry");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(budget.available(), 1, "the spent retry expired");
}

#[tokio::test(start_paused = true)]
async fn plain_run_retries_errors() {
    let policy = RetryPolicy::new(4, Backoff::constant(Duration::from_secs(1))).unwrap();
    let start = Instant::now();
    let result: Result<u32, String> = policy
        .run(|attempt| async move {
            if attempt < 3 {
                Err(format!("attempt {attempt}"))
            } else {
                Ok(attempt)
            }
        })
        .await;
    assert_eq!(result, Ok(3));
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

#[test]
fn budget_allows_percent_plus_minimum() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 25.0).unwrap();
    assert!(!budget.withdraw(), "nothing deposited, no minimum");
    for _ in 0..8 {
        budget.deposit();
    }
    assert!(budget.withdraw());
    assert!(budget.withdraw());
    assert!(!budget.withdraw(), "25% of 8 is 2");
}

#[test]
fn constructors_explain_what_is_wrong() {
    assert_eq!(
        Backoff::exponential(Duration::ZERO, Duration::from_secs(1))
            .unwrap_err()
            .to_string(),
        "base delay must be greater than zero for exponential backoff"
    );
    assert!(matches!(
        Backoff::exponential(Duration::from_secs(2), Duration::from_secs(1)),
        Err(InvalidBackoff::MaxBelowBase { .. })
    ));
    let exp = Backoff::exponential(Duration::from_millis(10), Duration::from_secs(1)).unwrap();
    assert_eq!(
        exp.with_factor(0.5).unwrap_err().to_string(),
        "factor must be a finite number of at least 1, got 0.5"
    );
    assert_eq!(
        RetryBudget::new(Duration::from_millis(10), 1, 20.0)
            .unwrap_err()
            .to_string(),
        "ttl must be between 1s and 60s, got 10ms"
    );
    assert!(matches!(
        RetryBudget::new(Duration::from_secs(1), 1, -1.0),
        Err(InvalidBudget::Percent(_))
    ));
    assert_eq!(
        RetryPolicy::new(0, Backoff::constant(Duration::ZERO)).unwrap_err(),
        InvalidRetry::ZeroAttempts
    );
}

#[test]
fn exponential_backoff_doubles_up_to_the_cap() {
    let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_millis(500))
        .unwrap()
        .with_jitter(Jitter::None);
    let delays: Vec<u64> = backoff
        .delays()
        .take(5)
        .map(|d| d.as_millis() as u64)
        .collect();
    assert_eq!(delays, [100, 200, 400, 500, 500]);
}

#[test]
fn idempotent_methods() {
    for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
        assert!(is_idempotent(method), "{method}");
    }
    for method in ["POST", "PATCH", "CONNECT", "get"] {
        assert!(!is_idempotent(method), "{method}");
    }
}
