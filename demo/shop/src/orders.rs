//! `order-service`: `POST /orders` (honours `Idempotency-Key`), `GET /orders/{id}`
//! with the status history; drives each order from `pending` to `confirmed` or
//! `cancelled` as inventory and payments answer.
//!
//! ```text
//! pending --inventory.reserved--> inventory_confirmed --payment.completed--> payment_confirmed -> confirmed
//!    \--inventory.rejected--> cancelled          \--payment.failed--> cancelled
//! ```
//!
//! Events from inventory and payments may arrive in any order: `payment.*`
//! implies the stock was reserved, so it moves a `pending` order through
//! `inventory_confirmed` first. Each transition is published as
//! `order.<status>` with the id `<order id>/<status>`: a redelivered fact
//! republishes the very same events, which consumers' inboxes drop.
//!
//! `Idempotency-Key` is kept twice: the service's key layer replays the
//! stored answer, and the orders store keeps one order per key. The second
//! covers an instance killed after it stored the order but before it
//! answered (the gateway retries a keyed POST on another instance, and the
//! key layer forgot the key with the killed request): the repeat gets the
//! same order and publishes its `order.created` again (same event id).
//!
//! Storing an order and publishing its `order.created` are two steps: the
//! store keeps an outbox of orders not yet published, and a relay in every
//! instance publishes those older than [`RELAY_AFTER`]. So an order is
//! accepted (201) once stored, even while the bus is down, and an instance
//! killed between the two steps leaves no order stuck `pending`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use switchboard_bus::{Event, HandlerError};
use switchboard_service::{
    Context, Correlation, IdempotencyLayer, IdempotencyStore, Service, ServiceBuilder, ServiceError,
};

use crate::events::{
    self, InventoryReserved, Item, OrderCreated, OrderRef, OrderRejected, PaymentCompleted,
};
use crate::users::{self, User};
use crate::{inventory, problem};

/// The service's name in the registry.
pub const SERVICE: &str = "order-service";

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Placed; waiting for inventory.
    Pending,
    /// Stock reserved; waiting for payment.
    InventoryConfirmed,
    /// Paid.
    PaymentConfirmed,
    /// Done: reserved and paid.
    Confirmed,
    /// Done: rejected by inventory or payments (stock given back).
    Cancelled,
}

impl Status {
    /// Whether the order can no longer change.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Confirmed | Status::Cancelled)
    }

    /// The event published when an order enters this status.
    pub fn event_type(self) -> &'static str {
        match self {
            Status::Pending => events::ORDER_CREATED,
            Status::InventoryConfirmed => events::ORDER_INVENTORY_CONFIRMED,
            Status::PaymentConfirmed => events::ORDER_PAYMENT_CONFIRMED,
            Status::Confirmed => events::ORDER_CONFIRMED,
            Status::Cancelled => events::ORDER_CANCELLED,
        }
    }
}

/// One step of an order's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The status entered.
    pub status: Status,
    /// When, RFC 3339.
    pub at: String,
    /// The event type that caused it (`POST /orders` for `pending`).
    pub cause: String,
    /// Why, for a cancellation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// `ord_` and 12 hex digits.
    pub id: String,
    /// Who ordered.
    pub user_id: String,
    /// What.
    pub items: Vec<Item>,
    /// Total price in cents.
    pub total_cents: u64,
    /// The request id of the `POST /orders` that placed it.
    pub request_id: String,
    /// The current status (the last step's).
    pub status: Status,
    /// Every status the order went through, oldest first.
    pub history: Vec<Step>,
}

/// A fact another service reported about an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fact {
    /// `inventory.reserved`.
    InventoryReserved,
    /// `inventory.rejected`.
    InventoryRejected(String),
    /// `payment.completed`.
    PaymentCompleted,
    /// `payment.failed`.
    PaymentFailed(String),
}

impl Fact {
    fn cause(&self) -> &'static str {
        match self {
            Fact::InventoryReserved => events::INVENTORY_RESERVED,
            Fact::InventoryRejected(_) => events::INVENTORY_REJECTED,
            Fact::PaymentCompleted => events::PAYMENT_COMPLETED,
            Fact::PaymentFailed(_) => events::PAYMENT_FAILED,
        }
    }
}

/// The orders "database": shared by every instance of the service in this process.
#[derive(Debug, Clone, Default)]
pub struct Orders {
    orders: Arc<Mutex<HashMap<String, Order>>>,
    /// Idempotency-Key -> order id: the unique constraint that keeps one
    /// order per key when the request is repeated after the instance that
    /// placed it died before answering (the key layer has forgotten the key then).
    keys: Arc<Mutex<HashMap<String, String>>>,
    /// The outbox: orders whose `order.created` is not known to be published
    /// yet, with when they were stored.
    unpublished: Arc<Mutex<HashMap<String, Instant>>>,
}

/// What [`Orders::create_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A new order.
    New(Order),
    /// The order an earlier request with the same key placed.
    Existing(Order),
}

impl Orders {
    /// Stores a new `pending` order.
    pub fn create(
        &self,
        user_id: String,
        items: Vec<Item>,
        total_cents: u64,
        request_id: String,
    ) -> Order {
        let order = new_order(user_id, items, total_cents, request_id);
        self.orders.lock().insert(order.id.clone(), order.clone());
        self.unpublished
            .lock()
            .insert(order.id.clone(), Instant::now());
        order
    }

    /// Records that the order's `order.created` was published.
    pub fn mark_published(&self, id: &str) {
        self.unpublished.lock().remove(id);
    }

    /// Orders stored at least `age` ago whose `order.created` is not known to
    /// be published (the instance that stored them died first, or the bus failed).
    pub fn unpublished(&self, age: Duration) -> Vec<Order> {
        let ids: Vec<String> = self
            .unpublished
            .lock()
            .iter()
            .filter(|(_, at)| at.elapsed() >= age)
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| self.get(id)).collect()
    }

    /// Like [`Orders::create`], once per `key`: a second call with the same
    /// key returns the first order (whatever the other arguments).
    pub fn create_once(
        &self,
        key: &str,
        user_id: String,
        items: Vec<Item>,
        total_cents: u64,
        request_id: String,
    ) -> Created {
        let mut keys = self.keys.lock();
        if let Some(existing) = keys.get(key).and_then(|id| self.get(id)) {
            return Created::Existing(existing);
        }
        let order = self.create(user_id, items, total_cents, request_id);
        keys.insert(key.to_owned(), order.id.clone());
        Created::New(order)
    }

    /// An order by id.
    pub fn get(&self, id: &str) -> Option<Order> {
        self.orders.lock().get(id).cloned()
    }

    /// Every order, in no particular order.
    pub fn all(&self) -> Vec<Order> {
        self.orders.lock().values().cloned().collect()
    }

    /// Number of orders in each status.
    pub fn counts(&self) -> HashMap<Status, usize> {
        let mut counts = HashMap::new();
        for o in self.orders.lock().values() {
            *counts.entry(o.status).or_default() += 1;
        }
        counts
    }

    /// Applies `fact` to order `id` and returns the steps it caused, now or on an
    /// earlier delivery of the same fact (so a redelivery republishes them), or
    /// `None` for an unknown order.
    pub fn apply(&self, id: &str, fact: &Fact) -> Option<Vec<Step>> {
        let mut orders = self.orders.lock();
        let order = orders.get_mut(id)?;
        let cause = fact.cause();
        let push = |order: &mut Order, status: Status, reason: Option<&String>| {
            order.status = status;
            order.history.push(Step {
                status,
                at: crate::now(),
                cause: cause.to_owned(),
                reason: reason.cloned(),
            });
        };
        match fact {
            Fact::InventoryReserved => {
                if order.status == Status::Pending {
                    push(order, Status::InventoryConfirmed, None);
                }
            }
            Fact::InventoryRejected(reason) => {
                if order.status == Status::Pending {
                    push(order, Status::Cancelled, Some(reason));
                }
            }
            Fact::PaymentCompleted | Fact::PaymentFailed(_) => {
                // A payment happens only after a reservation: catch up if its
                // event is still on the way.
                if order.status == Status::Pending {
                    push(order, Status::InventoryConfirmed, None);
                }
                if order.status == Status::InventoryConfirmed {
                    if let Fact::PaymentFailed(reason) = fact {
                        push(order, Status::Cancelled, Some(reason));
                    } else {
                        push(order, Status::PaymentConfirmed, None);
                        push(order, Status::Confirmed, None);
                    }
                }
            }
        }
        Some(
            order
                .history
                .iter()
                .filter(|s| s.cause == cause)
                .cloned()
                .collect(),
        )
    }
}

fn new_order(user_id: String, items: Vec<Item>, total_cents: u64, request_id: String) -> Order {
    Order {
        id: crate::new_id("ord"),
        user_id,
        items,
        total_cents,
        request_id,
        status: Status::Pending,
        history: vec![Step {
            status: Status::Pending,
            at: crate::now(),
            cause: "POST /orders".into(),
            reason: None,
        }],
    }
}

/// The body of `POST /orders`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// An existing user's id.
    pub user_id: String,
    /// At least one line; SKUs from the catalogue, quantities of at least 1.
    pub items: Vec<Item>,
}

/// The service, ready for its registry and bus to be set. Instances sharing
/// `orders` and `keys` serve the same data.
pub fn service(orders: &Orders, keys: IdempotencyStore) -> ServiceBuilder {
    let mut builder = Service::builder(SERVICE)
        .version(crate::VERSION)
        .router_with({
            let orders = orders.clone();
            move |ctx: &Context| router(orders, ctx.clone(), keys)
        });
    for topic in [
        events::INVENTORY_RESERVED,
        events::INVENTORY_REJECTED,
        events::PAYMENT_COMPLETED,
        events::PAYMENT_FAILED,
    ] {
        let orders = orders.clone();
        builder = builder.on(topic, move |ctx, event| on_fact(orders.clone(), ctx, event));
    }
    builder
}

#[derive(Clone)]
struct AppState {
    orders: Orders,
    ctx: Context,
    /// Stops the relay when the last clone of the routes is dropped (the
    /// instance stopped or was killed).
    _relay: Arc<Relay>,
}

/// How long a stored order's `order.created` may stay unpublished before the
/// relay publishes it (the request that stored it publishes first).
pub const RELAY_AFTER: Duration = Duration::from_secs(2);

struct Relay(tokio::task::AbortHandle);

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The outbox relay: publishes `order.created` for stored orders whose
/// request did not (killed between storing and publishing, or the bus
/// failed), with the same event id, so a second publication is dropped by
/// inboxes. Every instance runs one; they may publish the same order twice.
async fn relay(orders: Orders, ctx: Context) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for order in orders.unpublished(RELAY_AFTER) {
            let correlation = Correlation::from_parts(Some(&order.request_id), None);
            let published = correlation
                .scope(publish_created(ctx.clone(), order.clone()))
                .await;
            match published {
                Ok(()) => {
                    orders.mark_published(&order.id);
                    tracing::info!(order_id = %order.id, "order.created published by the relay");
                }
                Err(error) => {
                    tracing::warn!(order_id = %order.id, %error, "relay: order.created not published; next round");
                    break;
                }
            }
        }
    }
}

async fn publish_created(ctx: Context, order: Order) -> Result<(), ServiceError> {
    let created = OrderCreated {
        order_id: order.id.clone(),
        user_id: order.user_id,
        items: order.items,
        total_cents: order.total_cents,
    };
    // A deterministic id: publishing again (a repeat, the relay) is dropped by inboxes.
    let event_id = format!("{}/{}", order.id, events::ORDER_CREATED);
    ctx.publish(events::ORDER_CREATED, event_id, &created).await
}

/// The service's routes: `POST /orders` behind the `Idempotency-Key` layer,
/// `GET /orders/{id}`, `GET /orders/stats` (number of orders per status); and
/// the outbox relay, which runs until the routes are dropped.
pub fn router(orders: Orders, ctx: Context, keys: IdempotencyStore) -> Router {
    let task = tokio::spawn(relay(orders.clone(), ctx.clone()));
    let state = AppState {
        orders,
        ctx,
        _relay: Arc::new(Relay(task.abort_handle())),
    };
    Router::new()
        .route("/orders", post(place).layer(IdempotencyLayer::new(keys)))
        .route("/orders/stats", get(stats))
        .route("/orders/{id}", get(read))
        .with_state(state)
}

async fn place(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let new: NewOrder = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return problem(StatusCode::UNPROCESSABLE_ENTITY, &format!("body: {e}")),
    };
    if new.items.is_empty() {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "an order needs at least one item",
        );
    }
    let mut total_cents = 0u64;
    for item in &new.items {
        let Some(price) = inventory::price(&item.sku) else {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("unknown sku {:?}", item.sku),
            );
        };
        if item.qty == 0 {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "quantities must be at least 1",
            );
        }
        total_cents += price * u64::from(item.qty);
    }
    // Users is called over HTTP through discovery, breakers and retries.
    let path = format!("/users/{}", new.user_id);
    match app
        .ctx
        .client()
        .get_json::<User>(users::SERVICE, &path)
        .await
    {
        Ok(_) => {}
        Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("no user {}", new.user_id),
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "user lookup failed");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("user lookup failed: {e}"),
            );
        }
    }
    let request_id = Correlation::current()
        .map(|c| c.request_id().to_owned())
        .unwrap_or_default();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (order, repeat) = match &key {
        None => (
            app.orders
                .create(new.user_id, new.items, total_cents, request_id),
            false,
        ),
        Some(key) => match app.orders.create_once(
            key,
            new.user_id.clone(),
            new.items.clone(),
            total_cents,
            request_id,
        ) {
            Created::New(order) => (order, false),
            // The instance that ran the first request died before answering
            // (or before publishing): answer with its order and publish again.
            Created::Existing(order)
                if order.user_id == new.user_id && order.items == new.items =>
            {
                (order, true)
            }
            Created::Existing(_) => {
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "this Idempotency-Key was already used with a different request",
                );
            }
        },
    };
    match publish_created(app.ctx.clone(), order.clone()).await {
        Ok(()) => app.orders.mark_published(&order.id),
        // The order is stored: it is accepted, and the relay publishes its
        // event once the bus is back. (Forgetting it instead would be wrong
        // too: the event may have been stored before the error.)
        Err(e) => {
            tracing::warn!(order_id = %order.id, error = %e, "order.created not published; the relay will");
        }
    }
    if repeat {
        tracing::info!(order_id = %order.id, "order placed before; order.created published again");
    } else {
        tracing::info!(order_id = %order.id, user_id = %order.user_id, total_cents, "order placed");
    }
    let location = format!("/orders/{}", order.id);
    (
        StatusCode::CREATED,
        [(http::header::LOCATION, location)],
        Json(order),
    )
        .into_response()
}

async fn read(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    match app.orders.get(&id) {
        Some(order) => Json(order).into_response(),
        None => problem(StatusCode::NOT_FOUND, &format!("no order {id}")),
    }
}

async fn stats(State(app): State<AppState>) -> Response {
    Json(app.orders.counts()).into_response()
}

async fn on_fact(orders: Orders, ctx: Context, event: Event) -> Result<(), HandlerError> {
    let (order_id, fact) = match event.ty() {
        events::INVENTORY_RESERVED => {
            let d: InventoryReserved = event.data_as()?;
            (d.order_id, Fact::InventoryReserved)
        }
        events::PAYMENT_COMPLETED => {
            let d: PaymentCompleted = event.data_as()?;
            (d.order_id, Fact::PaymentCompleted)
        }
        events::INVENTORY_REJECTED => {
            let d: OrderRejected = event.data_as()?;
            (d.order_id, Fact::InventoryRejected(d.reason))
        }
        events::PAYMENT_FAILED => {
            let d: OrderRejected = event.data_as()?;
            (d.order_id, Fact::PaymentFailed(d.reason))
        }
        other => return Err(format!("unexpected event type {other}").into()),
    };
    let Some(steps) = orders.apply(&order_id, &fact) else {
        // Not ours (another process's orders, or a previous run on a durable bus).
        tracing::warn!(%order_id, event = event.ty(), "event for an unknown order ignored");
        return Ok(());
    };
    for step in steps {
        let ty = step.status.event_type();
        let id = format!("{order_id}/{ty}");
        match &step.reason {
            Some(reason) => {
                let data = OrderRejected {
                    order_id: order_id.clone(),
                    reason: reason.clone(),
                };
                ctx.publish(ty, id, &data).await?;
                tracing::info!(%order_id, status = ?step.status, %reason, "order {}", status_word(step.status));
            }
            None => {
                let data = OrderRef {
                    order_id: order_id.clone(),
                };
                ctx.publish(ty, id, &data).await?;
                tracing::info!(%order_id, status = ?step.status, "order {}", status_word(step.status));
            }
        }
    }
    Ok(())
}

fn status_word(status: Status) -> &'static str {
    match status {
        Status::Pending => "pending",
        Status::InventoryConfirmed => "inventory_confirmed",
        Status::PaymentConfirmed => "payment_confirmed",
        Status::Confirmed => "confirmed",
        Status::Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(orders: &Orders) -> String {
        let items = vec![Item {
            sku: "widget".into(),
            qty: 1,
        }];
        orders.create("usr_1".into(), items, 250, "req".into()).id
    }

    fn statuses(steps: &[Step]) -> Vec<Status> {
        steps.iter().map(|s| s.status).collect()
    }

    #[test]
    fn happy_path_and_redelivery() {
        let orders = Orders::default();
        let id = order(&orders);
        let s = orders.apply(&id, &Fact::InventoryReserved).unwrap();
        assert_eq!(statuses(&s), [Status::InventoryConfirmed]);
        let s = orders.apply(&id, &Fact::PaymentCompleted).unwrap();
        assert_eq!(statuses(&s), [Status::PaymentConfirmed, Status::Confirmed]);
        // Redelivery: no new step, the same steps to republish.
        let again = orders.apply(&id, &Fact::PaymentCompleted).unwrap();
        assert_eq!(again, s);
        let o = orders.get(&id).unwrap();
        assert_eq!(o.status, Status::Confirmed);
        assert_eq!(o.history.len(), 4);
    }

    #[test]
    fn payment_before_reservation_catches_up() {
        let orders = Orders::default();
        let id = order(&orders);
        let s = orders
            .apply(&id, &Fact::PaymentFailed("declined".into()))
            .unwrap();
        assert_eq!(
            statuses(&s),
            [Status::InventoryConfirmed, Status::Cancelled]
        );
        assert_eq!(s[1].reason.as_deref(), Some("declined"));
        let late = orders.apply(&id, &Fact::InventoryReserved).unwrap();
        assert!(late.is_empty());
        assert_eq!(orders.get(&id).unwrap().status, Status::Cancelled);
    }

    #[test]
    fn one_order_per_idempotency_key() {
        let orders = Orders::default();
        let items = vec![Item {
            sku: "widget".into(),
            qty: 1,
        }];
        let Created::New(first) =
            orders.create_once("k1", "usr_1".into(), items.clone(), 250, "r1".into())
        else {
            panic!("the first call creates");
        };
        let again = orders.create_once("k1", "usr_1".into(), items.clone(), 250, "r2".into());
        assert_eq!(again, Created::Existing(first.clone()));
        let other = orders.create_once("k2", "usr_1".into(), items, 250, "r3".into());
        assert!(matches!(other, Created::New(o) if o.id != first.id));
        assert_eq!(orders.all().len(), 2);
    }

    #[test]
    fn rejection_cancels_and_final_states_stay() {
        let orders = Orders::default();
        let id = order(&orders);
        orders.apply(&id, &Fact::InventoryRejected("out of stock".into()));
        orders.apply(&id, &Fact::PaymentCompleted);
        assert_eq!(orders.get(&id).unwrap().status, Status::Cancelled);
        assert!(
            orders
                .apply("ord_unknown", &Fact::InventoryReserved)
                .is_none()
        );
    }
}
