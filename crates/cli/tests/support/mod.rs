//! What the CLI's integration tests share: running the built binary.

use std::time::Duration;

use tokio::process::Command;

/// How long one run of the binary may take.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Runs the binary with `args` and returns its stdout; panics (naming the
/// command and its stderr) on a non-zero exit or after `PATIENCE`.
pub async fn switchboard(args: &[&str]) -> String {
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
