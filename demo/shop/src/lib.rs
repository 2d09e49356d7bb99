//! The Switchboard demo shop: four small services that talk through the
//! gateway and the event bus, built on `switchboard-service`.
//!
//! An order's life: `POST /orders` (orders checks the user with users over
//! HTTP) publishes `order.created`; inventory reserves stock
//! (`inventory.reserved`) or rejects the order; payments charges
//! (`payment.completed`) or fails (`payment.failed`, and inventory gives the
//! stock back); orders records each step and publishes `order.confirmed` or
//! `order.cancelled`. Every handler is idempotent: redelivered events are
//! dropped by the inbox, and every reply carries a deterministic event id.
//!
//! # Layout
//! - [`events`]: event types and payloads, the contract between the services.
//! - [`users`], [`orders`], [`inventory`], [`payments`]: one module per service:
//!   its "database" (shared by its instances in this process), routes and handlers.
//! - [`demo`]: [`demo::run`] starts registry, bus, gateway and two instances of
//!   each service, as `switchboard demo` does.
//! - [`soak`]: mixed traffic under instance and broker kills, then the count
//!   (every accepted order ended, stock and money add up), for
//!   `switchboard bench chaos shop` and the soak test.

pub mod demo;
pub mod events;
pub mod inventory;
pub mod orders;
pub mod payments;
pub mod soak;
pub mod users;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use demo::{DemoHandle, DemoOptions, run};

/// The version every shop service registers with.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A new id: `prefix`, `_`, 12 random hex digits.
pub(crate) fn new_id(prefix: &str) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &hex[..12])
}

/// Now, RFC 3339 with milliseconds.
pub(crate) fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// An RFC 9457 problem+json response.
pub(crate) fn problem(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut res = (status, body.to_string()).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}
