//! Error types

use std::time::Duration;

/// The call did not finish within its time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {after:?}")]
pub struct Elapsed {
    /// The limit that passed.
    pub after: Duration,
}
