//! `switchboard gateway --config FILE`: runs the gateway with its registry
//! until Ctrl-C or SIGTERM, then drains in-flight requests and exits 0.
//! `SIGHUP`, an edit of the file, or `POST /v1/reload` on the admin listener
//! reloads routes, services and policies without dropping a connection.

use std::path::PathBuf;

use anyhow::Context as _;
use switchboard_gateway::Config;

/// Arguments of `switchboard gateway`.
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// The gateway config (TOML); check it with `switchboard check`.
    #[arg(long)]
    config: PathBuf,
}

/// Runs until a shutdown signal.
pub fn run(args: &GatewayArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    // The proxy has its own worker threads; this runtime carries discovery,
    // health checks and the admin API.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gateway-control")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime
        .block_on(switchboard_gateway::run_file(
            &args.config,
            config,
            shutdown_signal(),
        ))
        .context("running the gateway")
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
