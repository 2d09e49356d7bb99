//! The shop's event types and payloads: the contract between its services.
//!
//! Every event is a CloudEvent whose `type` is one of the constants below and
//! whose `data` is the matching payload, as JSON.

use serde::{Deserialize, Serialize};

/// orders -> inventory: an order was placed ([`OrderCreated`]).
pub const ORDER_CREATED: &str = "order.created";
/// inventory -> orders, payments: stock was reserved ([`InventoryReserved`]).
pub const INVENTORY_RESERVED: &str = "inventory.reserved";
/// inventory -> orders: not enough stock ([`OrderRejected`]).
pub const INVENTORY_REJECTED: &str = "inventory.rejected";
/// inventory: a reservation was given back after a failed payment ([`OrderRef`]).
pub const INVENTORY_RELEASED: &str = "inventory.released";
/// payments -> orders: the payment went through ([`PaymentCompleted`]).
pub const PAYMENT_COMPLETED: &str = "payment.completed";
/// payments -> orders, inventory: the payment failed ([`OrderRejected`]).
pub const PAYMENT_FAILED: &str = "payment.failed";
/// orders: the order's stock is reserved ([`OrderRef`]).
pub const ORDER_INVENTORY_CONFIRMED: &str = "order.inventory_confirmed";
/// orders: the order is paid ([`OrderRef`]).
pub const ORDER_PAYMENT_CONFIRMED: &str = "order.payment_confirmed";
/// orders: the order is confirmed, the happy end ([`OrderRef`]).
pub const ORDER_CONFIRMED: &str = "order.confirmed";
/// orders: the order is cancelled, the unhappy end ([`OrderRejected`]).
pub const ORDER_CANCELLED: &str = "order.cancelled";

/// Every event type the shop publishes, in flow order.
pub const ALL: [&str; 10] = [
    ORDER_CREATED,
    INVENTORY_RESERVED,
    INVENTORY_REJECTED,
    INVENTORY_RELEASED,
    PAYMENT_COMPLETED,
    PAYMENT_FAILED,
    ORDER_INVENTORY_CONFIRMED,
    ORDER_PAYMENT_CONFIRMED,
    ORDER_CONFIRMED,
    ORDER_CANCELLED,
];

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Stock keeping unit, e.g. `widget`.
    pub sku: String,
    /// How many, at least 1.
    pub qty: u32,
}

/// `order.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub user_id: String,
    /// What.
    pub items: Vec<Item>,
    /// Total price in cents.
    pub total_cents: u64,
}

/// `inventory.reserved`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    /// The order.
    pub order_id: String,
    /// The reserved lines.
    pub items: Vec<Item>,
    /// Amount to charge, in cents.
    pub total_cents: u64,
}

/// `payment.completed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCompleted {
    /// The order.
    pub order_id: String,
    /// The payment.
    pub payment_id: String,
    /// Amount charged, in cents.
    pub amount_cents: u64,
}

/// `inventory.rejected`, `payment.failed`, `order.cancelled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRejected {
    /// The order.
    pub order_id: String,
    /// Why, for people.
    pub reason: String,
}

/// Events that only name their order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRef {
    /// The order.
    pub order_id: String,
}
