//! `switchboard bench ...`: built-in benchmarks, one file each.

mod breaker;
mod bridge;
mod bus;
mod chaos;
mod gateway;

use clap::Subcommand;

/// Which benchmark to run.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// HTTP event bridge: events/s published over HTTP and pushed to a local subscriber, end to end.
    Bridge(bridge::BridgeArgs),
    /// Circuit breaker: ns per call on the closed and open paths, one and two threads.
    Breaker(breaker::BreakerArgs),
    /// Event bus: end-to-end events/s (publish -> handled -> acked) and publish p50/p99.
    Bus(bus::BusArgs),
    /// Gateway: requests/s and p50/p99 through the proxy, in one process (see bench/gateway.sh for nginx/HAProxy).
    Gateway(gateway::GatewayArgs),
    /// Fault injection under load: `chaos gateway` (upstreams killed, black-holed, slow,
    /// resetting), `chaos bus` (redis-server kill -9, consumers killed, a poison event),
    /// `chaos registry` (two registries on one Redis, flapping instances, kills) and
    /// `chaos shop` (the demo shop soaked under instance and redis-server kills).
    Chaos(chaos::ChaosArgs),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Breaker(args) => breaker::run(&args),
        BenchCommand::Bridge(args) => bridge::run(&args),
        BenchCommand::Bus(args) => bus::run(args),
        BenchCommand::Gateway(args) => gateway::run(&args),
        BenchCommand::Chaos(args) => chaos::run(args),
    }
}
