//! `payment-service`: charges each order whose stock was reserved
//! (`inventory.reserved` -> `payment.completed` or `payment.failed`), shows a
//! payment at `GET /payments/{order_id}`, and takes faults on purpose at
//! `POST /admin/faults` (`{"fail": true}`, `{"delay_ms": 3000}`, `{}` to heal).
//!
//! With `fail` on, every payment fails (inventory then gives the stock back) and
//! every `/payments/...` request answers 500, so the gateway's breaker for the
//! service opens. `/admin/faults` itself always works.
//!
//! The ledger is keyed by order: a redelivered `inventory.reserved` gets the
//! outcome decided the first time, never a second charge.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use switchboard_bus::{Event, HandlerError};
use switchboard_service::{Context, Service, ServiceBuilder};

use crate::events::{self, InventoryReserved, OrderRejected, PaymentCompleted};
use crate::problem;

/// The service's name in the registry.
pub const SERVICE: &str = "payment-service";

/// Faults to inject, set with `POST /admin/faults`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Fail every payment and every `/payments` request.
    #[serde(default)]
    pub fail: bool,
    /// Wait this long before answering each payment and request, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
}

/// A payment's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Payment {
    /// Charged.
    Completed {
        /// `pay_` and 12 hex digits.
        payment_id: String,
        /// Amount charged, in cents.
        amount_cents: u64,
    },
    /// Not charged.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The payments ledger and fault switch: shared by every instance of the service in this process.
#[derive(Debug, Clone, Default)]
pub struct Payments {
    ledger: Arc<Mutex<HashMap<String, Payment>>>,
    faults: Arc<Mutex<Faults>>,
}

impl Payments {
    /// Decides the payment for `order_id` (once: later calls return the first outcome).
    pub fn charge(&self, order_id: &str, amount_cents: u64) -> Payment {
        let fail = self.faults.lock().fail;
        self.ledger
            .lock()
            .entry(order_id.to_owned())
            .or_insert_with(|| {
                if fail {
                    Payment::Failed {
                        reason: "card declined (injected fault)".into(),
                    }
                } else {
                    Payment::Completed {
                        payment_id: crate::new_id("pay"),
                        amount_cents,
                    }
                }
            })
            .clone()
    }

    /// The payment for `order_id`.
    pub fn get(&self, order_id: &str) -> Option<Payment> {
        self.ledger.lock().get(order_id).cloned()
    }

    /// Every decided payment, by order id.
    pub fn all(&self) -> HashMap<String, Payment> {
        self.ledger.lock().clone()
    }

    /// Number of payments decided.
    pub fn len(&self) -> usize {
        self.ledger.lock().len()
    }

    /// Whether no payment was decided yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        *self.faults.lock()
    }

    /// Sets the faults.
    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock() = faults;
    }
}

/// The service, ready for its registry and bus to be set.
pub fn service(payments: Payments) -> ServiceBuilder {
    let on_reserved = {
        let payments = payments.clone();
        move |ctx, event| on_inventory_reserved(payments.clone(), ctx, event)
    };
    Service::builder(SERVICE)
        .version(crate::VERSION)
        .router(router(payments))
        .on(events::INVENTORY_RESERVED, on_reserved)
}

/// The service's routes: `GET /payments/{order_id}`, `GET`/`POST /admin/faults`.
pub fn router(payments: Payments) -> Router {
    Router::new()
        .route("/payments/{order_id}", get(read))
        .route("/admin/faults", get(faults).post(set_faults))
        .with_state(payments)
}

async fn read(State(payments): State<Payments>, Path(order_id): Path<String>) -> Response {
    let faults = payments.faults();
    if faults.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
    }
    if faults.fail {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "injected fault");
    }
    match payments.get(&order_id) {
        Some(payment) => Json(payment).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            &format!("no payment for order {order_id}"),
        ),
    }
}

async fn faults(State(payments): State<Payments>) -> Response {
    Json(payments.faults()).into_response()
}

async fn set_faults(State(payments): State<Payments>, Json(faults): Json<Faults>) -> Response {
    payments.set_faults(faults);
    tracing::warn!(fail = faults.fail, delay_ms = faults.delay_ms, "faults set");
    Json(faults).into_response()
}

async fn on_inventory_reserved(
    payments: Payments,
    ctx: Context,
    event: Event,
) -> Result<(), HandlerError> {
    let reserved: InventoryReserved = event.data_as()?;
    let order_id = reserved.order_id;
    // Decide first, then wait: a redelivery during the delay finds the decision.
    let payment = payments.charge(&order_id, reserved.total_cents);
    let delay = payments.faults().delay_ms;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    match payment {
        Payment::Completed {
            payment_id,
            amount_cents,
        } => {
            let data = PaymentCompleted {
                order_id: order_id.clone(),
                payment_id: payment_id.clone(),
                amount_cents,
            };
            let id = format!("{order_id}/{}", events::PAYMENT_COMPLETED);
            ctx.publish(events::PAYMENT_COMPLETED, id, &data).await?;
            tracing::info!(%order_id, %payment_id, amount_cents, "payment completed");
        }
        Payment::Failed { reason } => {
            let data = OrderRejected {
                order_id: order_id.clone(),
                reason: reason.clone(),
            };
            let id = format!("{order_id}/{}", events::PAYMENT_FAILED);
            ctx.publish(events::PAYMENT_FAILED, id, &data).await?;
            tracing::info!(%order_id, %reason, "payment failed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_is_decided_once() {
        let p = Payments::default();
        let first = p.charge("o1", 500);
        assert!(matches!(
            first,
            Payment::Completed {
                amount_cents: 500,
                ..
            }
        ));
        p.set_faults(Faults {
            fail: true,
            delay_ms: 0,
        });
        assert_eq!(p.charge("o1", 500), first, "redelivery never charges again");
        assert!(matches!(p.charge("o2", 500), Payment::Failed { .. }));
        assert_eq!(p.len(), 2);
    }
}
