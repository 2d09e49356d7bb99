//! `switchboard registry`: a standalone registry server (the HTTP API of
//! `switchboard_registry::http`, plus `/health`, `/ready`, `/metrics`, `/openapi.json`).

use std::net::SocketAddr;

use anyhow::Context as _;
use switchboard_registry::http::{self, HttpOptions};
use switchboard_registry::{Registry, RegistryOptions};

/// Arguments of `switchboard registry`.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Address to listen on; a non-loopback address requires --token.
    #[arg(long, default_value = "127.0.0.1:9900")]
    listen: SocketAddr,
    /// Store URL: memory:// or redis://HOST:PORT (shared by several registry processes).
    #[arg(long, default_value = "memory://", env = "SWITCHBOARD_STORE")]
    store: String,
    /// Bearer token required on writes (PUT, DELETE).
    #[arg(long, env = "SWITCHBOARD_REGISTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Runs the server until Ctrl-C.
pub fn run(args: RegistryArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: RegistryArgs) -> anyhow::Result<()> {
    let mut opts = HttpOptions::default();
    if let Some(token) = args.token.filter(|t| !t.is_empty()) {
        opts = opts.token(token);
    }
    let listener = http::bind(args.listen, &opts)
        .await
        .context("starting the registry server")?;
    let registry = Registry::open(&args.store, RegistryOptions::default())
        .await
        .with_context(|| format!("opening the store {}", args.store))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%addr, store = registry.store_kind(), "registry listening");
    println!(
        "switchboard registry listening on http://{addr} (store {})",
        args.store
    );
    http::serve(listener, registry.clone(), opts, shutdown_signal())
        .await
        .context("serving the registry")?;
    registry.shutdown().await;
    Ok(())
}

/// Ctrl-C or SIGTERM (what `kill` and container runtimes send).
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
