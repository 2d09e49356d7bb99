//! The example services of `examples/` take part in the demo shop's flow, run
//! as the README says (`node index.js`, `PYTHONPATH=.pydeps python3
//! service.py`) against the shop on free ports; only `GATEWAY_ADMIN` points
//! them at this shop's admin listener instead of 127.0.0.1:9900. An order
//! placed through the gateway reaches the Node.js notification-service as
//! `order.confirmed` and the Python receipt-service as `payment.completed`,
//! each with the order's correlation id, and each answers on the bus with its
//! own event (`notification.sent`, `receipt.issued`) under the same id.
//!
//! `.ci/run` installs the SDKs (`npm ci` in examples/node-service, `pip
//! install --target examples/python-service/.pydeps`); without node, python3
//! or an SDK this test skips with a reason unless SWITCHBOARD_REQUIRE_SERVERS is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::Api;
use serde_json::Value;
use switchboard_bus::{Bus, Event, HandlerError, SubscribeOptions, Subscription};
use switchboard_shop::{DemoOptions, events, run};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(30);

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// Whether `program args` runs and exits 0 (with `env`).
fn works(program: &str, args: &[&str], env: &[(&str, &Path)]) -> bool {
    let mut c = std::process::Command::new(program);
    c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.status().is_ok_and(|s| s.success())
}

/// Why the examples cannot run here, if they cannot.
fn missing() -> Option<&'static str> {
    let pydeps = examples().join("python-service/.pydeps");
    if !works("node", &["--version"], &[]) {
        return Some("node is not installed");
    }
    if !examples()
        .join("node-service/node_modules/cloudevents/package.json")
        .exists()
    {
        return Some("the npm cloudevents SDK is not installed (npm ci in examples/node-service)");
    }
    if !works("python3", &["--version"], &[]) {
        return Some("python3 is not installed");
    }
    if !works(
        "python3",
        &["-c", "import cloudevents.core.bindings.http"],
        &[("PYTHONPATH", &pydeps)],
    ) {
        return Some(
            "the PyPI cloudevents SDK is not installed (pip install --target examples/python-service/.pydeps -r examples/python-service/requirements.txt)",
        );
    }
    None
}

/// A running example service and the lines it prints.
struct Example {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Example {
    fn spawn(mut command: tokio::process::Command, admin: &str, name: &'static str) -> Example {
        let mut child = command
            .env("GATEWAY_ADMIN", admin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[{name}] {line}");
                let _ = tx.send(line);
            }
        });
        Example { child, lines }
    }

    /// The first printed line containing every one of `parts`.
    async fn line_with(&mut self, parts: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no line with {parts:?} within {PATIENCE:?}"))
                .unwrap_or_else(|| panic!("the example exited before printing {parts:?}"));
            if parts.iter().all(|p| line.contains(p)) {
                return line;
            }
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Every event of `topic`, as group `examples-tap`.
async fn tap(bus: &Bus, topic: &str) -> (Subscription, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sub = bus
        .subscribe(
            topic,
            "examples-tap",
            move |e: Event| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(e);
                    Ok::<_, HandlerError>(())
                }
            },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    (sub, rx)
}

/// The first event on `rx` about `order` (its data's `order_id`).
async fn about(rx: &mut mpsc::UnboundedReceiver<Event>, order: &str) -> (Event, Value) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no event about {order} within {PATIENCE:?}"))
            .unwrap();
        let data: Value = e.data_as().unwrap();
        if data["order_id"] == order {
            return (e, data);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_python_examples_take_part_in_the_shop_flow() {
    if let Some(reason) = missing() {
        assert!(
            !switchboard_testkit::require_servers(),
            "SWITCHBOARD_REQUIRE_SERVERS is set but {reason}"
        );
        eprintln!("skipping the examples test: {reason}");
        return;
    }
    let shop = run(DemoOptions::for_tests()).await.unwrap();
    let admin = format!("http://{}", shop.admin_addr().unwrap());
    let (taps, mut rxs): (Vec<_>, Vec<_>) = observe(shop.bus()).await.into_iter().unzip();
    let [confirmed, paid, sent, receipts] = &mut rxs[..] else {
        unreachable!()
    };

    // As the README runs them, with the admin address of this shop.
    let dir = examples();
    let mut node = tokio::process::Command::new("node");
    node.arg("index.js").current_dir(dir.join("node-service"));
    let mut node = Example::spawn(node, &admin, "notification-service");
    let mut python = tokio::process::Command::new("python3");
    python
        .arg("service.py")
        .current_dir(dir.join("python-service"))
        .env("PYTHONPATH", ".pydeps");
    let mut python = Example::spawn(python, &admin, "receipt-service");
    node.line_with(&["subscribed to order.confirmed"]).await;
    python.line_with(&["subscribed to payment.completed"]).await;

    let api = Api::new(shop.gateway_addr().unwrap());
    let user = api.create_user().await;
    let rid = "examples-corr-7";
    let order = api.place_order(&user, 1, &[("x-request-id", rid)]).await;
    let id = order["id"].as_str().unwrap();
    let done = api.wait_final(id, PATIENCE).await;
    assert_eq!(done["status"], "confirmed", "{done}");
    let (order_confirmed, _) = about(confirmed, id).await;
    let (payment_completed, payment) = about(paid, id).await;
    assert_eq!(order_confirmed.correlation_id(), Some(rid));
    assert_eq!(payment_completed.correlation_id(), Some(rid));

    // Node.js received order.confirmed for this order (parsed with its SDK,
    // correlation intact) and published notification.sent about it.
    let line = node.line_with(&[&format!("order {id} confirmed")]).await;
    assert!(
        line.contains(&format!(
            "(event {}, correlation {rid})",
            order_confirmed.id()
        )),
        "{line}"
    );
    let (notification, data) = about(sent, id).await;
    assert_eq!(notification.source(), "/notification-service");
    assert_eq!(notification.correlation_id(), Some(rid));
    assert_eq!(data["about"], order_confirmed.id(), "{data}");

    // Python received payment.completed and published receipt.issued.
    let line = python
        .line_with(&[&format!("for order {id}"), &format!("correlation {rid}")])
        .await;
    assert!(
        line.contains(&format!(
            "payment {}",
            payment["payment_id"].as_str().unwrap()
        )),
        "{line}"
    );
    let (receipt, data) = about(receipts, id).await;
    assert_eq!(receipt.source(), "/receipt-service");
    assert_eq!(receipt.correlation_id(), Some(rid));
    assert_eq!(data["receipt_for"], payment_completed.id(), "{data}");
    assert_eq!(data["amount_cents"], payment["amount_cents"], "{data}");

    // Both deliveries were acked by the bridge.
    let http = reqwest::Client::new();
    for name in ["notification-service", "receipt-service"] {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let sub: Value = http
                .get(format!("{admin}/v1/subscriptions/{name}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if sub["stats"]["acked"] == 1 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name}: {sub}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    node.stop().await;
    python.stop().await;
    for t in taps {
        t.shutdown().await;
    }
    shop.shutdown().await;
}

/// Taps on what the examples receive and what they publish.
async fn observe(bus: &Bus) -> Vec<(Subscription, mpsc::UnboundedReceiver<Event>)> {
    let mut taps = Vec::new();
    for topic in [
        events::ORDER_CONFIRMED,
        events::PAYMENT_COMPLETED,
        "notification.sent",
        "receipt.issued",
    ] {
        taps.push(tap(bus, topic).await);
    }
    taps
}
