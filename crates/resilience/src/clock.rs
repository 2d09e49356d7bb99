//! A monotonic nanosecond clock on tokio's `Instant`.
//!
//! Every time-dependent primitive in this crate reads time through
//! `tokio::time::Instant`, so tests drive it with `tokio::time::pause()` and
//! `advance()` instead of sleeping. Times are kept as `u64` nanoseconds since a
//! per-object epoch so they fit in one atomic word.

use std::time::Duration;
use tokio::time::Instant;

/// Nanoseconds since `epoch`, read from tokio's (possibly paused) clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    epoch: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    /// Now, in nanoseconds since the epoch. Saturates instead of panicking
    /// when a paused test clock sits before the epoch.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
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
