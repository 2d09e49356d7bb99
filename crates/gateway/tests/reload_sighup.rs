//! `SIGHUP` reloads the config (its own test binary: the signal reaches every
//! watcher in the process).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::Backend;
use switchboard_gateway::Config;

fn config_text(alpha: &Backend, beta: &Backend, routes: &str) -> String {
    format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
workers = 2
access_log = false

[[services]]
name = "alpha"
instances = ["{}"]

[[services]]
name = "beta"
instances = ["{}"]
{routes}"#,
        alpha.addr, beta.addr
    )
}

const TO_ALPHA: &str = "\n[[routes]]\nprefix = \"/api\"\nservice = \"alpha\"\n";
const TO_BETA: &str = "\n[[routes]]\nprefix = \"/api\"\nservice = \"beta\"\n";

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_listener_changes_are_kept() {
    // Install the process's SIGHUP handler before any signal is sent (the
    // default action would end the test process).
    let mut own = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    let alpha = Backend::start("alpha").await;
    let beta = Backend::start("beta").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    write(&path, &config_text(&alpha, &beta, TO_ALPHA));
    let running = switchboard_gateway::start(Config::load(&path).unwrap())
        .await
        .unwrap();
    let listen = running.gateway.listen();
    // Polling once an hour: only SIGHUP can trigger this reload.
    let reloader = Arc::clone(running.gateway.reloader());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        reloader.watch(path.clone(), Duration::from_secs(3600), async move {
            let _ = stop_rx.await;
        }),
    );
    // A listener change cannot apply without a restart: the running one stays.
    let text = config_text(&alpha, &beta, TO_BETA)
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    write(&path, &text);
    let client = support::client();
    let pid = std::process::id().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let v: Value = client
            .get(format!("http://{listen}/api/x"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["instance"] == "beta" {
            break;
        }
        assert_eq!(v["instance"], "alpha");
        assert!(Instant::now() < deadline, "SIGHUP never reloaded");
    }
    let _ = own.recv().await;
    let cfg = running.gateway.reloader().config().await;
    assert_eq!(cfg.gateway.listen.port(), 0, "the listener needs a restart");
    let _ = stop_tx.send(());
    running.shutdown().await;
}
