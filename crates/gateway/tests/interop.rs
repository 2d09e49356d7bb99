//! Interop with the official CloudEvents SDKs: the example services in
//! `examples/` (npm `cloudevents`, PyPI `cloudevents`) run against a gateway
//! with the bridge and the registry. Each registers itself and a push
//! subscription over HTTP, parses the event the bridge pushes (binary mode)
//! with its SDK, and publishes a follow-up event with its SDK (Node: binary
//! mode, Python: structured mode), which must arrive on the bus with the
//! correlation id of the first.
//!
//! `.ci/run` installs the SDKs (`npm ci` in examples/node-service, `pip
//! install --target examples/python-service/.pydeps`); without node, python3
//! or the SDK these tests skip with a reason unless SWITCHBOARD_REQUIRE_SERVERS is set.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_bus::{Bus, Event, HandlerError, SubscribeOptions};
use switchboard_gateway::Config;
use tokio::sync::mpsc;

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

fn skip(reason: &str) {
    assert!(
        !switchboard_testkit::require_servers(),
        "SWITCHBOARD_REQUIRE_SERVERS is set but {reason}"
    );
    eprintln!("skipping SDK interop test: {reason}");
}

/// Runs one example service against a fresh gateway: publishes `in_type`
/// (binary mode, with a correlation id) and returns the follow-up event of
/// `out_type` the service published with its SDK.
async fn round_trip(
    mut command: tokio::process::Command,
    service: &str,
    in_type: &str,
    data: Value,
    out_type: &str,
) -> (Event, Value) {
    let bus_url = format!("memory://interop-{service}-{}", std::process::id());
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 1\naccess_log = false\n\n[bridge]\nbus = \"{bus_url}\"\n"
    );
    let config = Config::parse("interop.toml".as_ref(), &text).unwrap();
    let running = switchboard_gateway::start(config).await.unwrap();
    let admin = format!("http://{}", running.gateway.admin());

    let bus = Bus::open(&bus_url).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tap = bus
        .subscribe(
            out_type,
            "interop-tap",
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

    let mut child = command
        .env("GATEWAY_ADMIN", &admin)
        .env("PORT", "0")
        .env("INSTANCE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the example service");

    // Wait for its subscription (it registers the instance first).
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = http
            .get(format!("{admin}/v1/subscriptions/{service}"))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the {service} example exited early: {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} did not register its subscription"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let r = http
        .post(format!("{admin}/v1/events"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "interop-in-1")
        .header("ce-source", "/interop-test")
        .header("ce-type", in_type)
        .header("ce-correlationid", "interop-corr-1")
        .header("content-type", "application/json")
        .body(data.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());

    let out = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {out_type} from {service} within 20 s"))
        .unwrap();
    // The follow-up can arrive before the bridge has seen the 2xx: wait for the ack.
    let mut sub = Value::Null;
    for _ in 0..100 {
        sub = http
            .get(format!("{admin}/v1/subscriptions/{service}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if sub["stats"]["acked"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    tap.shutdown().await;
    running.shutdown().await;
    (out, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sdk_parses_pushed_events_and_publishes() {
    let dir = examples().join("node-service");
    if !works("node", &["--version"], &[]) {
        return skip("node is not installed");
    }
    if !dir.join("node_modules/cloudevents/package.json").exists() {
        return skip("the npm cloudevents SDK is not installed (npm ci in examples/node-service)");
    }
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("index.js").current_dir(&dir);
    let (out, sub) = round_trip(
        cmd,
        "notification-service",
        "order.confirmed",
        json!({"order_id": "o-42"}),
        "notification.sent",
    )
    .await;
    assert_eq!(out.source(), "/notification-service");
    assert_eq!(out.correlation_id(), Some("interop-corr-1"));
    let data: Value = out.data_as().unwrap();
    assert_eq!(data["order_id"], "o-42", "{data}");
    assert_eq!(data["about"], "interop-in-1", "{data}");
    assert_eq!(sub["stats"]["acked"], 1, "{sub}");
    assert_eq!(sub["origin"], "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_parses_pushed_events_and_publishes() {
    let dir = examples().join("python-service");
    let deps = dir.join(".pydeps");
    if !works("python3", &["--version"], &[]) {
        return skip("python3 is not installed");
    }
    if !works(
        "python3",
        &["-c", "import cloudevents.core.bindings.http"],
        &[("PYTHONPATH", &deps)],
    ) {
        return skip(
            "the PyPI cloudevents SDK is not installed (pip install --target examples/python-service/.pydeps -r examples/python-service/requirements.txt)",
        );
    }
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg("service.py")
        .current_dir(&dir)
        .env("PYTHONPATH", &deps);
    let (out, sub) = round_trip(
        cmd,
        "receipt-service",
        "payment.completed",
        json!({"order_id": "o-7", "payment_id": "p-1", "amount_cents": 1999}),
        "receipt.issued",
    )
    .await;
    assert_eq!(out.source(), "/receipt-service");
    assert_eq!(out.correlation_id(), Some("interop-corr-1"));
    let data: Value = out.data_as().unwrap();
    assert_eq!(
        (
            &data["order_id"],
            &data["payment_id"],
            &data["amount_cents"]
        ),
        (&json!("o-7"), &json!("p-1"), &json!(1999)),
        "{data}"
    );
    assert_eq!(data["receipt_for"], "interop-in-1", "{data}");
    assert_eq!(sub["stats"]["acked"], 1, "{sub}");
}
