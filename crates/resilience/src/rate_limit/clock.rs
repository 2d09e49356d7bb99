//! governor's clock, read from tokio's (so virtual time drives it in tests).

use crate::clock::Clock;
use governor::nanos::Nanos;

/// A governor clock on `tokio::time::Instant`. governor's default (quanta)
/// cannot be paused, and every other time-based primitive here runs on tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock(Clock);

impl TokioClock {
    pub(crate) fn new() -> Self {
        Self(Clock::new())
    }

    pub(crate) fn nanos(&self) -> u64 {
        self.0.now()
    }
}

impl governor::clock::Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.now())
    }
}
