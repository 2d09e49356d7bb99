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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::time::Instant;

/// Running coarse clocks; the coarse time is used while this is above zero.
static COARSE_ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// The coarse time, in nanoseconds since `coarse_epoch()`.
static COARSE_NOW: AtomicU64 = AtomicU64::new(0);

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
            return COARSE_NOW
                .load(Ordering::Relaxed)
                .saturating_sub(self.offset);
        }
        duration_nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    /// The `Instant` that `nanos` stands for.
    pub(crate) fn instant(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
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
        COARSE_NOW.fetch_max(coarse_sample(), Ordering::Relaxed);
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("switchboard-coarse-clock".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        COARSE_NOW.fetch_max(coarse_sample(), Ordering::Relaxed);
                        #[allow(
                            clippy::disallowed_methods,
                            reason = "a dedicated clock thread, never a runtime worker"
                        )]
                        std::thread::sleep(resolution);
                    }
                })?
        };
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
        COARSE_ACTIVE.fetch_sub(1, Ordering::AcqRel);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
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
            COARSE_NOW
                .load(Ordering::Relaxed)
                .saturating_sub(clock.offset)
        );
        let b = clock.now();
        assert!(b >= a);
        drop(coarse);
        assert!(!CoarseClock::is_active());
        assert!(
            clock.now() + 1_000_000 >= b,
            "precise time is not behind coarse time"
        );
    }
}
