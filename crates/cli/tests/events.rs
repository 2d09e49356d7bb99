//! `switchboard events publish|tail` against a real redis-server started by
//! the testkit on a free port: publish exits 0 once the backend accepted the
//! event, and `tail --group` reads as a durable consumer group that resumes
//! where the previous run stopped.
//!
//! Not yet on NATS: there a second `tail --group G --count 1` run hung in 6
//! of 20 tries, as if the first run had acknowledged an event it never
//! printed (likely one fetched ahead and handled during shutdown); open in
//! issue 5.

use std::time::Duration;

use switchboard_testkit::{Persistence, RedisServer};
use tokio::process::Command;

const PATIENCE: Duration = Duration::from_secs(30);

/// Runs the binary with `args` and returns its stdout; panics (naming the
/// command and its stderr) on a non-zero exit or after `PATIENCE`.
async fn switchboard(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        PATIENCE,
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(args)
            .env("SWITCHBOARD_LOG", "error")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("switchboard {args:?} did not finish within {PATIENCE:?}"))
    .expect("spawn switchboard");
    assert!(
        out.status.success(),
        "switchboard {args:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

async fn publish_then_tail_resumes(bus: &str) {
    for (id, n) in [("e-1", 1), ("e-2", 2)] {
        let data = format!("{{\"n\":{n}}}");
        switchboard(&[
            "events", "--bus", bus, "publish", "cli.test", &data, "--id", id,
        ])
        .await;
    }
    let tail = [
        "events", "--bus", bus, "tail", "--group", "g1", "--count", "1", "cli.test",
    ];
    let first = switchboard(&tail).await;
    assert!(
        first.contains("cli.test") && first.contains("e-1"),
        "first tail printed {first:?}"
    );
    assert!(first.contains("\"n\":1"), "first tail printed {first:?}");
    // The group acked e-1, so a second run of the same group resumes at e-2.
    let second = switchboard(&tail).await;
    assert!(
        second.contains("e-2") && !second.contains("e-1"),
        "second tail printed {second:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_tail_on_redis_streams() {
    let Some(redis) = RedisServer::start(Persistence::None) else {
        return;
    };
    publish_then_tail_resumes(&redis.url()).await;
}
