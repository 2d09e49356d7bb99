//! End to end through the gateway, on real sockets: orders confirm, cancel with
//! compensation, honour Idempotency-Key, and carry the client's request id.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{Api, statuses};
use serde_json::json;
use switchboard_bus::{Event, HandlerError, SubscribeOptions};
use switchboard_shop::{DemoOptions, events, run};

/// Every log line of this test binary, for the correlation test.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .try_init();
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_confirms_within_two_seconds() {
    let shop = run(DemoOptions::for_tests()).await.unwrap();
    let api = Api::new(shop.gateway_addr().unwrap());
    let user = api.create_user().await;
    let order = api.place_order(&user, 2, &[]).await;
    assert_eq!(order["status"], "pending");
    assert_eq!(order["total_cents"], 500);
    let id = order["id"].as_str().unwrap();
    let done = api.wait_final(id, Duration::from_secs(2)).await;
    assert_eq!(done["status"], "confirmed", "{done}");
    assert_eq!(
        statuses(&done),
        [
            "pending",
            "inventory_confirmed",
            "payment_confirmed",
            "confirmed"
        ]
    );
    let (_, widget) = api.get("/inventory/widget").await;
    assert_eq!(widget, json!({"available": 998, "reserved": 2}));
    let (status, payment) = api.get(&format!("/payments/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(payment["status"], "completed");
    assert_eq!(payment["amount_cents"], 500);
    // Unknown users and SKUs are refused before anything is published.
    let body = json!({"user_id": "usr_nobody", "items": [{"sku": "widget", "qty": 1}]});
    assert_eq!(api.post("/orders", &body, &[]).await.0, 422);
    let body = json!({"user_id": user, "items": [{"sku": "unobtainium", "qty": 1}]});
    assert_eq!(api.post("/orders", &body, &[]).await.0, 422);
    shop.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_payments_cancel_the_order_and_give_the_stock_back() {
    let shop = run(DemoOptions::for_tests()).await.unwrap();
    let api = Api::new(shop.gateway_addr().unwrap());
    let user = api.create_user().await;
    let (status, faults) = api
        .post("/payments/admin/faults", &json!({"fail": true}), &[])
        .await;
    assert_eq!(status, 200, "{faults}");
    let order = api.place_order(&user, 3, &[]).await;
    let id = order["id"].as_str().unwrap();
    let done = api.wait_final(id, Duration::from_secs(2)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(
        statuses(&done),
        ["pending", "inventory_confirmed", "cancelled"]
    );
    assert_eq!(
        done["history"][2]["reason"],
        "card declined (injected fault)"
    );
    // The compensation runs after the cancellation is visible: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let (_, widget) = api.get("/inventory/widget").await;
        if widget == json!({"available": 1000, "reserved": 0}) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stock not given back: {widget}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The payments routes fail too; the gateway's breaker opens and answers 503.
    let mut codes = Vec::new();
    for _ in 0..30 {
        codes.push(api.get(&format!("/payments/{id}")).await.0);
    }
    assert!(codes.contains(&500), "{codes:?}");
    assert_eq!(*codes.last().unwrap(), 503, "{codes:?}");
    // Healing payments makes new orders confirm again.
    let (status, _) = api.post("/payments/admin/faults", &json!({}), &[]).await;
    assert_eq!(status, 200);
    let order = api.place_order(&user, 1, &[]).await;
    let done = api
        .wait_final(order["id"].as_str().unwrap(), Duration::from_secs(2))
        .await;
    assert_eq!(done["status"], "confirmed", "{done}");
    shop.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_twice_creates_one_order() {
    let shop = run(DemoOptions::for_tests()).await.unwrap();
    let api = Api::new(shop.gateway_addr().unwrap());
    let user = api.create_user().await;
    let key = [("idempotency-key", "order-once")];
    let first = api.place_order(&user, 1, &key).await;
    let mut ids = vec![first["id"].clone()];
    for _ in 0..5 {
        ids.push(api.place_order(&user, 1, &key).await["id"].clone());
    }
    assert!(ids.iter().all(|id| *id == first["id"]), "{ids:?}");
    api.wait_final(first["id"].as_str().unwrap(), Duration::from_secs(2))
        .await;
    let (_, stats) = api.get("/orders/stats").await;
    assert_eq!(stats, json!({"confirmed": 1}));
    let (_, widget) = api.get("/inventory/widget").await;
    assert_eq!(widget["reserved"], 1);
    // The same key with another body is refused.
    let body = json!({"user_id": user, "items": [{"sku": "gadget", "qty": 1}]});
    assert_eq!(api.post("/orders", &body, &key).await.0, 422);
    shop.shutdown().await;
}

/// Regression (found by the shop soak): an orders instance killed after it
/// stored an order but before it answered left the key forgotten by the key
/// layer; the gateway's retry with the key placed a second order (two
/// charges), and an order stored but never published stayed `pending`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_after_a_killed_first_attempt_gets_the_same_order() {
    let shop = run(DemoOptions::for_tests()).await.unwrap();
    let api = Api::new(shop.gateway_addr().unwrap());
    let user = api.create_user().await;
    // What the killed attempt left: the order stored, nothing published,
    // no answer stored by the key layer.
    let items = vec![events::Item {
        sku: "widget".into(),
        qty: 1,
    }];
    let switchboard_shop::orders::Created::New(first) =
        shop.data()
            .orders
            .create_once("killed-once", user.clone(), items, 250, "req-1".into())
    else {
        panic!("a new key creates an order");
    };
    let key = [("idempotency-key", "killed-once")];
    let repeat = api.place_order(&user, 1, &key).await;
    assert_eq!(repeat["id"], first.id.as_str(), "{repeat}");
    // Published again: the order ends instead of staying pending.
    let done = api.wait_final(&first.id, Duration::from_secs(2)).await;
    assert_eq!(done["status"], "confirmed", "{done}");
    let (_, stats) = api.get("/orders/stats").await;
    assert_eq!(stats, json!({"confirmed": 1}), "one order, one charge");
    assert_eq!(shop.data().payments.len(), 1);
    // The same key with another body is still refused.
    let body = json!({"user_id": user, "items": [{"sku": "widget", "qty": 2}]});
    assert_eq!(api.post("/orders", &body, &key).await.0, 422);
    shop.shutdown().await;
}

/// Regression (found by the shop soak): an order stored by an instance killed
/// before it published `order.created` stayed `pending` for ever; the outbox
/// relay now publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_stored_but_not_published_is_published_by_the_relay() {
    let shop = run(DemoOptions::for_tests()).await.unwrap();
    let api = Api::new(shop.gateway_addr().unwrap());
    let user = api.create_user().await;
    let items = vec![events::Item {
        sku: "gadget".into(),
        qty: 2,
    }];
    let order = shop
        .data()
        .orders
        .create(user, items, 2400, "req-killed".into());
    let within = switchboard_shop::orders::RELAY_AFTER + Duration::from_secs(3);
    let done = api.wait_final(&order.id, within).await;
    assert_eq!(done["status"], "confirmed", "{done}");
    let (_, gadget) = api.get("/inventory/gadget").await;
    assert_eq!(gadget["reserved"], 2);
    shop.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_reaches_every_event_and_every_service_log() {
    let logs = logs();
    let shop = run(DemoOptions::for_tests()).await.unwrap();
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let mut subs = Vec::new();
    for ty in events::ALL {
        let seen = seen.clone();
        let sub = shop
            .bus()
            .subscribe(
                ty,
                "observer",
                move |e: Event| {
                    seen.lock().unwrap().push(e);
                    async { Ok::<_, HandlerError>(()) }
                },
                SubscribeOptions::default(),
            )
            .await
            .unwrap();
        subs.push(sub);
    }
    let api = Api::new(shop.gateway_addr().unwrap());
    let user = api.create_user().await;
    let rid = "trace-me-42";
    let order = api.place_order(&user, 1, &[("x-request-id", rid)]).await;
    let id = order["id"].as_str().unwrap();
    assert_eq!(order["request_id"], rid);
    api.wait_final(id, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events: Vec<Event> = seen.lock().unwrap().clone();
    let mine: Vec<&Event> = events.iter().filter(|e| e.id().starts_with(id)).collect();
    let types: Vec<&str> = mine.iter().map(|e| e.ty()).collect();
    for ty in [
        events::ORDER_CREATED,
        events::INVENTORY_RESERVED,
        events::PAYMENT_COMPLETED,
        events::ORDER_INVENTORY_CONFIRMED,
        events::ORDER_PAYMENT_CONFIRMED,
        events::ORDER_CONFIRMED,
    ] {
        assert!(types.contains(&ty), "{ty} missing from {types:?}");
    }
    let trace = mine[0].traceparent().unwrap()[3..35].to_owned();
    for e in &mine {
        assert_eq!(e.correlation_id(), Some(rid), "{}", e.ty());
        assert_eq!(
            &e.traceparent().unwrap()[3..35],
            trace,
            "one trace: {}",
            e.ty()
        );
    }
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(rid)).collect();
    for (service, message) in [
        ("user-service", "user looked up"),
        ("order-service", "order placed"),
        ("inventory-service", "stock reserved"),
        ("payment-service", "payment completed"),
        ("order-service", "order confirmed"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("service={service}")) && l.contains(message)),
            "no {service} line {message:?} with {rid}:\n{}\n---- all lines of {id}:\n{}",
            lines.join("\n"),
            text.lines()
                .filter(|l| l.contains(id))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    for s in subs {
        s.shutdown().await;
    }
    shop.shutdown().await;
}

#[tokio::test]
async fn only_needs_a_shared_store_and_bus() {
    for only in ["payments", "gateway"] {
        let options = DemoOptions {
            only: Some(only.into()),
            ..DemoOptions::for_tests()
        };
        let err = run(options).await.unwrap_err().to_string();
        assert!(err.contains("--only"), "{err}");
    }
    let options = DemoOptions {
        only: Some("shipping".into()),
        ..DemoOptions::for_tests()
    };
    let err = run(options).await.unwrap_err().to_string();
    assert!(err.contains("unknown service"), "{err}");
}
