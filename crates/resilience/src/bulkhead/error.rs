//! Error types

use std::time::Duration;

/// Every slot of the bulkhead stayed taken for as long as the call may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bulkhead full: {max_concurrent} calls in flight, waited {waited:?}")]
pub struct BulkheadFull {
    /// The bulkhead's size.
    pub max_concurrent: u32,
    /// How long the call waited for a slot.
    pub waited: Duration,
}

/// A bulkhead that cannot work, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBulkhead {
    /// A bulkhead with no slot would reject everything.
    #[error("max_concurrent must be at least 1")]
    ZeroConcurrency,
    /// Above tokio's semaphore limit.
    #[error("max_concurrent must be at most {max}, got {value}")]
    TooLarge {
        /// The rejected value.
        value: u32,
        /// The largest accepted value.
        max: u32,
    },
}
