//! `switchboard`: thin entry points over the Switchboard crates.
//!
//! # Layout
//! - `main.rs`: argument parsing and dispatch; errors print their chain, one line each.
//! - `bench.rs`: `switchboard bench ...`, the built-in benchmarks.
//! - `events.rs`: `switchboard events publish|tail|dlq`, the event bus by hand.
//! - `demo.rs`: `switchboard demo`, the shop of `switchboard-shop` with its walkthrough.
//! - `gateway.rs`, `check.rs`: `switchboard gateway` and `switchboard check` (gateway config).
//! - `registry.rs`, `services.rs`: `switchboard registry` (standalone registry server) and
//!   `switchboard services` (the table of services, instances and health).
//!
//! Each subcommand's substance lives in a library crate; the files here only wire it.

mod bench;
mod check;
mod demo;
mod events;
mod gateway;
mod registry;
mod services;

use clap::{Parser, Subcommand};

// The gateway's request path makes many small, short-lived allocations;
// mimalloc serves them markedly faster than glibc's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchboard: an API gateway, a service registry and an event bus for microservices.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Built-in benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Operates the event bus: publish, tail, dead letters.
    Events(events::EventsArgs),
    /// Runs the demo shop: gateway, registry, bus and four services, with a walkthrough.
    Demo(demo::DemoArgs),
    /// Validates a gateway config; errors name file, line, column and key.
    Check(check::CheckArgs),
    /// Runs the gateway (+ its registry) from a TOML config.
    Gateway(gateway::GatewayArgs),
    /// Runs a standalone service registry server.
    Registry(registry::RegistryArgs),
    /// Lists services, instances and health as a table.
    Services(services::ServicesArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHBOARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
        Command::Events(args) => events::run(args),
        Command::Check(args) => check::run(&args),
        Command::Demo(args) => demo::run(args),
        Command::Gateway(args) => gateway::run(&args),
        Command::Registry(args) => registry::run(args),
        Command::Services(args) => services::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
