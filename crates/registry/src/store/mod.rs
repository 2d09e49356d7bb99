//! Stores behind the registry, chosen by URL. The memory store is the
//! registry's own state (see [`crate::registry`]); the Redis store mirrors a
//! shared Redis into it.

pub(crate) mod redis;

pub use switchboard_resilience::redact::redact_url;
