//! The consumer loop shared by every backend.
//!
//! A subscription is three tasks connected by channels:
//!
//! ```text
//! fetcher --(deliveries)--> runner --(settlements)--> settler
//!   ^                                                    |
//!   +------------------ in-flight permits ---------------+
//! ```
//!
//! - the **fetcher** takes permits (at most `max_in_flight`) and fetches that many
//!   deliveries from the backend; a fetch that is not cancel-safe (a blocking
//!   Redis read) is never cancelled, so no delivery is lost in a dropped reply;
//! - the **runner** runs handlers concurrently on one task (no spawn per event),
//!   catches panics, and decides: ack, retry after backoff, or dead-letter;
//! - the **settler** batches acks, publishes dead letters before acking them,
//!   and returns permits. It retries failed acks, so an ack is never dropped
//!   because of a reconnect (Redis `XACK` is idempotent, so a retried ack that
//!   had in fact succeeded is harmless).
//!
//! Graceful shutdown cancels the fetcher; the runner drains its handlers and
//! the settler its queue before the subscription reports done.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::RetryBackoff;
use crate::deadletter::{self, Reason};
use crate::middleware::correlation::{self, Correlation};
use crate::middleware::metrics::Metrics;
use crate::stats::GroupCounters;
use crate::{BusError, Event, Handler, HandlerError, SubscribeOptions, Subscription};

/// An entry that could not be decoded into an event.
#[derive(Debug, Clone)]
pub(crate) struct Malformed {
    pub(crate) error: String,
    pub(crate) raw: Vec<u8>,
}

/// One delivery of one event (or of an undecodable entry) to this consumer.
pub(crate) struct Delivery<T> {
    pub(crate) token: T,
    /// 1 for the first delivery of the event to its group.
    pub(crate) attempt: u32,
    pub(crate) payload: Result<Event, Malformed>,
}

/// What a backend implements to be consumed by the shared loop.
pub(crate) trait Consumer: Send + Sync + 'static {
    /// Identifies a delivery for ack/retry (a sequence number, a stream id, a message).
    type Token: Send + Sync + Unpin + 'static;

    /// Whether dropping a `fetch` future midway loses nothing.
    const CANCEL_SAFE_FETCH: bool;

    /// Waits a bounded time for up to `max` deliveries; may return none.
    fn fetch(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Delivery<Self::Token>>, BusError>> + Send;

    /// Acknowledges deliveries; must be idempotent.
    fn ack(&self, tokens: &[Self::Token]) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Makes a failed delivery available again after `delay`.
    fn retry(
        &self,
        token: Self::Token,
        attempt: u32,
        delay: Duration,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Durably publishes a dead letter to `topic` (the delivery is acked afterwards).
    fn publish_dead_letter(
        &self,
        topic: &str,
        letter: &Event,
    ) -> impl Future<Output = Result<(), BusError>> + Send;
}

enum Settle<T> {
    Ack(T),
    Retry(T, u32, Duration),
    DeadLetter(T, Event),
}

struct Ctx {
    topic: String,
    group: String,
    opts: SubscribeOptions,
    metrics: Arc<Metrics>,
    group_stats: Arc<GroupCounters>,
}

/// Starts the three tasks of a subscription.
pub(crate) fn spawn<C: Consumer>(
    consumer: C,
    topic: &str,
    group: &str,
    handler: Arc<dyn Handler>,
    opts: SubscribeOptions,
    metrics: Arc<Metrics>,
    group_stats: Arc<GroupCounters>,
) -> Subscription {
    let consumer = Arc::new(consumer);
    let stop = CancellationToken::new();
    let permits = Arc::new(Semaphore::new(opts.max_in_flight));
    let ctx = Arc::new(Ctx {
        topic: topic.to_owned(),
        group: group.to_owned(),
        opts,
        metrics,
        group_stats,
    });
    let (deliveries_tx, deliveries_rx) = mpsc::unbounded_channel();
    let (settle_tx, settle_rx) = mpsc::unbounded_channel();
    let fetcher = tokio::spawn(fetcher(
        Arc::clone(&consumer),
        Arc::clone(&permits),
        deliveries_tx,
        stop.clone(),
    ));
    let runner = tokio::spawn(runner(deliveries_rx, settle_tx, handler, Arc::clone(&ctx)));
    let settler = tokio::spawn(settler(consumer, settle_rx, permits, ctx, stop.clone()));
    Subscription {
        topic: topic.to_owned(),
        group: group.to_owned(),
        stop,
        tasks: vec![fetcher, runner, settler],
    }
}

/// Delay before retrying a failed fetch or ack.
fn io_backoff() -> RetryBackoff {
    RetryBackoff::new(Duration::from_millis(50), Duration::from_secs(2), 2.0).unwrap_or_default()
}

async fn fetcher<C: Consumer>(
    consumer: Arc<C>,
    permits: Arc<Semaphore>,
    out: mpsc::UnboundedSender<Vec<Delivery<C::Token>>>,
    stop: CancellationToken,
) {
    let backoff = io_backoff();
    let mut failures = 0;
    loop {
        // Wait for room, then take all the room there is.
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        first.forget();
        let mut n = 1;
        let extra = permits.available_permits();
        if extra > 0
            && let Ok(p) = permits.try_acquire_many(u32::try_from(extra).unwrap_or(u32::MAX))
        {
            n += p.num_permits();
            p.forget();
        }
        let result = if C::CANCEL_SAFE_FETCH {
            tokio::select! {
                biased;
                () = stop.cancelled() => { permits.add_permits(n); return; }
                r = consumer.fetch(n) => r,
            }
        } else {
            consumer.fetch(n).await
        };
        match result {
            Ok(batch) => {
                failures = 0;
                permits.add_permits(n - batch.len().min(n));
                if !batch.is_empty() && out.send(batch).is_err() {
                    return;
                }
            }
            Err(error) => {
                permits.add_permits(n);
                failures += 1;
                let delay = backoff.delay(failures);
                tracing::warn!(%error, retry_in = ?delay, "bus fetch failed");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

type Outcome<T> = (Delivery<T>, Result<(), Failure>, Duration);

/// A failed handler run: its message and what a [`crate::Nack`] asked for.
struct Failure {
    message: String,
    permanent: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn plain(message: String) -> Self {
        Failure {
            message,
            permanent: false,
            retry_after: None,
        }
    }
}

/// One handler run: the handler's future polled inside the event's span and
/// correlation context, with panics caught.
///
/// Written out by hand rather than as an `async` block so that the runner can
/// poll it once in place: a handler that finishes without waiting (most do)
/// is settled without going through `FuturesUnordered`, which would allocate
/// and schedule a task node per event.
struct Run<T> {
    delivery: Option<Delivery<T>>,
    fut: BoxFuture<'static, Result<(), HandlerError>>,
    correlation: Correlation,
    /// Which delivery this is, for [`crate::current_delivery`].
    info: crate::subscribe::DeliveryInfo,
    span: tracing::Span,
    started: Instant,
}

impl<T: Unpin> Run<T> {
    fn start(
        handler: &dyn Handler,
        delivery: Delivery<T>,
        event: Event,
        started: Instant,
        max_deliveries: u32,
    ) -> Self {
        let info = crate::subscribe::DeliveryInfo {
            attempt: delivery.attempt,
            max_deliveries,
        };
        let span = tracing::debug_span!(
            "event",
            r#type = %event.ty(),
            id = %event.id(),
            attempt = delivery.attempt,
            correlationid = event.correlation_id().unwrap_or(""),
            traceparent = event.traceparent().unwrap_or(""),
        );
        let mut correlation = Correlation::of(&event);
        correlation.traceparent = correlation
            .traceparent
            .as_deref()
            .map(correlation::child_traceparent);
        let fut = {
            let _entered = span.enter();
            // A handler may panic before it returns its future, too.
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                crate::subscribe::DELIVERY.sync_scope(info, || {
                    correlation::sync_scope(correlation.clone(), || handler.handle(event))
                })
            }))
            .unwrap_or_else(|panic| {
                let error: HandlerError = panic_message(&*panic).into();
                Box::pin(std::future::ready(Err(error)))
            })
        };
        Run {
            delivery: Some(delivery),
            fut,
            correlation,
            info,
            span,
            started,
        }
    }
}

impl<T: Unpin> Future for Run<T> {
    type Output = Outcome<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome<T>> {
        let this = self.get_mut();
        let polled = {
            let _entered = this.span.enter();
            let (fut, correlation, info) = (&mut this.fut, &this.correlation, this.info);
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                crate::subscribe::DELIVERY.sync_scope(info, || {
                    correlation::sync_scope(correlation.clone(), || fut.as_mut().poll(cx))
                })
            }))
        };
        let result = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => Ok(()),
            Ok(Poll::Ready(Err(e))) => Err(match e.downcast_ref::<crate::Nack>() {
                Some(n) => Failure {
                    message: n.to_string(),
                    permanent: n.is_permanent(),
                    retry_after: n.get_retry_after(),
                },
                None => Failure::plain(e.to_string()),
            }),
            Err(panic) => Err(Failure::plain(panic_message(&*panic))),
        };
        let Some(delivery) = this.delivery.take() else {
            unreachable!("a finished run is not polled again")
        };
        Poll::Ready((delivery, result, this.started.elapsed()))
    }
}

async fn runner<T: Send + Sync + Unpin + 'static>(
    mut deliveries: mpsc::UnboundedReceiver<Vec<Delivery<T>>>,
    settle: mpsc::UnboundedSender<Vec<Settle<T>>>,
    handler: Arc<dyn Handler>,
    ctx: Arc<Ctx>,
) {
    let mut running: FuturesUnordered<Run<T>> = FuturesUnordered::new();
    let mut open = true;
    while open || !running.is_empty() {
        tokio::select! {
            biased;
            Some(outcome) = running.next(), if !running.is_empty() => {
                // Settle everything that is done by now in one send.
                let mut done = vec![decide(&ctx, outcome)];
                while let Some(Some(outcome)) = running.next().now_or_never() {
                    done.push(decide(&ctx, outcome));
                }
                if settle.send(done).is_err() { return; }
            }
            batch = deliveries.recv(), if open => match batch {
                Some(batch) => {
                    let redelivered = batch.iter().filter(|d| d.attempt > 1).count();
                    ctx.metrics.delivered(batch.len() as u64, redelivered as u64);
                    ctx.group_stats.delivered(batch.len() as u64, redelivered as u64);
                    let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
                    let mut task_cx = Context::from_waker(&waker);
                    let mut done = Vec::with_capacity(batch.len());
                    let mut now = Instant::now();
                    for Delivery { token, attempt, payload } in batch {
                        let settlement = match payload {
                            Err(bad) => {
                                let letter = deadletter::malformed(&ctx.topic, &ctx.group, attempt, &bad);
                                Settle::DeadLetter(token, letter)
                            }
                            Ok(event) if attempt > ctx.opts.max_deliveries => {
                                let letter = deadletter::letter(
                                    &event, &ctx.topic, &ctx.group, Reason::MaxDeliveries,
                                    attempt - 1, "not acknowledged within the ack wait",
                                );
                                Settle::DeadLetter(token, letter)
                            }
                            Ok(event) => {
                                let d = Delivery { token, attempt, payload: Ok(event.clone()) };
                                // One clock read per event: a run that ends in
                                // place ends when the next one starts.
                                let mut run = Run::start(&*handler, d, event, now, ctx.opts.max_deliveries);
                                let polled = Pin::new(&mut run).poll(&mut task_cx);
                                now = Instant::now();
                                match polled {
                                    Poll::Ready(outcome) => done.push(decide(&ctx, outcome)),
                                    Poll::Pending => running.push(run),
                                }
                                continue;
                            }
                        };
                        ctx.metrics.dead_lettered();
                        ctx.group_stats.dead_lettered();
                        done.push(settlement);
                    }
                    if !done.is_empty() && settle.send(done).is_err() { return; }
                }
                None => open = false,
            },
        }
    }
}

fn decide<T>(ctx: &Ctx, (d, result, took): Outcome<T>) -> Settle<T> {
    ctx.metrics.handler_latency(took);
    match result {
        Ok(()) => Settle::Ack(d.token),
        Err(failure) => {
            ctx.metrics.handler_error();
            let Ok(event) = d.payload else {
                unreachable!("only decoded events reach handlers")
            };
            let error = failure.message;
            if failure.permanent {
                tracing::warn!(topic = %ctx.topic, group = %ctx.group, id = %event.id(), attempts = d.attempt, %error, "dead-lettering rejected event");
                ctx.metrics.dead_lettered();
                ctx.group_stats.dead_lettered();
                let letter = deadletter::letter(
                    &event,
                    &ctx.topic,
                    &ctx.group,
                    Reason::Rejected,
                    d.attempt,
                    &error,
                );
                Settle::DeadLetter(d.token, letter)
            } else if d.attempt >= ctx.opts.max_deliveries {
                tracing::warn!(topic = %ctx.topic, group = %ctx.group, id = %event.id(), attempts = d.attempt, %error, "dead-lettering event");
                ctx.metrics.dead_lettered();
                ctx.group_stats.dead_lettered();
                let letter = deadletter::letter(
                    &event,
                    &ctx.topic,
                    &ctx.group,
                    Reason::MaxDeliveries,
                    d.attempt,
                    &error,
                );
                Settle::DeadLetter(d.token, letter)
            } else {
                let delay = ctx.opts.backoff.delay(d.attempt);
                let delay = failure.retry_after.map_or(delay, |after| delay.max(after));
                tracing::debug!(topic = %ctx.topic, group = %ctx.group, id = %event.id(), attempt = d.attempt, %error, retry_in = ?delay, "handler failed");
                Settle::Retry(d.token, d.attempt, delay)
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    format!("handler panicked: {msg}")
}

async fn settler<C: Consumer>(
    consumer: Arc<C>,
    mut rx: mpsc::UnboundedReceiver<Vec<Settle<C::Token>>>,
    permits: Arc<Semaphore>,
    ctx: Arc<Ctx>,
    stop: CancellationToken,
) {
    let backoff = io_backoff();
    let mut acks = Vec::new();
    let mut batch = Vec::new();
    let mut batches = Vec::new();
    while rx.recv_many(&mut batches, 64).await > 0 {
        batch.extend(batches.drain(..).flatten());
        let settled = batch.len();
        for s in batch.drain(..) {
            match s {
                Settle::Ack(t) => acks.push(t),
                Settle::Retry(t, attempt, delay) => {
                    if let Err(error) = consumer.retry(t, attempt, delay).await {
                        // The broker redelivers it after the ack wait anyway.
                        tracing::warn!(%error, "scheduling a redelivery failed");
                    }
                }
                Settle::DeadLetter(t, letter) => {
                    match consumer
                        .publish_dead_letter(&ctx.opts.dead_letter_topic, &letter)
                        .await
                    {
                        Ok(()) => acks.push(t),
                        Err(error) => tracing::warn!(
                            %error,
                            "publishing a dead letter failed; the event comes back after the ack wait"
                        ),
                    }
                }
            }
        }
        let mut failures = 0;
        while !acks.is_empty() {
            match consumer.ack(&acks).await {
                Ok(()) => {
                    ctx.metrics.acked(acks.len() as u64);
                    ctx.group_stats.acked(acks.len() as u64);
                    acks.clear();
                }
                Err(error) => {
                    failures += 1;
                    // While shutting down, give up after a few tries: unacked
                    // deliveries are redelivered, which at-least-once allows.
                    if stop.is_cancelled() && failures > 5 {
                        tracing::warn!(%error, n = acks.len(), "giving up acks at shutdown");
                        acks.clear();
                        break;
                    }
                    let delay = backoff.delay(failures);
                    tracing::warn!(%error, retry_in = ?delay, "ack failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        permits.add_permits(settled);
    }
}
