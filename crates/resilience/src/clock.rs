//! Where every primitive here reads the time, and an optional coarse clock
//! that makes that read nearly free.
//!
//! By default time comes from `tokio::time::Instant`, so tests drive it with
//! `tokio::time::pause()` and `advance()` instead of sleeping. Reading it costs
//! a `clock_gettime`, which is about 20 ns on most machines but can be several
//! times that in some VMs. A process that reads the time on every request (a
//! breaker with a time-based window or slow-call tracking, an open breaker
//! rejecting, a rate limiter, a retry budget) can start a [`CoarseClock`]: a
//! background thread that publishes the time every millisecond or so, which
//! those reads then load from one atomic instead.
//!
//! The coarse clock stops ticking when nobody reads it: after 100 ms (or ten
//! ticks, if longer) without a read, its thread parks, and the next read
//! takes the precise time, publishes it and wakes the thread. An idle
//! process does not wake 100 times a second for a clock it does not read.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::time::Instant;

/// Running coarse clocks; the coarse time is used while this is above zero.
static COARSE_ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// The coarse time, in nanoseconds since `coarse_epoch()`, in the bits above
/// [`FLAGS`]; the two lowest bits are [`UNREAD`] and [`PARKED`].
static COARSE_NOW: AtomicU64 = AtomicU64::new(0);
/// Set by each tick, cleared by the first read after it: a tick that finds
/// it still set saw no read.
const UNREAD: u64 = 1;
/// Set while the clock threads are parked: the next read wakes them.
const PARKED: u64 = 2;
const FLAGS: u64 = UNREAD | PARKED;
/// The threads of the running coarse clocks, for the read that wakes them.
static COARSE_THREADS: Mutex<Vec<std::thread::Thread>> = Mutex::new(Vec::new());

fn coarse_epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn coarse_sample() -> u64 {
    duration_nanos(coarse_epoch().elapsed())
}

/// Nanoseconds since a per-object epoch, in one word so they fit in an atomic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    epoch: Instant,
    /// `epoch` in coarse-clock nanoseconds.
    offset: u64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let coarse = coarse_epoch();
        let epoch = Instant::now();
        Self {
            epoch,
            offset: duration_nanos(epoch.into_std().saturating_duration_since(coarse)),
        }
    }

    /// Now, in nanoseconds since the epoch. Saturates instead of panicking
    /// when a paused test clock sits before the epoch.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        if COARSE_ACTIVE.load(Ordering::Relaxed) > 0 {
            return coarse_read().saturating_sub(self.offset);
        }
        duration_nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    /// The `Instant` that `nanos` stands for.
    pub(crate) fn instant(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }
}

/// The coarse time; marks it read, and wakes parked clock threads.
#[inline]
fn coarse_read() -> u64 {
    let v = COARSE_NOW.load(Ordering::Relaxed);
    if v & FLAGS == 0 {
        return v;
    }
    coarse_read_slow(v)
}

#[cold]
fn coarse_read_slow(mut v: u64) -> u64 {
    if v & PARKED == 0 {
        // The first read since the tick (one per tick, not per read).
        COARSE_NOW.fetch_and(!UNREAD, Ordering::Relaxed);
        return v & !FLAGS;
    }
    // Parked, so the published time may be old: publish the precise time
    // (never going back) and wake the threads. Whoever clears the flag
    // wakes them; a read that loses the race rereads.
    let now = coarse_sample() & !FLAGS;
    loop {
        let t = (v & !FLAGS).max(now);
        match COARSE_NOW.compare_exchange_weak(v, t, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                if v & PARKED != 0 {
                    for thread in COARSE_THREADS
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .iter()
                    {
                        thread.unpark();
                    }
                }
                return t;
            }
            Err(cur) if cur & PARKED == 0 => return coarse_read_slow(cur),
            Err(cur) => v = cur,
        }
    }
}

/// A duration in nanoseconds, saturating at `u64::MAX` (about 584 years).
#[inline]
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// While a value of this type lives, every primitive in this crate reads a
/// clock that a background thread refreshes every `resolution`, instead of
/// asking the OS each time.
///
/// Times are then late by up to `resolution` (plus however long the thread
/// waits to be scheduled on a saturated machine), which only ever makes an
/// open breaker stay open that much longer or a window slide that much later.
/// After 100 ms (at least ten ticks) without a read the thread parks; the
/// next read takes the precise time, publishes it and wakes the thread.
/// Do not start one in tests that use `tokio::time::pause`: the coarse clock
/// follows real time.
///
/// ```
/// use std::time::Duration;
/// use switchboard_resilience::clock::CoarseClock;
///
/// let clock = CoarseClock::start(Duration::from_millis(1)).unwrap();
/// // ... run the gateway ...
/// drop(clock); // back to precise reads
/// ```
#[derive(Debug)]
pub struct CoarseClock {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CoarseClock {
    /// Starts the refreshing thread (`resolution` is clamped to 100 µs..=10 ms).
    pub fn start(resolution: Duration) -> std::io::Result<Self> {
        let resolution = resolution.clamp(Duration::from_micros(100), Duration::from_millis(10));
        let stop = Arc::new(AtomicBool::new(false));
        tick(false);
        let thread = {
            let stop = Arc::clone(&stop);
            // Ticks without a read before the thread parks: 100 ms, at least ten.
            let idle_ticks = (IDLE_BEFORE_PARK.as_nanos() / resolution.as_nanos()).max(10);
            std::thread::Builder::new()
                .name("switchboard-coarse-clock".into())
                .spawn(move || {
                    let mut unread = 0;
                    while !stop.load(Ordering::Relaxed) {
                        if COARSE_NOW.load(Ordering::Relaxed) & UNREAD == 0 {
                            unread = 0;
                        } else {
                            unread += 1;
                        }
                        let park = unread >= idle_ticks;
                        if park && tick(true) {
                            unread = 0;
                            while COARSE_NOW.load(Ordering::Acquire) & PARKED != 0
                                && !stop.load(Ordering::Relaxed)
                            {
                                std::thread::park();
                            }
                            continue;
                        }
                        tick(false);
                        #[allow(
                            clippy::disallowed_methods,
                            reason = "a dedicated clock thread, never a runtime worker"
                        )]
                        std::thread::sleep(resolution);
                    }
                })?
        };
        COARSE_THREADS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(thread.thread().clone());
        COARSE_ACTIVE.fetch_add(1, Ordering::AcqRel);
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// True while any coarse clock is running in this process.
    pub fn is_active() -> bool {
        COARSE_ACTIVE.load(Ordering::Relaxed) > 0
    }
}

impl Drop for CoarseClock {
    fn drop(&mut self) {
        if COARSE_ACTIVE.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last one: a clock started later begins unparked.
            COARSE_NOW.fetch_and(!PARKED, Ordering::AcqRel);
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let id = thread.thread().id();
            thread.thread().unpark();
            let _ = thread.join();
            COARSE_THREADS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|t| t.id() != id);
        }
    }
}

/// How long nobody reads the coarse clock before its thread parks.
const IDLE_BEFORE_PARK: Duration = Duration::from_millis(100);

/// Publishes the time (never going back), marked unread, and parked if
/// `park`. With `park`, returns whether the clock is now parked: false when
/// it was read meanwhile (a read in the same instant keeps it ticking), true
/// when this call or another clock's thread parked it. Without, returns
/// whether the time was published (not while parked: the waking read does).
fn tick(park: bool) -> bool {
    let now = coarse_sample() & !FLAGS;
    let mut v = COARSE_NOW.load(Ordering::Relaxed);
    loop {
        if park && v & UNREAD == 0 {
            return false;
        }
        if v & PARKED != 0 {
            // Another clock's thread parked it: park too, or leave the
            // time to the read that will wake them.
            return park;
        }
        let t = (v & !FLAGS).max(now) | UNREAD | if park { PARKED } else { 0 };
        match COARSE_NOW.compare_exchange_weak(v, t, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(cur) => v = cur,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clock_is_used_while_running_and_never_goes_back() {
        let clock = Clock::new();
        assert!(!CoarseClock::is_active());
        let coarse = CoarseClock::start(Duration::from_millis(1)).unwrap();
        assert!(CoarseClock::is_active());
        let a = clock.now();
        // Read straight from the atomic: the same value until the thread ticks.
        assert_eq!(
            a,
            (COARSE_NOW.load(Ordering::Relaxed) & !FLAGS).saturating_sub(clock.offset)
        );
        let b = clock.now();
        assert!(b >= a);

        // Unread for 100 ticks, the thread parks.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while COARSE_NOW.load(Ordering::Relaxed) & PARKED == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock never parked"
            );
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(5));
        }
        let parked_at = COARSE_NOW.load(Ordering::Relaxed) & !FLAGS;
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            COARSE_NOW.load(Ordering::Relaxed) & !FLAGS,
            parked_at,
            "a parked clock does not tick"
        );
        // The next read gets the precise time, not the parked one, and wakes it.
        let precise = duration_nanos(Instant::now().saturating_duration_since(clock.epoch));
        let c = clock.now();
        assert!(c + 4 >= precise, "read {c}, precise before it {precise}");
        assert!(c >= parked_at.saturating_sub(clock.offset) + 20_000_000);
        assert_eq!(COARSE_NOW.load(Ordering::Relaxed) & PARKED, 0);
        while COARSE_NOW.load(Ordering::Relaxed) & !FLAGS <= c + clock.offset {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock never ticked again"
            );
            std::thread::yield_now();
        }
        assert!(clock.now() >= c);
        drop(coarse);
        assert!(!CoarseClock::is_active());
        assert!(
            clock.now() + 1_000_000 >= b,
            "precise time is not behind coarse time"
        );
    }
}
