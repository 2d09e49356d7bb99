//! Consumer and producer middleware.
//!
//! - [`idempotency`]: drop events whose `source`+`id` was handled before (an inbox).
//! - [`correlation`]: `traceparent`/`correlationid` flow from the current task into
//!   published events, and handlers run inside the event's context.
//! - [`metrics`]: counters and a handler latency histogram on atomics.

pub mod correlation;
pub mod idempotency;
pub mod metrics;
