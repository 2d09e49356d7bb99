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

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`).
pub(crate) fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is parenthesized and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((utime + stime) / 100.0)
}
