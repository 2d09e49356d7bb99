//! Timeout, bulkhead and rate limit, alone and stacked in a ServiceBuilder,
//! on virtual time.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use switchboard_resilience::breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};
use switchboard_resilience::bulkhead::{Bulkhead, BulkheadFull, BulkheadLayer};
use switchboard_resilience::rate_limit::{
    KeyedRateLimitLayer, KeyedRateLimiter, Quota, RateLimitLayer, RateLimited, RateLimiter, quota,
};
use switchboard_resilience::retry::{Backoff, RetryLayer, RetryPolicy};
use switchboard_resilience::timeout::{Elapsed, TimeoutLayer, timeout};
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt, service_fn};

fn sleepy(
    delay: Duration,
) -> impl tower::Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(move |n: u32| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, BoxError>(n)
    })
}

#[tokio::test(start_paused = true)]
async fn timeout_plain_and_as_a_layer() {
    assert_eq!(timeout(Duration::from_secs(1), async { 7 }).await, Ok(7));
    let svc =
        TimeoutLayer::new(Duration::from_millis(50)).layer(sleepy(Duration::from_millis(100)));
    let err = svc.oneshot(1).await.unwrap_err();
    assert_eq!(
        *err.downcast_ref::<Elapsed>().unwrap(),
        Elapsed {
            after: Duration::from_millis(50)
        }
    );
    let svc =
        TimeoutLayer::new(Duration::from_millis(150)).layer(sleepy(Duration::from_millis(100)));
    assert_eq!(svc.oneshot(2).await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn bulkhead_bounds_concurrency_and_waiting() {
    let bulkhead = Bulkhead::new(2, Duration::from_millis(100)).unwrap();
    let a = bulkhead.acquire().await.unwrap();
    let _b = bulkhead.acquire().await.unwrap();
    assert_eq!(bulkhead.available(), 0);
    assert_eq!(
        bulkhead.try_acquire().unwrap_err(),
        BulkheadFull {
            max_concurrent: 2,
            waited: Duration::ZERO
        }
    );
    // A waiter gets the slot freed within its wait.
    let waiter = {
        let bulkhead = bulkhead.clone();
        tokio::spawn(async move { bulkhead.acquire().await.map(drop) })
    };
    tokio::time::advance(Duration::from_millis(50)).await;
    drop(a);
    assert!(waiter.await.unwrap().is_ok());
    assert!(Bulkhead::new(0, Duration::ZERO).is_err());
}

#[tokio::test(start_paused = true)]
async fn bulkhead_layer_rejects_after_the_wait() {
    let bulkhead = Bulkhead::new(1, Duration::from_millis(10)).unwrap();
    let svc = BulkheadLayer::new(bulkhead).layer(sleepy(Duration::from_millis(100)));
    let first = tokio::spawn(svc.clone().oneshot(1));
    tokio::task::yield_now().await;
    let err = svc.clone().oneshot(2).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<BulkheadFull>().unwrap().waited,
        Duration::from_millis(10)
    );
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(svc.oneshot(3).await.unwrap(), 3, "the slot is free again");
}

#[tokio::test(start_paused = true)]
async fn rate_limiter_says_when_to_come_back() {
    let limiter = RateLimiter::new(quota(10, Duration::from_secs(1), 2).unwrap());
    assert!(limiter.check().is_ok());
    assert!(limiter.check().is_ok());
    let limited = limiter.check().unwrap_err();
    assert_eq!(limited.retry_after, Duration::from_millis(100));
    tokio::time::advance(Duration::from_millis(100)).await;
    assert!(limiter.check().is_ok());
    // acquire waits on virtual time instead of failing.
    let start = tokio::time::Instant::now();
    limiter.acquire().await;
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn keyed_rate_limits_are_per_key_and_bounded() {
    let limiter: KeyedRateLimiter<u32> =
        KeyedRateLimiter::new(Quota::per_second(NonZeroU32::new(1).unwrap()), 32).unwrap();
    assert!(limiter.check(&1).is_ok());
    assert!(limiter.check(&1).is_err());
    assert!(limiter.check(&2).is_ok(), "keys are independent");
    for n in 100..10_100u32 {
        assert!(
            limiter.check(&n).is_ok(),
            "a new key starts with a full burst"
        );
    }
    assert!(
        limiter.len() <= 32,
        "memory stays bounded: {}",
        limiter.len()
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(limiter.check(&1).is_ok());
}

#[tokio::test(start_paused = true)]
async fn rate_limit_layers_reject_with_retry_after() {
    let limiter = Arc::new(RateLimiter::new(
        quota(1, Duration::from_secs(2), 1).unwrap(),
    ));
    let svc = RateLimitLayer::new(limiter).layer(sleepy(Duration::ZERO));
    assert!(svc.clone().oneshot(1).await.is_ok());
    let err = svc.oneshot(2).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<RateLimited>().unwrap().retry_after,
        Duration::from_secs(2)
    );

    let keyed = Arc::new(
        KeyedRateLimiter::new(Quota::per_second(NonZeroU32::new(1).unwrap()), 100).unwrap(),
    );
    let svc = KeyedRateLimitLayer::new(keyed, |n: &u32| *n % 2).layer(sleepy(Duration::ZERO));
    assert!(svc.clone().oneshot(1).await.is_ok());
    assert!(svc.clone().oneshot(2).await.is_ok(), "another key");
    assert!(svc.oneshot(3).await.is_err(), "same key as 1");
}

#[tokio::test(start_paused = true)]
async fn everything_composes_in_a_service_builder() {
    let breaker = Breaker::new(BreakerConfig::default()).unwrap();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(Arc::new(RateLimiter::new(
            quota(100, Duration::from_secs(1), 10).unwrap(),
        ))))
        .layer(BulkheadLayer::new(
            Bulkhead::new(4, Duration::from_millis(10)).unwrap(),
        ))
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .layer(RetryLayer::new(
            RetryPolicy::new(2, Backoff::constant(Duration::from_millis(1))).unwrap(),
        ))
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(sleepy(Duration::from_millis(5)));
    for n in 0..5 {
        assert_eq!(svc.clone().oneshot(n).await.unwrap(), n);
    }
    assert_eq!(breaker.snapshot().calls, 5);
}
