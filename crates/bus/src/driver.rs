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
//! # Shutdown
//! Graceful shutdown cancels the fetcher (a fetch that is not cancel-safe
//! runs to its end first). Handlers that already started finish and are
//! settled as usual. Nothing else is acked or left to the ack wait: the
//! consumer hands back to the group ([`Consumer::release`]) every delivery
//! that reaches the runner after shutdown began (fetched, never run) and
//! every one whose handler refused with [`crate::Nack::release`]; once the
//! settler's queue is drained, [`Consumer::release_held`] hands back what the
//! backend still holds in this process (Redis: failed entries waiting for
//! their backoff). The group's next consumer gets all of it at once.

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

    /// Hands deliveries back to the group at once, without a handler outcome:
    /// fetched but never run because the subscription is stopping, or refused
    /// by their handler ([`crate::Nack::release`]) while it stops. Each comes
    /// with the deliveries that count so far (`attempt - 1`), so that, where
    /// the backend can, the handback does not count as a delivery.
    fn release(
        &self,
        tokens: Vec<(Self::Token, u32)>,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Called once, at the end of a graceful shutdown: hands back what the
    /// backend still holds for this consumer in this process, so that it does
    /// not wait for the ack wait, and says how many deliveries that was. Most
    /// backends hold nothing.
    fn release_held(&self) -> impl Future<Output = Result<u64, BusError>> + Send {
        std::future::ready(Ok(0))
    }

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
    /// Hand back without an outcome; the deliveries that count so far.
    Release(T, u32, Handback),
}

/// Why a delivery goes back to its group unhandled (the `reason` label of
/// `switchboard_bus_handed_back_total`).
#[derive(Clone, Copy)]
enum Handback {
    /// Its handler refused it with [`crate::Nack::release`] while stopping.
    Released,
    /// Never run: fetched after shutdown began (and, counted apart, what
    /// [`Consumer::release_held`] hands back).
    Held,
}

struct Ctx {
    topic: String,
    group: String,
    opts: SubscribeOptions,
    metrics: Arc<Metrics>,
    group_stats: Arc<GroupCounters>,
    /// Cancelled when graceful shutdown begins.
    stop: CancellationToken,
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
        stop: stop.clone(),
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
    release: bool,
}

impl Failure {
    fn plain(message: String) -> Self {
        Failure {
            message,
            permanent: false,
            retry_after: None,
            release: false,
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
                    release: n.is_release(),
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
                Some(batch) if ctx.stop.is_cancelled() => {
                    // Fetched, but shutdown began before it started: not
                    // ours to run any more, so hand it back now.
                    let done = batch
                        .into_iter()
                        .map(|d| Settle::Release(d.token, d.attempt.saturating_sub(1), Handback::Held))
                        .collect();
                    if settle.send(done).is_err() { return; }
                }
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
        // Refused because this process is stopping: not a failure. (While not
        // stopping, a release is retried like a failure, so a handler that
        // refuses everything cannot spin.)
        Err(failure) if failure.release && ctx.stop.is_cancelled() => {
            Settle::Release(d.token, d.attempt.saturating_sub(1), Handback::Released)
        }
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
    let mut releases = Vec::new();
    // Of `releases`, how many are `Handback::Released` and `Handback::Held`.
    let (mut released, mut held) = (0, 0);
    let mut batch = Vec::new();
    let mut batches = Vec::new();
    while rx.recv_many(&mut batches, 64).await > 0 {
        batch.extend(batches.drain(..).flatten());
        let settled = batch.len();
        for s in batch.drain(..) {
            match s {
                Settle::Ack(t) => acks.push(t),
                Settle::Release(t, counted, why) => {
                    match why {
                        Handback::Released => released += 1,
                        Handback::Held => held += 1,
                    }
                    releases.push((t, counted));
                }
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
        if !releases.is_empty() {
            let n = releases.len();
            if let Err(error) = consumer.release(std::mem::take(&mut releases)).await {
                tracing::warn!(%error, n, "handing back deliveries failed; they come back after the ack wait");
            } else {
                tracing::debug!(topic = %ctx.topic, group = %ctx.group, n, "handed back unhandled deliveries");
                // Counted only once the backend took them: a failed handback
                // leaves them to the ack wait, like a crash.
                ctx.metrics.handed_back(released, held);
                ctx.group_stats.handed_back(released, held);
            }
            (released, held) = (0, 0);
        }
        permits.add_permits(settled);
    }
    if stop.is_cancelled() {
        match consumer.release_held().await {
            Ok(held) => {
                ctx.metrics.handed_back(0, held);
                ctx.group_stats.handed_back(0, held);
            }
            Err(error) => {
                tracing::warn!(%error, "handing back scheduled retries failed; they come back after the ack wait");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The shutdown promise on a scripted backend, where the timing of a
    //! fetch that completes after shutdown began is under the test's control.

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use parking_lot::Mutex;
    use tokio::sync::Notify;

    use super::*;
    use crate::stats::BusStats;

    #[derive(Default)]
    struct Script {
        fetches: AtomicUsize,
        /// The second fetch (a blocking read) returns once this is notified.
        answer: Notify,
        acked: Mutex<Vec<u32>>,
        retried: Mutex<Vec<u32>>,
        released: Mutex<Vec<(u32, u32)>>,
        released_held: AtomicBool,
    }

    struct Scripted(Arc<Script>);

    fn delivery(n: u32, attempt: u32) -> Delivery<u32> {
        let event = Event::builder()
            .source("/t")
            .ty("t")
            .id(n.to_string())
            .build()
            .unwrap();
        Delivery {
            token: n,
            attempt,
            payload: Ok(event),
        }
    }

    impl Consumer for Scripted {
        type Token = u32;
        const CANCEL_SAFE_FETCH: bool = false;

        async fn fetch(&self, _max: usize) -> Result<Vec<Delivery<u32>>, BusError> {
            match self.0.fetches.fetch_add(1, Ordering::SeqCst) {
                0 => Ok(vec![delivery(1, 1)]),
                1 => {
                    self.0.answer.notified().await;
                    Ok(vec![delivery(2, 1), delivery(3, 2)])
                }
                // Later reads find nothing within their block time.
                _ => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok(Vec::new())
                }
            }
        }
        async fn ack(&self, tokens: &[u32]) -> Result<(), BusError> {
            self.0.acked.lock().extend_from_slice(tokens);
            Ok(())
        }
        async fn release(&self, tokens: Vec<(u32, u32)>) -> Result<(), BusError> {
            self.0.released.lock().extend(tokens);
            Ok(())
        }
        /// As if one failed delivery were still waiting for its backoff.
        async fn release_held(&self) -> Result<u64, BusError> {
            self.0.released_held.store(true, Ordering::SeqCst);
            Ok(1)
        }
        async fn retry(&self, token: u32, _attempt: u32, _delay: Duration) -> Result<(), BusError> {
            self.0.retried.lock().push(token);
            Ok(())
        }
        async fn publish_dead_letter(&self, _topic: &str, _letter: &Event) -> Result<(), BusError> {
            Ok(())
        }
    }

    fn start(
        script: &Arc<Script>,
        handler: impl Handler,
    ) -> (Subscription, Arc<Metrics>, BusStats) {
        let metrics = Arc::new(Metrics::default());
        let stats = BusStats::default();
        let sub = spawn(
            Scripted(Arc::clone(script)),
            "t",
            "g",
            Arc::new(handler),
            SubscribeOptions::default().max_in_flight(4),
            Arc::clone(&metrics),
            stats.group("t", "g"),
        );
        (sub, metrics, stats)
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        waited.await.unwrap_or_else(|_| panic!("{what}"));
    }

    /// Deliveries a fetch returns after shutdown began are handed back with
    /// the deliveries that count so far, never run nor acked; the consumer is
    /// asked to release what it holds once the rest is settled.
    #[tokio::test]
    async fn deliveries_fetched_after_stop_are_handed_back() {
        let script = Arc::new(Script::default());
        let ran = Arc::new(Mutex::new(Vec::new()));
        let r = Arc::clone(&ran);
        let handler = move |e: Event| {
            r.lock().push(e.id().to_owned());
            std::future::ready(Ok::<_, HandlerError>(()))
        };
        let (sub, metrics, stats) = start(&script, handler);
        until("the first event is acked and the next fetch waits", || {
            *script.acked.lock() == [1] && script.fetches.load(Ordering::SeqCst) == 2
        })
        .await;
        sub.stop();
        script.answer.notify_one();
        sub.shutdown().await;
        assert_eq!(*ran.lock(), ["1"]);
        assert_eq!(*script.acked.lock(), [1]);
        assert_eq!(*script.released.lock(), [(2, 0), (3, 1)]);
        assert!(script.retried.lock().is_empty());
        assert!(script.released_held.load(Ordering::SeqCst));
        // Counted as held: the two fetched after the stop, and the one the
        // consumer still held.
        let m = metrics.snapshot();
        assert_eq!((m.released, m.held), (0, 3), "{m:?}");
        let g = &stats.snapshot().groups[0];
        assert_eq!((g.released, g.held), (0, 3), "{g:?}");
    }

    /// `Nack::release` hands the event back when the subscription is
    /// stopping, and is an ordinary (retried) failure when it is not.
    #[tokio::test]
    async fn nack_release_hands_back_only_while_stopping() {
        let script = Arc::new(Script::default());
        let gate = Arc::new(Notify::new());
        let g = Arc::clone(&gate);
        let handler = move |e: Event| {
            let g = Arc::clone(&g);
            async move {
                if e.id() == "2" {
                    g.notified().await;
                }
                Err::<(), HandlerError>(crate::Nack::release("stopping").into())
            }
        };
        let (sub, metrics, stats) = start(&script, handler);
        until("event 1 is retried", || *script.retried.lock() == [1]).await;
        script.answer.notify_one();
        until("event 3 is retried and 2 runs", || {
            *script.retried.lock() == [1, 3]
        })
        .await;
        sub.stop();
        gate.notify_one();
        sub.shutdown().await;
        assert_eq!(*script.released.lock(), [(2, 0)]);
        assert!(script.acked.lock().is_empty());
        let m = metrics.snapshot();
        assert_eq!(m.handler_errors, 2);
        // Only the refusal while stopping is a handback (besides the one the
        // consumer held); the two before it were failures.
        assert_eq!((m.released, m.held), (1, 1), "{m:?}");
        let g = &stats.snapshot().groups[0];
        assert_eq!((g.released, g.held), (1, 1), "{g:?}");
    }
}
