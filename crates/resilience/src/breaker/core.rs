//! The breaker itself: its state machine, permits and snapshots.
//!
//! Written by hand because tower has no circuit breaker and the crates that do
//! (tower-resilience, failsafe, recloser) lock or allocate per call; see the
//! crate docs for the measured difference. The closed path is one atomic load
//! in `try_acquire` and, in `record`, one load plus two or three uncontended
//! atomic read-modify-writes on a count window. The clock is read only when
//! slow calls are tracked or the window is time-based. Every transition goes
//! through one short mutex, which only the thread that observed the reason for
//! it ever takes.

use super::config::{BreakerConfig, Window};
use super::error::{BreakerOpen, CallError, InvalidBreakerConfig};
use super::window::{CountWindow, Counts, Recorded, TimeWindow};
use crate::clock::{Clock, duration_nanos};
use parking_lot::Mutex;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls flow; outcomes are recorded and the rates checked.
    Closed,
    /// Calls are rejected until the open duration has passed.
    Open,
    /// A bounded number of probe calls decide whether to close or open again.
    HalfOpen,
    /// Rejects every call until [`Breaker::reset`]; set by an operator.
    ForcedOpen,
    /// Admits every call and records nothing; set by an operator.
    Disabled,
    /// Admits every call and records outcomes, but never opens: a dry run.
    MetricsOnly,
}

impl State {
    /// The lowercase name used in logs, metrics labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
            State::MetricsOnly => "metrics_only",
        }
    }

    /// True when calls are currently rejected (open or forced open).
    pub fn is_open(self) -> bool {
        matches!(self, State::Open | State::ForcedOpen)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The caller's verdict on one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The call worked.
    Success,
    /// The call failed in a way that says something about the upstream's health.
    Failure,
    /// The call says nothing about the upstream (e.g. a client error or a
    /// cancellation): it is not counted, and a probe slot it held is freed.
    Ignored,
}

/// One state change, as passed to a transition listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
    /// When it happened, on tokio's clock.
    pub at: tokio::time::Instant,
}

/// A cheap, consistent-enough picture of a breaker for metrics and dashboards.
///
/// The counts describe the closed-state window (in the open and half-open
/// states, the window that opened the breaker).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// The state when the snapshot was taken. An open breaker whose open
    /// duration has passed reports `Open` until the next call moves it to half-open.
    pub state: State,
    /// Calls in the window.
    pub calls: u64,
    /// Failed calls in the window.
    pub failed_calls: u64,
    /// Slow calls in the window (a slow call can also be a failed one).
    pub slow_calls: u64,
    /// `failed_calls / calls`, `0.0` for an empty window.
    pub failure_rate: f64,
    /// `slow_calls / calls`, `0.0` for an empty window.
    pub slow_call_rate: f64,
    /// Openings since the breaker was last closed.
    pub consecutive_opens: u32,
    /// For an open breaker, how long until it admits probes.
    pub retry_after: Option<Duration>,
}

/// The type of a transition listener.
type Listener = Arc<dyn Fn(&Transition) + Send + Sync>;

// The state word: kind in the low 3 bits, epoch above. Every transition bumps
// the epoch, so a permit can tell whether the state it was issued in is over.
const KIND_BITS: u32 = 3;
const KIND_MASK: u64 = (1 << KIND_BITS) - 1;
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const DISABLED: u64 = 4;
const METRICS_ONLY: u64 = 5;

#[inline]
fn kind(word: u64) -> u64 {
    word & KIND_MASK
}

#[inline]
fn epoch(word: u64) -> u64 {
    word >> KIND_BITS
}

fn state_of(word: u64) -> State {
    match kind(word) {
        CLOSED => State::Closed,
        OPEN => State::Open,
        HALF_OPEN => State::HalfOpen,
        FORCED_OPEN => State::ForcedOpen,
        DISABLED => State::Disabled,
        _ => State::MetricsOnly,
    }
}

fn kind_of(state: State) -> u64 {
    match state {
        State::Closed => CLOSED,
        State::Open => OPEN,
        State::HalfOpen => HALF_OPEN,
        State::ForcedOpen => FORCED_OPEN,
        State::Disabled => DISABLED,
        State::MetricsOnly => METRICS_ONLY,
    }
}

// The half-open word: admitted (11 bits) | succeeded (11) | failed (11) |
// slow (11) | tag (20, the half-open state's epoch). `admitted` counts probes
// handed out and not released as ignored.
const HO_BITS: u32 = 11;
const HO_MASK: u64 = (1 << HO_BITS) - 1;
const HO_OK: u32 = HO_BITS;
const HO_FAILED: u32 = 2 * HO_BITS;
const HO_SLOW: u32 = 3 * HO_BITS;
const HO_TAG: u32 = 4 * HO_BITS;

#[inline]
fn ho_field(word: u64, shift: u32) -> u64 {
    (word >> shift) & HO_MASK
}

#[inline]
fn ho_tag(epoch: u64) -> u64 {
    epoch & ((1 << (64 - HO_TAG)) - 1)
}

/// Pads a hot atomic to its own cache line, so that writers of the window do
/// not keep invalidating the line every `try_acquire` reads.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

#[derive(Debug)]
enum WindowImpl {
    Count(CountWindow),
    Time(TimeWindow),
}

/// Thresholds resolved to integers once, so the hot path does no float math.
#[derive(Debug)]
struct Resolved {
    failure_ppm: u64,
    slow_ppm: u64,
    /// 0 when slow calls are not tracked.
    slow_nanos: u64,
    min_calls: u64,
    probes: u64,
    half_open_max_wait: u64,
    /// Read the clock when recording (slow calls tracked, or a time window).
    record_needs_clock: bool,
}

fn ppm(rate: f64) -> u64 {
    // Rates are validated to (0, 1]; the product fits easily.
    (rate * 1_000_000.0).round() as u64
}

#[inline]
fn reaches(part: u64, whole: u64, ppm: u64) -> bool {
    u128::from(part) * 1_000_000 >= u128::from(ppm) * u128::from(whole)
}

struct Inner {
    state: Padded<AtomicU64>,
    window: WindowImpl,
    half_open: Padded<AtomicU64>,
    open_until: AtomicU64,
    half_open_since: AtomicU64,
    consecutive_opens: AtomicU32,
    resolved: Resolved,
    config: BreakerConfig,
    clock: Clock,
    transition_lock: Mutex<()>,
    watch: watch::Sender<State>,
    listener: Option<Listener>,
}

/// A circuit breaker, cheap to clone (clones share state).
///
/// ```
/// use switchboard_resilience::breaker::{Breaker, BreakerConfig, Outcome};
///
/// let breaker = Breaker::new(BreakerConfig::default()).unwrap();
/// match breaker.try_acquire() {
///     Ok(permit) => {
///         // ... send the request, look at the response ...
///         permit.record(Outcome::Success);
///     }
///     Err(open) => println!("rejected, retry after {:?}", open.retry_after),
/// }
/// ```
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The part of a permit that does not depend on how the breaker is held.
#[derive(Debug)]
struct Ticket {
    /// The state word the permit was issued under.
    word: u64,
    /// Start time in clock nanoseconds, when slow calls are tracked.
    start: u64,
    done: bool,
}

/// Leave to make one call, borrowed from a [`Breaker`]; report its outcome with
/// [`record`](Permit::record). Dropping it without a verdict counts as
/// [`Outcome::Ignored`] (and frees a half-open probe slot).
#[derive(Debug)]
#[must_use = "a permit records nothing unless `record` is called"]
pub struct Permit<'a> {
    inner: &'a Inner,
    ticket: Ticket,
}

impl Permit<'_> {
    /// Reports the call's outcome.
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        self.ticket.done = true;
        self.inner.record(&self.ticket, outcome);
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        kind(self.ticket.word) == HALF_OPEN
    }

    /// Turns this permit into an [`OwnedPermit`] so its verdict can be given
    /// later, from a `'static` context (one reference-count increment, no
    /// allocation). `breaker` must be the breaker that issued the permit;
    /// any other breaker gets the permit back unchanged.
    pub fn into_owned(mut self, breaker: &Breaker) -> Result<OwnedPermit, Self> {
        if !std::ptr::eq(self.inner, Arc::as_ptr(&breaker.inner)) {
            return Err(self);
        }
        // This permit hands its ticket over and records nothing when dropped.
        self.ticket.done = true;
        Ok(OwnedPermit {
            inner: Arc::clone(&breaker.inner),
            ticket: Ticket {
                word: self.ticket.word,
                start: self.ticket.start,
                done: false,
            },
        })
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        if !self.ticket.done {
            self.inner.record(&self.ticket, Outcome::Ignored);
        }
    }
}

/// Like [`Permit`], but owns a handle on the breaker so it can move into a
/// `'static` future (what a tower service needs).
#[must_use = "a permit records nothing unless `record` is called"]
pub struct OwnedPermit {
    inner: Arc<Inner>,
    ticket: Ticket,
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

impl OwnedPermit {
    /// Reports the call's outcome.
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        self.ticket.done = true;
        self.inner.record(&self.ticket, outcome);
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        kind(self.ticket.word) == HALF_OPEN
    }
}

impl Drop for OwnedPermit {
    #[inline]
    fn drop(&mut self) {
        if !self.ticket.done {
            self.inner.record(&self.ticket, Outcome::Ignored);
        }
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("state", &state_of(self.state.0.load(Ordering::Relaxed)))
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker, or the reason `config` cannot work.
    pub fn new(config: BreakerConfig) -> Result<Self, InvalidBreakerConfig> {
        Self::build(config, None)
    }

    /// Like [`new`](Breaker::new), and calls `listener` after every state change
    /// (outside the breaker's lock, on the thread that caused the change).
    pub fn with_listener(
        config: BreakerConfig,
        listener: impl Fn(&Transition) + Send + Sync + 'static,
    ) -> Result<Self, InvalidBreakerConfig> {
        Self::build(config, Some(Arc::new(listener)))
    }

    /// How many handles share this breaker (the keyed set evicts unshared ones first).
    pub(crate) fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    pub(crate) fn build(
        config: BreakerConfig,
        listener: Option<Listener>,
    ) -> Result<Self, InvalidBreakerConfig> {
        config.validate()?;
        let word = CLOSED | (1 << KIND_BITS);
        let window = match config.window {
            Window::Count(size) => WindowImpl::Count(CountWindow::new(size, epoch(word))),
            Window::Time(d) => WindowImpl::Time(TimeWindow::new(
                duration_nanos(d),
                config.slow_call_duration.is_some(),
            )),
        };
        let slow_nanos = config.slow_call_duration.map_or(0, duration_nanos);
        let resolved = Resolved {
            failure_ppm: ppm(config.failure_rate),
            slow_ppm: ppm(config.slow_call_rate),
            slow_nanos,
            min_calls: u64::from(config.min_calls),
            probes: u64::from(config.half_open_probes),
            half_open_max_wait: duration_nanos(config.half_open_max_wait),
            record_needs_clock: slow_nanos > 0 || matches!(config.window, Window::Time(_)),
        };
        let (watch, _) = watch::channel(State::Closed);
        Ok(Self {
            inner: Arc::new(Inner {
                state: Padded(AtomicU64::new(word)),
                window,
                half_open: Padded(AtomicU64::new(0)),
                open_until: AtomicU64::new(0),
                half_open_since: AtomicU64::new(0),
                consecutive_opens: AtomicU32::new(0),
                resolved,
                config,
                clock: Clock::new(),
                transition_lock: Mutex::new(()),
                watch,
                listener,
            }),
        })
    }

    /// The configuration this breaker was built with.
    pub fn config(&self) -> &BreakerConfig {
        &self.inner.config
    }

    /// Asks leave to make a call.
    ///
    /// In the closed state this is one atomic load and never allocates. An
    /// open breaker whose open duration has passed turns half-open here and
    /// hands out a probe.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_>, BreakerOpen> {
        let ticket = self.inner.acquire()?;
        Ok(Permit {
            inner: &self.inner,
            ticket,
        })
    }

    /// Like [`try_acquire`](Breaker::try_acquire), but the permit keeps the
    /// breaker alive (one reference-count increment).
    #[inline]
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, BreakerOpen> {
        let ticket = self.inner.acquire()?;
        Ok(OwnedPermit {
            inner: Arc::clone(&self.inner),
            ticket,
        })
    }

    /// Runs `call` if the breaker admits it; `Ok` counts as success and `Err`
    /// as failure. A cancelled call counts as ignored.
    pub async fn call<F, T, E>(&self, call: F) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        self.call_classified(call, |result| match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        })
        .await
    }

    /// Runs `call` if the breaker admits it, and lets `classify` judge the result.
    pub async fn call_classified<F, T, E, C>(&self, call: F, classify: C) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
        C: FnOnce(&Result<T, E>) -> Outcome,
    {
        let permit = self.try_acquire()?;
        let result = call.await;
        permit.record(classify(&result));
        result.map_err(CallError::Inner)
    }

    /// The current state.
    pub fn state(&self) -> State {
        state_of(self.inner.state.0.load(Ordering::Acquire))
    }

    /// A receiver that sees every state change (the latest one, if several
    /// happen between two looks).
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.inner.watch.subscribe()
    }

    /// The state and the window's counts, without locking.
    pub fn snapshot(&self) -> Snapshot {
        let inner = &*self.inner;
        let word = inner.state.0.load(Ordering::Acquire);
        let counts = match &inner.window {
            WindowImpl::Count(w) => w.counts(),
            WindowImpl::Time(w) => w.counts(inner.clock.now()),
        };
        let rate = |part: u64| {
            if counts.calls == 0 {
                0.0
            } else {
                part as f64 / counts.calls as f64
            }
        };
        let retry_after = match kind(word) {
            OPEN => Some(inner.open_retry_after(inner.clock.now())),
            FORCED_OPEN => Some(inner.config.open_duration.base),
            _ => None,
        };
        Snapshot {
            state: state_of(word),
            calls: counts.calls,
            failed_calls: counts.failed,
            slow_calls: counts.slow,
            failure_rate: rate(counts.failed),
            slow_call_rate: rate(counts.slow),
            consecutive_opens: inner.consecutive_opens.load(Ordering::Relaxed),
            retry_after,
        }
    }

    /// Closes the breaker with an empty window, from any state.
    pub fn reset(&self) {
        self.inner.force(State::Closed);
    }

    /// Opens the breaker until [`reset`](Breaker::reset) (an operator's switch).
    pub fn force_open(&self) {
        self.inner.force(State::ForcedOpen);
    }

    /// Admits everything and records nothing until [`reset`](Breaker::reset).
    pub fn disable(&self) {
        self.inner.force(State::Disabled);
    }

    /// Records outcomes and reports rates but never opens, until [`reset`](Breaker::reset).
    pub fn metrics_only(&self) {
        self.inner.force(State::MetricsOnly);
    }
}

impl Inner {
    #[inline]
    fn acquire(&self) -> Result<Ticket, BreakerOpen> {
        let word = self.state.0.load(Ordering::Acquire);
        match kind(word) {
            CLOSED | METRICS_ONLY | DISABLED => Ok(Ticket {
                word,
                start: self.start_time(),
                done: false,
            }),
            _ => self.acquire_slow(word),
        }
    }

    #[inline]
    fn start_time(&self) -> u64 {
        if self.resolved.slow_nanos > 0 {
            self.clock.now()
        } else {
            0
        }
    }

    fn open_retry_after(&self, now: u64) -> Duration {
        Duration::from_nanos(self.open_until.load(Ordering::Acquire).saturating_sub(now))
    }

    #[cold]
    fn acquire_slow(&self, mut word: u64) -> Result<Ticket, BreakerOpen> {
        loop {
            match kind(word) {
                CLOSED | METRICS_ONLY | DISABLED => {
                    return Ok(Ticket {
                        word,
                        start: self.start_time(),
                        done: false,
                    });
                }
                FORCED_OPEN => {
                    return Err(BreakerOpen {
                        retry_after: self.config.open_duration.base,
                    });
                }
                OPEN => {
                    let now = self.clock.now();
                    if now < self.open_until.load(Ordering::Acquire) {
                        return Err(BreakerOpen {
                            retry_after: self.open_retry_after(now),
                        });
                    }
                    self.transition(word, HALF_OPEN);
                }
                _ => {
                    if let Some(result) = self.acquire_probe(word) {
                        return result;
                    }
                }
            }
            word = self.state.0.load(Ordering::Acquire);
        }
    }

    /// Hands out a half-open probe if a slot is free. `None` means the state
    /// changed under us and the caller should look again.
    fn acquire_probe(&self, word: u64) -> Option<Result<Ticket, BreakerOpen>> {
        let tag = ho_tag(epoch(word));
        let mut ho = self.half_open.0.load(Ordering::Acquire);
        loop {
            if ho >> HO_TAG != tag {
                return None;
            }
            if ho & HO_MASK >= self.resolved.probes {
                break;
            }
            match self.half_open.0.compare_exchange_weak(
                ho,
                ho + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(Ok(Ticket {
                        word,
                        start: self.start_time(),
                        done: false,
                    }));
                }
                Err(actual) => ho = actual,
            }
        }
        // Every probe slot is taken. If the probes have had their time and not
        // all reported, give up on them and open again.
        let now = self.clock.now();
        let since = self.half_open_since.load(Ordering::Acquire);
        let deadline = since.saturating_add(self.resolved.half_open_max_wait);
        if now >= deadline {
            if self.transition(word, OPEN) {
                return Some(Err(BreakerOpen {
                    retry_after: self.open_retry_after(self.clock.now()),
                }));
            }
            return None;
        }
        let wait = Duration::from_nanos(deadline - now).min(self.config.open_duration.base);
        Some(Err(BreakerOpen { retry_after: wait }))
    }

    #[inline]
    fn record(&self, ticket: &Ticket, outcome: Outcome) {
        match kind(ticket.word) {
            CLOSED | METRICS_ONLY if outcome != Outcome::Ignored => {
                self.record_closed(ticket, outcome == Outcome::Failure);
            }
            HALF_OPEN => self.record_probe(ticket, outcome),
            _ => {}
        }
    }

    #[inline]
    fn record_closed(&self, ticket: &Ticket, failed: bool) {
        let now = if self.resolved.record_needs_clock {
            self.clock.now()
        } else {
            0
        };
        let slow = self.resolved.slow_nanos > 0
            && now.saturating_sub(ticket.start) >= self.resolved.slow_nanos;
        if self.state.0.load(Ordering::Acquire) != ticket.word {
            // The state changed since the permit was issued: its outcome
            // belongs to a window that is gone.
            return;
        }
        let counts = match &self.window {
            WindowImpl::Count(w) => match w.record(epoch(ticket.word), failed, slow) {
                Recorded::Changed(counts) => counts,
                Recorded::Unchanged | Recorded::Stale => return,
            },
            WindowImpl::Time(w) => w.record(now, failed, slow),
        };
        if kind(ticket.word) == CLOSED && self.should_open(counts) {
            self.transition(ticket.word, OPEN);
        }
    }

    #[inline]
    fn should_open(&self, c: Counts) -> bool {
        c.calls >= self.resolved.min_calls
            && (reaches(c.failed, c.calls, self.resolved.failure_ppm)
                || reaches(c.slow, c.calls, self.resolved.slow_ppm))
    }

    #[cold]
    fn record_probe(&self, ticket: &Ticket, outcome: Outcome) {
        let slow = self.resolved.slow_nanos > 0
            && outcome != Outcome::Ignored
            && self.clock.now().saturating_sub(ticket.start) >= self.resolved.slow_nanos;
        let tag = ho_tag(epoch(ticket.word));
        let mut ho = self.half_open.0.load(Ordering::Acquire);
        let next = loop {
            if ho >> HO_TAG != tag {
                return;
            }
            let next = match outcome {
                Outcome::Ignored => ho - 1,
                Outcome::Success => ho + (1 << HO_OK),
                Outcome::Failure => ho + (1 << HO_FAILED),
            } + if slow { 1 << HO_SLOW } else { 0 };
            match self.half_open.0.compare_exchange_weak(
                ho,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break next,
                Err(actual) => ho = actual,
            }
        };
        let ok = ho_field(next, HO_OK);
        let failed = ho_field(next, HO_FAILED);
        let probes = self.resolved.probes;
        if outcome == Outcome::Ignored || ok + failed < probes {
            return;
        }
        let reopen = reaches(failed, probes, self.resolved.failure_ppm)
            || reaches(ho_field(next, HO_SLOW), probes, self.resolved.slow_ppm);
        self.transition(ticket.word, if reopen { OPEN } else { CLOSED });
    }

    /// Moves from the state `expected` to `to`. Returns false, doing nothing,
    /// if the state is no longer `expected` (someone else moved it first).
    #[cold]
    fn transition(&self, expected: u64, to: u64) -> bool {
        let guard = self.transition_lock.lock();
        if self.state.0.load(Ordering::Acquire) != expected {
            return false;
        }
        let now = self.clock.now();
        let epoch = epoch(expected) + 1;
        match to {
            OPEN => {
                let n = self.consecutive_opens.fetch_add(1, Ordering::AcqRel) + 1;
                let open_for = self.config.open_duration.for_opening(n);
                let until = now.saturating_add(duration_nanos(open_for));
                self.open_until.store(until, Ordering::Release);
            }
            HALF_OPEN => {
                self.half_open
                    .0
                    .store(ho_tag(epoch) << HO_TAG, Ordering::Release);
                self.half_open_since.store(now, Ordering::Release);
            }
            CLOSED | METRICS_ONLY => {
                if to == CLOSED {
                    self.consecutive_opens.store(0, Ordering::Release);
                }
                match &self.window {
                    WindowImpl::Count(w) => w.reset(epoch),
                    WindowImpl::Time(w) => w.reset(),
                }
            }
            _ => {}
        }
        // Publish last: a thread that sees the new word sees the reset window.
        self.state
            .0
            .store(to | (epoch << KIND_BITS), Ordering::Release);
        drop(guard);
        let transition = Transition {
            from: state_of(expected),
            to: state_of(to),
            at: self.clock.instant(now),
        };
        self.watch.send_replace(transition.to);
        if let Some(listener) = &self.listener {
            listener(&transition);
        }
        true
    }

    fn force(&self, to: State) {
        loop {
            let word = self.state.0.load(Ordering::Acquire);
            if self.transition(word, kind_of(to)) {
                return;
            }
        }
    }
}
