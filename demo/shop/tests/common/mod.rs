//! Helpers shared by the shop's end-to-end tests.
#![allow(dead_code, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A JSON client for one base URL (the gateway).
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn create_user(&self) -> String {
        let (status, user) = self
            .post(
                "/users",
                &json!({"name": "Ada", "email": "ada@example.com"}),
                &[],
            )
            .await;
        assert_eq!(status, 201, "{user}");
        user["id"].as_str().unwrap().to_owned()
    }

    pub async fn place_order(&self, user: &str, qty: u32, headers: &[(&str, &str)]) -> Value {
        let body = json!({"user_id": user, "items": [{"sku": "widget", "qty": qty}]});
        let (status, order) = self.post("/orders", &body, headers).await;
        assert_eq!(status, 201, "{order}");
        order
    }

    /// Polls the order until its status is final, or panics after `within`.
    pub async fn wait_final(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (status, order) = self.get(&format!("/orders/{id}")).await;
            assert_eq!(status, 200, "{order}");
            let s = order["status"].as_str().unwrap_or_default();
            if s == "confirmed" || s == "cancelled" {
                return order;
            }
            assert!(
                Instant::now() < deadline,
                "order {id} still {s} after {within:?}: {order}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn statuses(order: &Value) -> Vec<String> {
    order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap().to_owned())
        .collect()
}
