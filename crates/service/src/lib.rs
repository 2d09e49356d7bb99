//! What a Rust service links to be a good citizen of a Switchboard system.
//!
//! A service built with this crate registers itself in the registry with a
//! health check, heartbeats, and deregisters on shutdown; calls other services by
//! name with balancing, breakers, retries and timeouts; and carries the request
//! id and trace context of every request into its log lines, its outgoing calls
//! and the events it publishes.
//!
//! # Layout
//! - [`correlation`]: the task-local [`Correlation`] (request id + `traceparent`) and the axum/tower layer that sets it.
//! - [`idempotency`]: the `Idempotency-Key` layer for a service's own POST handlers.

pub mod correlation;
pub mod idempotency;

pub use correlation::{Correlation, CorrelationLayer, TraceParent};
pub use idempotency::{IdempotencyLayer, IdempotencyStore};
