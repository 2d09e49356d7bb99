//! `inventory-service`: reserves stock for each `order.created` (or rejects the
//! order), gives it back on `payment.failed` (the compensation), and shows the
//! stock at `GET /inventory` and `GET /inventory/{sku}`.
//!
//! Reservations are keyed by order: a redelivered `order.created` finds its
//! reservation and republishes the same answer instead of reserving twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use switchboard_bus::{Event, HandlerError};
use switchboard_service::{Context, Service, ServiceBuilder};

use crate::events::{self, InventoryReserved, Item, OrderCreated, OrderRef, OrderRejected};
use crate::problem;

/// The service's name in the registry.
pub const SERVICE: &str = "inventory-service";

/// The catalogue: SKU and unit price in cents.
pub const CATALOGUE: [(&str, u64); 3] = [("widget", 250), ("gadget", 1200), ("gizmo", 9900)];

/// The unit price of `sku`, if it is in the catalogue.
pub fn price(sku: &str) -> Option<u64> {
    CATALOGUE.iter().find(|(s, _)| *s == sku).map(|(_, p)| *p)
}

/// Stock of one SKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Free to reserve.
    pub available: u64,
    /// Held by orders (given back when their payment fails).
    pub reserved: u64,
}

/// What inventory answered for an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Stock held.
    Reserved,
    /// Not enough stock; the reason.
    Rejected(String),
}

#[derive(Debug, Default)]
struct Inner {
    stock: BTreeMap<String, Stock>,
    reservations: HashMap<String, (Vec<Item>, Reservation, bool)>,
}

/// The inventory "database": shared by every instance of the service in this process.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    inner: Arc<Mutex<Inner>>,
}

impl Inventory {
    /// An inventory holding `available` of every catalogue SKU.
    pub fn with_stock(available: u64) -> Self {
        let inv = Self::default();
        {
            let mut inner = inv.inner.lock();
            for (sku, _) in CATALOGUE {
                inner.stock.insert(
                    sku.to_owned(),
                    Stock {
                        available,
                        reserved: 0,
                    },
                );
            }
        }
        inv
    }

    /// Reserves `items` for `order_id` (all or nothing), or returns the answer
    /// given to an earlier delivery for the same order.
    pub fn reserve(&self, order_id: &str, items: &[Item]) -> Reservation {
        let mut inner = self.inner.lock();
        if let Some((_, answer, _)) = inner.reservations.get(order_id) {
            return answer.clone();
        }
        let short = items.iter().find(|i| {
            inner
                .stock
                .get(&i.sku)
                .is_none_or(|s| s.available < u64::from(i.qty))
        });
        let answer = match short {
            Some(i) => Reservation::Rejected(format!("not enough {} in stock", i.sku)),
            None => {
                for i in items {
                    let s = inner.stock.get_mut(&i.sku).expect("checked above");
                    s.available -= u64::from(i.qty);
                    s.reserved += u64::from(i.qty);
                }
                Reservation::Reserved
            }
        };
        inner
            .reservations
            .insert(order_id.to_owned(), (items.to_vec(), answer.clone(), false));
        answer
    }

    /// Gives back the stock reserved for `order_id`. Returns whether the order
    /// had a reservation (released now or before); a second call changes nothing.
    pub fn release(&self, order_id: &str) -> bool {
        let mut inner = self.inner.lock();
        let Inner {
            stock,
            reservations,
        } = &mut *inner;
        let Some((items, answer, released)) = reservations.get_mut(order_id) else {
            return false;
        };
        if *answer == Reservation::Reserved && !*released {
            for i in items.iter() {
                if let Some(s) = stock.get_mut(&i.sku) {
                    s.available += u64::from(i.qty);
                    s.reserved -= u64::from(i.qty);
                }
            }
            *released = true;
        }
        true
    }

    /// The stock of every SKU.
    pub fn stock(&self) -> BTreeMap<String, Stock> {
        self.inner.lock().stock.clone()
    }
}

/// The service, ready for its registry and bus to be set.
pub fn service(inventory: Inventory) -> ServiceBuilder {
    let on_created = {
        let inventory = inventory.clone();
        move |ctx, event| on_order_created(inventory.clone(), ctx, event)
    };
    let on_failed = {
        let inventory = inventory.clone();
        move |ctx, event| on_payment_failed(inventory.clone(), ctx, event)
    };
    Service::builder(SERVICE)
        .version(crate::VERSION)
        .router(router(inventory))
        .on(events::ORDER_CREATED, on_created)
        .on(events::PAYMENT_FAILED, on_failed)
}

/// The service's routes: `GET /inventory`, `GET /inventory/{sku}`.
pub fn router(inventory: Inventory) -> Router {
    Router::new()
        .route("/inventory", get(list))
        .route("/inventory/{sku}", get(one))
        .with_state(inventory)
}

async fn list(State(inventory): State<Inventory>) -> Response {
    Json(inventory.stock()).into_response()
}

async fn one(State(inventory): State<Inventory>, Path(sku): Path<String>) -> Response {
    match inventory.stock().get(&sku) {
        Some(stock) => Json(stock).into_response(),
        None => problem(StatusCode::NOT_FOUND, &format!("no sku {sku}")),
    }
}

async fn on_order_created(
    inventory: Inventory,
    ctx: Context,
    event: Event,
) -> Result<(), HandlerError> {
    let order: OrderCreated = event.data_as()?;
    match inventory.reserve(&order.order_id, &order.items) {
        Reservation::Reserved => {
            let data = InventoryReserved {
                order_id: order.order_id.clone(),
                items: order.items,
                total_cents: order.total_cents,
            };
            let id = format!("{}/{}", order.order_id, events::INVENTORY_RESERVED);
            ctx.publish(events::INVENTORY_RESERVED, id, &data).await?;
            tracing::info!(order_id = %order.order_id, "stock reserved");
        }
        Reservation::Rejected(reason) => {
            let data = OrderRejected {
                order_id: order.order_id.clone(),
                reason: reason.clone(),
            };
            let id = format!("{}/{}", order.order_id, events::INVENTORY_REJECTED);
            ctx.publish(events::INVENTORY_REJECTED, id, &data).await?;
            tracing::info!(order_id = %order.order_id, %reason, "order rejected");
        }
    }
    Ok(())
}

async fn on_payment_failed(
    inventory: Inventory,
    ctx: Context,
    event: Event,
) -> Result<(), HandlerError> {
    let failed: OrderRejected = event.data_as()?;
    if !inventory.release(&failed.order_id) {
        tracing::warn!(order_id = %failed.order_id, "payment failed for an order without reservation");
        return Ok(());
    }
    let data = OrderRef {
        order_id: failed.order_id.clone(),
    };
    let id = format!("{}/{}", failed.order_id, events::INVENTORY_RELEASED);
    ctx.publish(events::INVENTORY_RELEASED, id, &data).await?;
    tracing::info!(order_id = %failed.order_id, "stock released (compensation)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(sku: &str, qty: u32) -> Vec<Item> {
        vec![Item {
            sku: sku.into(),
            qty,
        }]
    }

    #[test]
    fn reserve_is_idempotent_and_release_gives_back_once() {
        let inv = Inventory::with_stock(5);
        assert_eq!(
            inv.reserve("o1", &items("widget", 3)),
            Reservation::Reserved
        );
        assert_eq!(
            inv.reserve("o1", &items("widget", 3)),
            Reservation::Reserved
        );
        assert_eq!(inv.stock()["widget"].available, 2);
        assert!(matches!(
            inv.reserve("o2", &items("widget", 3)),
            Reservation::Rejected(_)
        ));
        assert_eq!(inv.stock()["widget"].available, 2);
        assert!(inv.release("o1"));
        assert!(inv.release("o1"));
        assert_eq!(
            inv.stock()["widget"],
            Stock {
                available: 5,
                reserved: 0
            }
        );
        assert!(!inv.release("nope"));
        assert!(matches!(
            inv.reserve("o3", &items("unobtainium", 1)),
            Reservation::Rejected(_)
        ));
    }
}
