//! Runs the gateway from a config file until Ctrl-C, like `switchboard gateway`
//! (without the CLI's other commands): `cargo run --release --example serve -- FILE`.

#![allow(clippy::print_stderr)]

// A faster allocator than glibc's for the proxy's many small, short-lived
// allocations (as the `switchboard` binary uses).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: serve CONFIG.toml");
        return std::process::ExitCode::from(2);
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHBOARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config = match switchboard_gateway::Config::load(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(switchboard_gateway::run(config, async {
        let _ = tokio::signal::ctrl_c().await;
    })) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
