//! What a Rust service links to be a good citizen of a Switchboard system.
//!
//! A service built with this crate registers itself in the registry with a
//! health check, heartbeats, and deregisters on shutdown; calls other services by
//! name with balancing, breakers, retries and timeouts; and carries the request
//! id and trace context of every request into its log lines, its outgoing calls
//! and the events it publishes.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{Router, routing::get};
//! use switchboard_service::{Context, Service};
//!
//! let service = Service::builder("greeter")
//!     .version("1.0.0")
//!     .registry_url("memory://")
//!     .bus_url("memory://")
//!     .router_with(|ctx: &Context| {
//!         let ctx = ctx.clone();
//!         Router::new().route("/greet", get(move || async move {
//!             // Carries this request's x-request-id and traceparent.
//!             ctx.publish("greeting.sent", uuid::Uuid::new_v4().to_string(), &"hi").await.ok();
//!             "hi"
//!         }))
//!     })
//!     .start()
//!     .await?;
//! service.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`service`]: [`Service::builder`], the running instance and its [`Context`].
//! - [`client`]: [`Client`], calls by service name (P2C, breakers, retries with budget, timeouts).
//! - [`correlation`]: the task-local [`Correlation`] (request id + `traceparent`) and the layer that sets it.
//! - [`idempotency`]: the `Idempotency-Key` layer for a service's own POST handlers.

pub mod client;
pub mod correlation;
pub mod idempotency;
pub mod service;

pub use client::{CallError, Client, ClientConfig};
pub use correlation::{Correlation, CorrelationLayer, TraceParent};
pub use idempotency::{IdempotencyLayer, IdempotencyStore};
pub use service::{Context, RunningService, Service, ServiceBuilder, ServiceError};
